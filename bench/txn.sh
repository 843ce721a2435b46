#!/usr/bin/env bash
# Transactions, raftkvd against etcd, on 3-node clusters on loopback (release build):
# for each system a fresh cluster from ../shared/bench/cluster.sh (every request to
# node 1, as ../shared/bench/run.sh does), then wrk -t2 -c64: the shared bench's put
# workload (../shared/bench/kv.lua) for reference, and bench/txn.lua, where each put
# is a transaction (a compare on the key's revision, then the put). Prints each run's
# BENCH line and a table: rate, p99, and raftkvd/etcd ratios.
# Needs wrk, curl, python3, and for etcd's part `etcd` on PATH (apt-get install
# etcd-server). Env: DURATION (default 10), WARMUP (default 2), WORKDIR (default: new
# /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10} WARMUP=${WARMUP:-2}
cargo build --release --quiet
export RAFTKVD=$PWD/target/release/raftkvd
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-txnbench.XXXXXX)}
CLUSTER=../shared/bench/cluster.sh
systems=(raftkvd)
command -v etcd >/dev/null && systems=(etcd raftkvd) || echo "== etcd not installed: its part SKIPPED"
running=""
trap '[[ -n $running ]] && $CLUSTER "$running" stop "$WORKDIR/$running" >/dev/null 2>&1 || true' EXIT
results=$WORKDIR/results.jsonl
sync
for system in "${systems[@]}"; do
  port=$([[ $system == etcd ]] && echo 12371 || echo 13371)
  mkdir -p "$WORKDIR/$system"
  $CLUSTER "$system" start "$WORKDIR/$system" >/dev/null
  running=$system
  for workload in put txn; do
    script=$PWD/../shared/bench/kv.lua
    [[ $workload == txn ]] && script=$PWD/bench/txn.lua
    run() {  # run SECONDS: one wrk run of this workload
      BENCH_SYSTEM=$system BENCH_MODE=put BENCH_WORKLOAD=$workload BENCH_THREADS=2 \
        BENCH_CONNS=64 wrk -t2 -c64 -d"$1"s --timeout 10s -s "$script" "http://127.0.0.1:$port"
    }
    run "$WARMUP" >/dev/null
    run "$DURATION" | tee "$WORKDIR/wrk-$system-$workload.log" | grep '^BENCH' | sed 's/^BENCH //' | tee -a "$results"
  done
  $CLUSTER "$system" stop "$WORKDIR/$system" >/dev/null
  running=""
done
python3 - "$results" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["system"], r["workload"])] = r
    bad = r["non2xx"] + r["empty"] + r["sock_errors"]
    print(f'{r["system"]:8} {r["workload"]:4} {r["rps"]:10.0f} req/s  p99 {r["p99_ms"]:7.2f} ms  bad {bad}')
for w in ("put", "txn"):
    e, k = rows.get(("etcd", w)), rows.get(("raftkvd", w))
    if e and k:
        print(f'{w}: raftkvd/etcd throughput {k["rps"] / e["rps"]:.2f}x, p99 {k["p99_ms"] / e["p99_ms"]:.2f}x')
k_put, k_txn = rows.get(("raftkvd", "put")), rows.get(("raftkvd", "txn"))
if k_put and k_txn:
    print(f'raftkvd txn/put throughput {k_txn["rps"] / k_put["rps"]:.2f}x')
e_put, e_txn = rows.get(("etcd", "put")), rows.get(("etcd", "txn"))
if e_put and e_txn:
    print(f'etcd txn/put throughput {e_txn["rps"] / e_put["rps"]:.2f}x')
PY
echo "== runs kept in $WORKDIR"
