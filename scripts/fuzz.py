#!/usr/bin/env python3
"""Long fuzzing runs of the HTTP/2 core and the DNS wire parser, by hand.

The same Hypothesis properties CI runs at a fixed seed with few examples
(tests/unit/test_fuzz_h2.py, tests/unit/test_fuzz_dns.py), here with a fresh
random seed per round and many examples, round-robin over the properties
until the time is up. Run from the repository root:

    .venv/bin/python scripts/fuzz.py --minutes 10            # everything
    .venv/bin/python scripts/fuzz.py --target h2 --minutes 30
    .venv/bin/python scripts/fuzz.py --target dns --seed 1234 --examples 5000   # replay one round

Properties: any input gives events (HTTP/2) or a message (DNS), or raises our
own protocol error (H2ProtocolError / DnsFormatError), nothing else; the HTTP/2
core's buffers stay bounded; valid DNS messages round-trip. On a failure the
minimal failing example, the property and the seed are printed and the exit
status is 1; 0 when the time ran out with none.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings

from tests.unit import test_fuzz_dns, test_fuzz_h2

TARGETS: dict[str, dict[Callable[..., None], dict[str, Any]]] = {
    "h2": test_fuzz_h2.STRATEGIES,
    "dns": test_fuzz_dns.STRATEGIES,
}


def run_round(prop: Callable[..., None], strategies: dict[str, Any], round_seed: int, examples: int) -> None:
    test = seed(round_seed)(
        settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                 suppress_health_check=list(HealthCheck))(given(**strategies)(prop))
    )
    test()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    ap.add_argument("--target", choices=["all", *TARGETS], default="all", help="what to fuzz (default all)")
    ap.add_argument("--examples", type=int, default=2000,
                    help="examples per property per round (default 2000)")
    ap.add_argument("--seed", type=int, help="run one round per property at this seed (to replay a failure)")
    args = ap.parse_args(argv)

    props = [p for name, table in TARGETS.items() if args.target in ("all", name) for p in table.items()]
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    rng = random.Random()
    while True:
        for prop, strategies in props:
            round_seed = args.seed if args.seed is not None else rng.getrandbits(32)
            t0 = time.monotonic()
            try:
                run_round(prop, strategies, round_seed, args.examples)
            except Exception:  # a falsified property: Hypothesis put the minimal example in the traceback
                traceback.print_exc()
                print(f"\nFAILED {prop.__module__}.{prop.__name__} at --seed {round_seed}", file=sys.stderr)
                return 1
            rounds += 1
            print(f"ok {prop.__name__} seed={round_seed} examples={args.examples} "
                  f"in {time.monotonic() - t0:.1f} s", flush=True)
            if time.monotonic() >= deadline:
                break
        if args.seed is not None or time.monotonic() >= deadline:
            break
    print(f"no failure in {rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
