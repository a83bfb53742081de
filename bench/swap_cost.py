#!/usr/bin/env python3
"""The placeholder swap's cost in instructions, not seconds: iron-proxy runs under
`valgrind --tool=callgrind` (instruction counts are repeatable on a shared, noisy machine,
where req/s pairs move by ±15 %), oha sends N1 then N2 keep-alive GETs on one connection,
each with `Authorization: Bearer BENCH_TOKEN` (swapped) and with a value that is no
placeholder; the difference of the two runs' totals divided by N2 - N1 is the per-request
count without start-up (aws-lc's start-up entropy gathering, which varies run to run, is
taken out by function name). All threads are counted (the audit writer too).
Usage: python3 bench/swap_cost.py [--n1 200] [--n2 1200]; needs the release build and valgrind."""
import argparse, glob, os, re, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# Functions of aws-lc's start-up entropy gathering (see `total`).
ENTROPY = re.compile(r"jent_|keccak|rol64|xoshiro|entropy|jitter")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=1200)
    ap.add_argument("--keep", metavar="DIR", help="copy each run's callgrind files here, named "
                    "by header and N (bench/cg_diff.py: where the per-request count goes)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="iron-swapcost-")
    real = os.environ.get("IRON_BENCH_BIN") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release", "iron-proxy")
    wrap = f"{work}/proxy.sh"
    with open(wrap, "w") as f:
        f.write(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={work}/cg.%p {real} \"$@\"\n")
    os.chmod(wrap, 0o755)
    os.environ["IRON_BENCH_BIN"] = wrap
    import bench  # reads IRON_BENCH_BIN at import
    from cg_diff import self_costs

    def total(n, header):
        for f in glob.glob(f"{work}/cg.*"):
            os.remove(f)
        d, origin_port, proxy_port, proxy, bundle = bench.start_stack("iron-swapcost-")
        try:
            subprocess.run(["oha", "--no-tui", "-n", str(n), "-c", "1", "--no-pre-lookup",
                            "-x", f"http://127.0.0.1:{proxy_port}", "--cacert", bundle, "-H", header,
                            f"https://{bench.HOST}:{origin_port}/"], capture_output=True, check=True)
        finally:
            bench.stop_stack(d, proxy)
        time.sleep(1)
        best = 0
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            for f in glob.glob(f"{work}/cg.*"):
                shutil.copy(f, os.path.join(a.keep, f"{header.split()[-1]}.n{n}.{os.path.basename(f)}"))
        # aws-lc gathers start-up entropy (CPU jitter, `jent_*`, hashed with Keccak) for a
        # number of rounds that varies run to run: ±400 instructions per request at
        # N2 - N1 = 3000, which does not cancel out. Its self cost is taken out by name.
        for f in glob.glob(f"{work}/cg.*"):
            for line in open(f):
                if line.startswith(("summary:", "totals:")):
                    noise = sum(v for k, v in self_costs(f).items() if ENTROPY.search(k))
                    best = max(best, int(line.split()[1]) - noise)
        return best

    per = {}
    for name, header in [("swap", "Authorization: Bearer BENCH_TOKEN"),
                         ("no placeholder", "Authorization: Bearer not-a-placeholder")]:
        per[name] = (total(a.n2, header) - total(a.n1, header)) / (a.n2 - a.n1)
        print(f"{name:15} {per[name]:9.0f} instructions/request", flush=True)
    extra = per["swap"] - per["no placeholder"]
    print(f"swap cost       {extra:9.0f} instructions/request ({extra / per['no placeholder'] * 100:.1f} %)")


if __name__ == "__main__":
    main()
