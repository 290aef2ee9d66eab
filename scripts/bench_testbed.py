"""Benchmark: wall time of `nodemesh testbed up` and `down` (2 nodes x 10 pods by default).

Runs the real CLI (process start included) several times, alternating up and
down, and prints medians as JSON. Usage (root):

    .venv/bin/python scripts/bench_testbed.py [--rounds 5] [--nodes 2] [--pods-per-node 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

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
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "pods_per_node": args.pods_per_node,
                "rounds": args.rounds,
                "up_s_median": round(statistics.median(ups), 3),
                "up_s_all": [round(x, 3) for x in ups],
                "down_s_median": round(statistics.median(downs), 3),
                "down_s_all": [round(x, 3) for x in downs],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
