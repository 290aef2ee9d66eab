"""Benchmark: wall time of `nodemesh testbed up` and `down` (2 nodes x 10 pods by default).

Runs the real CLI (process start included) several times, alternating up and
down, and prints medians as JSON. Usage (root):

    .venv/bin/python scripts/bench_testbed.py [--rounds 5] [--nodes 2] [--pods-per-node 10] [--json out.json]

With ``--json`` the result is also written there, with a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import benchplot  # (scripts/, this script's own directory)

PREFIX = "nmbench"


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--pods-per-node", type=int, default=10)
    ap.add_argument("--json", help="also write the result to this file (and a PNG next to it)")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "agent.cli.main", "testbed"]
    ups, downs = [], []
    try:
        for _ in range(args.rounds):
            ups.append(
                timed([*cli, "up", "-n", str(args.nodes), "-m", str(args.pods_per_node), "-p", PREFIX])
            )
            downs.append(timed([*cli, "down", "-p", PREFIX]))
    finally:
        subprocess.run([*cli, "down", "-p", PREFIX], stdout=subprocess.DEVNULL)
    result = {
        "nodes": args.nodes,
        "pods_per_node": args.pods_per_node,
        "rounds": args.rounds,
        "up_s_median": round(statistics.median(ups), 3),
        "up_s_all": [round(x, 3) for x in ups],
        "down_s_median": round(statistics.median(downs), 3),
        "down_s_all": [round(x, 3) for x in downs],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        benchplot.bars(benchplot.png_next_to(args.json),
                       f"testbed of {args.nodes} nodes x {args.pods_per_node} pods (median of {args.rounds})",
                       ["up", "down"], [result["up_s_median"], result["down_s_median"]], "seconds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
