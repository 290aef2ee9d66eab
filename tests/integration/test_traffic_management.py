"""Istio traffic management on the testbed: VirtualService and DestinationRule YAML applied with
`nodemesh apply` as users write it, enforced by the source node's proxy for real clients
(curl) through real eBPF capture and HBONE; outcomes checked in the agents' metrics."""

from __future__ import annotations

import os
import re
import shutil
import textwrap
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics
from tests.integration.scrape import requests_total as requests

VIP = "10.96.0.40"

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec:
  vip: {VIP}
  selector: {{app: reviews}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n2-p1": ("reviews", {"app": "reviews", "version": "v1"}, {}),
    "n2-p2": ("reviews", {"app": "reviews", "version": "v2"}, {}),
}

ISTIO = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 2}}
    loadBalancer: {consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - name: flaky
    match: [{uri: {prefix: /flaky}}]
    route:
    - destination: {host: reviews, subset: v1}
    retries: {attempts: 3, retryOn: 5xx}
  - name: mirrored
    match: [{uri: {prefix: /mirrored}}]
    route:
    - destination: {host: reviews, subset: v1}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100}
  - name: delayed
    match: [{uri: {prefix: /delayed}}]
    route:
    - destination: {host: reviews, subset: v1}
    fault:
      delay: {fixedDelay: 0.2s, percentage: {value: 50}}
  - name: sticky
    match: [{uri: {prefix: /sticky}}]
    route:
    - destination: {host: reviews}
  - name: hold
    match: [{uri: {prefix: /slow/hold}}]
    route:
    - destination: {host: reviews, subset: v1}
  - name: slow
    match: [{uri: {prefix: /slow}}]
    route:
    - destination: {host: reviews, subset: v1}
    timeout: 0.3s
  - name: teapot
    match: [{uri: {prefix: /teapot}}]
    route:
    - destination: {host: reviews, subset: v1}
    fault:
      abort: {httpStatus: 418, percentage: {value: 20}}
  - name: split
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
---
"""

# An HTTP server per pod: its name; /flaky fails two requests of every three; /slow waits 1 s.
SERVER = textwrap.dedent(
    """
    import http.server, sys, threading, time
    NAME, ADDR = sys.argv[1], sys.argv[2]
    lock, count = threading.Lock(), [0]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            status = 200
            if self.path.startswith("/flaky"):
                with lock:
                    count[0] += 1
                    status = 200 if count[0] % 3 == 0 else 503
            if self.path.startswith("/slow"):
                time.sleep(1.0)
            body = NAME.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer((ADDR, 8080), H)
    print("ready", flush=True)
    srv.serve_forever()
    """
)


class Bed:
    def __init__(self, bed: meshbed.MeshBed) -> None:
        self.bed = bed

    def curl(self, *args: str, timeout_s: float = 120) -> list[tuple[str, str]]:
        """(status, body) per URL, many URLs on one keep-alive connection."""
        r = self.bed.exec(
            "n1-p1",
            ["curl", "-sS", "--max-time", "60", "-w", "\x1f%{http_code}\x1e", *args],
            timeout_s=timeout_s,
        )
        rows = [item.rsplit("\x1f", 1) for item in r.stdout.split("\x1e") if "\x1f" in item]
        return [(code, body) for body, code in rows]

    def metrics(self) -> str:
        return node_metrics(self.bed.topo, "n1")






@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    prefix = run_prefix("v")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    work = f"/run/nodemesh/{prefix}-vs"
    os.makedirs(work, exist_ok=True)
    try:
        with meshbed.running(topo, SERVICES + meshbed.workload_manifest(topo, ROLES)) as mb, \
                pod_servers(topo, SERVER, {"n2-p1": (), "n2-p2": ()}):
            path = os.path.join(work, "reviews-istio.yaml")
            with open(path, "w") as f:
                f.write(ISTIO)
            mb.cli("apply", "-f", path, "--registry-dir", mb.registry_dir)
            b = Bed(mb)
            deadline = time.monotonic() + 10  # the agents see the new snapshot
            while b.curl("-H", "end-user: jason", f"http://{VIP}/")[0][1] != "n2-p2":
                assert time.monotonic() < deadline, "the VirtualService did not take effect"
                time.sleep(0.1)
            yield b
    finally:
        testbed.down(prefix)
        shutil.rmtree(work, ignore_errors=True)


def test_weighted_split_90_10_over_1000_requests(bed: Bed) -> None:
    rows = bed.curl(*[f"http://{VIP}/"] * 1000)
    assert len(rows) == 1000 and {c for c, _ in rows} == {"200"}
    got = Counter(b for _, b in rows)
    assert 870 <= got["n2-p1"] <= 930, got  # 900 ± 3.2 sigma (sigma = 9.5)


def test_header_match_routes_exactly(bed: Bed) -> None:
    rows = bed.curl("-H", "end-user: jason", *["http://reviews.default/"] * 50)
    assert {b for _, b in rows} == {"n2-p2"} and len(rows) == 50
    rows = bed.curl("-H", "end-user: jasonx", *[f"http://{VIP}/"] * 50)  # exact is exact
    assert "n2-p1" in {b for _, b in rows}


def test_retries_make_a_server_failing_2_of_3_reliable(bed: Bed) -> None:
    rows = bed.curl(*[f"http://{VIP}/flaky"] * 300)
    ok = sum(1 for c, _ in rows if c == "200")
    assert len(rows) == 300 and ok / 300 >= 0.99, Counter(c for c, _ in rows)


def test_timeout_answers_504_ut_on_time(bed: Bed) -> None:
    t = time.monotonic()
    rows = bed.curl(f"http://{VIP}/slow")
    assert rows[0][0] == "504" and "timeout" in rows[0][1]
    assert time.monotonic() - t < 1.0  # the server would take 1 s
    assert requests(bed.metrics(), reporter="source", response_code="504", response_flags="UT") >= 1


def test_fault_abort_percentage_and_flag(bed: Bed) -> None:
    before = requests(bed.metrics(), reporter="source", response_code="418", response_flags="FI")
    rows = bed.curl(*[f"http://{VIP}/teapot"] * 500)
    aborted = sum(1 for c, _ in rows if c == "418")
    assert 65 <= aborted <= 135, aborted  # 20 % of 500 (sigma ~9)
    after = requests(bed.metrics(), reporter="source", response_code="418", response_flags="FI")
    assert after - before == aborted


def test_bad_input_is_refused_with_file_line_field_and_nothing_applied(bed: Bed, tmp_path: object) -> None:
    bad = ISTIO.replace("prefix: /slow}", "regex: '/slow(['}")
    path = os.path.join(str(tmp_path), "bad.yaml")
    with open(path, "w") as f:
        f.write(bad)
    r = bed.bed.cli("apply", "-f", path, "--registry-dir", bed.bed.registry_dir, check=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "bad.yaml:" in out and re.search(r"spec\.http\[6\]\.match\[0\]\.uri\.regex", out), out
    # nothing applied: the routes in force are the old ones
    assert bed.curl(f"http://{VIP}/slow")[0][0] == "504"


def dest_requests(bed: Bed, workload: str) -> float:
    text = node_metrics(bed.bed.topo, "n2")
    return requests(text, reporter="destination", destination_workload=workload)


def test_mirror_copies_reach_the_mirror_and_the_client_sees_the_main_route(bed: Bed) -> None:
    before = dest_requests(bed, "n2-p2")
    rows = bed.curl(*[f"http://{VIP}/mirrored"] * 40)
    assert {b for _, b in rows} == {"n2-p1"} and len(rows) == 40
    deadline = time.monotonic() + 10
    while dest_requests(bed, "n2-p2") - before < 40:
        assert time.monotonic() < deadline, dest_requests(bed, "n2-p2") - before
        time.sleep(0.2)


def test_fault_delay_percentage_and_flag(bed: Bed) -> None:
    script = f"for i in $(seq 60); do curl -s -o /dev/null -w '%{{time_total}}\\n' http://{VIP}/delayed; done"
    r = bed.bed.exec("n1-p1", ["sh", "-c", script], timeout_s=60)
    times = [float(t) for t in r.stdout.split()]
    delayed = sum(1 for t in times if t >= 0.2)
    assert len(times) == 60 and 15 <= delayed <= 45, sorted(times)  # 50 % of 60 (sigma ~3.9)
    assert requests(bed.metrics(), reporter="source", response_code="200", response_flags="DI") >= delayed


def test_consistent_hash_keeps_each_user_on_one_endpoint(bed: Bed) -> None:
    pods: dict[str, set[str]] = {}
    for i in range(16):
        rows = bed.curl("-H", f"x-user: user-{i}", *[f"http://{VIP}/sticky"] * 6)
        pods[f"user-{i}"] = {b for _, b in rows}
    assert all(len(p) == 1 for p in pods.values()), pods
    assert set().union(*pods.values()) == {"n2-p1", "n2-p2"}  # the keys spread over both


def test_circuit_breaker_overflow_gives_503_uo(bed: Bed) -> None:
    # http2MaxRequests: 2 — four concurrent requests held 1 s by the server: two are served,
    # two overflow at once
    script = (
        " & ".join([f"curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 http://{VIP}/slow/hold"] * 4)
        + " & wait"
    )
    before = requests(bed.metrics(), reporter="source", response_code="503", response_flags="UO")
    r = bed.bed.exec("n1-p1", ["sh", "-c", script], timeout_s=30)
    assert sorted(r.stdout.split()) == ["200", "200", "503", "503"], r.stdout + r.stderr
    after = requests(bed.metrics(), reporter="source", response_code="503", response_flags="UO")
    assert after - before == 2


def test_explain_agrees_with_what_the_proxy_did(bed: Bed) -> None:
    import json

    def explain(*args: str) -> dict[str, object]:
        r = bed.bed.cli(
            "explain", "--from", "n1-p1", *args, "-o", "json", "--registry-dir", bed.bed.registry_dir
        )
        doc: dict[str, object] = json.loads(r.stdout)
        return doc

    # header routing: explain names the route and the pod; the proxy sends the request there
    walk = explain("GET", "http://reviews.default/", "-H", "end-user: jason")
    assert walk["virtual_service"] == {
        "name": "default/reviews",
        "source": walk["virtual_service"]["source"],  # type: ignore[index]
        "route": {"index": 0, "name": "jason"},
    }
    assert walk["outcome"]["to"] == "n2-p2"  # type: ignore[index]
    assert bed.curl("-H", "end-user: jason", f"http://{VIP}/")[0][1] == "n2-p2"
    # the timeout in force is the one the proxy applied (504 before the server's 1 s)
    walk = explain("GET", f"http://{VIP}/slow")
    assert walk["in_force"] == {"timeout_s": 0.3} and walk["destination"]["subset"] == "v1"  # type: ignore[index]
    assert bed.curl(f"http://{VIP}/slow")[0][0] == "504"
    # retries and faults in force, as the proxy enforced them above
    assert explain("GET", f"http://{VIP}/flaky")["in_force"]["retries"]["attempts"] == 3  # type: ignore[index]
    fault = explain("GET", f"http://{VIP}/teapot")["in_force"]["fault"]  # type: ignore[index]
    assert fault["abort_status"] == 418 and fault["abort_percent"] == 20.0
    # the mirror in force: the destination the copies reached above
    mirror = explain("GET", f"http://{VIP}/mirrored")["in_force"]["mirror"]  # type: ignore[index]
    assert mirror == {"host": "reviews", "subset": "v2", "port": None, "percent": 100.0}
    # the split: both destinations with their weights
    walk = explain("GET", f"http://{VIP}/")
    assert [(d["subset"], d["weight"]) for d in walk["destinations"]] == [("v1", 90), ("v2", 10)]  # type: ignore[attr-defined]
