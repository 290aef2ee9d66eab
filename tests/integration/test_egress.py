"""Egress on the testbed (issue 14 point 3, Must show): an "external" HTTP server in a network
namespace outside the mesh (no agent there; reachable from the testbed's node only), real eBPF
capture, a real agent and curl/dig in a pod.

ALLOW_ANY (the default): the pod reaches the external address directly, not captured (the eBPF
bypass counter moves, the proxy reports nothing). REGISTRY_ONLY: the same connection is captured
and refused (HTTP 502 NR, raw TCP reset), counted in nodemesh_outbound_refused_total and logged;
after a ServiceEntry for it is applied, the pod resolves the entry's host through the mesh DNS
(a VIP allocated by apply), reaches the server by that name with Istio's metrics for
destination_service = the host, and a VirtualService timeout bound to the host applies (504 UT).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

from agent import meshbed
from netns import testbed, topology
from tests.integration.scrape import node_metrics
from tests.integration.scrape import requests_total as requests

EXTERNAL_IP = "10.250.0.200"  # on the fabric, outside every capture CIDR; no agent
EXTERNAL_PORT = 8080
HOST = "api.external.test"

SERVER = textwrap.dedent(
    """
    import http.server, sys, time
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            if self.path.startswith("/slow"):
                time.sleep(2)
            body = f"external {self.path} host={self.headers.get('host')}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
    print("ready", flush=True)
    srv.serve_forever()
    """
)

ENTRY = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api, namespace: default}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {EXTERNAL_PORT}}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: external-api, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: 0.5s
    route: [{{destination: {{host: {HOST}}}}}]
  - route: [{{destination: {{host: {HOST}}}}}]
"""


LEGACY_IP, LEGACY_HOST = "10.250.0.201", "legacy.external.test"  # an address no host has
ENTRY_BY_ADDRESS = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy-api, namespace: default}}
spec:
  hosts: [{LEGACY_HOST}]
  addresses: [{LEGACY_IP}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {EXTERNAL_PORT}}}]
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
"""


# The upstream resolver: backend.external.test is EXTERNAL_IP (TTL 30 s), other names NXDOMAIN;
# prints a line per query (the test counts them)
DNS_SERVER = textwrap.dedent(
    """
    import socket, sys
    from agent.control import dns_wire as w
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 53))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(512)
        q = w.decode(data)
        name = q.questions[0].name
        ok = name == "backend.external.test"
        ans = (w.Record(name, w.A, w.CLASS_IN, 30, sys.argv[1]),) if ok else ()
        s.sendto(w.encode(w.Message(id=q.id, qr=True, rd=q.rd, ra=True, questions=q.questions,
                                    rcode=w.NOERROR if ok else w.NXDOMAIN, answers=ans)), addr)
    """
)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY_DNS = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dns-api, namespace: default}}
spec:
  hosts: [dns.external.test]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: DNS
  endpoints: [{{address: backend.external.test, ports: {{http: {EXTERNAL_PORT}}}}}]
"""


