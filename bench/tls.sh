#!/usr/bin/env bash
# The cost of TLS: a 3-node raftkvd cluster over plain HTTP, then the same cluster with TLS
# on both ports (HTTPS for clients, mutual TLS between peers), each under wrk's `put`
# (-t2 -c64) and `put1` (-t1 -c1) workloads of ../shared/bench (its kv.lua), one after
# the other on this machine. Prints both and the TLS/plain ratios. wrk cannot present a
# client certificate, so the client API runs without --client-cert-auth here.
# Needs: wrk, openssl, python3. Env: DURATION (default 10s), WARMUP (2s), WORKDIR,
# MODES (default "plain tls": the order of the two runs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-tls-bench.XXXXXX)}
KV_LUA=../shared/bench/kv.lua
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop EXIT
tls/dev-certs.sh "$WORKDIR/pki" >/dev/null
pki=$WORKDIR/pki

# run_cluster MODE: starts 3 nodes (MODE plain or tls), runs both workloads on node 1.
run_cluster() {
  local mode=$1 scheme=http flags=()
  if [ "$mode" = tls ]; then
    scheme=https
    flags=(--cert-file "$pki/node.pem" --key-file "$pki/node-key.pem"
      --peer-cert-file "$pki/node.pem" --peer-key-file "$pki/node-key.pem"
      --peer-trusted-ca-file "$pki/ca.pem")
  fi
  local cluster="$scheme://127.0.0.1:14381,$scheme://127.0.0.1:14382,$scheme://127.0.0.1:14383"
  for i in 1 2 3; do
    ./target/release/raftkvd --id $i --cluster "$cluster" --port 1437$i \
      --data-dir "$WORKDIR/$mode/n$i" "${flags[@]}" 2>"$WORKDIR/$mode-n$i.log" &
    pids+=($!)
  done
  local url="$scheme://127.0.0.1:14371"
  for _ in $(seq 1 300); do
    curl -sk -XPUT "$url/ready" -d x -o /dev/null -w '%{http_code}' | grep -q 204 && break
    sleep 0.1
  done
  # Whether node 1 leads changes put1 by a hop: make it lead in both runs.
  curl -sk -XPOST "$url/v1/groups/1/leader" -d '{"id": 1}' -o /dev/null
  echo "$mode: leader is node $(curl -sk "$url/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')"
  for workload in put:2:64 put1:1:1; do
    IFS=: read -r name t c <<<"$workload"
    export BENCH_SYSTEM=raftkvd BENCH_MODE=put BENCH_WORKLOAD="$mode-$name" BENCH_THREADS=$t BENCH_CONNS=$c
    wrk -t"$t" -c"$c" -d"$WARMUP" -s "$KV_LUA" "$url" >/dev/null 2>&1
    wrk -t"$t" -c"$c" -d"$DURATION" --timeout 5s --latency -s "$KV_LUA" "$url" \
      | grep '^BENCH ' | sed 's/^BENCH //' >>"$WORKDIR/results.jsonl"
  done
  stop
}

: >"$WORKDIR/results.jsonl"
for mode in ${MODES:-plain tls}; do run_cluster "$mode"; done
python3 - "$WORKDIR/results.jsonl" <<'PY'
import json, sys
rows = {r["workload"]: r for r in map(json.loads, open(sys.argv[1]))}
print(f"{'workload':<12}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
for name, r in rows.items():
    print(f"{name:<12}{r['rps']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}")
for w in ("put", "put1"):
    p, t = rows[f"plain-{w}"], rows[f"tls-{w}"]
    print(f"TLS/plain {w}: throughput {t['rps'] / p['rps']:.2f}x, p50 {t['p50_ms'] / p['p50_ms']:.2f}x")
PY
echo "logs and results in $WORKDIR"
