#!/usr/bin/env bash
# portico-dp's memory (idle, and holding 5,000 routes over 500 Apis and 50
# Services) and the time from `apply` returning to a changed route
# answering in traffic, 30 changes. Prints a Markdown table for
# BENCHMARKS.md. Usage: bash bench/dp-config.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
target/release/dp-config
