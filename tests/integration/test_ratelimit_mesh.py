"""RateLimitPolicy on the testbed (issue 15, "Must show"): limits applied with `nodemesh apply`,
enforced by the destination agents for h2load's traffic through real eBPF capture and HBONE mTLS.

The mesh: three nodes, each with an ``api`` server pod (n<i>-p1, service account api) and a
client pod (n<i>-p2: n1 and n2 as ``web``, n3 as ``batch``). Local limits: clients on n1 and n3
call n2's api pod across nodes, so n2's inbound judges them. The service-wide limit: each client
calls its own node's api pod (80/10/10 of the load), so each agent judges its own share and the
three agents divide the budget among themselves; n1 is then partitioned from its peers by
blackhole routes inside the testbed's node namespaces. A limit on one VirtualService route:
the client on n1 calls the service's VIP (the source agent chooses the route), with forged
route headers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent import meshbed
from agent.control.embedded import EmbeddedBackend
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics
from tests.integration.test_authz_mesh import metric

SERVICE = """apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  vip: 10.96.0.80
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    **{f"n{i}-p1": ("api", {"app": "api"}, {"http": 8080}) for i in (1, 2, 3)},
    "n1-p2": ("web", {"app": "web"}, {}), "n2-p2": ("web", {"app": "web"}, {}),
    "n3-p2": ("batch", {"app": "batch"}, {}),
}
NODES = ("n1", "n2", "n3")

# In a server pod: HTTP/1.1 on :8080 answering "<pod>" (one write, no Nagle delay).
SERVER = textwrap.dedent(
    """
    import http.server, sys
    NAME, ADDR = sys.argv[1], sys.argv[2]
    BODY = NAME.encode()
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        def do_GET(self):
            self.wfile.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(BODY), BODY))
        def log_message(self, *a):
            pass
    class Srv(http.server.ThreadingHTTPServer):
        daemon_threads = True
        def handle_error(self, *a):
            pass
    srv = Srv((ADDR, 8080), H)
    print("ready", flush=True)
    srv.serve_forever()
    """
)


def policy(name: str, spec: str) -> str:
    return f"""apiVersion: nodemesh.io/v1
kind: RateLimitPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  targetRef: {{kind: Service, name: api, port: 80}}
{spec}"""


