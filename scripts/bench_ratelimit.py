#!/usr/bin/env python3
"""Rate limiting cost per HTTP request: what a RateLimitPolicy in force adds at the destination.

Not a test: a benchmark, run by hand from the repository root (no root needed):

    .venv/bin/python scripts/bench_ratelimit.py [--requests 20000] [--out-dir bench-results]

What it times: what the destination's inbound does for each HTTP request before it is
forwarded, :meth:`agent.dataplane.authorize.Authorizer.judge_request` (method check, path
normalised, RequestAuthentication and AuthorizationPolicy lookups: none apply here), with the
node's :class:`agent.dataplane.ratelimit.RateLimits` attached as the agent attaches it, in
these cases (policies written as users write them, YAML through the validator):

* ``no limits``: RateLimits attached, no RateLimitPolicy anywhere (the cost for everyone);
* ``other service``: a policy for another service (this workload: one lookup);
* ``total``: ``total: 1e6/s`` on the request's service port (one bucket, admitted);
* ``total+identity+header``: a total, a per-identity and a per-header-value descriptor
  (three buckets, admitted);
* ``service scope``: ``total`` with ``scope: service`` (a node's share);
* ``refused``: a total whose bucket is empty: the 429 LocalReply built and raised;
* ``route: its route`` / ``route: another route``: ``total`` on one VirtualService route
  (``targetRef.route``), the request of that route (one bucket) or of another (passed by).

The baseline is the same call with no RateLimits attached (``limits = None``). Medians of 5
runs, microseconds per request; a table on stdout, JSON in ``--out-dir``
(bench-results/ratelimit-<timestamp>.json) and a bar chart of the added cost next to it (.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchplot  # noqa: E402  (scripts/, this script's own directory)
from prometheus_client import CollectorRegistry  # noqa: E402

from agent.control import authz  # noqa: E402
from agent.control.apply import plan  # noqa: E402
from agent.control.snapshot import SnapshotBuilder  # noqa: E402
from agent.control.validate import parse_vip_range, parse_yaml  # noqa: E402
from agent.dataplane.authorize import Authorizer  # noqa: E402
from agent.dataplane.http.exchange import Exchange, LocalReply  # noqa: E402
from agent.dataplane.http.normalize import PathNormalization  # noqa: E402
from agent.dataplane.ratelimit import RateLimits  # noqa: E402
from agent.dataplane.route import Directory  # noqa: E402
from agent.metrics.istio import MeshMetrics  # noqa: E402
from scripts.bench_authz import RUNS, median_us, revision  # noqa: E402

NET = parse_vip_range("10.96.0.0/16")
PRINCIPAL = "cluster.local/ns/shop/sa/frontend"
CONN = authz.Facts(principal=PRINCIPAL, namespace="shop", source_ip="10.244.1.5",
                   destination_ip="10.244.2.9", destination_port=9080)
METHOD, TARGET, AUTHORITY = "GET", "/api/v1/reviews/42?lang=en", "reviews.shop.svc.cluster.local:9080"
HEADERS = [
    (b"host", AUTHORITY.encode()),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) bench"),
    (b"accept", b"application/json"),
    (b"x-tenant", b"gold"),
    (b"x-request-id", b"6b1c3f0e-8d2a-4d4f-9a8e-2f0c1b7d9e11"),
]
MESH = """apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: other, namespace: shop}
spec:
  selector: {app: other}
  ports: [{name: http, port: 9080, protocol: http}]
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews}}
spec: {address: 10.244.2.9, node: n2, serviceAccount: reviews}
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: reviews-2, namespace: shop, labels: {app: reviews}}
spec: {address: 10.244.3.9, node: n3, serviceAccount: reviews}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - {name: search, match: [{uri: {prefix: /search}}], route: [{destination: {host: reviews}}]}
  - {name: api, route: [{destination: {host: reviews}}]}
