"""The node proxy's HTTP path on the testbed: real eBPF capture, real agents, real HBONE mTLS,
real servers (nginx for HTTP/1.1 and h2c, grpcio, websockets) and real clients (curl, wrk,
h2load, grpcio, websockets), across nodes and on one node, by VIP and by DNS name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import pod_nginx, run_prefix
from tests.integration.scrape import node_metrics
from tests.integration.scrape import requests_total as requests

WEB_VIP = "10.96.0.30"
LOCAL_VIP = "10.96.0.31"

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  vip: {WEB_VIP}
  selector: {{app: web}}
  ports:
  - {{name: http-web, port: 80, targetPort: 8080}}
  - {{name: http2-web, port: 81, targetPort: 8081}}
  - {{name: plain, port: 82, targetPort: 8080}}
  - {{name: grpc, port: 9090, targetPort: 9090}}
  - {{name: http-ws, port: 8765, targetPort: 8765}}
  - {{name: banner, port: 25, targetPort: 2525}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  vip: {LOCAL_VIP}
  selector: {{app: local}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: http2, port: 81, targetPort: 8081}}
  - {{name: grpc, port: 9090, targetPort: 9090}}
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n1-p2": ("local", {"app": "local"}, {}),
    "n2-p1": ("web", {"app": "web"}, {}),
    "n2-p2": ("web", {"app": "web"}, {}),
}
SERVER_PODS = ("n1-p2", "n2-p1", "n2-p2")

NGINX = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000;
  server {{
    listen {addr}:8080;
    listen {addr}:8081 http2;
    location / {{ return 200 "{pod}"; }}
    location /status/404 {{ return 404 "{pod}"; }}
  }}
}}
"""

# gRPC (grpcio), WebSocket (websockets) and a server-first "banner" protocol, in one process
APP = textwrap.dedent(
    """
    import asyncio, sys
    from concurrent import futures
    import grpc, websockets
    NAME, ADDR = sys.argv[1], sys.argv[2]

    def say(request, context):
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return NAME.encode() + b":" + request

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{ADDR}:9090")
    server.start()

    async def ws(conn):
        async for msg in conn:
            await conn.send(f"{NAME}:{msg}")

    async def banner(r, w):
        w.write(b"220 " + NAME.encode() + b" ready\\r\\n")
        await w.drain()
        line = await r.readline()
        w.write(b"250 " + line)
        await w.drain()
        w.close()

    async def main():
        async with websockets.serve(ws, ADDR, 8765):
            b = await asyncio.start_server(banner, ADDR, 2525)
            print("ready", flush=True)
            await b.serve_forever()
    asyncio.run(main())
    """
)

GRPC_CLIENT = textwrap.dedent(
    """
    import sys, grpc
    from collections import Counter
    with grpc.insecure_channel(sys.argv[1]) as ch:
        say = ch.unary_unary("/echo.Echo/Say")
        who = Counter(say(b"hi", timeout=10).decode().split(":")[0] for _ in range(20))
        try:
            say(b"missing", timeout=10)
            status = "OK"
        except grpc.RpcError as e:
            status = f"{e.code().name} {e.details()}"
    print(dict(sorted(who.items())), status)
    """
)

WS_CLIENT = textwrap.dedent(
    """
    import asyncio, sys, websockets
    async def main():
        async with websockets.connect(sys.argv[1], open_timeout=10) as ws:
            for i in range(3):
                await ws.send(f"m{i}")
                print(await asyncio.wait_for(ws.recv(), 10))
    asyncio.run(main())
    """
)

