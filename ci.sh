#!/usr/bin/env bash
# The project's checks: formatting, lints, then the whole test suite (which starts real
# raftkvd processes). Run from the repository root: ./ci.sh
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# Two test threads: every cluster test runs several raftkvd processes, and CI has 2 cores.
cargo test -- --test-threads 2
