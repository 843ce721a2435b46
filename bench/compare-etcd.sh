#!/usr/bin/env bash
# Reproduces the README's benchmark figures: builds raftkvd in release mode and runs
# ../shared/bench/run.sh (3-node etcd vs 3-node raftkvd, wrk, same machine), which prints
# the raftkvd/etcd ratios. Needs: apt-get install -y etcd-server etcd-client wrk curl.
# Env is passed through (DURATION, WARMUP, WORKDIR); see ../shared/bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
exec ../shared/bench/run.sh "$@"
