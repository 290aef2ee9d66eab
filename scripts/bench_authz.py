#!/usr/bin/env python3
"""Authorization cost per HTTP request: 0, 1, 10 and 100 AuthorizationPolicies in force.

Not a test: a benchmark, run by hand from the repository root (no root needed):

    .venv/bin/python scripts/bench_authz.py [--requests 20000] [--out-dir bench-results]

What it times: what the destination node's inbound does for each HTTP request before
it is forwarded (``InboundHttp._authorize`` in agent/dataplane/inbound.py), by calling
the same function, :meth:`agent.dataplane.authorize.Authorizer.judge_request`: the method
checked and the path normalised (Istio's BASE mode, :mod:`agent.dataplane.http.normalize`),
the workload's RequestAuthentications (none here: one dict lookup) and AuthorizationPolicies
looked up, and, if any policy applies, the connection's reduced policies
(:meth:`Authorizer.decider`, made once per snapshot and connection facts), the request's
:class:`agent.control.authz.Facts` (headers as HTTP/1.1 parses them: bytes, joined only if a
condition reads them), the decision (:meth:`agent.control.authz_decider.Decider.decide`) and its
counter. Also timed alone: ``Decider.decide`` and ``authz.evaluate`` (the whole evaluation,
which TCP connections and the per-connection reduction use) over the same policies, and
building the request's Facts (with normalisation).

Cases, all policies applying to the destination workload (``shop/reviews``, labels
``app: reviews``), written as users write them (YAML through the validator):

* 0 policies: the baseline, what a workload without policies costs (normalisation
  and one lookup);
* 1 policy: an ALLOW by principal + path prefix + method that the request matches;
* 10 and 100 policies: a mesh-wide deny-all in the root namespace (an ALLOW without
  rules), a DENY by header (``x-debug-token`` present: the request has none), and
  per-service ALLOWs by principal + path prefix + method, half of them for other
  principals, half for the request's principal on other paths; the request matches
  the last ALLOW evaluated (every policy is tried).

Medians of 5 runs, microseconds per request. Output: a markdown table, JSON in
``--out-dir`` (bench-results/authz-<timestamp>.json) and a PNG next to it when
matplotlib is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchplot  # noqa: E402  (scripts/, this script's own directory)
from prometheus_client import CollectorRegistry  # noqa: E402

from agent.control import authz  # noqa: E402
from agent.control.model import Kind, Workload, resource_key  # noqa: E402
from agent.control.snapshot import SnapshotBuilder  # noqa: E402
from agent.control.validate import parse_vip_range, parse_yaml  # noqa: E402
from agent.dataplane.authorize import Authorizer, LazyHeaders  # noqa: E402
from agent.dataplane.http.exchange import Exchange  # noqa: E402
from agent.dataplane.http.normalize import (  # noqa: E402
    PathNormalization,
    normalize_path,
)
from agent.dataplane.route import Directory  # noqa: E402
from agent.metrics.istio import MeshMetrics  # noqa: E402

POLICY_COUNTS = (0, 1, 10, 100)
RUNS = 5
NAMESPACE = "shop"
PRINCIPAL = "cluster.local/ns/shop/sa/frontend"
SERVER = Workload(name="reviews-1", namespace=NAMESPACE, address="10.244.2.9", node="n2",
                  service_account="reviews", labels={"app": "reviews", "version": "v1"})
# the connection's L4 facts, as the inbound builds them from the tunnel's verified identity
CONN = authz.Facts(principal=PRINCIPAL, namespace=NAMESPACE, source_ip="10.244.1.5",
                   destination_ip=SERVER.address, destination_port=9080)
# one HTTP/1.1 request as the parser hands it over
METHOD = "GET"
TARGET = "/api/v1/reviews/42?lang=en"
AUTHORITY = "reviews.shop.svc.cluster.local:9080"
HEADERS = [
    (b"host", AUTHORITY.encode()),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) bench"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"x-request-id", b"6b1c3f0e-8d2a-4d4f-9a8e-2f0c1b7d9e11"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    (b"cookie", b"session=abc123; theme=dark"),
]
MODE = PathNormalization.BASE


def _policy(name: str, namespace: str, spec: str) -> authz.AuthorizationPolicy:
    text = (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")
    (loc,) = parse_yaml(text, f"{name}.yaml", parse_vip_range("10.96.0.0/16"))
    assert isinstance(loc.resource, authz.AuthorizationPolicy)
    return loc.resource


def _allow(name: str, principal: str, prefix: str, methods: str) -> authz.AuthorizationPolicy:
    return _policy(name, NAMESPACE, (
        "  selector: {matchLabels: {app: reviews}}\n"
        "  action: ALLOW\n"
        "  rules:\n"
        f"  - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n"
        f"    to: [{{operation: {{methods: [{methods}], paths: [\"{prefix}*\"]}}}}]\n"
    ))


def policies(n: int) -> list[authz.AuthorizationPolicy]:
    """``n`` policies that all apply to SERVER; the request matches the last ALLOW tried."""
    matching = _allow(f"allow-{max(n - 1, 0):03d}", PRINCIPAL, "/api/v1/reviews/", "GET, HEAD")
    if n <= 1:
        return [matching][:n]
    out = [
        _policy("deny-all", authz.DEFAULT_ROOT_NAMESPACE, "  {}\n"),  # mesh-wide: ALLOW without rules
        _policy("deny-debug", NAMESPACE, (
            "  selector: {matchLabels: {app: reviews}}\n"
            "  action: DENY\n"
            "  rules:\n"
            "  - when: [{key: \"request.headers[x-debug-token]\", values: [\"*\"]}]\n"
        )),
    ]
    for i in range(n - 3):  # (names sort before the matching one's: tried first)
        if i % 2:
            out.append(_allow(f"allow-{i:03d}", f"cluster.local/ns/shop/sa/caller-{i}", "/api/", "GET, POST"))
        else:
            out.append(_allow(f"allow-{i:03d}", PRINCIPAL, f"/api/v{i + 2}/", "GET, POST"))
    out.append(matching)
    assert len(out) == n
    return out


def authorizer(n: int) -> Authorizer:
    b = SnapshotBuilder()
    b.apply({resource_key(Kind.WORKLOAD, NAMESPACE, SERVER.name): json.dumps(SERVER.to_doc())}, [])
    snap = dataclasses.replace(b.build(1), authorization_policies={
        (p.namespace, p.name): p for p in policies(n)})
    directory = Directory.build(snap)
    return Authorizer(lambda: directory, MeshMetrics(CollectorRegistry()))


def _facts(target: str, headers: list[tuple[bytes, bytes]]) -> authz.Facts:
    """The request's Facts as InboundHttp._authorize builds them: the connection's verified facts
    copied field by field, the headers joined only if a condition reads them."""
    f = CONN
    return authz.Facts(f.principal, f.namespace, f.source_ip, f.remote_ip, f.destination_ip,
                       f.destination_port, f.sni, True, METHOD, target.partition("?")[0], AUTHORITY,
                       LazyHeaders(headers))


def facts_of_request() -> authz.Facts:
    return _facts(normalize_path(TARGET, MODE), HEADERS)


def request(az: Authorizer) -> Callable[[], None]:
    """One request through what InboundHttp._authorize does (HTTP/1.1: headers as bytes); a
    refusal would raise LocalReply."""

    def conn() -> authz.Facts:
        return CONN  # (the inbound's connection facts: one object per connection)

    def one() -> None:
        az.judge_request(SERVER, conn, Exchange(0.0, METHOD, AUTHORITY, TARGET), HEADERS, MODE)

    return one


def median_us(fn: Callable[[], object], n: int) -> tuple[float, list[float]]:
    fn()  # (warm: the snapshot's policies sorted and looked up once, as the first request does)
    runs = []
    for _ in range(RUNS):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs), runs


def case(n: int, requests: int) -> dict[str, Any]:
    az = authorizer(n)
    one = request(az)
    one()  # (raises LocalReply if refused)
    applied = az.policies(SERVER)
    if len(applied) != n:
        raise SystemExit(f"bench_authz: {len(applied)} policies apply, expected {n}")
    facts = facts_of_request()
    decider = az.decider(SERVER, CONN)
    v = decider.decide(facts) if n else None
    if n and (v is None or not v.allowed or v.action != "ALLOW" or v != authz.evaluate(applied, facts)):
        raise SystemExit(f"bench_authz: {n} policies: expected an ALLOW to match, got {v}")
    total, runs = median_us(one, requests)
    ev, ev_runs = median_us(lambda: authz.evaluate(applied, facts), requests) if n else (0.0, [])
    dec, dec_runs = median_us(lambda: decider.decide(facts), requests) if n else (0.0, [])
    return {"policies": n, "decided_by": v.policy if v else "", "per_request_us": total,
            "per_request_runs_us": runs, "decide_us": dec, "decide_runs_us": dec_runs,
            "evaluate_us": ev, "evaluate_runs_us": ev_runs}


def plot(rows: list[dict[str, Any]], png: str) -> str | None:
    plt = benchplot.pyplot()
    if plt is None:
        return None
    labels = [str(r["policies"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(labels, [r["per_request_us"] for r in rows], color="#7c5", label="whole step")
    ax.bar(labels, [r["decide_us"] for r in rows], color="#37c", width=0.5, label="Decider.decide")
    ax.set_xlabel("AuthorizationPolicies in force")
    ax.set_ylabel("µs per request")
    ax.set_title("authorization per HTTP request")
    ax.legend()
    return benchplot.save(fig, png)


def revision() -> str:
    r = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else os.environ.get("NODEMESH_BENCH_REV", "unknown")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="requests per run (5 runs per case)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench-results"), help="where the JSON goes")
    a = ap.parse_args()
    load_before = os.getloadavg()
    rows = [case(n, a.requests) for n in POLICY_COUNTS]
    # (the part of each case with policies that does not depend on how many: normalisation aside)
    facts_us, _ = median_us(facts_of_request, a.requests)
    base = rows[0]["per_request_us"]
    for r in rows:
        r["added_us"] = r["per_request_us"] - base
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(a.out_dir, exist_ok=True)
    json_path = os.path.join(a.out_dir, f"authz-{stamp}.json")
    png = plot(rows, os.path.join(a.out_dir, f"authz-{stamp}.png"))
    doc = {
        "benchmark": "authz",
        "when": stamp,
        "revision": revision(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "requests_per_run": a.requests,
        "runs": RUNS,
        "request": {"method": METHOD, "target": TARGET, "principal": PRINCIPAL, "headers": len(HEADERS),
                    "path_normalization": MODE.name},
        "cases": rows,
        "facts_us": facts_us,
        "plot": png,
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"## Authorization per HTTP request (medians of {RUNS} runs of {a.requests:,} requests)\n")
    print("| policies in force | µs per request | added to no policy | of which Decider.decide "
          "| authz.evaluate alone | decided by |")
    print("|---:|---:|---:|---:|---:|---|")
    for r in rows:
        name = "0 (baseline: normalisation + one lookup)" if r["policies"] == 0 else str(r["policies"])
        print(f"| {name} | {r['per_request_us']:,.2f} | {r['added_us']:,.2f} | {r['decide_us']:,.2f} "
              f"| {r['evaluate_us']:,.2f} | {r['decided_by'] or '-'} |")
    print(f"\nOf each case with policies: {facts_us:.2f} µs build the request's Facts (path normalised, "
          "the connection's facts copied, headers joined lazily); the rest is the connection's "
          "reduced policies looked up, Decider.decide and the decision counter.")
    print(f"\nJSON: {os.path.relpath(json_path, ROOT)}"
          + (f"; plot: {os.path.relpath(png, ROOT)}" if png else "; no plot (matplotlib not installed)"))


if __name__ == "__main__":
    main()
