"""Outlier detection and locality failover on the testbed, with real clients (curl) through real
eBPF capture and HBONE, counted by the destination agents; and `nodemesh explain` asked at the same
moments, reading the source node's agent's ejection state, agreeing with what the proxy did.

Two services: ``ratings`` (three pods on n2, one answering 500) and ``zonal`` (one pod in the
client's zone on n1, one in another zone on n2); each pod's locality is its node's zone. Each has
a DestinationRule with outlierDetection (which is also what turns Istio's locality LB on)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics
from tests.integration.scrape import requests_total as requests
from tests.integration.test_traffic_management import Bed

RATINGS_VIP = "10.96.0.60"
ZONAL_VIP = "10.96.0.61"
BASE_EJECTION_S = 3.0
ZONES = {"n1": "r1/za", "n2": "r1/zb"}
PODS = {"n1": ("n1-p1", "n1-p2"), "n2": ("n2-p1", "n2-p2", "n2-p3", "n2-p4")}
SERVER_PODS = ("n1-p2", "n2-p1", "n2-p2", "n2-p3", "n2-p4")

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: ratings, namespace: default}}
spec:
  vip: {RATINGS_VIP}
  selector: {{app: ratings}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: zonal, namespace: default}}
spec:
  vip: {ZONAL_VIP}
  selector: {{app: zonal}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n1-p2": ("zonal", {"app": "zonal"}, {}),
    "n2-p1": ("ratings", {"app": "ratings"}, {}),
    "n2-p2": ("ratings", {"app": "ratings"}, {}),
    "n2-p3": ("ratings", {"app": "ratings"}, {}),
    "n2-p4": ("zonal", {"app": "zonal"}, {}),
}
ISTIO = "".join(
    f"""apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: {BASE_EJECTION_S:g}s
      maxEjectionPercent: 100
---
"""
    for host in ("ratings", "zonal")
)

# An HTTP server per pod: answers its name, with 500 while its flag file exists.
SERVER = textwrap.dedent(
    """
    import http.server, os, sys
    NAME, ADDR, FLAG = sys.argv[1], sys.argv[2], sys.argv[3]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = NAME.encode()
            self.send_response(500 if os.path.exists(FLAG) else 200)
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


def with_localities(manifest: str, topo: topology.Topology) -> str:
    """The workload documents with each pod's locality: its node's zone."""
    docs = list(yaml.safe_load_all(manifest))
    for d in docs:
        pod = topo.pod(d["metadata"]["name"])
        assert pod is not None
        d["spec"]["locality"] = ZONES[pod.node]
    return yaml.safe_dump_all(docs, sort_keys=False)


class Mesh(Bed):
    def __init__(self, bed: meshbed.MeshBed, work: str) -> None:
        super().__init__(bed)
        self.work = work
        self.servers: dict[str, subprocess.Popen[bytes]] = {}  # by pod: the servers started

    def flag(self, pod: str) -> str:
        return os.path.join(self.work, f"fail-{pod}")

    def served(self, pod: str, **labels: str) -> float:
        """Requests the destination proxy delivered to ``pod`` (reporter=destination)."""
        node = pod.split("-")[0]
        text = node_metrics(self.bed.topo, node)
        return requests(text, reporter="destination", destination_workload=pod, **labels)

    def explain_text(self, url: str, *args: str) -> str:
        """`nodemesh explain` from n1-p1, asking n1's agent (its admin port, inside n1's netns)."""
        n1 = self.bed.topo.node("n1")
        assert n1 is not None
        return self.bed.cli("explain", "--from", "n1-p1", "GET", url, *args,
                            "--registry-dir", self.bed.registry_dir, "--netns", n1.netns).stdout

    def explain(self, url: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.explain_text(url, "-o", "json"))
        assert doc["outlier_detection"]["state_known"] is True, doc["outlier_detection"]
        return doc