"""


def limit(service: str, spec: str, route: str = "") -> str:
    to = f", route: {{virtualService: reviews, name: {route}}}" if route else ""
    return ("---\napiVersion: nodemesh.io/v1\nkind: RateLimitPolicy\n"
            "metadata: {name: limit, namespace: shop}\n"
            f"spec:\n  targetRef: {{kind: Service, name: {service}, port: 9080{to}}}\n{spec}")


CASES = {
    "no limits": "",
    "other service": limit("other", "  http: {total: {requestsPerSecond: 1000000}}\n"),
    "total": limit("reviews", "  http: {total: {requestsPerSecond: 1000000}}\n"),
    "total+identity+header": limit("reviews", (
        "  http:\n    total: {requestsPerSecond: 1000000}\n    perIdentity: {requestsPerSecond: 1000000}\n"
        "    descriptors: [{header: x-tenant, requestsPerSecond: 1000000}]\n")),
    "service scope": limit("reviews", "  scope: service\n  http: {total: {requestsPerSecond: 1000000}}\n"),
    "refused": limit("reviews", "  http: {total: {requestsPerSecond: 0.001, burst: 1}}\n"),
    "route: its route": limit("reviews", "  http: {total: {requestsPerSecond: 1000000}}\n", "search"),
    "route: another route": limit("reviews", "  http: {total: {requestsPerSecond: 1000000}}\n", "search"),
}
ROUTES = {"route: its route": "shop/reviews/search", "route: another route": "shop/reviews/api"}


def authorizer(text: str, with_limits: bool) -> Authorizer:
    b = SnapshotBuilder()
    b.reset(plan({}, parse_yaml(MESH + text, "bench.yaml", NET), NET).puts)
    directory = Directory.build(b.build(1))
    az = Authorizer(lambda: directory, MeshMetrics(CollectorRegistry()))
    if with_limits:
        az.limits = RateLimits(lambda: directory, "n2", CollectorRegistry())
    return az


def request(az: Authorizer, route: str = "") -> Callable[[], bool]:
    w = az.directory().snapshot.workloads[("shop", "reviews-1")]

    def conn() -> authz.Facts:
        return CONN

    def one() -> bool:
        try:
            az.judge_request(w, conn, Exchange(0.0, METHOD, AUTHORITY, TARGET), HEADERS,
                             PathNormalization.BASE, route)
        except LocalReply as r:
            if r.status != 429:
                raise
            return False
        return True

    return one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="requests per run (5 runs per case)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench-results"), help="where the JSON goes")
    a = ap.parse_args()
    base, base_runs = median_us(request(authorizer("", with_limits=False)), a.requests)
    rows: list[dict[str, Any]] = []
    for name, text in CASES.items():
        one = request(authorizer(text, with_limits=True), ROUTES.get(name, ""))
        if name == "refused":
            one()  # (the burst's one token)
        admitted = one()
        if admitted != (name != "refused"):
            raise SystemExit(f"bench_ratelimit: {name}: {'admitted' if admitted else '429'}, not as expected")
        us, runs = median_us(one, a.requests)
        rows.append({"case": name, "per_request_us": us, "added_us": us - base, "runs_us": runs})
    print(f"baseline (no RateLimits attached): {base:.2f} us per request")
    print("| case | us per request | added us |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['per_request_us']:.2f} | {r['added_us']:+.2f} |")
    os.makedirs(a.out_dir, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(a.out_dir, f"ratelimit-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": "ratelimit", "revision": revision(), "python": platform.python_version(),
                   "machine": platform.machine(), "requests_per_run": a.requests, "runs": RUNS,
                   "baseline_us": base, "baseline_runs_us": base_runs, "cases": rows}, f, indent=1)
    png = benchplot.bars(benchplot.png_next_to(path),
                         f"RateLimitPolicy cost per request (baseline {base:.2f} µs)",
                         [r["case"] for r in rows], [r["added_us"] for r in rows], "µs added per request",
                         rotate=30)
    print(f"\nJSON: {os.path.relpath(path, ROOT)}"
          + (f"; plot: {os.path.relpath(png, ROOT)}" if png else "; no plot (matplotlib not installed)"))


if __name__ == "__main__":
    main()
