# Sourced by bench/run.sh and bench/pgo.sh: installs what the bench drives when missing
# (nginx, oha, openssl, Postgres 15 with pgbench, and, unless BENCH_PEERS=0, the peers when
# the registries allow).
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
if [ "${BENCH_PEERS:-1}" != 0 ]; then
  [ -x /usr/sbin/squid ] || apt-get install -y -q squid-openssl || true
  command -v mitmdump >/dev/null 2>&1 || [ -x /opt/mitm/bin/mitmdump ] \
    || { python3 -m venv /opt/mitm && /opt/mitm/bin/pip install -q mitmproxy; } || true
  # hudsucker (a Rust MITM library) as a peer: a small proxy built outside the workspace.
  [ -x bench/hudsucker-peer/target/release/hudsucker-peer ] \
    || (cd bench/hudsucker-peer && cargo build --release) || true
fi
