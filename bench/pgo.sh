#!/usr/bin/env bash
# Profile-guided release build of iron-proxy (rustc's PGO:
# https://doc.rust-lang.org/rustc/profile-guided-optimization.html).
#
#   bench/pgo.sh [--train-duration SECS]
#
# 1. builds an instrumented release binary (-Cprofile-generate) in target/pgo-gen;
# 2. trains it on the bench's own scenarios (bench.py with IRON_BENCH_BIN, no peers: every
#    HTTP scenario with and without a placeholder, passthrough, and the Postgres relay), one
#    short rep each; the proxy writes its profile when it exits on SIGTERM;
# 3. merges the profiles with the llvm-profdata of rustc's own LLVM major version (installs
#    Debian's llvm-N when missing: a mismatched version cannot read the raw profiles);
# 4. builds the release binary with -Cprofile-use in target/pgo and prints its path.
#
# Run the bench on it with IRON_BENCH_BIN=<that path> python3 bench/bench.py ... (or
# bench/run.sh --pgo). The plain `cargo build --release` stays the default build: a
# profile-guided one is only as good as its training, and this one is trained on the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
train=3
while [ $# -gt 0 ]; do
  case "$1" in
    --train-duration) train="$2"; shift 2 ;;
    *) echo "usage: bench/pgo.sh [--train-duration SECS]" >&2; exit 2 ;;
  esac
done
BENCH_PEERS=0
. bench/prereqs.sh

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
triple=$(rustc -vV | sed -n 's/^host: //p')
profdata=$(command -v "llvm-profdata-$llvm_major" || true)
if [ -z "$profdata" ]; then
  { apt-get update -q && apt-get install -y -q "llvm-$llvm_major"; } >&2
  profdata="llvm-profdata-$llvm_major"
fi

data="$PWD/target/pgo-data"
rm -rf "$data"
mkdir -p "$data"
# --target keeps RUSTFLAGS off build scripts (they would be instrumented too).
RUSTFLAGS="-Cprofile-generate=$data" \
  cargo build --release -p iron-proxy --target "$triple" --target-dir target/pgo-gen >&2
IRON_BENCH_BIN="$PWD/target/pgo-gen/$triple/release/iron-proxy" \
  python3 bench/bench.py --no-peers --reps 1 --duration "$train" --pg-duration "$train" >&2
n=$(find "$data" -name '*.profraw' | wc -l)
if [ "$n" -eq 0 ]; then
  echo "pgo: the training wrote no profile (did the proxy exit on SIGTERM?)" >&2
  exit 1
fi
"$profdata" merge -o "$data/merged.profdata" "$data"/*.profraw >&2
# rustc lists the profile in its dep-info, so cargo rebuilds when a training changes it.
RUSTFLAGS="-Cprofile-use=$data/merged.profdata" \
  cargo build --release -p iron-proxy --target "$triple" --target-dir target/pgo >&2
echo "$PWD/target/pgo/$triple/release/iron-proxy"
