"""A real Prometheus (Debian's package) scrapes every agent of a mesh on the testbed.

The mesh: two nodes, a TCP service on n2 whose server answers every connection
with a fixed number of bytes after reading the request to EOF. A client in
n1-p1 opens a known number of connections with a known request size. Prometheus
runs inside n1's network namespace (so it reaches both agents on their fabric
addresses, and nothing outside the testbed), scrapes every second, and is
asked through its HTTP API for connection and byte counts between the two
workloads. `promtool check metrics` lints each agent's /metrics output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent import meshbed
from netns import testbed, topology
from netns.topology import Topology
from tests.integration.conftest import run_prefix

VIP = "10.96.0.20"
PORT = 9000
CONNECTIONS = 20
REQUEST_BYTES = 1000
RESPONSE_BYTES = 5000

HTTP_VIP = "10.96.0.21"
CODES = {"200": 12, "404": 5, "503": 3}  # requests per response code the server answers

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: fixed, namespace: default}}
spec:
  vip: {VIP}
  selector: {{app: fixed}}
  ports: [{{name: tcp, port: {PORT}, targetPort: {PORT}, protocol: tcp}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: codes, namespace: default}}
spec:
  vip: {HTTP_VIP}
  selector: {{app: fixed}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
---
"""
ROLES = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n2-p1": ("fixed", {"app": "fixed"}, {}),
    "n2-p2": ("fixed", {"app": "fixed"}, {}),
}

# Reads the request to EOF, then answers RESPONSE_BYTES and closes.
SERVER = textwrap.dedent(
    f"""
    import asyncio
    async def handle(r, w):
        while await r.read(65536):
            pass
        w.write(b"r" * {RESPONSE_BYTES}); await w.drain(); w.close()
    async def main():
        s = await asyncio.start_server(handle, "0.0.0.0", {PORT})
        print("ready", flush=True)
        await s.serve_forever()
    asyncio.run(main())
    """
)

# An HTTP server (the standard library's) answering GET /<code> with that status code.
HTTP_SERVER = textwrap.dedent(
    """
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            body = b"code " + self.path[1:].encode()
            self.send_response(int(self.path[1:]))
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
    """
)

# CONNECTIONS connections, one after the other: send REQUEST_BYTES, half-close, read the answer.
CLIENT = textwrap.dedent(
    f"""
    import socket, sys
    for i in range({CONNECTIONS}):
        with socket.create_connection(("{VIP}", {PORT}), timeout=10) as s:
            s.sendall(b"q" * {REQUEST_BYTES}); s.shutdown(socket.SHUT_WR)
            got = 0
            while chunk := s.recv(65536):
                got += len(chunk)
            assert got == {RESPONSE_BYTES}, (i, got)
    print("done")
    """
)


@dataclass
class Scraped:
    topo: Topology
    bed: meshbed.MeshBed
    prom_port: int

    def curl(self, url: str, timeout_s: float = 10.0) -> str:
        """GET from inside n1's namespace, where Prometheus and the agents' fabric addresses are."""
        proc = testbed.popen_in(
            self.topo.nodes[0].netns, None, ["curl", "-sS", "--max-time", "5", url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = proc.communicate(timeout=timeout_s)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    def query(self, promql: str) -> list[dict[str, object]]:
        q = urllib.parse.quote(promql, safe="")
        doc = json.loads(self.curl(f"http://127.0.0.1:{self.prom_port}/api/v1/query?query={q}"))
        assert doc["status"] == "success", doc
        result: list[dict[str, object]] = doc["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        r = self.query(promql)
        if not r:
            return None
        value = r[0]["value"]
        assert isinstance(value, list)
        return float(value[1])

    def wait_for(self, promql: str, want: float, timeout_s: float = 15.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        got = self.scalar(promql)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.25)
            got = self.scalar(promql)
        return got


def prometheus_config(topo: Topology) -> str:
    targets = [f"{n.fabric_address}:15020" for n in topo.nodes]
    return json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "nodemesh", "static_configs": [{"targets": targets}]}],
    })


