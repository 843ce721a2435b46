#!/usr/bin/env bash
# Watchers at scale (issue 16): a 3-node release-build cluster on loopback, node 1 made
# leader. First wrk's `put` workload of ../shared/bench/kv.lua (-t2 -c64) against node 1
# alone; then WATCHERS watchers are opened on node 1 (bench/watchers.py, one key
# each: w/0, w/1, ...), node 1's RSS is read before and after, and the same wrk load runs
# again while the prober PUTs PROBE_RATE random watched keys a second and times each from
# its acknowledgement to its arrival at its watcher. Prints puts/s without and with the
# watchers, memory per watcher, and how many probes arrived and how fast.
# With LOAD=1 the watchers watch the load's own keys instead (watcher i the prefix
# k<i as 4 digits: ten of kv.lua's 100,000 keys each, so every put reaches a watcher),
# and the events they received are counted. With STREAMS=n the watchers share n watch
# streams (each stream naming its watchers' keys or prefixes; default one stream each).
# Needs wrk, curl, python3. Env: WATCHERS (10000), STREAMS, DURATION (20s),
# PROBE_RATE (200), LOAD, WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
WATCHERS=${WATCHERS:-10000} DURATION=${DURATION:-20s} PROBE_RATE=${PROBE_RATE:-200}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-watch-bench.XXXXXX)}
KV_LUA=../shared/bench/kv.lua
ulimit -n "$(ulimit -Hn)"  # each watcher is a socket on both ends
cargo build --release --quiet
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop EXIT
cluster=http://127.0.0.1:15381,http://127.0.0.1:15382,http://127.0.0.1:15383
for i in 1 2 3; do
  ./target/release/raftkvd --id $i --cluster "$cluster" --port 1537$i --data-dir "$WORKDIR/n$i" \
    --max-client-connections $((WATCHERS + 1000)) 2>"$WORKDIR/n$i.log" &
  pids+=($!)
done
url=http://127.0.0.1:15371
for _ in $(seq 1 300); do
  curl -s -XPUT "$url/ready" -d x -o /dev/null -w '%{http_code}' | grep -q 204 && break
  sleep 0.1
done
curl -s -XPOST "$url/v1/groups/1/leader" -d '{"id": 1}' -o /dev/null
rss() { awk '/VmRSS/ {print $2}' "/proc/${pids[0]}/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
put_rate() {
  export BENCH_SYSTEM=raftkvd BENCH_MODE=put BENCH_WORKLOAD=$1 BENCH_THREADS=2 BENCH_CONNS=64
  wrk -t2 -c64 -d"$DURATION" --timeout 5s --latency -s "$KV_LUA" "$url" | grep '^BENCH ' | sed 's/^BENCH //'
}
wrk -t2 -c64 -d2s -s "$KV_LUA" "$url" >/dev/null 2>&1 || true
t0=$(cpu_ticks "${pids[0]}")
alone=$(put_rate put-alone)
t1=$(cpu_ticks "${pids[0]}")
before=$(rss)
mkfifo "$WORKDIR/go"
python3 bench/watchers.py 127.0.0.1 15371 "$WATCHERS" "${DURATION%s}" "$PROBE_RATE" "$WORKDIR/ready" \
  ${LOAD:+load} \
  <"$WORKDIR/go" >"$WORKDIR/probes.json" &
pids+=($!)
exec 3>"$WORKDIR/go"
for _ in $(seq 1 1200); do [ -f "$WORKDIR/ready" ] && break; sleep 0.1; done
[ -f "$WORKDIR/ready" ] || { echo "the watchers did not all open" >&2; exit 1; }
after=$(rss)
echo go >&3
t2=$(cpu_ticks "${pids[0]}")
watched=$(put_rate put-watched)
t3=$(cpu_ticks "${pids[0]}")
wait "${pids[3]}" || true
hz=$(getconf CLK_TCK)
python3 - "$alone" "$watched" "$before" "$after" "$WATCHERS" "$WORKDIR/probes.json" \
  "$(( t1 - t0 ))" "$(( t3 - t2 ))" "$hz" <<'PY'
import json, sys
alone, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
before, after, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
probes = json.loads(open(sys.argv[6]).read())
rate = lambda r: r.get("requests_per_sec") or r.get("rps") or r.get("throughput")
print(f"puts/s without watchers: {rate(alone)} (p99 {alone['p99_ms']} ms), with {n} watchers: {rate(watched)} (p99 {watched['p99_ms']} ms): {rate(watched) / rate(alone):.3f}x")
print(f"node 1 RSS: {before // 1024} MiB before the watchers, {after // 1024} MiB with them: "
      f"{(after - before) * 1024 / n / 1024:.1f} KiB per watcher")
print("probes:", json.dumps(probes))
node_alone, node_watched, hz = (int(a) for a in sys.argv[7:10])
per_1k = lambda ticks, r: 1000 * ticks / hz * 1000 / (rate(r) * (r["duration_s"]))
print(f"node 1 CPU per 1,000 puts: {per_1k(node_alone, alone):.1f} ms alone, "
      f"{per_1k(node_watched, watched):.1f} ms with the watchers; the watchers' client "
      f"used {100 * probes['client_cpu_share']:.0f}% of a core meanwhile")
PY
echo "workdir: $WORKDIR"
