#!/usr/bin/env bash
# Fleet benchmark of the xDS server: 1,000 and 10,000 simulated nodes over
# SotW and Delta ADS on loopback. Prints a Markdown table for BENCHMARKS.md.
# Usage: bench/xds-fleet.sh [NODES...]   (default: 1000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
# Each node holds one connection on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --workspace --bins --quiet
counts=("${@:-1000 10000}")
echo "| ADS | nodes | initial config | CP RSS held | CP RSS per node | ACKs of the change | p50 ms | p99 ms | last ms | CP CPU to connect | CP CPU for the change |"
echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for n in ${counts[@]}; do
  for mode in sotw delta; do
    target/release/xds-fleet "$n" "$mode"
  done
done
