#!/usr/bin/env python3
"""iron-proxy benchmark harness (see bench/README.md). Called by bench/run.sh."""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# IRON_BENCH_BIN runs another build (an A/B against an older binary).
PROXY_BIN = os.environ.get("IRON_BENCH_BIN") or os.path.join(ROOT, "target", "release", "iron-proxy")
HOST = "bench.test"
PASS_HOST = "pass.test"

SCENARIOS = [
    # name, oha args
    ("keep-alive GET 93 B, 1 conn", ["-c", "1"], "GET"),
    ("keep-alive GET 93 B, 32 conns", ["-c", "32"], "GET"),
    ("new connection per request, c=1", ["-c", "1", "--disable-keepalive"], "GET"),
    ("new connection per request, c=16", ["-c", "16", "--disable-keepalive"], "GET"),
    ("keep-alive POST 100 KiB, 8 conns", ["-c", "8"], "POST"),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def make_certs(d):
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-subj", "/CN=bench-origin-ca", "-days", "2")
    sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", f"{d}/origin.key", "-out", f"{d}/origin.csr", "-subj", f"/CN={HOST}")
    with open(f"{d}/ext.cnf", "w") as f:
        f.write(f"subjectAltName=DNS:{HOST},DNS:{PASS_HOST},IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    sh("openssl", "x509", "-req", "-in", f"{d}/origin.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
       "-CAcreateserial", "-out", f"{d}/origin.crt", "-days", "2", "-extfile", f"{d}/ext.cnf")


def start_nginx(d, port):
    body = "x" * 92 + "\n"  # 93 bytes
    os.makedirs(f"{d}/www", exist_ok=True)
    with open(f"{d}/www/index.txt", "w") as f:
        f.write(body)
    conf = f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_max_body_size 10m;
  client_body_buffer_size 256k;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/origin.crt;
    ssl_certificate_key {d}/origin.key;
    ssl_session_cache shared:SSL:10m;
    root {d}/www;
    location = / {{ default_type text/plain; try_files /index.txt =404; }}
    location = /post {{ client_body_in_single_buffer off; default_type text/plain; return 200 "{body.strip()}\\n"; }}
  }}
}}
"""
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(conf)
    subprocess.run(["nginx", "-c", f"{d}/nginx.conf", "-p", d], check=True)


def stop_nginx(d):
    subprocess.run(["nginx", "-c", f"{d}/nginx.conf", "-p", d, "-s", "quit"], capture_output=True)


SQUID_CERTGEN = "/usr/lib/squid/security_file_certgen"


def start_squid(d, port, bump):
    """Squid as a CONNECT tunnel, or with ssl-bump (interception) when `bump`. Resolves the
    bench host names through its own hosts_file. Runs in the foreground (-N), one process."""
    squid = shutil.which("squid") or "/usr/sbin/squid"
    name = "squid-bump" if bump else "squid"
    sd = f"{d}/{name}"
    os.makedirs(sd, exist_ok=True)
    with open(f"{sd}/hosts", "w") as f:
        f.write(f"127.0.0.1 {HOST} {PASS_HOST}\n")
    port_line = f"http_port 127.0.0.1:{port}"
    bump_lines = ""
    if bump:
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", f"{sd}/ca.key", "-out", f"{sd}/ca.pem", "-subj", "/CN=bench-squid-ca", "-days", "2",
           "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        sh(SQUID_CERTGEN, "-c", "-s", f"{sd}/ssldb", "-M", "16MB")
        port_line += (f" ssl-bump tls-cert={sd}/ca.pem tls-key={sd}/ca.key generate-host-certificates=on"
                      " dynamic_cert_mem_cache_size=16MB")
        bump_lines = f"""sslcrtd_program {SQUID_CERTGEN} -s {sd}/ssldb -M 16MB