BANNER_CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], 25), timeout=5)
    t = time.monotonic()
    greeting = s.recv(100)  # the client says nothing first
    waited = time.monotonic() - t
    s.sendall(b"HELO me\\r\\n")
    print(greeting.decode().strip(), "|", s.recv(100).decode().strip(), "|", round(waited, 3))
    """
)


class Bed:
    def __init__(self, bed: meshbed.MeshBed, work: str) -> None:
        self.bed = bed
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def exec(self, argv: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return self.bed.exec("n1-p1", argv, timeout_s=timeout_s)

    def py(self, script: str, *args: str, timeout_s: float = 60) -> str:
        r = self.exec([sys.executable, "-c", script, *args], timeout_s=timeout_s)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def metrics(self, node: str) -> str:
        return node_metrics(self.bed.topo, node)






@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    prefix = run_prefix("h")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    work = f"/run/nodemesh/{prefix}-www"
    os.makedirs(work, exist_ok=True)
    try:
        with meshbed.running(topo, SERVICES + meshbed.workload_manifest(topo, ROLES)) as mb, \
                pod_nginx(topo, work, NGINX, SERVER_PODS):
            b = Bed(mb, work)
            try:
                for name in SERVER_PODS:
                    pod = topo.pod(name)
                    assert pod is not None
                    app = testbed.popen_in_pod(
                        pod, [sys.executable, "-c", APP, name, pod.address], stdout=subprocess.PIPE
                    )
                    b.procs.append(app)
                    assert app.stdout is not None and app.stdout.readline() == b"ready\n"
                yield b
            finally:
                for p in b.procs:  # by PID: the ones this fixture started
                    p.kill()
                    p.wait()
    finally:
        testbed.down(prefix)
        shutil.rmtree(work, ignore_errors=True)


def test_curl_across_nodes_and_on_one_node_by_vip_and_by_name(bed: Bed) -> None:
    for url in (f"http://{WEB_VIP}/", "http://web.default/", "http://web.default.svc.cluster.local/"):
        r = bed.exec(["curl", "-sS", "--max-time", "10", url])
        assert r.returncode == 0 and r.stdout in ("n2-p1", "n2-p2"), (url, r.stdout, r.stderr)
    for url in (f"http://{LOCAL_VIP}/", "http://local.default/"):
        r = bed.exec(["curl", "-sS", "--max-time", "10", url])
        assert r.returncode == 0 and r.stdout == "n1-p2", (url, r.stdout, r.stderr)
    r = bed.exec(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge", "http://local.default:81/"])
    assert r.returncode == 0 and r.stdout == "n1-p2", r.stdout + r.stderr
    # a code the server chose passes through, with the server's body
    r = bed.exec(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://{WEB_VIP}/status/404"])
    assert r.stdout == "404"


def test_100_requests_on_one_keepalive_connection_are_balanced_per_request(bed: Bed) -> None:
    urls = [f"http://{WEB_VIP}/"] * 100
    r = bed.exec(["curl", "-sS", "--max-time", "30", "-w", " %{num_connects}\n", *urls])
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 100
    assert sum(int(n) for _, n in rows) == 1, "one connection carried all 100 requests"
    assert Counter(pod for pod, _ in rows) == {"n2-p1": 50, "n2-p2": 50}  # ROUND_ROBIN, per request


def test_100_requests_on_one_http2_connection_are_balanced_per_request(bed: Bed) -> None:
    # (h2load, not curl: curl 7.88's --http2-prior-knowledge fails reusing a connection, even
    # talking to nginx directly)
    def per_pod() -> tuple[float, float]:
        text = bed.metrics("n1")
        sel = {"reporter": "source", "destination_service_name": "web", "response_code": "200"}
        return (
            requests(text, destination_workload="n2-p1", **sel),
            requests(text, destination_workload="n2-p2", **sel),
        )

    before = per_pod()
    r = bed.exec(["h2load", "-n", "100", "-c", "1", "-m", "1", f"http://{WEB_VIP}:81/"], timeout_s=60)
    assert "100 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout + r.stderr
    assert re.search(r"requests: 100 total", r.stdout) and "1 total client" in r.stdout.replace(
        "clients", "client"
    ), r.stdout
    after = per_pod()
    assert (after[0] - before[0], after[1] - before[1]) == (50, 50)


def test_wrk_and_h2load_through_the_mesh(bed: Bed) -> None:
    r = bed.exec(["wrk", "-t1", "-c8", "-d2s", "--timeout", "5s", f"http://{WEB_VIP}/"], timeout_s=30)
    assert r.returncode == 0, r.stderr
    assert "Non-2xx" not in r.stdout and "Socket errors" not in r.stdout, r.stdout
    done = int(re.search(r"(\d+) requests in", r.stdout).group(1))  # type: ignore[union-attr]
    assert done > 200, r.stdout
    for url in (f"http://{WEB_VIP}:81/", f"http://{LOCAL_VIP}:81/"):
        r = bed.exec(["h2load", "-n", "400", "-c", "4", "-m", "10", url], timeout_s=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "400 succeeded, 0 failed, 0 errored" in r.stdout, r.stdout
        assert "status codes: 400 2xx" in r.stdout, r.stdout


def test_grpcio_client_and_server_across_nodes_and_on_one_node(bed: Bed) -> None:
    out = bed.py(GRPC_CLIENT, "web.default:9090")
    assert out.strip() == "{'n2-p1': 10, 'n2-p2': 10} NOT_FOUND no such thing", out
    out = bed.py(GRPC_CLIENT, f"{LOCAL_VIP}:9090")
    assert out.strip() == "{'n1-p2': 20} NOT_FOUND no such thing", out
    text = bed.metrics("n1")
    assert requests(text, reporter="source", request_protocol="grpc", grpc_response_status="0") >= 40
    assert requests(text, reporter="source", request_protocol="grpc", grpc_response_status="5") >= 2
    # the same-node calls are reported by the one proxy that saw them, as both reporters
    assert (
        requests(text, reporter="destination", destination_workload="n1-p2", grpc_response_status="0") >= 20
    )
    assert requests(bed.metrics("n2"), reporter="destination", grpc_response_status="0") >= 20


def test_websocket_upgrade_becomes_a_byte_relay(bed: Bed) -> None:
    out = bed.py(WS_CLIENT, "ws://web.default:8765/").split()
    assert len(out) == 3 and len({o.split(":")[0] for o in out}) == 1, out
    assert [o.split(":")[1] for o in out] == ["m0", "m1", "m2"]
    deadline = time.monotonic() + 5  # (counted when the relayed connection has ended)
    while requests(bed.metrics("n1"), reporter="source", response_code="101") < 1:
        assert time.monotonic() < deadline, "the upgraded request was not counted"
        time.sleep(0.1)


def test_server_first_protocol_on_an_undeclared_port_gets_its_banner(bed: Bed) -> None:
    out = bed.py(BANNER_CLIENT, WEB_VIP)
    greeting, answer, waited = (x.strip() for x in out.split("|"))
    assert re.fullmatch(r"220 n2-p[12] ready", greeting) and answer == "250 HELO me", out
    assert float(waited) < 2.0  # after the sniff timeout (0.1 s per proxy), not a hang
    text = bed.metrics("n1")
    assert re.search(
        r'^istio_tcp_connections_opened_total\{[^}]*destination_service="web.default', text, re.M
    )


def test_an_undeclared_http_port_is_detected_as_http(bed: Bed) -> None:
    before = requests(
        bed.metrics("n1"), reporter="source", destination_service_name="web", response_code="200"
    )
    for _ in range(3):
        r = bed.exec(["curl", "-sS", "--max-time", "10", f"http://{WEB_VIP}:82/"])
        assert r.stdout in ("n2-p1", "n2-p2"), r.stdout + r.stderr
    after = requests(
        bed.metrics("n1"), reporter="source", destination_service_name="web", response_code="200"
    )
    assert after - before == 3