@contextlib.contextmanager
def external_server(topo: topology.Topology) -> Iterator[None]:
    """An HTTP server and a DNS server (the agent's dns_upstream) on a host outside the mesh
    (:func:`netns.testbed.external_host`)."""
    with testbed.external_host(topo, EXTERNAL_IP) as ns:
        procs = []
        try:
            for script, arg in ((SERVER, str(EXTERNAL_PORT)), (DNS_SERVER, EXTERNAL_IP)):
                p = testbed.popen_in(ns, None, [sys.executable, "-c", script, arg], stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": ROOT})
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline() == b"ready\n"
            yield
        finally:
            for p in procs:
                p.kill()
                p.wait()


def curl(bed: meshbed.MeshBed, pod: str, url: str, *extra: str) -> tuple[int, str, str]:
    """(curl's exit code, HTTP status, body)."""
    r = bed.exec(pod, ["curl", "-sS", "--max-time", "5", "-o", "/dev/stdout", "-w", "\n%{http_code}",
                       *extra, url])
    body, _, status = r.stdout.rpartition("\n")
    return r.returncode, status, body


RAW_TCP = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"\\x16\\x03\\x01 not http at all")
    try:
        print("data" if s.recv(100) else "eof")
    except ConnectionResetError:
        print("reset")
    """
)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or (series.startswith(name + "{")
                              and all(f'{k}="{v}"' in series for k, v in labels.items())):
            total += float(value)
    return total


def test_registry_only_refuses_then_service_entry_reaches_with_metrics_and_timeout(
    make_testbed: Callable[..., topology.Topology],
) -> None:
    topo = make_testbed(nodes=1, pods_per_node=1)
    node = topo.nodes[0]
    pod = node.pods[0].name
    manifest = meshbed.workload_manifest(topo, {pod: ("client", {"app": "client"}, {})})
    direct = f"http://{EXTERNAL_IP}:{EXTERNAL_PORT}/direct"
    with external_server(topo), meshbed.running(topo, manifest, start_agents=False) as bed:
        # ALLOW_ANY: not captured at all, so the pod reaches it directly (the proxy sees nothing)
        bed.start_agent(node)
        before = metric(node_metrics(topo, node.name), "nodemesh_bpf_bypass_not_captured_total")
        code, status, body = curl(bed, pod, direct)
        assert (code, status) == (0, "200") and body.startswith("external /direct"), (code, status, body)
        text = node_metrics(topo, node.name)
        assert metric(text, "nodemesh_bpf_bypass_not_captured_total") > before
        assert requests(text, reporter="source") == 0
        # an entry's own address outside capture_cidrs is captured (a /32 in the eBPF map), so the
        # mesh applies to it; other external addresses stay uncaptured
        out = bed.apply(ENTRY_BY_ADDRESS)
        assert "ServiceEntry default/legacy-api created" in out, out
        deadline = time.monotonic() + 10
        status = ""
        while time.monotonic() < deadline and status != "200":
            code, status, body = curl(bed, pod, f"http://{LEGACY_IP}/legacy")
            time.sleep(0.2)
        assert status == "200" and body.startswith("external /legacy"), (status, body)
        assert requests(node_metrics(topo, node.name), reporter="source", destination_service=LEGACY_HOST,
                        response_code="200") == 1
        assert bed.stop_agent(node.name) == 0

        # REGISTRY_ONLY: captured and refused, counted, logged
        bed.extra["outbound_traffic_policy"] = {"mode": "REGISTRY_ONLY"}
        bed.extra["dns_upstream"] = f"{EXTERNAL_IP}:53"  # non-mesh names, and DNS endpoints
        bed.start_agent(node)
        code, status, body = curl(bed, pod, direct, "-f")
        assert code == 22 and status == "502", (code, status, body)  # curl -f: the server said 502
        code, status, body = curl(bed, pod, direct)
        assert status == "502" and "REGISTRY_ONLY" in body, body
        for dst in (EXTERNAL_IP, f"::ffff:{EXTERNAL_IP}"):  # IPv4, and a dual-stack socket (connect6)
            r = bed.exec(pod, [sys.executable, "-c", RAW_TCP, dst, str(EXTERNAL_PORT)])
            assert r.stdout.strip() == "reset", (dst, r.stdout, r.stderr)
        text = node_metrics(topo, node.name)
        assert metric(text, "nodemesh_outbound_refused_total", reason="registry_only") == 4
        assert requests(text, response_code="502", response_flags="NR", destination_service="unknown") == 2
        assert "REGISTRY_ONLY" in bed.log_text(node.name) and "refused" in bed.log_text(node.name)
        st = testbed.popen_in(node.netns, None, ["curl", "-sS", f"http://{node.fabric_address}:15021/status"],
                              stdout=subprocess.PIPE)
        proxy = json.loads(st.communicate(timeout=10)[0])["proxy"]
        assert proxy["outbound_traffic_policy"] == "REGISTRY_ONLY" and "0.0.0.0/0" in proxy["capture_cidrs"]

        # a ServiceEntry makes it reachable by the entry's host, through the mesh DNS and proxy
        out = bed.apply(ENTRY)
        assert "ServiceEntry default/external-api created" in out, out
        vip = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not vip:  # the agent follows the registry (~0.2 s)
            r = bed.exec(pod, ["dig", "@10.96.0.53", HOST, "A", "+short", "+tries=1", "+time=2"])
            vip = r.stdout.strip()
            if not vip:
                time.sleep(0.2)
        assert vip.startswith("10.96."), (vip, r.stderr)
        resolve = ("--resolve", f"{HOST}:80:{vip}")
        for i in range(3):
            code, status, body = curl(bed, pod, f"http://{HOST}/hello{i}", *resolve)
            assert (code, status) == (0, "200") and body == f"external /hello{i} host={HOST}", body
        # the VirtualService bound to the host: its 0.5 s timeout answers 504 UT before the 2 s server
        t0 = time.monotonic()
        code, status, body = curl(bed, pod, f"http://{HOST}/slow", *resolve)
        assert status == "504" and time.monotonic() - t0 < 1.8, (status, body)
        text = node_metrics(topo, node.name)
        labels = {"reporter": "source", "destination_service": HOST, "destination_service_name": HOST,
                  "destination_service_namespace": "default", "source_workload": pod,
                  "connection_security_policy": "none"}
        assert requests(text, response_code="200", **labels) == 3, text
        assert requests(text, response_code="504", response_flags="UT", **labels) == 1
        # the endpoint's own address is still not in the registry: refused
        code, status, body = curl(bed, pod, direct)
        assert status == "502"
        assert metric(node_metrics(topo, node.name), "nodemesh_outbound_refused_total",
                      reason="registry_only") == 5
        # resolution DNS: the endpoint's name is resolved by the agent through dns_upstream
        out = bed.apply(ENTRY_DNS)
        assert "ServiceEntry default/dns-api created" in out, out
        deadline, vip2 = time.monotonic() + 10, ""
        while time.monotonic() < deadline and not vip2:
            r = bed.exec(pod, ["dig", "@10.96.0.53", "dns.external.test", "+short", "+tries=1"])
            vip2 = r.stdout.strip()
            time.sleep(0 if vip2 else 0.2)
        for i in range(2):
            code, status, body = curl(bed, pod, f"http://dns.external.test/d{i}", "--resolve",
                                      f"dns.external.test:80:{vip2}")
            assert status == "200" and body.startswith(f"external /d{i}"), (vip2, status, body)
        assert requests(node_metrics(topo, node.name), destination_service="dns.external.test",
                        response_code="200") == 2
        # a name outside the mesh is forwarded to the same upstream
        r = bed.exec(pod, ["dig", "@10.96.0.53", "backend.external.test", "+short", "+tries=1"])
        assert r.stdout.strip() == EXTERNAL_IP, (r.stdout, r.stderr)