sslcrtd_children 4
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={d}/ca.pem
"""
    with open(f"{sd}/squid.conf", "w") as f:
        f.write(f"""{port_line}
{bump_lines}acl SSL_ports port 1-65535
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_log {sd}/cache.log
pid_filename {sd}/squid.pid
coredump_dir {sd}
hosts_file {sd}/hosts
shutdown_lifetime 1 seconds
client_persistent_connections on
server_persistent_connections on
""")
    subprocess.run(["chown", "-R", "proxy:proxy", sd])
    p = subprocess.Popen([squid, "-N", "-f", f"{sd}/squid.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, name, f"{sd}/cache.log")
    return p, (f"{sd}/ca.pem" if bump else None)


HUDSUCKER_BIN = os.path.join(ROOT, "bench", "hudsucker-peer", "target", "release", "hudsucker-peer")


def start_hudsucker(d, port):
    """hudsucker (Rust MITM library, bench/hudsucker-peer) with a NoopHandler: intercepts,
    no placeholder work. Its own CA; trusts the origin CA upstream."""
    hd = f"{d}/hudsucker"
    os.makedirs(hd, exist_ok=True)
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", f"{hd}/ca.key", "-out", f"{hd}/ca.pem", "-subj", "/CN=bench-hudsucker-ca", "-days", "2",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    sh("openssl", "pkcs8", "-topk8", "-nocrypt", "-in", f"{hd}/ca.key", "-out", f"{hd}/ca.pk8")
    log = open(f"{hd}/log", "w")
    p = subprocess.Popen([HUDSUCKER_BIN, str(port), f"{hd}/ca.pem", f"{hd}/ca.pk8", f"{d}/ca.pem"],
                         stdout=log, stderr=subprocess.STDOUT)
    wait_port(port, "hudsucker", f"{hd}/log")
    return p, f"{hd}/ca.pem"


def start_mitmproxy(d, port):
    """mitmdump (regular proxy mode), verifying the origin with its CA."""
    exe = shutil.which("mitmdump") or "/opt/mitm/bin/mitmdump"
    conf = f"{d}/mitm"
    os.makedirs(conf, exist_ok=True)
    p = subprocess.Popen([exe, "--listen-host", "127.0.0.1", "-p", str(port), "-q", "--set", f"confdir={conf}",
                          "--set", f"ssl_verify_upstream_trusted_ca={d}/ca.pem"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, "mitmdump", conf)
    for _ in range(50):
        if os.path.exists(f"{conf}/mitmproxy-ca-cert.pem"):
            break
        time.sleep(0.1)
    return p, f"{conf}/mitmproxy-ca-cert.pem"


def start_proxy(d, origin_port, port):
    policy = f"""version = 1
[proxy]
listen = "127.0.0.1:{port}"
allow_cidrs = ["127.0.0.1/32"]
upstream_ca = ["{d}/ca.pem"]
passthrough = ["{PASS_HOST}:{origin_port}"]
resolve = {{ "{HOST}" = "127.0.0.1", "{PASS_HOST}" = "127.0.0.1" }}

[[secrets]]
name = "BENCH_TOKEN"
type = "http"
source = {{ env = "BENCH_REAL_TOKEN" }}
match_headers = ["Authorization"]
hosts = ["{HOST}:{origin_port}"]
"""
    # The policy in its own directory (the watcher's), the log outside it, as deployed.
    os.makedirs(f"{d}/etc", exist_ok=True)
    with open(f"{d}/etc/policy.toml", "w") as f:
        f.write(policy)
    # IRON_BENCH_LOG sets the proxy's log level (default warn; the proxy's own default is info).
    env = dict(os.environ, BENCH_REAL_TOKEN="bench-real-token-value", IRON_PROXY_HOME=f"{d}/state",
               IRON_PROXY_LOG=os.environ.get("IRON_BENCH_LOG", "warn"))
    log = open(f"{d}/proxy.log", "w")
    p = subprocess.Popen([PROXY_BIN, "serve", "--policy", f"{d}/etc/policy.toml"], env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            time.sleep(0.1)
    raise SystemExit("iron-proxy did not start; see " + f"{d}/proxy.log")


def start_stack(prefix):
    """An nginx TLS origin and iron-proxy (bench policy) in a fresh directory; returns
    (dir, origin_port, proxy_port, proxy process, CA bundle path). For profile.py and soak.py."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)  # nginx workers (nobody) read the document root
    make_certs(d)
    origin_port, proxy_port = free_port(), free_port()
    start_nginx(d, origin_port)
    proxy = start_proxy(d, origin_port, proxy_port)
    bundle = f"{d}/bundle.pem"
    with open(bundle, "w") as f:
        f.write(open(f"{d}/state/ca.crt").read() + open(f"{d}/ca.pem").read())
    return d, origin_port, proxy_port, proxy, bundle