def endpoints(walk: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["workload"]: e for e in walk["endpoints"]}


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    prefix = run_prefix("o")
    spec = topology.TopologySpec(prefix, tuple(
        topology.NodeSpec(n, f"10.244.{i}.0/24", pods) for i, (n, pods) in enumerate(PODS.items(), 1)))
    topo = testbed.up(topology.plan(spec))
    work = f"/run/nodemesh/{prefix}-od"
    os.makedirs(work, exist_ok=True)
    try:
        manifest = SERVICES + with_localities(meshbed.workload_manifest(topo, ROLES), topo) + "---\n" + ISTIO
        with meshbed.running(topo, manifest) as mb:
            m = Mesh(mb, work)
            with pod_servers(topo, SERVER, {name: (m.flag(name),) for name in SERVER_PODS}) as servers:
                m.servers.update(servers)
                yield m
    finally:
        testbed.down(prefix)
        shutil.rmtree(work, ignore_errors=True)


def test_an_endpoint_answering_500_is_ejected_after_3_and_returns_after_base_ejection_time(
    mesh: Mesh,
) -> None:
    url = f"http://{RATINGS_VIP}/"
    pods = ("n2-p1", "n2-p2", "n2-p3")
    with open(mesh.flag("n2-p3"), "w"):
        pass
    before = {p: mesh.served(p) for p in pods}
    before_500 = mesh.served("n2-p3", response_code="500")
    # round robin over three: n2-p3 gets every third request until its third 500 ejects it
    rows = mesh.curl(*[url] * 12)
    assert Counter(rows)[("500", "n2-p3")] == 3 and Counter(c for c, _ in rows) == {"500": 3, "200": 9}, rows
    assert mesh.served("n2-p3") - before["n2-p3"] == 3  # exactly consecutive5xxErrors, then no more
    assert mesh.served("n2-p3", response_code="500") - before_500 == 3

    # explain, now: n2-p3 ejected (the first time, for up to baseEjectionTime), not picked
    t0 = time.monotonic()
    walk = mesh.explain(url)
    eps = endpoints(walk)
    ej = eps["n2-p3"]["ejection"]
    assert ej["state"] == "ejected" and ej["ejections"] == 1, ej
    assert 0 < ej["for_s"] <= BASE_EJECTION_S and ej["until"], ej
    assert eps["n2-p3"]["candidate"] is False
    assert {eps[p]["ejection"]["state"] for p in ("n2-p1", "n2-p2")} == {"ok"}
    assert walk["outcome"]["to"] in {"n2-p1", "n2-p2"}
    back_at = time.monotonic() + ej["for_s"]  # (an upper bound: the agent answered after t0)
    lines = mesh.explain_text(url).splitlines()
    assert any("n2-p3" in ln and "ejected (until " in ln and ", 1st ejection)" in ln for ln in lines), lines
    assert any(ln.startswith("balancer:") and "n2-p3" not in ln for ln in lines), lines

    # while ejected it gets nothing, though it would have had a third of these
    rows = mesh.curl(*[url] * 12)
    assert time.monotonic() < t0 + ej["for_s"], "too slow to check the ejection"
    assert {c for c, _ in rows} == {"200"} and Counter(b for _, b in rows) == {"n2-p1": 6, "n2-p2": 6}
    assert mesh.served("n2-p3") - before["n2-p3"] == 3

    # after baseEjectionTime it is back: it gets requests again, fails 3 and is ejected again,
    # for twice as long (Envoy's ejection time grows with the number of ejections)
    time.sleep(max(0.0, back_at - time.monotonic()) + 0.1)
    rows = mesh.curl(*[url] * 12)
    assert Counter(c for c, _ in rows) == {"500": 3, "200": 9}, rows
    assert mesh.served("n2-p3") - before["n2-p3"] == 6
    t1 = time.monotonic()
    ej = endpoints(mesh.explain(url))["n2-p3"]["ejection"]
    assert ej["state"] == "ejected" and ej["ejections"] == 2, ej
    assert BASE_EJECTION_S < ej["for_s"] <= 2 * BASE_EJECTION_S, ej
    # past what a first ejection would have lasted, it is still out
    time.sleep(max(0.0, ej["for_s"] - BASE_EJECTION_S + 0.3))  # (from now: the answer was fresh)
    rows = mesh.curl(*[url] * 6)
    assert time.monotonic() < t1 + ej["for_s"], "too slow to check the second ejection"
    assert {c for c, _ in rows} == {"200"} and "n2-p3" not in {b for _, b in rows}
    assert mesh.served("n2-p3") - before["n2-p3"] == 6
    os.unlink(mesh.flag("n2-p3"))


