#!/usr/bin/env python3
"""Where the per-request instructions go: the difference of two callgrind runs of the same
build (N1 and N2 requests, from `python3 bench/swap_cost.py --keep DIR`), per function
(self cost, all threads), divided by N2 - N1, so start-up (CA generation, entropy, TLS
set-up) cancels out.
Usage: python3 bench/cg_diff.py DIR/not-a-placeholder.n200.cg.* DIR/not-a-placeholder.n2200.cg.* 2000 [TOP]"""
import collections, re, subprocess, sys


def self_costs(path):
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", path],
                         capture_output=True, text=True, check=True).stdout
    costs = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", line)
        if not m or "=>" in line or ":" not in m.group(2):
            continue
        name = re.sub(r" \[.*\]$", "", m.group(2)).split(":", 1)[1]  # drop the file
        costs[name] += int(m.group(1).replace(",", ""))
    return costs


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    a, b, n = self_costs(sys.argv[1]), self_costs(sys.argv[2]), float(sys.argv[3])
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    per = {k: (b[k] - a.get(k, 0)) / n for k in b}
    print(f"{sum(per.values()):8.0f}  instructions per request in all")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{v:8.0f}  {k[:160]}")


if __name__ == "__main__":
    main()
