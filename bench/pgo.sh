#!/usr/bin/env bash
# Builds portico-dp with profile-guided optimisation (PGO) into target/pgo/.
#
# Usage: bash bench/pgo.sh [--code-state] [--help]
#
# --code-state: only print the checked-out code's state as target/pgo/built-from
# names it (bench/dp.sh compares the two).
#
# Three steps; the two builds are the workspace's release build, as
# `cargo build --release --workspace --bins` makes target/release (the same
# crate features, so the plain and the PGO portico-dp differ only by the
# profile), each with its own target directory:
#   1. an instrumented build (rustc -Cprofile-generate) in target/pgo-generate;
#   2. training: that build proxies the benchmark's traffic (bench/dp.sh with
#      PROXIES=portico, HTTP/1.1 and h2c, pinned and unpinned, TRAIN_SECS
#      seconds each) and writes its profile when it exits; llvm-profdata
#      merges the profile;
#   3. the optimised build (rustc -Cprofile-use) in target/pgo-use, copied
#      with the plain release portico-cp and portico to target/pgo/, where
#      bench/dp.sh finds it for its `portico-pgo` row.
# Code the training does not run (features the benchmark's configuration
# does not use) is laid out as cold: PGO speeds the common path at some cost
# to the rest.
# The training traffic is the benchmark's own (a proxy's usual work: HTTP/1.1
# and HTTP/2 requests through the router to a keep-alive upstream), so the
# benchmark's portico-pgo row shows the best case of this build; the plain
# release build stays in the same table. target/pgo/built-from names the
# commit the build was made from, with "-dirty" when code differed from it
# (the benchmarks' own outputs, bench/dp/ and BENCHMARKS.md, do not count).
#
# Needs llvm-profdata of the Rust toolchain's LLVM: from the toolchain's
# llvm-tools component, added with rustup when missing.
#
# Environment:
#   TRAIN_SECS=5   seconds of each training run
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
export LC_ALL=C

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF"; }
die() { echo "bench/pgo.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }

# The code's state: the commit, "-dirty" when anything but the benchmarks'
# outputs differs from it.
code_state() {
  local c
  c="$(git rev-parse --short HEAD 2>/dev/null)" || { echo unknown; return; }
  git diff --quiet HEAD -- . ':(exclude)bench/dp' ':(exclude)BENCHMARKS.md' || c+="-dirty"
  echo "$c"
}

case "${1:-}" in
  "") ;;
  --code-state) code_state; exit 0 ;;
  -h|--help) usage; exit 0 ;;
  *) echo "bench/pgo.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
esac
TRAIN_SECS="${TRAIN_SECS:-5}"
[[ "$TRAIN_SECS" =~ ^[1-9][0-9]*$ ]] || die "TRAIN_SECS must be a positive integer (got '$TRAIN_SECS')"

# llvm-profdata must read the profile format of rustc's own LLVM: take the
# toolchain's, not the distribution's.
sysroot="$(rustc --print sysroot)" || die "rustc not found"
host="$(rustc -vV | sed -n 's/^host: //p')"
PROFDATA="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  command -v rustup >/dev/null || die "$PROFDATA is missing and there is no rustup to add the llvm-tools component"
  say "adding the toolchain's llvm-tools component (for llvm-profdata)"
  rustup component add llvm-tools >&2 || rustup component add llvm-tools-preview >&2 \
    || die "rustup could not add the llvm-tools component"
  [ -x "$PROFDATA" ] || die "$PROFDATA is still missing after adding llvm-tools"
fi

BUILT_FROM="$(code_state)"
PROFILES="$PWD/target/pgo-profiles"
# Added to the caller's flags, as the plain build would have them.
EXTRA="${RUSTFLAGS:+$RUSTFLAGS }"
WORK="$(mktemp -d -t portico-pgo.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

say "the plain release build (cargo build --release --workspace --bins)"
cargo build --release --locked --workspace --bins || die "the release build failed"

say "1/3: instrumented portico-dp (target/pgo-generate)"
mkdir -p "$PROFILES"
RUSTFLAGS="${EXTRA}-Cprofile-generate=$PROFILES" CARGO_TARGET_DIR=target/pgo-generate \
  cargo build --release --locked --workspace --bins \
  || die "the instrumented build failed"

say "2/3: training on the benchmark's traffic (${TRAIN_SECS}s per run)"
# Only the training's profiles: build scripts and proc macros of the
# instrumented build ran instrumented too and may have left theirs.
rm -rf "$PROFILES"
mkdir -p "$PROFILES" "$WORK/bin"
cp target/pgo-generate/release/portico-dp target/release/portico-cp target/release/portico "$WORK/bin/"
# One profile per portico-dp process (one per run: 2 layouts x 2 protocols).
LLVM_PROFILE_FILE="$PROFILES/portico-dp-%p.profraw" \
  BENCH_CONFIG=bench/dp/portico.yaml \
  PROXIES=portico LAYOUTS="pinned unpinned" PROTOCOLS="h1 h2" DURATION="$TRAIN_SECS" WARMUP=1 \
  PORTICO_BIN_DIR="$WORK/bin" REPORT_FILE="$WORK/training.md" \
  bash bench/dp.sh --no-build >"$WORK/training.log" 2>&1 \
  || { tail -n 40 "$WORK/training.log" >&2; die "the training run failed"; }
runs="$(find "$PROFILES" -name 'portico-dp-*.profraw' | wc -l)"
[ "$runs" -ge 4 ] \
  || die "only $runs of the 4 training runs left a profile in $PROFILES (an instrumented portico-dp that does not exit cleanly, within bench/dp.sh's 5 s, writes none)"
"$PROFDATA" merge -o "$PROFILES/merged.profdata" "$PROFILES"/*.profraw \
  || die "llvm-profdata could not merge the profiles in $PROFILES"

say "3/3: optimised portico-dp (target/pgo-use)"
RUSTFLAGS="${EXTRA}-Cprofile-use=$PROFILES/merged.profdata" CARGO_TARGET_DIR=target/pgo-use \
  cargo build --release --locked --workspace --bins \
  || die "the optimised build failed"

mkdir -p target/pgo
cp target/pgo-use/release/portico-dp target/release/portico-cp target/release/portico target/pgo/
echo "$BUILT_FROM" >target/pgo/built-from
say "written: target/pgo/portico-dp (from $BUILT_FROM)"