def test_locality_stays_in_zone_and_fails_over_when_its_endpoint_fails_or_stops(mesh: Mesh) -> None:
    url = f"http://{ZONAL_VIP}/"
    served = {p: mesh.served(p) for p in ("n1-p2", "n2-p4")}

    def delta() -> dict[str, float]:
        return {p: mesh.served(p) - served[p] for p in served}

    # zone A healthy: every request stays in zone A (the client's), none crosses to zone B
    walk = mesh.explain(url)
    assert walk["locality"] == {"source": "r1/za", "candidates": ["r1/za"]}
    assert walk["outcome"]["to"] == "n1-p2" and endpoints(walk)["n1-p2"]["ejection"]["state"] == "ok"
    assert endpoints(walk)["n2-p4"]["candidate"] is False
    rows = mesh.curl(*[url] * 20)
    assert rows == [("200", "n1-p2")] * 20
    assert delta() == {"n1-p2": 20, "n2-p4": 0}

    # zone A's endpoint starts failing: three 500s eject it, then traffic fails over to zone B
    with open(mesh.flag("n1-p2"), "w"):
        pass
    rows = mesh.curl(*[url] * 20)
    assert rows == [("500", "n1-p2")] * 3 + [("200", "n2-p4")] * 17, rows
    assert delta() == {"n1-p2": 23, "n2-p4": 17}
    walk = mesh.explain(url)
    ej = endpoints(walk)["n1-p2"]["ejection"]
    assert ej["state"] == "ejected" and ej["ejections"] == 1, ej
    assert walk["locality"]["candidates"] == ["r1/zb"] and walk["outcome"]["to"] == "n2-p4"
    back_at = time.monotonic() + ej["for_s"]

    # zone A recovers: once its ejection ends, traffic is back in zone A
    os.unlink(mesh.flag("n1-p2"))
    time.sleep(max(0.0, back_at - time.monotonic()) + 0.1)
    walk = mesh.explain(url)
    assert endpoints(walk)["n1-p2"]["ejection"] == {"state": "ok", "ejections": 1, "consecutive_5xx": 0}
    assert walk["outcome"]["to"] == "n1-p2"
    rows = mesh.curl(*[url] * 10)
    assert rows == [("200", "n1-p2")] * 10
    assert delta() == {"n1-p2": 33, "n2-p4": 17}

    # zone A's server stops: connection refused is a local-origin failure (a 5xx to outlier
    # detection, as Envoy counts it): three 503 UF, then zone B again, for twice as long
    server = mesh.servers["n1-p2"]
    server.kill()  # (by PID: the fixture started it)
    server.wait()
    rows = mesh.curl(*[url] * 10)
    assert [c for c, _ in rows] == ["503"] * 3 + ["200"] * 7 and {b for _, b in rows[3:]} == {"n2-p4"}, rows
    assert "upstream connect error" in rows[0][1]
    assert delta() == {"n1-p2": 33, "n2-p4": 24}
    walk = mesh.explain(url)
    ej = endpoints(walk)["n1-p2"]["ejection"]
    assert ej["state"] == "ejected" and ej["ejections"] == 2, ej
    assert walk["outcome"]["to"] == "n2-p4"
