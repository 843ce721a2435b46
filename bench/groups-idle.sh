#!/usr/bin/env bash
# Idle cost of many raft groups (issue 12): a 3-node release-build cluster on loopback
# formed with --shards NGROUPS (default 1,000 data groups of 3 replicas, so every process
# hosts every group), no client traffic. Once every group has a leader it waits SETTLE
# seconds (default 10), then measures each process's CPU (utime + stime from /proc) over
# MEASURE seconds (default 30) and its RSS. Prints one line per node and the mean.
# Needs curl, python3. Env: NGROUPS, SETTLE, MEASURE, WORKDIR (default: new /var/tmp dir),
# EXTRA (more raftkvd flags).
set -euo pipefail
cd "$(dirname "$0")/.."
NGROUPS=${NGROUPS:-1000} SETTLE=${SETTLE:-10} MEASURE=${MEASURE:-30} EXTRA=${EXTRA:-}
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-groupsbench.XXXXXX)}
cargo build --release --quiet
BIN=$PWD/target/release/raftkvd
P=(0 16481 16482 16483)   # raft ports
A=(0 16471 16472 16473)   # client ports
CLUSTER=http://127.0.0.1:${P[1]},http://127.0.0.1:${P[2]},http://127.0.0.1:${P[3]}
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true' EXIT
for id in 1 2 3; do
  # shellcheck disable=SC2086
  "$BIN" --id "$id" --cluster "$CLUSTER" --port "${A[$id]}" --data-dir "$WORKDIR/n$id" \
    --shards "$NGROUPS" $EXTRA >>"$WORKDIR/n$id.log" 2>&1 &
  pids[$id]=$!
done

started=$(date +%s.%N)
deadline=$(( $(date +%s) + 600 ))
until python3 - "${A[1]}" "$NGROUPS" <<'PY'
import json, sys, urllib.request
port, want = sys.argv[1], int(sys.argv[2])
try:
    groups = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/groups", timeout=30))["groups"]
except Exception:
    sys.exit(1)
led = sum(1 for g in groups if g["id"] != 1 and g["leader"] != 0)
sys.exit(0 if led == want else 1)
PY
do
  (( $(date +%s) < deadline )) || { echo "the groups did not all elect a leader" >&2; exit 1; }
  for id in 1 2 3; do
    kill -0 "${pids[$id]}" 2>/dev/null || { echo "node $id exited:" >&2; tail -3 "$WORKDIR/n$id.log" >&2; exit 1; }
  done
  sleep 0.5
done
echo "all $NGROUPS groups have a leader after $(python3 -c "print(round($(date +%s.%N) - $started, 1))") s"
sleep "$SETTLE"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for id in 1 2 3; do before[$id]=$(ticks "${pids[$id]}"); done
sleep "$MEASURE"
hz=$(getconf CLK_TCK)
total=0
for id in 1 2 3; do
  used=$(( $(ticks "${pids[$id]}") - ${before[$id]} ))
  cpu=$(python3 -c "print(round(100 * $used / $hz / $MEASURE, 2))")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/${pids[$id]}/status")
  echo "node $id: cpu ${cpu}% of one core, rss $(( rss / 1024 )) MiB"
  total=$(python3 -c "print($total + $cpu)")
done
echo "mean cpu $(python3 -c "print(round($total / 3, 2))")% of one core, $NGROUPS groups per process, idle"
echo "workdir: $WORKDIR"