def stop_stack(d, proxy):
    """Stops what start_stack started."""
    proxy.terminate()
    proxy.wait()
    stop_nginx(d)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def status_kib(pid, field):
    """A KiB field of /proc/PID/status (VmHWM: peak RSS, VmRSS: current RSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def peak_rss_kib(pid):
    return status_kib(pid, "VmHWM")


class RssSampler:
    """Samples a process's VmRSS every 50 ms while in use: the peak during one cell (VmHWM
    only gives the peak over the process's whole life)."""

    def __init__(self, pid):
        import threading
        self.pid, self.peak_kib, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.05):
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS") or 0)

    def __enter__(self):
        if self.pid:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.pid:
            self.thread.join()


def oha(url, extra, method, duration, proxy=None, cacert=None, body_file=None, headers=()):
    args = ["oha", "--no-tui", "--output-format", "json", "-z", f"{duration}s", "--no-pre-lookup"] + extra
    if proxy:
        args += ["-x", proxy]
    if cacert:
        args += ["--cacert", cacert]
    if method == "POST":
        args += ["-m", "POST", "-D", body_file]
    for h in headers:
        args += ["-H", h]
    args.append(url)
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        return {"rps": 0.0, "ok": 0, "errors": out.stderr.strip()[:200]}
    r = json.loads(out.stdout)
    ok = sum(v for k, v in r.get("statusCodeDistribution", {}).items() if k.startswith("2"))
    total = sum(r.get("statusCodeDistribution", {}).values())
    p99 = (r.get("latencyPercentiles") or {}).get("p99")
    return {"rps": ok / duration, "ok": ok, "non2xx": total - ok, "errors": r.get("errorDistribution", {}),
            "p99_ms": p99 * 1000.0 if p99 is not None else None}


PG_BIN = "/usr/lib/postgresql/15/bin"
PG_PASSWORD = "bench_REAL_pg_pw_1"


def as_postgres(*args):
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


def wait_port(port, what, log):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start; see {log}")


def pgbench(dsn, duration, clients, mode):
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    out = subprocess.run(["pgbench", "-n", mode, "-T", str(duration), "-c", str(clients), "-j", "2", dsn],
                         capture_output=True, text=True, env=env)
    r = {"tps": 0.0, "latency_ms": None, "failed": None, "exit": out.returncode}
    for line in out.stdout.splitlines():
        if line.startswith("tps ="):
            r["tps"] = float(line.split()[2])
        elif line.startswith("latency average ="):
            r["latency_ms"] = float(line.split()[3])
        elif line.startswith("number of failed transactions:"):
            r["failed"] = int(line.split(":")[1].split()[0])
    if out.returncode != 0:
        r["error"] = (out.stderr.strip() or out.stdout.strip())[-300:]
    return r


