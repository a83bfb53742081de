#!/usr/bin/env bash
# iron-proxy benchmark: one command. Builds release, starts a local TLS origin (nginx,
# installed if missing), installs oha if missing, and measures direct vs iron-proxy
# (interception with a placeholder swap on every request) vs iron-proxy passthrough, plus
# Squid (tunnel, ssl-bump) and mitmproxy, installed when the registries allow. Writes bench/results/latest.{md,json}.
# Also pgbench -S direct vs through the Postgres relay vs pgbouncer.
#   bench/run.sh [--duration SECS] [--reps N] [--only SCENARIO] [--pg-duration SECS] [--no-pg | --pg-only]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null 2>&1; then
  apt-get update -q && apt-get install -y -q nginx-light || apt-get install -y -q nginx
fi
if ! command -v oha >/dev/null 2>&1; then
  cargo install oha --locked
fi
command -v openssl >/dev/null 2>&1 || apt-get install -y -q openssl
# The Postgres relay bench: a real cluster, pgbench, and pgbouncer to compare with.
[ -x /usr/lib/postgresql/15/bin/initdb ] || apt-get install -y -q postgresql-15
command -v pgbench >/dev/null 2>&1 || apt-get install -y -q postgresql-client-15
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || apt-get install -y -q pgbouncer || true
# Peers to compare with, when they can be installed: Squid (tunnel and ssl-bump) and
# mitmproxy (in its own venv). Missing peers are skipped by bench.py.
[ -x /usr/sbin/squid ] || apt-get install -y -q squid-openssl || true
command -v mitmdump >/dev/null 2>&1 || [ -x /opt/mitm/bin/mitmdump ] \
  || { python3 -m venv /opt/mitm && /opt/mitm/bin/pip install -q mitmproxy; } || true
# hudsucker (a Rust MITM library) as a peer: a small proxy built outside the workspace.
[ -x bench/hudsucker-peer/target/release/hudsucker-peer ] \
  || (cd bench/hudsucker-peer && cargo build --release) || true
cargo build --release -p iron-proxy
exec python3 bench/bench.py "$@"
