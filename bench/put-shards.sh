#!/usr/bin/env bash
# Puts over many shards against one (issue 12), with the figures that explain the
# difference. For each run and each shard count in SHARDS (default "1 64"; counts
# interleaved, so that a slower minute of the machine hits both alike): a fresh 3-node
# release-build cluster from ../shared/bench/cluster.sh (ports 13371-13373, node 1 gets
# every request, as in ../shared/bench/run.sh), formed with RAFTKVD_SHARDS; once the
# groups' leaders are spread over the nodes, wrk's `put` workload of
# ../shared/bench/kv.lua (2 threads, CONNS connections) for WARMUP then DURATION seconds.
# SPREAD=1 spreads the clients instead, as etcd's client balances over its endpoints:
# three wrk processes of one thread, one on each node, a third of CONNS each, each
# writing its own keys (bench/kv-spread.lua); p99 is then the worst of the three.
# LEADERS=1 instead moves every group's leadership to node 1 (rebalancing off), so that
# no write is forwarded: the rounds a put spans then drop to one shard's, and what is
# left is the cost of many groups' entries in each of node 1's rounds.
# ROUTED=1 plays a client that knows the shard map: one wrk process of one thread per
# node that leads a group, with connections in proportion to the groups it leads, each
# writing only keys of those groups (bench/kv-routed.lua), so no write is forwarded and
# the leaders stay spread: the most any forwarding could be made to cost nothing.
# Prints per measured run: puts/s, p99, the cluster's CPU per 1,000 puts (utime + stime
# of the 3 processes), fsyncs per second (all nodes), the mean synced log write (write
# and fsync, as raftkvd_log_fsync_duration_seconds times it), puts per fsync on each
# node, raft entries committed per put (below 1 when a group's entry carries several
# writes), and two figures of node 1's loop rounds (one fsync each): the raft threads'
# CPU per round (all nodes), and rounds per put: CONNS x node 1's fsyncs / puts, how many
# of node 1's rounds a put's latency spans (each connection has one put in flight; with
# SPREAD=1 or ROUTED=1, where every node takes requests, node 1's rounds stand for any
# node's).
# What it has shown, run by run, is kept in bench/put-shards.md.
# Needs wrk, curl, python3, bc. Env: SHARDS, RUNS (default 1), DURATION (default 8),
# WARMUP (default 2), CONNS (default 64), SPREAD (default 0), LEADERS (default 0),
# ROUTED (default 0),
# RAFTKVD (default target/release/raftkvd, built if it is the default), WORKDIR
# (default: a new /var/tmp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-1 64} RUNS=${RUNS:-1} DURATION=${DURATION:-8} WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64} SPREAD=${SPREAD:-0} LEADERS=${LEADERS:-0} ROUTED=${ROUTED:-0}
if [[ -z ${RAFTKVD:-} ]]; then
  cargo build --release --quiet
  RAFTKVD=$PWD/target/release/raftkvd
fi
# Written data not yet on disk (a build's output) makes the runs' fsyncs wait behind
# its write-back: flush it first.
sync
WORKDIR=${WORKDIR:-$(mktemp -d /var/tmp/raftkvd-putshards.XXXXXX)}
CLUSTER=../shared/bench/cluster.sh
PORTS=(13371 13372 13373)
dir=""
trap '[[ -n $dir ]] && RAFTKVD=$RAFTKVD $CLUSTER raftkvd stop "$dir" >/dev/null 2>&1 || true' EXIT

# Sum of metric $1 over the nodes on ports $2... (default: all three), times SCALE
# (default 1: a count; 1e6 turns seconds into microseconds), as an integer.
metric() {
  local name=$1 p
  shift
  for p in "${@:-${PORTS[@]}}"; do
    curl -s "http://127.0.0.1:$p/metrics" |
      awk -v m="$name" -v scale="${SCALE:-1}" '$1 == m {s += $2} END {printf "%d\n", s * scale}'
  done | paste -sd+ | bc
}