@pytest.fixture(scope="module")
def scraped() -> Iterator[Scraped]:
    prefix = run_prefix("p")
    data = tempfile.mkdtemp(prefix=f"nodemesh-{prefix}-prometheus-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
        with meshbed.running(topo, SERVICES + meshbed.workload_manifest(topo, ROLES)) as bed:
            for name in ("n2-p1", "n2-p2"):
                pod = topo.pod(name)
                assert pod is not None
                srv = testbed.popen_in_pod(pod, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
                procs.append(srv)
                assert srv.stdout is not None and srv.stdout.readline() == b"ready\n"
                procs.append(testbed.popen_in_pod(pod, [sys.executable, "-c", HTTP_SERVER]))
            cfg = os.path.join(data, "prometheus.yml")
            with open(cfg, "w") as f:
                f.write(prometheus_config(topo))
            port = 9090
            log = open(os.path.join(data, "prometheus.log"), "ab")  # noqa: SIM115 - the child keeps it
            prom = testbed.popen_in(
                topo.nodes[0].netns, None,
                ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={data}/tsdb",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=log,
            )
            log.close()
            procs.append(prom)
            s = Scraped(topo, bed, port)
            deadline = time.monotonic() + 20
            while True:
                if prom.poll() is not None:
                    with open(os.path.join(data, "prometheus.log")) as f:
                        raise AssertionError(f"prometheus exited: {f.read()[-2000:]}")
                try:
                    if s.scalar('sum(up{job="nodemesh"})') == len(topo.nodes):
                        break
                except AssertionError:
                    pass  # not listening yet
                assert time.monotonic() < deadline, "prometheus did not scrape every agent"
                time.sleep(0.25)
            yield s
    finally:
        for p in procs:  # by PID, the ones this fixture started
            if p.poll() is None:
                p.kill()
            p.wait()
        testbed.down(prefix)
        shutil.rmtree(data, ignore_errors=True)


def test_promtool_accepts_every_agents_metrics(scraped: Scraped) -> None:
    for n in scraped.topo.nodes:
        text = scraped.curl(f"http://{n.fabric_address}:15020/metrics")
        assert "istio_tcp_connections_opened" in text or "nodemesh_" in text, text[:500]
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"{n.name}: {r.stdout}{r.stderr}"


def test_promql_counts_the_connections_and_bytes_between_two_workloads(scraped: Scraped) -> None:
    r = scraped.bed.exec("n1-p1", [sys.executable, "-c", CLIENT], timeout_s=30)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stdout + r.stderr
    between = 'source_workload="n1-p1",destination_workload=~"n2-.*"'
    for reporter in ("source", "destination"):
        sel = f'reporter="{reporter}",{between}'
        opened = scraped.wait_for(f"sum(istio_tcp_connections_opened_total{{{sel}}})", CONNECTIONS)
        assert opened == CONNECTIONS, (reporter, opened)
        closed = scraped.wait_for(f"sum(istio_tcp_connections_closed_total{{{sel}}})", CONNECTIONS)
        assert closed == CONNECTIONS, (reporter, closed)
        # Both directions are counted exactly, with Istio's meaning: received = request bytes
        # (client to server), sent = response bytes.
        total = CONNECTIONS * (REQUEST_BYTES + RESPONSE_BYTES)
        both = f"sum(istio_tcp_received_bytes_total{{{sel}}}) + sum(istio_tcp_sent_bytes_total{{{sel}}})"
        assert scraped.wait_for(both, total) == total, (reporter, scraped.scalar(both))
        received = scraped.scalar(f"sum(istio_tcp_received_bytes_total{{{sel}}})")
        sent = scraped.scalar(f"sum(istio_tcp_sent_bytes_total{{{sel}}})")
        assert (received, sent) == (CONNECTIONS * REQUEST_BYTES, CONNECTIONS * RESPONSE_BYTES), (
            reporter, received, sent
        )
    # both pods behind the service got a share, and nothing else was counted between these two
    by_pod = scraped.query(
        f'sum by (destination_workload) (istio_tcp_connections_opened_total{{reporter="source",{between}}})'
    )
    assert {str(x["metric"]["destination_workload"]) for x in by_pod} == {"n2-p1", "n2-p2"}, by_pod


def test_promql_counts_http_requests_by_response_code_from_both_reporters(scraped: Scraped) -> None:
    urls = [f"http://{HTTP_VIP}/{code}" for code, n in CODES.items() for _ in range(n)]
    deadline = time.monotonic() + 10  # the HTTP servers may still be starting
    while scraped.bed.exec("n1-p1", ["curl", "-s", "-o", "/dev/null", f"http://{HTTP_VIP}/200"]).returncode:
        assert time.monotonic() < deadline, "HTTP server did not start"
        time.sleep(0.1)
    # (that probe counts one 200; the known requests follow, on one keep-alive connection)
    r = scraped.bed.exec("n1-p1", ["curl", "-s", "-w", " %{http_code}\n", *urls])
    got_codes = [line.split()[-1] for line in r.stdout.splitlines() if line.strip()]
    assert got_codes == [u.rsplit("/", 1)[1] for u in urls], r.stdout + r.stderr
    want = {**CODES, "200": CODES["200"] + 1}
    for reporter in ("source", "destination"):
        sel = f'reporter="{reporter}",destination_workload=~"n2-.*",source_workload="n1-p1"'
        total = sum(want.values())
        got = scraped.wait_for(f"sum(istio_requests_total{{{sel}}})", total)
        assert got == total, (reporter, got)
        rows = scraped.query(f"sum by (response_code, request_protocol) (istio_requests_total{{{sel}}})")
        by_code = {str(x["metric"]["response_code"]): float(x["value"][1]) for x in rows}  # type: ignore[index]
        assert by_code == {k: float(v) for k, v in want.items()}, (reporter, by_code)
        assert {str(x["metric"]["request_protocol"]) for x in rows} == {"http"}  # type: ignore[index]
        hist = scraped.scalar(f"sum(istio_request_duration_milliseconds_count{{{sel}}})")
        assert hist == total, (reporter, hist)
    for n in scraped.topo.nodes:  # the request metrics lint clean too
        text = scraped.curl(f"http://{n.fabric_address}:15020/metrics")
        assert "istio_requests_total{" in text and "istio_request_duration_milliseconds_bucket{" in text
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        # The one finding is Istio's own name (promtool wants seconds); kept so Istio's dashboards
        # and Kiali work unchanged (README: metrics). Anything else is a defect.
        findings = {line for line in (r.stdout + r.stderr).splitlines() if line.strip()}
        assert findings == {
            'istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"',
            'istio_request_duration_milliseconds_created use base unit "seconds" instead of "milliseconds"',
        }, f"{n.name}: {r.stdout}{r.stderr}"