def pg_bench(a):
    """pgbench -S direct, through the iron-proxy relay, and through pgbouncer (if installed)."""
    if not os.path.exists(f"{PG_BIN}/initdb") or not shutil.which("pgbench"):
        print("postgresql-15 / pgbench not installed: Postgres bench skipped", file=sys.stderr)
        return None
    d = tempfile.mkdtemp(prefix="iron-pgbench-")
    os.chmod(d, 0o755)
    with open(f"{d}/pw", "w") as f:
        f.write(PG_PASSWORD)
    subprocess.run(["chown", "-R", "postgres:postgres", d])
    sh(*as_postgres(f"{PG_BIN}/initdb", "-D", f"{d}/data", "-U", "app", "--auth=scram-sha-256",
                    f"--pwfile={d}/pw", "--no-sync"))
    pg_port, relay_port, proxy_port, bouncer_port = free_port(), free_port(), free_port(), free_port()
    relay_sock_port = free_port()
    pg = subprocess.Popen(as_postgres(f"{PG_BIN}/postgres", "-D", f"{d}/data", "-p", str(pg_port), "-k", d,
                                      "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=100"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [pg]
    try:
        wait_port(pg_port, "postgres", d)
        time.sleep(0.5)
        direct = f"postgresql://app:{PG_PASSWORD}@127.0.0.1:{pg_port}/app?sslmode=disable"
        sh(*as_postgres(f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "app", "app"),
           env=dict(os.environ, PGPASSWORD=PG_PASSWORD))
        sh("pgbench", "-i", "-q", "-s", "10", direct)
        policy = f"""version = 1
[proxy]
listen = "127.0.0.1:{proxy_port}"
allow_cidrs = ["127.0.0.1/32"]

[[secrets]]
name = "DATABASE_URL"
type = "pg_dsn"
database = "app"
listen = "127.0.0.1:{relay_port}"
source = {{ env = "BENCH_REAL_DSN" }}

[[secrets]]
name = "DATABASE_URL_SOCKET"
type = "pg_dsn"
database = "app"
listen = "127.0.0.1:{relay_sock_port}"
source = {{ env = "BENCH_REAL_DSN_SOCKET" }}
"""
        with open(f"{d}/policy.toml", "w") as f:
            f.write(policy)
        # The same server over its Unix socket (libpq's host=DIRECTORY form): the upstream leg
        # of a relay or pooler running on the database's host.
        socket_dsn = f"host={d} port={pg_port} user=app password={PG_PASSWORD} dbname=app"
        env = dict(os.environ, BENCH_REAL_DSN=direct, BENCH_REAL_DSN_SOCKET=socket_dsn,
                   IRON_PROXY_HOME=f"{d}/state", IRON_PROXY_LOG="warn")
        log = open(f"{d}/proxy.log", "w")
        proxy = subprocess.Popen([PROXY_BIN, "serve", "--policy", f"{d}/policy.toml"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=log)
        procs.append(proxy)
        wait_port(relay_port, "iron-proxy relay", f"{d}/proxy.log")
        exports = sh(PROXY_BIN, "env", "--policy", f"{d}/policy.toml", env=env).stdout.splitlines()
        relay_dsn, relay_sock_dsn = (next(l.split("=", 1)[1].strip("'") for l in exports
                                          if l.startswith(f"export {name}="))
                                     for name in ("DATABASE_URL", "DATABASE_URL_SOCKET"))
        targets = {"direct": direct + "", "iron-proxy relay": relay_dsn + "?sslmode=disable",
                   "iron-proxy relay, socket upstream": relay_sock_dsn + "?sslmode=disable"}
        if shutil.which("pgbouncer") or os.path.exists("/usr/sbin/pgbouncer"):
            bouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
            with open(f"{d}/userlist.txt", "w") as f:
                f.write(f'"app" "{PG_PASSWORD}"\n')
            with open(f"{d}/pgbouncer.ini", "w") as f:
                f.write(f"""[databases]
app = host=127.0.0.1 port={pg_port} dbname=app
app_socket = host={d} port={pg_port} dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {bouncer_port}
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 20
unix_socket_dir =
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
""")
            subprocess.run(["chown", "-R", "postgres:postgres", d])
            procs.append(subprocess.Popen(as_postgres(bouncer, f"{d}/pgbouncer.ini"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(bouncer_port, "pgbouncer", f"{d}/pgbouncer.log")
            targets["pgbouncer (session pool)"] = f"postgresql://app:{PG_PASSWORD}@127.0.0.1:{bouncer_port}/app?sslmode=disable"
            targets["pgbouncer, socket upstream"] = f"postgresql://app:{PG_PASSWORD}@127.0.0.1:{bouncer_port}/app_socket?sslmode=disable"
        clients = 8
        rows = []
        for mode in ("-S", "-N"):  # select-only; simple-update (TPC-B without branch/teller updates)
            runs = {t: [] for t in targets}
            for rep in range(a.reps):
                for t, dsn in targets.items():
                    r = pgbench(dsn, a.pg_duration, clients, mode)
                    runs[t].append(r)
                    print(f"pgbench {mode} c={clients} {t:26} rep {rep + 1}: {r['tps']:9.0f} tps "
                          f"{r['latency_ms']} ms failed={r['failed']} {r.get('error', '')}", file=sys.stderr)
            base = statistics.median(x["tps"] for x in runs["direct"])
            for t, rs in runs.items():
                tps = statistics.median(x["tps"] for x in rs)
                lat = [x["latency_ms"] for x in rs if x["latency_ms"] is not None]
                rows.append({"mode": mode, "target": t, "median_tps": tps, "ratio_to_direct": tps / base if base else None,
                             "median_latency_ms": statistics.median(lat) if lat else None,
                             "failed": sum(x["failed"] or 0 for x in rs),
                             "errors": [x["error"] for x in rs if x.get("error")]})
        return {"clients": clients, "duration_s": a.pg_duration, "scale": 10, "rows": rows}
    finally:
        for p in reversed(procs[1:]):
            p.send_signal(signal.SIGTERM)
        subprocess.run(["kill", "-INT", open(f"{d}/data/postmaster.pid").read().split()[0]]
                       if os.path.exists(f"{d}/data/postmaster.pid") else ["true"])
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)


SWAP, NOP = "iron-proxy (intercept + swap)", "iron-proxy (intercept, no placeholder)"


def swap_cost(t):
    """The swap's cost in one scenario: the median over reps of 1 - swap/no-placeholder
    req/s (each pair ran back to back), and the extra proxy CPU per request (medians)."""
    s, n = t.get(SWAP), t.get(NOP)
    if not s or not n:
        return "–"
    pairs = [1 - a / b for a, b in zip(s.get("rps_runs", []), n.get("rps_runs", [])) if b]
    tput = (statistics.median(pairs) if pairs
            else (1 - s["median_rps"] / n["median_rps"]) if n["median_rps"] else None)
    sc, nc = s.get("proxy_cpu_ms_per_request"), n.get("proxy_cpu_ms_per_request")
    cpu = f" / {(sc / nc - 1) * 100:.1f} %" if sc and nc else ""
    return (f"{tput * 100:.1f} %" if tput is not None else "–") + cpu


def goal_lines(results, rss_mib):
    """The issue's goals, checked against this run: iron-proxy (intercept + swap) against
    hudsucker, Squid ssl-bump and the Squid tunnel, p99 against hudsucker, the swap's cost."""
    me = SWAP
    out = ["", "Goals, this run (iron-proxy = intercept + swap):", "",
           "| scenario | × hudsucker (> 1) | × ssl-bump (≥ 2) | × Squid tunnel (≥ 0.8 keep-alive, ≥ 0.7 new conn) "
           "| p99 ms iron / hudsucker | swap cost (≤ 3 %): req/s paired / CPU | peak RSS MiB iron / hudsucker (≤ 16) |", "|---|---|---|---|---|---|---|"]
    for row in results:
        t = row["targets"]
        if me not in t:
            continue
        mine = t[me]["median_rps"]

        def vs(name):
            o = t.get(name)
            return f"{mine / o['median_rps']:.2f}×" if o and o["median_rps"] else "–"
        h = t.get("hudsucker (Rust MITM)")
        p99 = (f"{t[me]['p99_ms']:.2f} / {h['p99_ms']:.2f}"
               if h and t[me].get("p99_ms") is not None and h.get("p99_ms") is not None else "–")
        cost = swap_cost(t)
        rss = f"{t[me].get('peak_rss_mib', 0)} / {h.get('peak_rss_mib', 0) if h else '–'}"
        out.append(f"| {row['scenario']} | {vs('hudsucker (Rust MITM)')} | {vs('squid ssl-bump')} | {vs('squid tunnel')} | {p99} | {cost} | {rss} |")
    out += ["", f"Peak RSS of iron-proxy over the whole run (every scenario, VmHWM): {rss_mib} MiB."]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None, help="substring of a scenario name")
    ap.add_argument("--pg-duration", type=int, default=20, help="seconds per pgbench run")
    ap.add_argument("--no-pg", action="store_true", help="skip the Postgres relay bench")
    ap.add_argument("--pg-only", action="store_true", help="only the Postgres relay bench")
    ap.add_argument("--no-peers", action="store_true", help="skip Squid, hudsucker and mitmproxy")
    ap.add_argument("--peers", default="squid,hudsucker,mitmproxy",
                    help="comma-separated peers to start (squid, hudsucker, mitmproxy)")
    ap.add_argument("--targets", default=None,
                    help="comma-separated substrings: only targets whose name has one (direct is always run)")
    a = ap.parse_args()
    pg = None if a.no_pg else pg_bench(a)
    if a.pg_only:
        print(json.dumps(pg, indent=2))
        return
    d = tempfile.mkdtemp(prefix="iron-bench-")
    os.chmod(d, 0o755)  # nginx workers (nobody) read the document root
    make_certs(d)
    origin_port = free_port()
    proxy_port = free_port()
    start_nginx(d, origin_port)
    proxy = start_proxy(d, origin_port, proxy_port)
    with open(f"{d}/body.bin", "wb") as f:
        f.write(b"b" * 100 * 1024)
    cas = [f"{d}/state/ca.crt", f"{d}/ca.pem"]
    url = f"https://{HOST}:{origin_port}"
    targets = {
        "direct": dict(url=url, proxy=None, extra=["--connect-to", f"{HOST}:{origin_port}:127.0.0.1:{origin_port}"], headers=(), pid=None),
        "iron-proxy (intercept + swap)": dict(url=url, proxy=f"http://127.0.0.1:{proxy_port}", extra=[], headers=("Authorization: Bearer BENCH_TOKEN",), pid=proxy.pid),
        "iron-proxy (intercept, no placeholder)": dict(url=url, proxy=f"http://127.0.0.1:{proxy_port}", extra=[], headers=("Authorization: Bearer not-a-placeholder",), pid=proxy.pid),
        "iron-proxy (passthrough)": dict(url=f"https://{PASS_HOST}:{origin_port}", proxy=f"http://127.0.0.1:{proxy_port}", extra=[], headers=(), pid=proxy.pid),
    }
    peers = []  # (name, process)
    want = set() if a.no_peers else set(a.peers.split(","))
    if "squid" in want and (shutil.which("squid") or os.path.exists("/usr/sbin/squid")):
        for bump in (False, True):
            port = free_port()
            try:
                sp, ca = start_squid(d, port, bump)
            except (SystemExit, subprocess.CalledProcessError) as e:
                print(f"squid{' ssl-bump' if bump else ''} not started: {e}", file=sys.stderr)
                continue
            name = "squid ssl-bump" if bump else "squid tunnel"
            peers.append((name, sp))
            if ca:
                cas.append(ca)
            targets[name] = dict(url=url, proxy=f"http://127.0.0.1:{port}", extra=[], headers=(), pid=sp.pid)
    if "hudsucker" in want and os.path.exists(HUDSUCKER_BIN):
        port = free_port()
        try:
            hp, ca = start_hudsucker(d, port)
            peers.append(("hudsucker", hp))
            cas.append(ca)
            targets["hudsucker (Rust MITM)"] = dict(url=url, proxy=f"http://127.0.0.1:{port}", extra=[], headers=(), pid=hp.pid)
        except (SystemExit, subprocess.CalledProcessError) as e:
            print(f"hudsucker not started: {e}", file=sys.stderr)
    if "mitmproxy" in want and (shutil.which("mitmdump") or os.path.exists("/opt/mitm/bin/mitmdump")):
        port = free_port()
        try:
            mp, ca = start_mitmproxy(d, port)
            peers.append(("mitmproxy", mp))
            cas.append(ca)
            # mitmproxy resolves names itself: the origin's IP SAN is used instead.
            targets["mitmproxy"] = dict(url=f"https://127.0.0.1:{origin_port}", proxy=f"http://127.0.0.1:{port}", extra=[], headers=(), pid=mp.pid)
        except SystemExit as e:
            print(f"mitmproxy not started: {e}", file=sys.stderr)
    if a.targets:
        keep = a.targets.split(",")
        targets = {t: c for t, c in targets.items() if t == "direct" or any(k in t for k in keep)}
    bundle = f"{d}/bundle.pem"
    with open(bundle, "w") as f:
        f.write("".join(open(c).read() for c in cas))
    results = []
    try:
        for name, extra, method in SCENARIOS:
            if a.only and a.only not in name:
                continue
            runs = {t: [] for t in targets}
            cpu = {t: [] for t in targets}
            names = list(targets)
            # Swap and no-placeholder run back to back (alternating which goes first), so the
            # swap's cost is measured in pairs a few seconds apart: one unit of the rotation.
            units = [[t] for t in names if t not in ("direct", NOP)]
            for u in units:
                if u == [SWAP] and NOP in names:
                    u.append(NOP)
            for rep in range(a.reps):
                # Interleaved: direct first, then the proxies with their order rotating each
                # repetition, so a different one runs right after direct each time. Running
                # right after direct (oha and nginx at full speed) was seen to cost the next
                # proxy up to 20 % (iron-proxy's event loops then park about 3x as often, for the
                # whole next cell; a 3 s pause did not help), and the old rotation of one cyclic
                # list put iron-proxy's pair right after direct in every repetition.
                k = rep % len(units) if units else 0
                order = ["direct"] + [t for u in units[k:] + units[:k] for t in u]
                if SWAP in order and NOP in order and rep % 2:
                    i = order.index(SWAP)
                    order[i], order[i + 1] = order[i + 1], order[i]
                for t in order:
                    cfg = targets[t]
                    path = "/post" if method == "POST" else "/"
                    before = cpu_ticks(cfg["pid"]) if cfg["pid"] else 0
                    with RssSampler(cfg["pid"]) as rss_cell:
                        r = oha(cfg["url"] + path, extra + cfg["extra"], method, a.duration, proxy=cfg["proxy"],
                                cacert=bundle, body_file=f"{d}/body.bin", headers=cfg["headers"])
                    r["peak_rss_kib"] = rss_cell.peak_kib
                    ticks = (cpu_ticks(cfg["pid"]) - before) if cfg["pid"] else 0
                    runs[t].append(r)
                    if cfg["pid"] and r["ok"]:
                        cpu[t].append(ticks * 1000.0 / os.sysconf("SC_CLK_TCK") / r["ok"])
                    print(f"{name:38} {t:30} rep {rep + 1}: {r['rps']:9.0f} req/s", file=sys.stderr)
            direct = statistics.median(x["rps"] for x in runs["direct"])
            row = {"scenario": name, "targets": {}}
            for t in targets:
                rps = [x["rps"] for x in runs[t]]
                med = statistics.median(rps)
                row["targets"][t] = {
                    "median_rps": med, "min_rps": min(rps), "max_rps": max(rps),
                    "ratio_to_direct": (med / direct) if direct else None,
                    "peak_rss_mib": round(max(x.get("peak_rss_kib", 0) for x in runs[t]) / 1024, 1),
                    "proxy_cpu_ms_per_request": statistics.median(cpu[t]) if cpu[t] else None,
                    "p99_ms": statistics.median(p99s) if (p99s := [x["p99_ms"] for x in runs[t] if x.get("p99_ms") is not None]) else None,
                    "errors": [x.get("errors") for x in runs[t] if x.get("errors")],
                    "rps_runs": rps,
                    "cpu_ms_runs": cpu[t],
                }
            results.append(row)
    finally:
        rss = peak_rss_kib(proxy.pid)
        peer_rss = {}
        for name, p in peers:
            peer_rss[name] = round(peak_rss_kib(p.pid) / 1024, 1)
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
        stop_nginx(d)
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "duration_s": a.duration, "reps": a.reps,
           "proxy_bin": os.path.relpath(PROXY_BIN, ROOT),
           "cpus": os.cpu_count(), "proxy_peak_rss_mib": round(rss / 1024, 1), "peer_peak_rss_mib": peer_rss, "results": results,
           "postgres": pg}
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    # A run restricted to some scenarios, targets or peers does not replace the full table.
    full = not (a.only or a.targets or a.no_peers or a.no_pg) and want == {"squid", "hudsucker", "mitmproxy"}
    stem = os.path.join(ROOT, "bench", "results", "latest" if full else "partial")
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=2)
    md = [f"Run {out['date']}, {a.reps} × {a.duration} s per cell, interleaved, {out['cpus']} cores shared by oha, nginx and the proxy. "
          f"iron-proxy binary: `{out['proxy_bin']}`. "
          f"Peak RSS over the whole run: iron-proxy {out['proxy_peak_rss_mib']} MiB"
          + "".join(f", {k} {v} MiB" for k, v in peer_rss.items()) + ".", "",
          "| scenario | target | median req/s | min–max | × direct | p99 ms | proxy CPU ms/req |", "|---|---|---|---|---|---|---|"]
    for row in results:
        for t, v in row["targets"].items():
            ratio = f"{v['ratio_to_direct']:.2f}×" if v["ratio_to_direct"] is not None else "–"
            cpu = f"{v['proxy_cpu_ms_per_request']:.3f}" if v["proxy_cpu_ms_per_request"] is not None else "–"
            p99 = f"{v['p99_ms']:.2f}" if v.get("p99_ms") is not None else "–"
            md.append(f"| {row['scenario']} | {t} | {v['median_rps']:.0f} | {v['min_rps']:.0f}–{v['max_rps']:.0f} | {ratio} | {p99} | {cpu} |")
    md += goal_lines(results, out["proxy_peak_rss_mib"])
    if pg:
        md += ["", f"Postgres relay: `pgbench -n -S|-N -c {pg['clients']} -j 2 -T {pg['duration_s']}` (scale {pg['scale']}), "
                   f"{a.reps} run(s) per target, interleaved; TLS off on every leg. Clients always reach the relay "
                   "and pgbouncer over TCP; their upstream leg is TCP, or the server's Unix socket in the "
                   "`socket upstream` rows (a relay or pooler on the database's host).", "",
               "| mode | target | median TPS | × direct | median latency ms | failed transactions | errors |",
               "|---|---|---|---|---|---|---|"]
        for r in pg["rows"]:
            ratio = f"{r['ratio_to_direct']:.2f}×" if r["ratio_to_direct"] is not None else "–"
            md.append(f"| {r['mode']} | {r['target']} | {r['median_tps']:.0f} | {ratio} | {r['median_latency_ms']} | {r['failed']} | {len(r['errors'])} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
