#!/usr/bin/env bash
# Puts over many shards against one (issue 12), with the figures that explain the
# difference. For each run and each shard count in SHARDS (default "1 64"; counts
# interleaved, so that a slower minute of the machine hits both alike): a fresh 3-node
# release-build cluster from ../shared/bench/cluster.sh (ports 13371-13373, node 1 gets
# every request, as in ../shared/bench/run.sh), formed with RAFTKVD_SHARDS; once the
# groups' leaders are spread over the nodes, wrk's `put` workload of
# ../shared/bench/kv.lua (2 threads, 64 connections) for WARMUP then DURATION seconds.
# Prints per measured run: puts/s, p99, the cluster's CPU per 1,000 puts (utime + stime
# of the 3 processes), fsyncs per second (all nodes), puts per fsync on each node, and
# raft entries committed per put (below 1 when a group's entry carries several writes).
# Needs wrk, curl, python3, bc. Env: SHARDS, RUNS (default 1), DURATION (default 8),
# WARMUP (default 2), RAFTKVD (default target/release/raftkvd, built if it is the default),
# WORKDIR (default: a new /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-1 64} RUNS=${RUNS:-1} DURATION=${DURATION:-8} WARMUP=${WARMUP:-2}
if [[ -z ${RAFTKVD:-} ]]; then
  cargo build --release --quiet
  RAFTKVD=$PWD/target/release/raftkvd
fi
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-putshards.XXXXXX)}
CLUSTER=../shared/bench/cluster.sh
PORTS=(13371 13372 13373)
dir=""
trap '[[ -n $dir ]] && RAFTKVD=$RAFTKVD $CLUSTER raftkvd stop "$dir" >/dev/null 2>&1 || true' EXIT

# Sum of a metric over the three nodes.
metric() {
  local p
  for p in "${PORTS[@]}"; do
    curl -s "http://127.0.0.1:$p/metrics" | awk -v m="$1" '$1 == m {s += $2} END {printf "%d\n", s}'
  done | paste -sd+ | bc
}

# Clock ticks of CPU the three nodes used so far.
cpu_ticks() {
  local pid
  for pid in $(cat "$dir/pids"); do awk '{print $14 + $15}' "/proc/$pid/stat"; done | paste -sd+ | bc
}

# Waits (up to 60 s) until each node leads about a third of the data groups.
wait_spread() {
  local shards=$1 i
  ((shards > 1)) || return 0
  for ((i = 0; i < 60; i++)); do
    if python3 - "$shards" "${PORTS[@]}" <<'PY'
import json, sys, urllib.request
shards, ports = int(sys.argv[1]), sys.argv[2:]
groups = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v1/groups", timeout=10))["groups"]
led = [sum(1 for g in groups if g["id"] != 1 and g["leader"] == n) for n in (1, 2, 3)]
sys.exit(0 if sum(led) == shards and max(led) - min(led) <= 2 else 1)
PY
    then return 0; fi
    sleep 1
  done
  echo "leaders not spread after 60 s; measuring anyway" >&2
}

ticks_per_s=$(getconf CLK_TCK)
for ((run = 1; run <= RUNS; run++)); do
  for shards in $SHARDS; do
    dir=$WORKDIR/run$run-shards$shards
    log=$dir/wrk.log
    RAFTKVD=$RAFTKVD RAFTKVD_SHARDS=$shards $CLUSTER raftkvd start "$dir" >/dev/null
    wait_spread "$shards"
    export BENCH_SYSTEM=raftkvd BENCH_WORKLOAD=put BENCH_MODE=put BENCH_THREADS=2 \
      BENCH_CONNS=64 BENCH_NKEYS=0 BENCH_PREFIX=w$run
    wrk -t2 -c64 -d"${WARMUP}s" --timeout 5s -s ../shared/bench/kv.lua http://127.0.0.1:13371 >/dev/null
    export BENCH_PREFIX=m$run
    fsyncs0=$(metric raftkvd_log_fsync_duration_seconds_count)
    entries0=$(metric raftkvd_committed_entries_total)
    cpu0=$(cpu_ticks)
    wrk -t2 -c64 -d"${DURATION}s" --timeout 5s --latency -s ../shared/bench/kv.lua \
      http://127.0.0.1:13371 >"$log" 2>&1
    cpu1=$(cpu_ticks)
    fsyncs1=$(metric raftkvd_log_fsync_duration_seconds_count)
    entries1=$(metric raftkvd_committed_entries_total)
    RAFTKVD=$RAFTKVD $CLUSTER raftkvd stop "$dir" >/dev/null
    dir=""
    line=$(grep '^BENCH ' "$log" | sed 's/^BENCH //')
    python3 - "$line" "$shards" "$((cpu1 - cpu0))" "$ticks_per_s" "$((fsyncs1 - fsyncs0))" \
      "$((entries1 - entries0))" "$DURATION" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
shards, ticks, hz, fsyncs, entries, secs = (int(x) for x in sys.argv[2:])
n = max(r["requests"], 1)
print(f"shards={shards:<3} puts/s={r['rps']:>9,.0f}  p99={r['p99_ms']:6.2f} ms  "
      f"non2xx={r['non2xx']}  cpu/1k puts={ticks / hz * 1000 / n * 1000:6.1f} ms  "
      f"fsyncs/s={fsyncs / secs:6.0f}  puts/fsync/node={3 * n / max(fsyncs, 1):5.1f}  "
      f"entries/put={entries / 3 / n:5.3f}")
PY
  done
done
