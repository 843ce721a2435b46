#!/usr/bin/env bash
# Backup and restore benchmark: on 3-node release-build clusters on loopback,
#  1. load KEYS keys (default 100,000) of 100 bytes with wrk into a one-shard cluster;
#  2. time GET /v1/backup through a follower, and note the file's size;
#  3. time POST /v1/restore of that file into a fresh cluster of SHARDS shards (default 8),
#     and check that it wrote every key;
#  4. time a backup of the sharded cluster (its groups read through their hosts).
# Needs wrk, curl, python3. Env: KEYS, SHARDS, WORKDIR (default: new /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-100000} SHARDS=${SHARDS:-8}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-backupbench.XXXXXX)}
cargo build --release --quiet
BIN=$PWD/target/release/raftkvd
P=(0 16481 16482 16483)   # raft ports
A=(0 16471 16472 16473)   # client ports
CLUSTER=http://127.0.0.1:${P[1]},http://127.0.0.1:${P[2]},http://127.0.0.1:${P[3]}
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT

start_cluster() {  # start_cluster NAME [flags...]: three nodes, until one leads
  local name=$1; shift
  for id in 1 2 3; do
    "$BIN" --id "$id" --cluster "$CLUSTER" --port "${A[$id]}" --data-dir "$WORKDIR/$name-n$id" "$@" \
      >>"$WORKDIR/$name-n$id.log" 2>&1 &
    pids[$id]=$!
  done
  until [[ $(field 1 leader) =~ ^[1-3]$ ]]; do sleep 0.1; done
}
stop_cluster() {
  for id in 1 2 3; do kill "${pids[$id]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
status() { curl -sf "http://127.0.0.1:${A[$1]}/status" || echo '{}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin).get('$2', 0))" <<<"$(status "$1")"; }
now() { date +%s.%N; }
# until_ok URL...: curl until a 200 (groups may still be electing leaders).
until_ok() {
  local deadline=$(( $(date +%s) + 120 ))
  until curl -sf -o /dev/null "$@"; do
    (( $(date +%s) < deadline )) || { echo "no 200 from $*" >&2; exit 1; }
    sleep 0.2
  done
}

echo "== data in $WORKDIR"
start_cluster one
L=$(field 1 leader); F=$(( L % 3 + 1 ))
echo "== loading $KEYS keys of 100 bytes through node $L"
target=$(( $(field "$L" revision) + KEYS ))
PUT_KEYS=$KEYS PUT_TOTAL=$KEYS wrk -t2 -c64 -d3600s --timeout 10s -s bench/puts.lua \
  "http://127.0.0.1:${A[$L]}" >"$WORKDIR/wrk.log" 2>&1 &
wrk_pid=$!
until (( $(field "$L" revision) >= target )); do sleep 0.2; done
kill -INT "$wrk_pid"; wait "$wrk_pid" || true

echo "== backup of one shard through follower $F"
t0=$(now); curl -sf -o "$WORKDIR/one.rkv" "http://127.0.0.1:${A[$F]}/v1/backup"; t1=$(now)
python3 -c "print(f'backup_s: {($t1-$t0):.2f}  bytes: $(stat -c %s "$WORKDIR/one.rkv")')"
stop_cluster

echo "== restore into $SHARDS shards"
start_cluster sharded --shards "$SHARDS"
until_ok "http://127.0.0.1:${A[1]}/v1/kv?limit=1"
t0=$(now)
answer=$(curl -sf --data-binary @"$WORKDIR/one.rkv" "http://127.0.0.1:${A[1]}/v1/restore")
t1=$(now)
python3 -c "print(f'restore_s: {($t1-$t0):.2f}  answer: $answer')"
python3 -c "import json,sys; a=json.loads(sys.argv[1]); assert a['keys']==$KEYS, a" "$answer"

echo "== backup of $SHARDS shards through node 2"
t0=$(now); curl -sf -o "$WORKDIR/sharded.rkv" "http://127.0.0.1:${A[2]}/v1/backup"; t1=$(now)
python3 -c "print(f'backup_s: {($t1-$t0):.2f}  bytes: $(stat -c %s "$WORKDIR/sharded.rkv")')"
echo "peak RSS per node (KiB): $(for p in "${pids[@]:1}"; do grep VmHWM /proc/$p/status | awk '{print $2}'; done | tr '\n' ' ')"
