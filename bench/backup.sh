#!/usr/bin/env bash
# Backup and restore, raftkvd against etcd, on 3-node clusters on loopback (release build):
#  1. load the shared bench's 100,000 keys (../shared/bench/kv.lua: 8-16 byte keys,
#     256-byte values) into each system with wrk;
#  2. backup: raftkvd `GET /v1/backup` through a follower; etcd `etcdctl snapshot save`
#     from a follower. Time and file size;
#  3. restore, timed from nothing to a new 3-node cluster that serves the data:
#     raftkvd: start three fresh nodes, `POST /v1/restore`, read a key back;
#     etcd: `etcdctl snapshot restore` for each member, start them, read a key back;
#  4. raftkvd only: the same restore into a cluster of SHARDS shards (default 8), and a
#     backup of it (its groups read through their hosts).
# etcd's part runs when `etcd` and `etcdctl` are on PATH (apt-get install etcd-server
# etcd-client). Needs wrk, curl, python3. Env: SHARDS, WORKDIR (default: new /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-8} KEYS=100000   # kv.lua's key space
KV_LUA=${KV_LUA:-$PWD/../shared/bench/kv.lua}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-backupbench.XXXXXX)}
cargo build --release --quiet
BIN=$PWD/target/release/raftkvd
H=127.0.0.1
RP=(0 16481 16482 16483) RA=(0 16471 16472 16473)   # raftkvd: raft, client ports
EP=(0 16581 16582 16583) EC=(0 16571 16572 16573)   # etcd: peer, client ports
RCLUSTER=http://$H:${RP[1]},http://$H:${RP[2]},http://$H:${RP[3]}
ECLUSTER=n1=http://$H:${EP[1]},n2=http://$H:${EP[2]},n3=http://$H:${EP[3]}
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT

