#!/usr/bin/env python3
"""Runs on one stack (nginx origin, iron-proxy), one after another, and what each costs every
process: req/s, CPU microseconds per request of iron-proxy and nginx (/proc) and of oha
(getrusage), and iron-proxy's voluntary context switches per request (its event loops going
idle: "parks"). For the "slow mode" (bench/README.md): an iron-proxy run right after a
direct run is slower, and every process spends more per request.

Usage: python3 bench/loop_probe.py STEPS [--scenario ka32|ka1|new16|new1|post8] [--threads]
  STEPS, comma-separated: i = a run through iron-proxy (swap on every request), d = a direct
  run, n = restart nginx, p = restart iron-proxy, a number = pause that many seconds.
  e.g. `python3 bench/loop_probe.py i,d,i,i`; TOKIO_WORKER_THREADS=1 for one event loop.
Needs the release build, nginx and oha (bench/run.sh installs them)."""
import argparse, json, os, resource, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SCENARIOS = {
    "ka32": ["-c", "32"],
    "ka1": ["-c", "1"],
    "new16": ["-c", "16", "--disable-keepalive"],
    "new1": ["-c", "1", "--disable-keepalive"],
    "post8": ["-c", "8", "-m", "POST"],
}
SECONDS = 5


def nginx_pids(d):
    master = int(open(f"{d}/nginx.pid").read())
    kids = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master] + [int(k) for k in kids]


def switches(pid):
    """Voluntary context switches of every thread of pid, by thread."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        for line in open(f"/proc/{pid}/task/{t}/status"):
            if line.startswith("voluntary_ctxt_switches"):
                out[f"{t}:{name}"] = int(line.split()[1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("steps")
    ap.add_argument("--scenario", default="ka32", choices=sorted(SCENARIOS))
    ap.add_argument("--threads", action="store_true", help="parks per request of each thread too")
    a = ap.parse_args()
    d, op, pp, proxy, bundle = bench.start_stack("iron-loop-probe-")
    ng = nginx_pids(d)
    body = f"{d}/body.bin"
    with open(body, "wb") as f:
        f.write(b"x" * 102400)
    url = f"https://{bench.HOST}:{op}/" + ("post" if a.scenario == "post8" else "")
    hz = os.sysconf("SC_CLK_TCK")

    def run(via_proxy):
        args = ["oha", "--no-tui", "--output-format", "json", "-z", f"{SECONDS}s", "--no-pre-lookup",
                "--cacert", bundle] + SCENARIOS[a.scenario]
        if a.scenario == "post8":
            args += ["-D", body]
        if via_proxy:
            args += ["-x", f"http://127.0.0.1:{pp}", "-H", "Authorization: Bearer BENCH_TOKEN"]
        else:
            args += ["--connect-to", f"{bench.HOST}:{op}:127.0.0.1:{op}"]
        p0, n0, s0 = bench.cpu_ticks(proxy.pid), sum(map(bench.cpu_ticks, ng)), switches(proxy.pid)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(args + [url], capture_output=True, text=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = json.loads(out.stdout)
        n = sum(report.get("statusCodeDistribution", {}).values())
        p99 = (report.get("latencyPercentiles") or {}).get("p99") or 0
        if n == 0:
            print(f"no answers: {out.stderr.strip()[:300]}")
            return
        s1 = switches(proxy.pid)
        oha_s = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        us = lambda ticks: 1e6 * ticks / hz / n  # noqa: E731
        parks = (sum(s1.values()) - sum(s0.values())) / n if via_proxy else 0
        print(f"{'iron-proxy' if via_proxy else 'direct    '} {n / SECONDS:8.0f} req/s  "
              f"iron-proxy {us(bench.cpu_ticks(proxy.pid) - p0):6.1f} µs/req  "
              f"nginx {us(sum(map(bench.cpu_ticks, ng)) - n0):6.1f}  oha {1e6 * oha_s / n:6.1f}  "
              f"parks/req {parks:.3f}  p99 {p99 * 1000:.2f} ms", flush=True)
        if via_proxy and a.threads:
            print("   by thread:", {k: round((v - s0.get(k, 0)) / n, 3) for k, v in s1.items()})

    try:
        for step in a.steps.split(","):
            if step in ("i", "d"):
                run(step == "i")
            elif step == "n":
                bench.stop_nginx(d)
                time.sleep(0.5)
                bench.start_nginx(d, op)
                time.sleep(0.5)
                ng = nginx_pids(d)
                print("nginx restarted")
            elif step == "p":
                proxy.terminate()
                proxy.wait()
                proxy = bench.start_proxy(d, op, pp)
                print("iron-proxy restarted")
            else:
                time.sleep(float(step))
    finally:
        bench.stop_stack(d, proxy)


if __name__ == "__main__":
    main()
