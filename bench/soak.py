#!/usr/bin/env python3
"""RSS over a long run: oha drives iron-proxy (keep-alive GET, 32 connections, a
placeholder swapped on every request) for --minutes, while the proxy's RSS is sampled every
--every seconds. Prints the samples and first/last/peak; flat means no growth after warm-up.
Run after bench/run.sh (needs the release build, nginx, oha).
Usage: python3 bench/soak.py [--minutes 10] [--every 10] [--conns 32]"""
import argparse, os, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def rss_kib(pid):
    return bench.status_kib(pid, "VmRSS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    d, origin_port, proxy_port, proxy, bundle = bench.start_stack("iron-soak-")
    secs = int(a.minutes * 60)
    load = subprocess.Popen(["oha", "--no-tui", "--output-format", "json", "-z", f"{secs}s", "--no-pre-lookup",
                             "-c", str(a.conns), "-x", f"http://127.0.0.1:{proxy_port}", "--cacert", bundle,
                             "-H", "Authorization: Bearer BENCH_TOKEN", f"https://{bench.HOST}:{origin_port}/"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []
    try:
        start = time.time()
        while load.poll() is None:
            time.sleep(a.every)
            samples.append((round(time.time() - start), rss_kib(proxy.pid)))
            print(f"{samples[-1][0]:>5} s  RSS {samples[-1][1] / 1024:.1f} MiB", flush=True)
        out, _ = load.communicate()
        try:
            import json
            r = json.loads(out)
            ok = sum(v for k, v in r.get("statusCodeDistribution", {}).items() if k.startswith("2"))
            print(f"requests answered 2xx: {ok} ({ok / secs:.0f}/s)")
        except ValueError:
            pass
        if samples:
            warm = samples[min(2, len(samples) - 1)][1]
            print(f"RSS after warm-up {warm / 1024:.1f} MiB, last {samples[-1][1] / 1024:.1f} MiB, "
                  f"peak {max(s for _, s in samples) / 1024:.1f} MiB, peak (VmHWM) {bench.peak_rss_kib(proxy.pid) / 1024:.1f} MiB")
    finally:
        bench.stop_stack(d, proxy)


if __name__ == "__main__":
    main()
