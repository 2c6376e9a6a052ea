#!/usr/bin/env bash
# Apply latency and store size for 5,000 routes across 500 Apis.
# Usage: bench/apply.sh            (prints a Markdown section for BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
exec target/release/apply-bench
