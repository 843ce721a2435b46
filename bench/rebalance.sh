#!/usr/bin/env bash
# Rebalancing benchmark (issue 12): a 3-node release-build cluster on loopback formed
# with --shards SHARDS (default 8, 3 replicas each, so every node hosts every group) is
# loaded with KEYS keys (default 100,000) of 100 bytes by wrk; then node 4 joins
# (POST /4, start with --join) and the cluster group's leader moves replicas onto it.
# Prints the seconds from node 4's start until every node hosts the mean number of
# replicas (SHARDS * 3 / 4) give or take one, and what node 4 then holds.
# Needs wrk, curl, python3. Env: SHARDS, KEYS, WORKDIR (default: new /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-8} KEYS=${KEYS:-100000}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-rebalancebench.XXXXXX)}
cargo build --release --quiet
BIN=$PWD/target/release/raftkvd
P=(0 16581 16582 16583 16584)   # raft ports
A=(0 16571 16572 16573 16574)   # client ports
CLUSTER3=http://127.0.0.1:${P[1]},http://127.0.0.1:${P[2]},http://127.0.0.1:${P[3]}
CLUSTER4=$CLUSTER3,http://127.0.0.1:${P[4]}
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT
start() {  # start ID CLUSTER [flags]
  local id=$1 cluster=$2; shift 2
  "$BIN" --id "$id" --cluster "$cluster" --port "${A[$id]}" --data-dir "$WORKDIR/n$id" "$@" \
    >>"$WORKDIR/n$id.log" 2>&1 &
  pids[$id]=$!
}
now() { date +%s.%N; }
# keys_on ID: keys in the data groups that node ID hosts.
keys_on() {
  curl -sf "http://127.0.0.1:${A[$1]}/status" |
    python3 -c "import json,sys; print(sum(g['keys'] for g in json.load(sys.stdin)['groups'] if g['id'] != 1))"
}
# balanced: every node hosts SHARDS*3/4 replicas and every group has 3 members.
balanced() {
  curl -sf "http://127.0.0.1:${A[1]}/v1/groups" | python3 -c "
import json, sys
groups = [g for g in json.load(sys.stdin)['groups'] if g['id'] != 1]
load = {n: 0 for n in (1, 2, 3, 4)}
for g in groups:
    for m in g['members']:
        load[m] += 1
want = len(groups) * 3 // 4
sys.exit(0 if all(len(g['members']) == 3 for g in groups) and all(abs(n - want) <= 1 for n in load.values()) else 1)"
}

echo "== data in $WORKDIR"
for id in 1 2 3; do start "$id" "$CLUSTER3" --shards "$SHARDS"; done
until curl -sf -XPUT "http://127.0.0.1:${A[1]}/warmup" -d x >/dev/null; do sleep 0.2; done
# Every data group must have a leader before the load: wrk counts a 503 as done.
until curl -sf "http://127.0.0.1:${A[1]}/v1/groups" | python3 -c "
import json, sys
sys.exit(0 if all(g['leader'] for g in json.load(sys.stdin)['groups']) else 1)"; do sleep 0.2; done
echo "== loading $KEYS keys of 100 bytes through node 1"
t0=$(now)
PUT_KEYS=$KEYS PUT_TOTAL=$KEYS wrk -t2 -c64 -d3600s --timeout 10s -s bench/puts.lua \
  "http://127.0.0.1:${A[1]}" >"$WORKDIR/wrk.log" 2>&1 &
wrk_pid=$!
# Until every key is in, or no key came in for 5 s (a put refused with 503 while a
# group's leadership moves is not retried, so a few keys may be missing; wrk itself runs
# for its whole -d even after its threads stop).
last=-1 still=0
until (( $(keys_on 1) >= KEYS )) || (( still >= 10 )); do
  sleep 0.5
  loaded=$(keys_on 1)
  if (( loaded == last )); then still=$((still + 1)); else still=0; fi
  last=$loaded
done
kill -INT "$wrk_pid" 2>/dev/null; wait "$wrk_pid" || true
python3 -c "print(f'load: {($(now) - $t0):.1f} s, {$(keys_on 1)} keys')"

echo "== node 4 joins; replicas move onto it"
curl -sf -XPOST "http://127.0.0.1:${A[1]}/4" -d "http://127.0.0.1:${P[4]}"
t0=$(now)
start 4 "$CLUSTER4" --join
deadline=$(( $(date +%s) + 600 ))
until balanced; do
  (( $(date +%s) < deadline )) || { echo "not balanced after 600 s" >&2; exit 1; }
  sleep 0.2
done
t1=$(now)
python3 -c "print(f'rebalance_s: {($t1 - $t0):.2f}  (node 4 start until every node hosts {$SHARDS * 3 // 4} replicas, give or take one)')"
echo "node 4 holds $(keys_on 4) keys"
