#!/usr/bin/env bash
# iron-proxy benchmark: one command. Builds release, starts a local TLS origin (nginx,
# installed if missing), installs oha if missing, and measures direct vs iron-proxy
# (interception with a placeholder swap on every request) vs iron-proxy passthrough, plus
# Squid (tunnel, ssl-bump) and mitmproxy, installed when the registries allow. Writes bench/results/latest.{md,json}.
# Also pgbench -S direct vs through the Postgres relay vs pgbouncer.
#   bench/run.sh [--pgo] [--duration SECS] [--reps N] [--only SCENARIO] [--pg-duration SECS] [--no-pg | --pg-only]
# --pgo measures the profile-guided build of bench/pgo.sh instead of the plain release one.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/prereqs.sh
if [ "${1:-}" = "--pgo" ]; then
  shift
  IRON_BENCH_BIN=$(bench/pgo.sh)
  export IRON_BENCH_BIN
else
  cargo build --release -p iron-proxy
fi
exec python3 bench/bench.py "$@"
