#!/usr/bin/env python3
"""Route matching cost per request: VirtualService with 1 and with 1,000 routes (regex included).

Not a test: a benchmark, run by hand from the repository root (no root needed):

    .venv/bin/python scripts/bench_routing.py [--requests 20000] [--json out.json]

What it times: :func:`agent.dataplane.http.routing.decide` for one request, the
pure per-request decision the source node's proxy makes (match, weighted
destination, subset endpoints, policy), over a snapshot with one service of two
workloads and one VirtualService of N routes. Cases: the request matches the
first route; it matches the last of 1,000 routes each with a RE2 uri regex
and a header regex (the worst case: every route's regex runs); no
VirtualService at all (the baseline: what every request costs without one).
Medians of 5 runs, microseconds per request. Output: a markdown table; with ``--json``
also the rows as JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchplot  # noqa: E402  (scripts/, this script's own directory)

from agent.control.istio import (  # noqa: E402
    Destination,
    HttpMatch,
    HttpRoute,
    RouteDestination,
    StringMatch,
    VirtualService,
)
from agent.control.model import Kind, Service, ServicePort, Workload, resource_key  # noqa: E402
from agent.control.snapshot import SnapshotBuilder  # noqa: E402
from agent.dataplane.http import routing  # noqa: E402

SVC = Service("reviews", "default", "10.96.0.20", (ServicePort("http", 80, 9080),), {"app": "reviews"})
CLIENT = Workload(name="web-1", namespace="default", address="10.244.1.2", node="n1", service_account="web",
                  labels={"app": "web"})


def snapshot(routes: int) -> Any:
    b = SnapshotBuilder()
    puts = {resource_key(Kind.SERVICE, "default", "reviews"): json.dumps(SVC.to_doc())}
    for i, addr in enumerate(("10.244.2.2", "10.244.2.3")):
        w = Workload(name=f"reviews-{i}", namespace="default", address=addr, node="n2",
                     service_account="reviews", labels={"app": "reviews"})
        puts[resource_key(Kind.WORKLOAD, "default", w.name)] = json.dumps(w.to_doc())
    puts[resource_key(Kind.WORKLOAD, "default", CLIENT.name)] = json.dumps(CLIENT.to_doc())
    b.apply(puts, [])
    snap = b.build(1)
    if routes == 0:
        return snap
    dest = (RouteDestination(Destination("reviews")),)
    http = tuple(
        HttpRoute(f"r{i}", (HttpMatch(uri=StringMatch("regex", f"/api/v{i}/[a-z]+"),
                                      headers=(("x-tenant", StringMatch("regex", f"tenant-{i}-[a-z]+")),)),),
                  dest)
        for i in range(routes)
    )
    vs = VirtualService("reviews", "default", ("reviews",), http)

    return dataclasses.replace(snap, virtual_services={("default", "reviews"): vs})


def per_request_us(routes: int, last: bool, n: int) -> float:
    table = routing.RouteTable.build(snapshot(routes))
    i = routes - 1 if last else 0
    req = routing.RequestFacts("GET", f"/api/v{max(i, 0)}/items?x=1", "reviews", "http",  # (query ignored)
                               {"x-tenant": f"tenant-{max(i, 0)}-acme", "user-agent": "bench"}, 80, CLIENT)
    rng = random.Random(1)
    routing.decide(table, SVC, req, rng)  # (compiles the regexes once, as the first request does)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            routing.decide(table, SVC, req, rng)
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--json", help="also write the rows to this file (and a PNG next to it)")
    a = ap.parse_args()
    rows = [
        ("no VirtualService (baseline)", per_request_us(0, False, a.requests)),
        ("1 route, matched", per_request_us(1, False, a.requests)),
        ("1,000 routes, first matched", per_request_us(1000, False, a.requests)),
        ("1,000 routes, last matched (every route's uri regex tried)",
         per_request_us(1000, True, max(a.requests // 100, 50))),
    ]
    print("| case | µs per request |")
    print("|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:,.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"case": name, "us_per_request": round(us, 2)} for name, us in rows], f, indent=1)
        benchplot.bars(benchplot.png_next_to(a.json), "route matching per request",
                       [name.split(" (")[0] for name, _ in rows], [us for _, us in rows],
                       "µs per request (log)", rotate=20, log=True)


if __name__ == "__main__":
    main()
