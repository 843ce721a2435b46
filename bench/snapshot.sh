#!/usr/bin/env bash
# Snapshot benchmark (issue 3): on a 3-node release-build cluster on loopback,
#  1. load KEYS keys (default 1,000,000) of 100 bytes with wrk;
#  2. restart time: kill -9 a follower, restart it, time until it has applied what the
#     leader had committed (it loads its snapshot and replays the log tail);
#  3. catch-up time: add node 4, start it with --join, time until it has applied what
#     the leader had committed (it receives and installs a snapshot);
#  4. disk use under overwrites: on a fresh cluster, OVERWRITES puts (default 200,000)
#     over 1,000 keys; the data dir sizes half-way and at the end (bounded: no growth).
# Needs wrk, curl, python3. Env: KEYS, OVERWRITES, WORKDIR (default: new /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-1000000} OVERWRITES=${OVERWRITES:-200000}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-snapbench.XXXXXX)}
cargo build --release --quiet
BIN=$PWD/target/release/raftkvd
P=(0 16381 16382 16383 16384)   # raft ports
A=(0 16371 16372 16373 16374)   # client ports
CLUSTER3=http://127.0.0.1:${P[1]},http://127.0.0.1:${P[2]},http://127.0.0.1:${P[3]}
CLUSTER4=$CLUSTER3,http://127.0.0.1:${P[4]}
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT

start() {  # start ID CLUSTER [--join]
  local id=$1 cluster=$2; shift 2
  "$BIN" --id "$id" --cluster "$cluster" --port "${A[$id]}" --data-dir "$WORKDIR/n$id" "$@" \
    >>"$WORKDIR/n$id.log" 2>&1 &
  pids[$id]=$!
}
status() { curl -sf "http://127.0.0.1:${A[$1]}/status" || echo '{}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin).get('$2', 0))" <<<"$(status "$1")"; }
leader() { field 1 leader; }
now() { date +%s.%N; }
# wait_applied ID INDEX: polls until node ID has applied INDEX (deadline 300 s).
wait_applied() {
  local deadline=$(( $(date +%s) + 300 ))
  until (( $(field "$1" applied) >= $2 )); do
    (( $(date +%s) < deadline )) || { echo "node $1 did not reach index $2" >&2; exit 1; }
    sleep 0.02
  done
}
wrk_put() {  # wrk_put NODE NKEYS TOTAL: TOTAL puts cycling over NKEYS keys, 100-byte values
  # wrk runs for its whole -d even after its threads stop: stop it once the node has
  # applied every put (the map's revision counts writes; entries carry several).
  local target=$(( $(field "$1" revision) + $3 ))
  PUT_KEYS=$2 PUT_TOTAL=$3 wrk -t2 -c64 -d3600s --timeout 10s -s bench/puts.lua "http://127.0.0.1:${A[$1]}" \
    >"$WORKDIR/wrk.log" 2>&1 &
  local wrk_pid=$!
  until (( $(field "$1" revision) >= target )); do sleep 0.2; done
  kill -INT "$wrk_pid"; wait "$wrk_pid" || true
  grep -E "requests in|Non-2xx|errors" "$WORKDIR/wrk.log" || true
}

echo "== data in $WORKDIR"
for id in 1 2 3; do start $id "$CLUSTER3"; done
until [[ $(leader) =~ ^[1-3]$ ]]; do sleep 0.1; done
L=$(leader)
echo "== loading $KEYS keys of 100 bytes through node $L"
t0=$(now); wrk_put "$L" "$KEYS" "$KEYS"; t1=$(now)
python3 -c "print(f'load: {($t1-$t0):.1f} s')"
echo "snapshot pauses (leader): $(grep -o 'loop_pause_ms: [0-9.]*' "$WORKDIR/n$L.log" | tail -3 | tr '\n' ' ')"

F=$(( L % 3 + 1 ))
echo "== restart: kill -9 node $F, restart it"
kill -9 "${pids[$F]}"; wait "${pids[$F]}" 2>/dev/null || true
target=$(field "$L" commit)
t0=$(now); start "$F" "$CLUSTER3"; wait_applied "$F" "$target"; t1=$(now)
python3 -c "print(f'restart_s: {($t1-$t0):.2f}  (applied index $target, incl. process start and snapshot load)')"

echo "== catch-up: add node 4"
curl -sf -XPOST "http://127.0.0.1:${A[$L]}/4" -d "http://127.0.0.1:${P[4]}"
target=$(field "$L" commit)
t0=$(now); start 4 "$CLUSTER4" --join; wait_applied 4 "$target"; t1=$(now)
python3 -c "print(f'catchup_s: {($t1-$t0):.2f}  (applied index $target, by snapshot transfer)')"
grep -h "snapshot sent\|installed a snapshot" "$WORKDIR"/n*.log | tail -2 || true

echo "== overwrite: a fresh 3-node cluster, $OVERWRITES puts over 1000 keys"
for id in 1 2 3 4; do kill "${pids[$id]}" 2>/dev/null || true; done
wait 2>/dev/null || true
for id in 1 2 3; do
  "$BIN" --id "$id" --cluster "$CLUSTER3" --port "${A[$id]}" --data-dir "$WORKDIR/ow$id" \
    >>"$WORKDIR/ow$id.log" 2>&1 &
  pids[$id]=$!
done
until [[ $(leader) =~ ^[1-3]$ ]]; do sleep 0.1; done
L=$(leader)
wrk_put "$L" 1000 "$((OVERWRITES / 2))"
du -sh "$WORKDIR"/ow1 "$WORKDIR"/ow2 "$WORKDIR"/ow3 | sed 's/^/half-way: /'
wrk_put "$L" 1000 "$((OVERWRITES / 2))"
sleep 1   # let the last snapshot and log purge settle before measuring
du -sh "$WORKDIR"/ow1 "$WORKDIR"/ow2 "$WORKDIR"/ow3 | sed 's/^/at the end: /'