# Clock ticks of CPU the three nodes used so far.
cpu_ticks() {
  local pid
  for pid in $(cat "$dir/pids"); do awk '{print $14 + $15}' "/proc/$pid/stat"; done | paste -sd+ | bc
}

# Clock ticks of CPU the three nodes' raft threads used so far.
raft_ticks() {
  local pid task
  for pid in $(cat "$dir/pids"); do
    for task in /proc/"$pid"/task/*; do
      if [[ $(cat "$task/comm" 2>/dev/null) == raft-node ]]; then
        awk '{print $14 + $15}' "$task/stat"
      fi
    done
  done | paste -sd+ | bc
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

# Waits (up to 60 s) until all $1 data groups exist and node 1 leads every group,
# asking for the transfers on the way (LEADERS=1).
lead_on_node1() {
  local i
  for ((i = 0; i < 60; i++)); do
    if python3 - "$1" "${PORTS[0]}" <<'PY'
import json, sys, urllib.request
shards, base = int(sys.argv[1]), f"http://127.0.0.1:{sys.argv[2]}/v1/groups"
groups = json.load(urllib.request.urlopen(base, timeout=10))["groups"]
elsewhere = [g["id"] for g in groups if g["leader"] != 1]
for g in elsewhere:
    req = urllib.request.Request(f"{base}/{g}/leader", data=b'{"id": 1}', method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
    except OSError:
        pass  # asked again on the next pass
sys.exit(0 if not elsewhere and len(groups) == shards + (shards > 1) else 1)
PY
    then return 0; fi
    sleep 1
  done
  echo "leaders not all on node 1 after 60 s; measuring anyway" >&2
}

# wrk's put workload for $1 seconds, writing keys of round $2; its output (one log per
# wrk process) goes to $3.N.
put_load() {
  local secs=$1 round=$2 out=$3 n
  export BENCH_SYSTEM=raftkvd BENCH_WORKLOAD=put BENCH_MODE=put BENCH_NKEYS=0 BENCH_PREFIX=$round
  if ((ROUTED)); then
    routed_load "$secs" "$out"
    return
  fi
  if ((SPREAD == 0)); then
    BENCH_THREADS=2 BENCH_CONNS=$CONNS wrk -t2 -c"$CONNS" -d"${secs}s" --timeout 5s --latency \
      -s ../shared/bench/kv.lua "http://127.0.0.1:${PORTS[0]}" >"$out.0" 2>&1
    return
  fi
  for n in 0 1 2; do
    local conns=$(((CONNS + 2 - n) / 3))
    BENCH_THREADS=3 BENCH_CONNS=$conns BENCH_ID_OFFSET=$n wrk -t1 -c"$conns" -d"${secs}s" \
      --timeout 5s --latency -s bench/kv-spread.lua "http://127.0.0.1:${PORTS[n]}" >"$out.$n" 2>&1 &
  done
  wait
}

# ROUTED=1: wrk on each node that leads groups, writing only their keys, for $1 seconds;
# output to $2.N. The leader of each slot of the shard list (groups 2, 3, ... in order;
# group 1 with one shard) is read from /v1/groups first.
routed_load() {
  local secs=$1 out=$2 leaders n led conns given=0 started=0
  leaders=$(python3 - "${PORTS[0]}" <<'PY'
import json, sys, urllib.request
groups = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/groups", timeout=10))["groups"]
data = sorted((g["id"], g["leader"]) for g in groups if g["id"] != 1) or [(1, next(g["leader"] for g in groups if g["id"] == 1))]
print(" ".join(str(leader) for _, leader in data))
PY
  )
  local slots
  slots=$(wc -w <<<"$leaders")
  for n in 1 2 3; do
    led=$(tr ' ' '\n' <<<"$leaders" | grep -cx "$n" || true)
    ((led > 0)) || continue
    started=$((started + led))
    conns=$((CONNS * started / slots - given))
    given=$((given + conns))
    ((conns > 0)) || continue
    BENCH_THREADS=1 BENCH_CONNS=$conns BENCH_NODE=$n BENCH_LEADERS=$leaders wrk -t1 -c"$conns" \
      -d"${secs}s" --timeout 5s --latency -s bench/kv-routed.lua "http://127.0.0.1:${PORTS[n - 1]}" \
      >"$out.$n" 2>&1 &
  done
  wait
}

ticks_per_s=$(getconf CLK_TCK)
for ((run = 1; run <= RUNS; run++)); do
  for shards in $SHARDS; do
    dir=$WORKDIR/run$run-shards$shards
    if ((LEADERS)); then
      RAFTKVD=$RAFTKVD RAFTKVD_SHARDS=$shards RAFTKVD_DISABLE_REBALANCING=true \
        $CLUSTER raftkvd start "$dir" >/dev/null
      lead_on_node1 "$shards"
    else
      RAFTKVD=$RAFTKVD RAFTKVD_SHARDS=$shards $CLUSTER raftkvd start "$dir" >/dev/null
      wait_spread "$shards"
    fi
    put_load "$WARMUP" "w$run" "$dir/warmup.log"
    fsyncs0=$(metric raftkvd_log_fsync_duration_seconds_count)
    fsync_us0=$(SCALE=1e6 metric raftkvd_log_fsync_duration_seconds_sum)
    entries0=$(metric raftkvd_committed_entries_total)
    # Node 1's fsyncs: one a loop round that wrote entries.
    cpu0=$(cpu_ticks) raft0=$(raft_ticks)
    rounds0=$(metric raftkvd_log_fsync_duration_seconds_count "${PORTS[0]}")
    put_load "$DURATION" "m$run" "$dir/wrk.log"
    cpu1=$(cpu_ticks) raft1=$(raft_ticks)
    rounds1=$(metric raftkvd_log_fsync_duration_seconds_count "${PORTS[0]}")
    fsyncs1=$(metric raftkvd_log_fsync_duration_seconds_count)
    fsync_us1=$(SCALE=1e6 metric raftkvd_log_fsync_duration_seconds_sum)
    entries1=$(metric raftkvd_committed_entries_total)
    RAFTKVD=$RAFTKVD $CLUSTER raftkvd stop "$dir" >/dev/null
    lines=$(cat "$dir"/wrk.log.* | grep '^BENCH ' | sed 's/^BENCH //')
    dir=""
    python3 - "$lines" "$shards" "$((cpu1 - cpu0))" "$ticks_per_s" "$((fsyncs1 - fsyncs0))" \
      "$((entries1 - entries0))" "$DURATION" "$((raft1 - raft0))" "$((rounds1 - rounds0))" \
      "$CONNS" "$((fsync_us1 - fsync_us0))" <<'PY'
import json, sys
rs = [json.loads(line) for line in sys.argv[1].splitlines()]
shards, ticks, hz, fsyncs, entries, secs, raft_ticks, rounds, conns, fsync_us = (int(x) for x in sys.argv[2:])
n = max(sum(r["requests"] for r in rs), 1)
rps = sum(r["rps"] for r in rs)
p99 = max(r["p99_ms"] for r in rs)
non2xx = sum(r["non2xx"] for r in rs)
print(f"shards={shards:<3} puts/s={rps:>9,.0f}  p99={p99:6.2f} ms  "
      f"non2xx={non2xx}  cpu/1k puts={ticks / hz * 1000 / n * 1000:6.1f} ms  "
      f"fsyncs/s={fsyncs / secs:6.0f}  fsync={fsync_us / max(fsyncs, 1):4.0f} us  puts/fsync/node={3 * n / max(fsyncs, 1):5.1f}  "
      f"entries/put={entries / 3 / n:5.3f}  "
      f"raft cpu/round={raft_ticks / hz * 1e6 / max(rounds, 1):5.0f} us  "
      f"rounds/put={conns * rounds / n:4.1f}")
PY
  done
done