now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.2f}')"; }
deadline_loop() {  # deadline_loop WHAT CMD...: runs CMD until it succeeds, 300 s at most
  local what=$1; shift; local end=$(( $(date +%s) + 300 ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || { echo "timed out: $what" >&2; exit 1; }
    sleep 0.05
  done
}
stop_all() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=(); }

raftkvd_start() {  # raftkvd_start NAME [flags...]
  local name=$1; shift
  for id in 1 2 3; do
    "$BIN" --id "$id" --cluster "$RCLUSTER" --port "${RA[$id]}" --data-dir "$WORKDIR/$name-n$id" "$@" \
      >>"$WORKDIR/$name-n$id.log" 2>&1 &
    pids+=($!)
  done
}
rstatus() { curl -sf "http://$H:${RA[$1]}/status" || echo '{}'; }
rfield() { python3 -c "import json,sys; print(json.load(sys.stdin).get('$2', 0))" <<<"$(rstatus "$1")"; }
has_leader() { [[ $(rfield 1 leader) =~ ^[1-3]$ ]]; }

etcd_start() {  # etcd_start NAME [extra flags]: three members with data dirs NAME-n1..3
  local name=$1; shift
  for n in 1 2 3; do
    etcd --name "n$n" --data-dir "$WORKDIR/$name-n$n" \
      --listen-client-urls "http://$H:${EC[$n]}" --advertise-client-urls "http://$H:${EC[$n]}" \
      --listen-peer-urls "http://$H:${EP[$n]}" --initial-advertise-peer-urls "http://$H:${EP[$n]}" \
      --initial-cluster "$ECLUSTER" --initial-cluster-token backupbench "$@" \
      >>"$WORKDIR/$name-n$n.log" 2>&1 &
    pids+=($!)
  done
}
ectl() { ETCDCTL_API=3 etcdctl --endpoints "http://$H:${EC[2]}" "$@"; }
erevision() { ectl endpoint status -w json 2>/dev/null \
  | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['Status']['header']['revision'])" || echo 0; }

# load SYSTEM URL REVISION_FN: kv.lua puts until the revision passed KEYS and a margin
# (every thread then went round the whole key space), then stops wrk.
load() {
  local system=$1 url=$2 revision=$3
  local target=$(( $($revision) + KEYS + 5000 ))
  BENCH_SYSTEM=$system BENCH_MODE=put BENCH_THREADS=2 BENCH_CONNS=64 \
    wrk -t2 -c64 -d3600s --timeout 10s -s "$KV_LUA" "$url" >"$WORKDIR/wrk-$system.log" 2>&1 &
  local wrk_pid=$!
  until (( $($revision) >= target )); do sleep 0.5; done
  kill -INT "$wrk_pid"; wait "$wrk_pid" || true
}
r1_revision() { rfield 1 revision; }
echo "== data in $WORKDIR"
echo "== raftkvd: load $KEYS keys"
raftkvd_start load
deadline_loop "raftkvd leader" has_leader
load raftkvd "http://$H:${RA[1]}" r1_revision
L=$(rfield 1 leader); F=$(( L % 3 + 1 ))
t0=$(now); curl -sf -o "$WORKDIR/raftkvd.rkv" "http://$H:${RA[$F]}/v1/backup"; took=$(since "$t0")
KEY=$(curl -sf "http://$H:${RA[1]}/v1/kv?limit=1" | python3 -c "import json,sys; print(json.load(sys.stdin)['items'][0]['key'])")
echo "raftkvd backup_s: $took  bytes: $(stat -c %s "$WORKDIR/raftkvd.rkv")  (through follower $F)"
stop_all

echo "== raftkvd: restore into a new 3-node cluster (1 shard)"
t0=$(now)
raftkvd_start one
deadline_loop "raftkvd leader" has_leader
answer=$(curl -sf --data-binary @"$WORKDIR/raftkvd.rkv" "http://$H:${RA[1]}/v1/restore")
deadline_loop "raftkvd serves $KEY" curl -sf "http://$H:${RA[3]}/v1/kv/$KEY"
echo "raftkvd restore_s: $(since "$t0")  (start, restore, read on node 3) answer: $answer"
python3 -c "import json,sys; a=json.loads(sys.argv[1]); assert a['keys']==$KEYS, a" "$answer"
stop_all

echo "== raftkvd: restore into a new 3-node cluster of $SHARDS shards"
t0=$(now)
raftkvd_start sharded --shards "$SHARDS"
deadline_loop "raftkvd shards" curl -sf "http://$H:${RA[1]}/v1/kv?limit=1"
answer=$(curl -sf --data-binary @"$WORKDIR/raftkvd.rkv" "http://$H:${RA[1]}/v1/restore")
deadline_loop "raftkvd serves $KEY" curl -sf "http://$H:${RA[3]}/v1/kv/$KEY"
echo "raftkvd restore_s ($SHARDS shards): $(since "$t0")  answer: $answer"
t0=$(now); curl -sf -o "$WORKDIR/sharded.rkv" "http://$H:${RA[2]}/v1/backup"; took=$(since "$t0")
echo "raftkvd backup_s ($SHARDS shards, through node 2): $took  bytes: $(stat -c %s "$WORKDIR/sharded.rkv")"
stop_all

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "== etcd not installed: its part SKIPPED"; exit 0
fi
echo "== etcd $(etcd --version | head -1 | awk '{print $3}'): load $KEYS keys"
etcd_start eload --initial-cluster-state new
deadline_loop "etcd health" ectl endpoint health
load etcd "http://$H:${EC[1]}" erevision
t0=$(now); ectl snapshot save "$WORKDIR/etcd.db" >/dev/null 2>&1; took=$(since "$t0")
echo "etcd backup_s: $took  bytes: $(stat -c %s "$WORKDIR/etcd.db")  (snapshot save from member 2)"
EKEY=$(ectl get "" --prefix --keys-only --limit 1 | head -1)
stop_all

echo "== etcd: restore into a new 3-node cluster"
t0=$(now)
for n in 1 2 3; do
  ectl snapshot restore "$WORKDIR/etcd.db" --name "n$n" --data-dir "$WORKDIR/erestored-n$n" \
    --initial-cluster "$ECLUSTER" --initial-cluster-token backupbench2 \
    --initial-advertise-peer-urls "http://$H:${EP[$n]}" >/dev/null 2>&1
done
etcd_start erestored
ectl3() { ETCDCTL_API=3 etcdctl --endpoints "http://$H:${EC[3]}" "$@"; }
served() { ectl3 get "$EKEY" | grep -q .; }
deadline_loop "etcd serves $EKEY" served
echo "etcd restore_s: $(since "$t0")  (3 x snapshot restore, start, read on member 3)"
count=$(ectl3 get "" --prefix --keys-only --limit 1 -w json | python3 -c "import json,sys; print(json.load(sys.stdin)['count'])")
echo "etcd keys after restore: $count"