class Bed:
    def __init__(self, bed: meshbed.MeshBed) -> None:
        self.bed = bed

    def address(self, pod: str) -> str:
        p = self.bed.topo.pod(pod)
        assert p is not None
        return p.address

    def apply(self, manifest: str) -> float:
        """`nodemesh apply`; returns when it returned (monotonic), the agents not yet following."""
        self.bed.apply(manifest)
        return time.monotonic()

    def delete(self, name: str) -> None:
        r = self.bed.cli("delete", "rlp", name, "--registry-dir", self.bed.registry_dir, check=False)
        assert r.returncode in (0, 3), r.stdout + r.stderr

    def settle(self) -> None:
        """Until every agent holds the registry's revision, and its data path follows (0.2 s poll)."""
        deadline = time.monotonic() + 10
        want = EmbeddedBackend(self.bed.registry_dir, create=False).read().revision
        for n in NODES:
            while metric(node_metrics(self.bed.topo, n), "nodemesh_registry_dataplane_revision") < want:
                assert time.monotonic() < deadline, f"{n} did not follow registry revision {want}"
                time.sleep(0.05)

    def h2load(self, loads: dict[str, tuple[str, int]], seconds: float, clients: int = 8,
               ) -> dict[str, dict[str, float]]:
        """h2load in each client pod at once: pod -> (target pod, requests/s); per pod: 2xx, 4xx,
        elapsed seconds."""
        procs = {}
        for pod, (target, rps) in loads.items():
            p = self.bed.topo.pod(pod)
            assert p is not None
            per_client = max(1, rps // clients)
            procs[pod] = testbed.popen_in_pod(p, [
                "h2load", "--h1", "-c", str(clients), "-m", "1", "--rps", str(per_client),
                "-D", f"{int(seconds * 1000)}ms", f"http://{self.address(target)}:8080/"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out = {}
        for pod, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=seconds + 30)
            text = stdout.decode()
            m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
            f = re.search(r"finished in ([\d.]+)(m?s)", text)
            assert m and f, text + stderr.decode()
            elapsed = float(f.group(1)) / (1000 if f.group(2) == "ms" else 1)
            out[pod] = {"2xx": int(m.group(1)), "4xx": int(m.group(3)), "5xx": int(m.group(4)),
                        "s": elapsed}
        return out

    def admitted(self) -> dict[str, float]:
        """nodemesh_ratelimit_decisions_total{result=admitted} per node."""
        return {n: metric(node_metrics(self.bed.topo, n), "nodemesh_ratelimit_decisions_total",
                          result="admitted") for n in NODES}

    def limit_status(self, node: str, policy: str) -> dict[str, Any]:
        """The agent's status of one rate limit (its /status on the health port)."""
        n = self.bed.topo.node(node)
        assert n is not None
        proc = testbed.popen_in(n.netns, None, ["curl", "-sS", "--max-time", "5",
                                                f"http://{n.fabric_address}:15021/status"],
                                stdout=subprocess.PIPE)
        doc = json.loads(proc.communicate(timeout=10)[0])
        got = [x for x in doc["rate_limits"] if x["policy"] == policy]
        assert len(got) == 1, doc["rate_limits"]
        return dict(got[0])

    def partition(self, node: str, on: bool) -> None:
        """Drop ``node``'s traffic with its peers both ways: blackhole routes for the peers'
        fabric addresses in its namespace, and for its address in theirs (testbed netns only)."""
        topo = self.bed.topo
        me = topo.node(node)
        assert me is not None
        for other in topo.nodes:
            if other is me:
                continue
            for ns, dst in ((me.netns, other.fabric_address), (other.netns, me.fabric_address)):
                subprocess.run(["ip", "-n", ns, "route", "add" if on else "del", "blackhole", f"{dst}/32"],
                               check=True, capture_output=True)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    prefix = run_prefix("rl")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 3, 2)))
    try:
        with meshbed.running(topo, SERVICE + meshbed.workload_manifest(topo, ROLES)) as mb, \
                pod_servers(topo, SERVER, {f"n{i}-p1": () for i in (1, 2, 3)}):
            b = Bed(mb)
            r = mb.exec("n1-p2", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://{b.address('n2-p1')}:8080/"])
            assert r.stdout == "200", r.stdout + r.stderr
            yield b
    finally:
        testbed.down(prefix)
        shutil.rmtree(f"/run/nodemesh/{prefix}-mesh", ignore_errors=True)


def within(value: float, target: float, tolerance: float) -> bool:
    return abs(value - target) <= tolerance * target


def test_local_limit_admits_the_limit_of_twice_the_load_with_429_headers(bed: Bed) -> None:
    bed.apply(SERVICE + policy("api-local", "  http:\n    total: {requestsPerSecond: 100, burst: 10}\n"))
    bed.settle()
    before = metric(node_metrics(bed.bed.topo, "n2"), "istio_requests_total", reporter="destination",
                    response_code="429", response_flags="RL")
    got = bed.h2load({"n1-p2": ("n2-p1", 200)}, 4)["n1-p2"]
    rate = got["2xx"] / got["s"]
    print(f"local limit 100/s, offered 200/s: admitted {rate:.1f}/s", got)
    assert within(rate, 100, 0.05), got  # offered 200/s: admitted 100/s +- 5 %
    assert got["4xx"] >= 0.4 * (got["2xx"] + got["4xx"]) and got["5xx"] == 0, got
    r = bed.bed.exec("n1-p2", ["curl", "-sS", "--parallel", "--parallel-max", "20", "-D", "-",
                               *[f"http://{bed.address('n2-p1')}:8080/"] * 100])
    m = re.search(r"HTTP/1.1 429 Too Many Requests\r\n(.*?)\r\n\r\n", r.stdout, re.S)
    assert m is not None, r.stdout[:2000] + r.stderr
    limited = m.group(1)
    for header in ("retry-after: 1", "x-ratelimit-limit: 100, 100;w=1", "x-ratelimit-remaining: 0",
                   "x-ratelimit-reset: 1"):
        assert header in limited, limited
    after = metric(node_metrics(bed.bed.topo, "n2"), "istio_requests_total", reporter="destination",
                   response_code="429", response_flags="RL")
    assert after - before >= got["4xx"], (before, after, got)  # counted, flagged RL, at the destination
    bed.delete("api-local")


def test_per_identity_limit_and_override(bed: Bed) -> None:
    bed.apply(SERVICE + policy("api-ids", """  http:
    perIdentity: {requestsPerSecond: 30, burst: 8}
    identities:
    - {principal: cluster.local/ns/default/sa/batch, requestsPerSecond: 60, burst: 12}
"""))  # (bursts cover h2load's 8 clients firing together)
    bed.settle()
    got = bed.h2load({"n1-p2": ("n2-p1", 60), "n3-p2": ("n2-p1", 120)}, 4)
    web, batch = (g["2xx"] / g["s"] for g in (got["n1-p2"], got["n3-p2"]))
    print(f"per identity 30/s: {web:.1f}/s; override 60/s: {batch:.1f}/s", got)
    assert within(web, 30, 0.1) and within(batch, 60, 0.1), got
    bed.delete("api-ids")


def test_service_wide_limit_divided_by_demand_and_partition_falls_back(bed: Bed) -> None:
    bed.apply(SERVICE + policy("api-all", """  scope: service
  http:
    total: {requestsPerSecond: 100, burst: 10}
"""))
    bed.settle()
    loads = {"n1-p2": ("n1-p1", 160), "n2-p2": ("n2-p1", 20), "n3-p2": ("n3-p1", 20)}  # 80/10/10, 2x
    result: dict[str, dict[str, float]] = {}
    runner = threading.Thread(target=lambda: result.update(bed.h2load(loads, 11.5, clients=2)))
    runner.start()
    time.sleep(1.5)  # the shares follow the demand
    windows = []
    last = bed.admitted()
    for _ in range(2):
        time.sleep(5)
        now = bed.admitted()
        windows.append({n: now[n] - last[n] for n in NODES})
        last = now
    runner.join()
    print("service-wide windows", windows, result)
    for w in windows:  # every 5 s window: the limit +- 10 %, each node its share of the demand
        assert within(sum(w.values()) / 5, 100, 0.1), windows
        assert within(w["n1"] / 5, 80, 0.15) and w["n2"] / 5 >= 8 and w["n3"] / 5 >= 8, windows
    st = bed.limit_status("n1", "default/api-all")
    assert st["sharing"] == "by demand" and st["peers"] == {"n2": "reachable", "n3": "reachable"}, st

    bed.partition("n1", True)
    try:
        runner = threading.Thread(target=lambda: result.update(bed.h2load(loads, 7.5, clients=2)))
        runner.start()
        time.sleep(1.5)  # peers silent for 0.5 s: static shares
        last = bed.admitted()
        time.sleep(5)
        now = bed.admitted()
        runner.join()
        w = {n: now[n] - last[n] for n in NODES}
        print("partitioned window", w)
        assert sum(w.values()) / 5 <= 110, w  # never over the limit x 1.1
        assert within(w["n1"] / 5, 100 / 3, 0.15), w  # n1 alone: its static third
        st = bed.limit_status("n1", "default/api-all")
        assert st["sharing"] == "static" and "n2, n3" in st["fallback"], st
        text = node_metrics(bed.bed.topo, "n1")
        assert metric(text, "nodemesh_ratelimit_fallback", policy="default/api-all") == 1
        n1 = bed.bed.topo.node("n1")
        assert n1 is not None
        out = testbed.popen_in(n1.netns, None, [*meshbed.NODEMESH, "status", "--node", n1.fabric_address],
                               stdout=subprocess.PIPE).communicate(timeout=20)[0].decode()
        assert "FALLBACK" in out and "default/api-all" in out, out
    finally:
        bed.partition("n1", False)
    bed.delete("api-all")


def test_a_limit_change_applies_on_propagation_and_removal_restores_throughput(bed: Bed) -> None:
    url = f"http://{bed.address('n2-p1')}:8080/"
    bed.apply(SERVICE + policy("api-change", "  http:\n    total: {requestsPerSecond: 100, burst: 100}\n"))
    bed.settle()
    t = bed.apply(SERVICE + policy("api-change", "  http:\n    total: {requestsPerSecond: 5, burst: 5}\n"))
    while True:  # bursts of 20 until the new limit answers
        r = bed.bed.exec("n1-p2", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}\\n", *[url] * 20])
        if "429" in r.stdout:
            break
        assert time.monotonic() - t < 3.0, "the new limit did not apply within 3 s"
    took = time.monotonic() - t
    print(f"limit change in force {took:.2f} s after apply returned")
    bed.delete("api-change")
    bed.settle()
    got = bed.h2load({"n1-p2": ("n2-p1", 200)}, 2)["n1-p2"]
    assert got["4xx"] == 0 and got["5xx"] == 0 and within(got["2xx"] / got["s"], 200, 0.1), got



ROUTES = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api]
  http:
  - name: search
    match: [{uri: {prefix: /search}}]
    route: [{destination: {host: api}}]
  - name: rest
    route: [{destination: {host: api}}]
