#!/usr/bin/env python3
"""Where iron-proxy's time goes in the keep-alive GET scenario (1 connection, a placeholder
swapped on every request): `perf record` (software cpu-clock, flat self time) on the proxy
while oha drives it, then the top symbols grouped by library. Needs linux-perf and the
release build; run after bench/run.sh. Usage: python3 bench/profile.py [--duration SECS]"""
import argparse, os, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--post", action="store_true", help="POST 100 KiB instead of GET")
    a = ap.parse_args()
    d, origin_port, proxy_port, proxy, bundle = bench.start_stack("iron-profile-")
    data = f"{d}/perf.data"
    try:
        rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "1999", "-o", data,
                                "-p", str(proxy.pid), "--", "sleep", str(a.duration)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        body = f"{d}/body.bin"
        with open(body, "wb") as f:
            f.write(b"b" * 100 * 1024)
        method = "POST" if a.post else "GET"
        r = bench.oha(f"https://{bench.HOST}:{origin_port}/{'post' if a.post else ''}", ["-c", str(a.conns)],
                      method, a.duration, proxy=f"http://127.0.0.1:{proxy_port}", cacert=bundle, body_file=body,
                      headers=("Authorization: Bearer BENCH_TOKEN",))
        rec.wait()
        print(f"keep-alive {method}, {a.conns} conn(s), {a.duration} s: {r['rps']:.0f} req/s through iron-proxy\n")
        views = [
            ("by library (share of all samples)", ["--sort", "dso", "--percent-limit", "0.5"]),
            ("top symbols (share of all samples)", ["--sort", "dso,symbol", "--percent-limit", "0.8"]),
            ("inside iron-proxy (share of its own samples)",
             ["--dsos", "iron-proxy", "--percentage", "relative", "--sort", "symbol", "--percent-limit", "0.9"]),
        ]
        for title, args in views:
            print(f"## {title}")
            out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children"] + args,
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                if line.strip() and not line.startswith("#"):
                    print(" ".join(line.split()))
            print()
    finally:
        bench.stop_stack(d, proxy)


if __name__ == "__main__":
    main()