---
"""


def test_a_route_limit_applies_to_that_route_only_and_cannot_be_forged(bed: Bed) -> None:
    """Through the service's VIP (the source agent chooses the VirtualService route): /search is
    limited (5/s, burst 5, per endpoint: 3 endpoints), /other is not, whatever route header the
    client sends."""
    limit = policy("api-search", "  http:\n    total: {requestsPerSecond: 5, burst: 5}\n")
    bed.apply(SERVICE + ROUTES + limit.replace("port: 80}", "port: 80, route: {virtualService: api, "
                                                                          "name: search}}"))
    bed.settle()

    def codes(path: str, forged: str) -> list[str]:
        r = bed.bed.exec("n1-p2", ["curl", "-sS", "-w", "%{http_code}\\n",
                                   "-H", f"x-nodemesh-route: {forged}", *[f"http://10.96.0.80{path}"] * 40])
        return re.findall(r"(\d{3})$", r.stdout, re.M)  # (each body, then its status)

    try:
        other = codes("/other", "default/api/search")  # another route, claiming the limited one
        search = codes("/search", "default/api/rest")  # the limited route, claiming another
        print(f"route limit: /search {search.count('200')} of 40 admitted, /other {other.count('200')}")
        assert other == ["200"] * 40, other  # not limited: the client's header is not the route
        assert len(search) == 40 and 10 <= search.count("200") <= 30 and set(search) == {"200", "429"}, search
    finally:
        bed.delete("api-search")
        r = bed.bed.cli("delete", "vs", "api", "--registry-dir", bed.bed.registry_dir, check=False)
        assert r.returncode in (0, 3), r.stdout + r.stderr
