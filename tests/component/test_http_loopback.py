"""The node proxy's HTTP path on loopback: app → outbound (HTTP/1.1 parsed, balanced per
request) → pooled HBONE → inbound (parsed again) → a real HTTP server per pod.

Clients are real: the standard library's http.client (keep-alive), curl, and raw
sockets for the malformed-request corpus, whose exact bytes matter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import tempfile
from collections import Counter
from typing import Any

import pytest

from agent.control.model import Service, ServicePort
from agent.control.snapshot import Snapshot
from agent.dataplane.http.accesslog import AccessLog, AccessLogConfig
from agent.dataplane.report import Reporter
from tests.component.harness import (
    VIP,
    Mesh,
    build_snapshot,
    http_pod,
    http_service,
    metric,
    run,
    two_node_mesh,
    workload,
)

WEB = {"app": "web", "version": "v1"}
CLIENT = "127.0.0.5"


def workloads(n_web: int = 2, node: str = "n2") -> list[Any]:
    ws = [workload("client", CLIENT, "n1", sa="client", labels={"app": "client"})]
    ws += [workload(f"web-{i}", f"127.0.0.{10 + i}", node, sa="web", labels=WEB) for i in range(1, n_web + 1)]
    return ws


class Pods:
    def __init__(self, names: list[tuple[str, str]], port: int = 9000) -> None:
        self.servers = [http_pod(addr, port, name) for name, addr in names]

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()


def pods_for(ws: list[Any]) -> Pods:
    return Pods([(w.name, w.address) for w in ws if w.name.startswith("web")])


def keepalive_requests(
    port: int, n: int, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """n requests on ONE keep-alive connection (http.client), as a blocking call."""
    conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(CLIENT, 0), timeout=10)
    out = []
    try:
        for _ in range(n):
            conn.request(method, path, headers={"host": "web.default", **(headers or {})})
            r = conn.getresponse()
            body = r.read()
            out.append(
                (
                    r.status,
                    json.loads(body)
                    if body and r.getheader("content-type") == "application/json"
                    else {"raw": body.decode()},
                    {k.lower(): v for k, v in r.getheaders()},
                )
            )
        assert conn.sock is not None  # still the one connection
    finally:
        conn.close()
    return out


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the proxy closes (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(CLIENT, 0)) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return out + b"<timeout>"
            if not chunk:
                return out
            out += chunk


async def with_mesh(
    ws: list[Any], services: list[Service], body: Any, *, dst: tuple[str, int] = (VIP, 80)
) -> Any:
    pods = pods_for(ws)
    try:
        async with two_node_mesh(ws, services) as mesh:
            mesh.original_dst[(CLIENT, 0)] = dst
            return await body(mesh)
    finally:
        pods.close()


def test_100_requests_on_one_keepalive_connection_are_balanced_per_request_and_counted_by_both() -> None:
    ws = workloads()

    async def body(mesh: Mesh) -> None:
        n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 100)
        assert [s for s, _, _ in res] == [200] * 100
        assert Counter(d["pod"] for _, d, _ in res) == {"web-1": 50, "web-2": 50}  # ROUND_ROBIN per request
        seen = res[0][1]["headers"]
        # the server learns who called, from verified facts only
        assert seen["x-forwarded-for"] == CLIENT
        assert seen["forwarded"] == f"for={CLIENT}"
        assert seen["x-forwarded-client-cert"] == (
            "By=spiffe://cluster.local/ns/default/sa/web;URI=spiffe://cluster.local/ns/default/sa/client"
        )
        assert len(seen["x-request-id"]) == 36
        assert seen["traceparent"].startswith("00-") and seen["traceparent"].endswith("-01")
        labels = {
            "response_code": "200",
            "request_protocol": "http",
            "destination_service_name": "web",
            "source_workload": "client",
            "destination_app": "web",
            "destination_version": "v1",
        }
        assert metric(n1, "istio_requests_total", reporter="source", **labels) == 100
        assert (
            metric(
                n2,
                "istio_requests_total",
                reporter="destination",
                source_workload="client",
                response_code="200",
                request_protocol="http",
            )
            == 100
        )
        assert metric(n1, "istio_request_duration_milliseconds_count", reporter="source") == 100
        assert metric(n2, "istio_response_bytes_count", reporter="destination") == 100
        # requests reused pooled tunnel streams: far fewer upstream dials than requests
        assert n1.outbound.upstreams.stats.dials <= 4
        assert n1.outbound.upstreams.stats.reuses >= 96

    run(with_mesh(ws, [http_service()], body))


def test_app_forwarding_headers_are_replaced_and_trace_continues_with_a_new_span() -> None:
    ws = workloads(1)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        res = await asyncio.to_thread(
            keepalive_requests,
            n1.outbound_port,
            1,
            "/",
            "GET",
            {
                "x-forwarded-for": "6.6.6.6",
                "forwarded": "for=6.6.6.6",
                "x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/default/sa/admin",
                "traceparent": parent,
                "x-request-id": "my-id-1",
            },
        )
        seen = res[0][1]["headers"]
        assert seen["x-forwarded-for"] == CLIENT and "6.6.6.6" not in json.dumps(seen)
        assert "sa/admin" not in seen["x-forwarded-client-cert"]
        assert seen["x-request-id"] == "my-id-1"
        trace, span = seen["traceparent"].split("-")[1:3]
        assert trace == "4bf92f3577b34da6a3ce929d0e0e4736" and span != "00f067aa0ba902b7"

    run(with_mesh(ws, [http_service()], body))


def test_curl_chunked_upload_with_trailers_100_continue_head_and_pipelining() -> None:
    ws = workloads(1)

    async def body(mesh: Mesh) -> None:
        port = mesh.nodes["n1"].outbound_port
        base = ["curl", "-sS", "--max-time", "10", "--interface", CLIENT, f"http://127.0.0.1:{port}/up"]
        # curl sends a chunked body (unknown length) with Expect: 100-continue
        p = await asyncio.to_thread(
            subprocess.run,
            [*base, "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue", "--data-binary", "@-"],
            input=b"x" * 300_000,
            capture_output=True,
            timeout=20,
        )
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["headers"]["transfer-encoding"] == "chunked" and len(doc["body"]) == 300_000
        # trailers pass through (raw: curl cannot send request trailers)
        req = (
            b"POST /t HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Checksum: 42\r\n\r\n"
        )
        out = await asyncio.to_thread(raw, port, req)
        assert b" 200 " in out.split(b"\r\n")[0]
        doc = json.loads(out.split(b"\r\n\r\n", 1)[1])
        assert doc["body"] == "abc" and doc["trailers"] == ["x-checksum: 42"]  # (names lower-cased, as Envoy)
        # HEAD: headers, no body, the connection stays usable
        p = await asyncio.to_thread(subprocess.run, [*base, "-I"], capture_output=True, timeout=20)
        assert p.returncode == 0 and b"200" in p.stdout.split(b"\r\n")[0]
        # three pipelined requests in one write: three answers, in order
        pipe = b"".join(b"GET /p%d HTTP/1.1\r\nHost: web\r\n\r\n" % i for i in range(3))
        out = await asyncio.to_thread(
            raw, port, pipe + b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        paths = [
            json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["path"]
            for part in out.split(b"HTTP/1.1 200 OK")[1:]
        ]
        assert paths == ["/p0", "/p1", "/p2", "/last"]

    run(with_mesh(ws, [http_service()], body))


SMUGGLING = [
    (
        "Content-Length with Transfer-Encoding",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "duplicate Content-Length",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
    ),
    ("signed Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", 400),
    ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("invalid header name", b"GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400),
    ("control byte in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n", 400),
    (
        "Transfer-Encoding not ending in chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("lower-case method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /\r\n\r\n", 505),
    ("oversized request line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (
        "oversized header block",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"b" * 70_000 + b"\r\n\r\n",
        431,
    ),
    (
        "too many headers",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n",
        431,
    ),
    ("garbage", b"\x16\x03\x01\x02\x00GET / HTTP/1.1\r\n\r\n", None),  # not HTTP: the sniffer says TCP
]


@pytest.mark.parametrize(("case", "data", "status"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_malformed_and_smuggling_requests_are_refused_and_the_proxy_keeps_serving(
    case: str, data: bytes, status: int | None
) -> None:
    ws = workloads(1)

    async def body(mesh: Mesh) -> None:
        port = mesh.nodes["n1"].outbound_port
        out = await asyncio.to_thread(raw, port, data)
        if status is None:  # declared HTTP port: the loop still parses it and refuses it
            assert out.startswith(b"HTTP/1.1 400 ") and b"server: nodemesh" in out
        else:
            head, _, text = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), out[:200]
            assert b"server: nodemesh" in head and b"connection: close" in head
            assert text.strip(), "the body names the reason"
        # nothing reached the pod, and the proxy still serves
        res = await asyncio.to_thread(keepalive_requests, port, 2)
        assert [s for s, _, _ in res] == [200, 200]

    run(with_mesh(ws, [http_service()], body))


def test_no_healthy_endpoint_is_503_uh_and_a_dead_endpoint_is_503_uf() -> None:
    ws = workloads(1)

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1)
        assert res[0][0] == 200
        # the pod dies: its port refuses (cross-node: the inbound answers 503 to the CONNECT)
        pods.close()
        n1.outbound.upstreams.close()
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 2)
        for status, doc, headers in res:
            assert status == 503 and headers["server"] == "nodemesh"
            assert "upstream connect error" in doc["raw"]
        assert (
            metric(n1, "istio_requests_total", reporter="source", response_code="503", response_flags="UF")
            == 2
        )
        # no endpoint at all
        sick = [w for w in ws if not w.name.startswith("web")]
        mesh.set_snapshot(build_snapshot([http_service()], sick, revision=2))
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1)
        assert res[0][0] == 503 and "no healthy upstream" in res[0][1]["raw"]
        assert metric(n1, "istio_requests_total", response_code="503", response_flags="UH") == 1

    pods = pods_for(ws)
    try:

        async def go() -> None:
            async with two_node_mesh(ws, [http_service()]) as mesh:
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                await body(mesh)

        run(go())
    finally:
        pods.close()


def test_undeclared_port_is_sniffed_http_and_a_server_first_protocol_still_works() -> None:
    ws = workloads(1)
    svc = Service(
        "web", "default", VIP, (ServicePort("web", 80, 9000), ServicePort("banner", 25, 2525)), {"app": "web"}
    )

    async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 smtp.example ESMTP ready\r\n")
        line = await r.readline()
        w.write(b"250 got " + line)
        await w.drain()
        w.close()

    async def body(mesh: Mesh) -> None:
        n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 3)
        assert [s for s, _, _ in res] == [200] * 3
        assert metric(n1, "istio_requests_total", reporter="source", response_code="200") == 3
        assert metric(n2, "istio_requests_total", reporter="destination", response_code="200") == 3
        srv = await asyncio.start_server(banner, "127.0.0.11", 2525)
        try:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 25)
            r, w = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
            greeting = await asyncio.wait_for(r.readline(), 5)  # the client says nothing first
            assert greeting == b"220 smtp.example ESMTP ready\r\n"
            w.write(b"HELO me\r\n")
            assert await asyncio.wait_for(r.readline(), 5) == b"250 got HELO me\r\n"
            w.close()
        finally:
            srv.close()
        assert metric(n1, "istio_tcp_connections_opened_total", reporter="source") == 1

    run(with_mesh(ws, [svc], body))


def test_access_log_lines_are_json_and_carry_the_trace_id_the_server_saw() -> None:
    ws = workloads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "access.log")

        async def body(mesh: Mesh) -> None:
            n1 = mesh.nodes["n1"]
            n1.outbound.reporter = Reporter(n1.metrics, AccessLog(AccessLogConfig(enabled=True, path=path)))
            res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 3, "/logged")
            with open(path) as f:
                lines = [json.loads(line) for line in f]
            assert len(lines) == 3
            for (_, doc, _), entry in zip(res, lines, strict=True):
                trace = doc["headers"]["traceparent"].split("-")[1]
                assert entry["trace_id"] == trace
                assert entry["x_request_id"] == doc["headers"]["x-request-id"]
                assert (
                    entry["response_code"] == 200 and entry["method"] == "GET" and entry["path"] == "/logged"
                )
                assert entry["source_workload"] == "client" and entry["destination_workload"] == "web-1"
                assert entry["upstream_host"] == "127.0.0.11:9000" and entry["response_flags"] == "-"

        run(with_mesh(ws, [http_service()], body))


async def _short_keepalive_pod(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answers one request per connection, keep-alive, then closes it 0.1 s later (a server
    with a short keep-alive timeout): the pooled upstream connection goes stale."""
    head = await r.readuntil(b"\r\n\r\n")
    body = b"once:" + head.split(b" ")[1]
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await w.drain()
    await asyncio.sleep(0.1)
    w.close()


async def _connect_pod(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A forward proxy: answers CONNECT with 200, then echoes bytes upper-cased."""
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"CONNECT ")
    w.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    while data := await r.read(1024):
        w.write(data.upper())
    w.close()


def test_a_stale_pooled_upstream_is_not_used_and_connect_and_idle_timeout_work() -> None:
    # same node: the upstream is a direct pod connection; the pods here are raw servers
    ws = [workload("client", CLIENT, "n1", sa="client"), workload("web-1", "127.0.0.21", "n1", labels=WEB)]

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        srv = await asyncio.start_server(_short_keepalive_pod, "127.0.0.21", 9000)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
            for path in (b"/a", b"/b"):
                w.write(b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % path)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await r.readexactly(len(b"once:/a")) == b"once:" + path
                await asyncio.sleep(0.3)  # the server closes its side of the pooled connection
            assert n1.outbound.upstreams.stats.dials == 2 and n1.outbound.upstreams.stats.stale == 1
            w.close()
        finally:
            srv.close()
        srv = await asyncio.start_server(_connect_pod, "127.0.0.21", 9000)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
            w.write(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\nhello")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(r.readexactly(5), 5) == b"HELLO"
            w.write(b"more")
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"MORE"  # a byte relay now
            w.close()
        finally:
            srv.close()
        # a keep-alive client silent past the idle timeout is closed by the proxy
        n1.outbound.config = dataclasses.replace(
            n1.outbound.config, http=dataclasses.replace(n1.outbound.config.http, idle_timeout_s=0.3)
        )
        r, w = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
        t = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert asyncio.get_running_loop().time() - t < 2
        w.close()
        # ... and so is one that stalls in the middle of its request head (slowloris)
        r, w = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
        w.write(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ")
        t = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert asyncio.get_running_loop().time() - t < 2
        w.close()

    async def go() -> None:
        async with two_node_mesh(ws, [http_service()]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            await body(mesh)

    run(go())


def test_least_request_counts_requests_in_flight_not_connections() -> None:
    ws = workloads()

    async def body(mesh: Mesh) -> None:
        port = mesh.nodes["n1"].outbound_port
        # one request held for 1 s on one endpoint...
        slow = asyncio.ensure_future(asyncio.to_thread(keepalive_requests, port, 1, "/slow"))
        await asyncio.sleep(0.3)
        # ...so requests meanwhile, on another keep-alive connection, all go to the other one
        # (power of two choices over two endpoints compares both: fewer requests in flight wins)
        res = await asyncio.to_thread(keepalive_requests, port, 10)
        held = (await slow)[0][1]["pod"]
        assert {d["pod"] for _, d, _ in res} == {"web-1", "web-2"} - {held}

    run(with_mesh(ws, [http_service(policy="LEAST_REQUEST")], body))


def _with_istio(snap: Snapshot, vss: list[Any], drs: list[Any]) -> Snapshot:
    """The snapshot with these VirtualServices/DestinationRules (their registry decoding is
    tested with the control plane)."""
    return dataclasses.replace(
        snap,
        virtual_services={(v.namespace, v.name): v for v in vss},
        destination_rules={(d.namespace, d.name): d for d in drs},
    )

def test_virtual_service_routes_per_request_by_header_with_rewrite_header_ops_and_timeout() -> None:
    from agent.control.istio import (
        Destination,
        DestinationRule,
        HeaderOps,
        HttpMatch,
        HttpRoute,
        RouteDestination,
        StringMatch,
        Subset,
        VirtualService,
    )
    from agent.dataplane.route import Directory

    ws = [workload("client", CLIENT, "n1", sa="client")]
    ws += [workload("web-1", "127.0.0.11", "n2", sa="web", labels={"app": "web", "version": "v1"})]
    ws += [workload("web-2", "127.0.0.12", "n2", sa="web", labels={"app": "web", "version": "v2"})]
    svc = http_service()
    dr = DestinationRule(
        "web",
        "default",
        "web",
        subsets=(Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),))),
    )
    vs = VirtualService(
        "web",
        "default",
        ("web",),
        (
            HttpRoute(
                "slow",
                (HttpMatch(uri=StringMatch("prefix", "/slow")),),
                (RouteDestination(Destination("web", "v1")),),
                timeout_s=0.3,
            ),
            HttpRoute(
                "jason",
                (HttpMatch(headers=(("end-user", StringMatch("exact", "jason")),)),),
                (RouteDestination(Destination("web", "v2")),),
                rewrite_uri="/v2",
                response_headers=HeaderOps(set=(("x-route", "jason"),), remove=("server",)),
            ),
            HttpRoute(
                "rest",
                (),
                (RouteDestination(Destination("web", "v1")),),
                request_headers=HeaderOps(add=(("x-added", "1"),)),
            ),
        ),
    )

    async def body(mesh: Mesh) -> None:
        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], [dr]))
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        plain = await asyncio.to_thread(keepalive_requests, port, 4, "/api")
        assert {d["pod"] for _, d, _ in plain} == {"web-1"}  # the default route: subset v1 only
        assert plain[0][1]["headers"]["x-added"] == "1"
        jason = await asyncio.to_thread(keepalive_requests, port, 4, "/api", "GET", {"end-user": "jason"})
        assert {d["pod"] for _, d, _ in jason} == {"web-2"}
        assert jason[0][1]["path"] == "/v2"  # the route's rewrite, as the server saw it
        assert jason[0][2]["x-route"] == "jason" and "server" not in jason[0][2]
        res = await asyncio.to_thread(keepalive_requests, port, 1, "/slow")  # the pod waits 1 s
        status, doc, headers = res[0]
        assert status == 504 and headers["server"] == "nodemesh" and "timeout" in doc["raw"]
        assert (
            metric(n1, "istio_requests_total", reporter="source", response_code="504", response_flags="UT")
            == 1
        )

    run(with_mesh(ws, [svc], body))


def test_retries_make_a_flaky_server_reliable_and_faults_are_injected_and_flagged() -> None:
    from agent.control.istio import (
        Destination,
        Fault,
        HttpMatch,
        HttpRoute,
        Retry,
        RouteDestination,
        StringMatch,
        VirtualService,
    )
    from agent.dataplane.route import Directory

    ws = workloads(2)
    web = RouteDestination(Destination("web"))
    vs = VirtualService(
        "web",
        "default",
        ("web",),
        (
            HttpRoute(
                "flaky",
                (HttpMatch(uri=StringMatch("prefix", "/flaky")),),
                (web,),
                retries=Retry(2, None, ("5xx",), ()),
            ),
            HttpRoute(
                "once",
                (HttpMatch(uri=StringMatch("prefix", "/once")),),
                (web,),
                retries=Retry(1, None, ("5xx",), ()),
            ),
            HttpRoute(
                "abort",
                (HttpMatch(uri=StringMatch("prefix", "/abort")),),
                (web,),
                fault=Fault(abort_status=418, abort_percent=50.0),
            ),
            HttpRoute(
                "delay",
                (HttpMatch(uri=StringMatch("prefix", "/delay")),),
                (web,),
                fault=Fault(delay_s=0.2, delay_percent=100.0),
            ),
        ),
    )

    async def body(mesh: Mesh) -> None:
        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], []))
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        res = await asyncio.to_thread(keepalive_requests, port, 60, "/flaky")
        assert [s for s, _, _ in res] == [200] * 60  # each failing try went to another endpoint
        assert metric(n1, "istio_requests_total", reporter="source", response_code="200") == 60
        # one retry is not enough for every request: the rest are the server's 503, flagged URX
        res = await asyncio.to_thread(keepalive_requests, port, 30, "/once/flaky")
        codes = Counter(s for s, _, _ in res)
        assert codes[503] > 0 and codes[200] > 0
        assert metric(n1, "istio_requests_total", response_code="503", response_flags="URX") == codes[503]
        res = await asyncio.to_thread(keepalive_requests, port, 200, "/abort")
        aborted = sum(1 for s, _, _ in res if s == 418)
        assert 60 <= aborted <= 140  # 50 % of 200 (sigma ~7)
        assert metric(n1, "istio_requests_total", response_code="418", response_flags="FI") == aborted
        t = asyncio.get_running_loop().time()
        res = await asyncio.to_thread(keepalive_requests, port, 3, "/delay")
        assert [s for s, _, _ in res] == [200] * 3 and asyncio.get_running_loop().time() - t >= 0.6
        assert metric(n1, "istio_requests_total", response_code="200", response_flags="DI") == 3

    run(with_mesh(ws, [http_service()], body))


def test_outlier_detection_ejects_an_endpoint_answering_5xx_and_brings_it_back() -> None:
    from agent.control.istio import DestinationRule, OutlierDetection, TrafficPolicy

    ws = workloads(2)
    od = OutlierDetection(consecutive_5xx=3, interval_s=1.0, base_ejection_s=1.5, max_ejection_percent=50)
    # (no VirtualService: the rule applies alone)
    dr = DestinationRule("web", "default", "web", TrafficPolicy(outlier=od))

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        res = await asyncio.to_thread(keepalive_requests, port, 14, "/fail-if/web-2")
        pods = [d.get("pod", "web-2" if s == 500 else "?") for s, d, _ in res]
        failed = sum(1 for s, _, _ in res if s == 500)
        assert failed == 3, pods  # round robin reached web-2 three times, then it was ejected
        assert pods[6:] == ["web-1"] * 8, pods
        assert n1.outbound.outliers.ejected_total == 1
        await asyncio.sleep(1.6)  # past baseEjectionTime: web-2 takes requests again...
        res = await asyncio.to_thread(keepalive_requests, port, 10, "/fail-if/web-2")
        assert sum(1 for s, _, _ in res if s == 500) == 3  # ...until three more failures
        assert n1.outbound.outliers.ejected_total == 2  # ejected again (for 2 x 1.5 s)
        res = await asyncio.to_thread(keepalive_requests, port, 4, "/")
        assert {d["pod"] for _, d, _ in res} == {"web-1"}

    run(with_mesh(ws, [http_service()], body))


def test_connection_pool_overflow_is_503_uo_and_the_slot_is_given_back() -> None:
    from agent.control.istio import ConnectionPool, DestinationRule, TrafficPolicy

    ws = workloads(2)
    dr = DestinationRule("web", "default", "web", TrafficPolicy(pool=ConnectionPool(max_requests=1)))

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        slow = asyncio.ensure_future(asyncio.to_thread(keepalive_requests, port, 1, "/slow"))
        await asyncio.sleep(0.3)  # one request in flight: the limit
        t = asyncio.get_running_loop().time()
        res = await asyncio.to_thread(keepalive_requests, port, 3, "/")
        assert [s for s, _, _ in res] == [503] * 3 and asyncio.get_running_loop().time() - t < 0.5
        assert "overflow" in res[0][1]["raw"] and res[0][2]["server"] == "nodemesh"
        assert (await slow)[0][0] == 200
        res = await asyncio.to_thread(keepalive_requests, port, 3, "/")  # the slot came back
        assert [s for s, _, _ in res] == [200] * 3
        assert (
            metric(n1, "istio_requests_total", reporter="source", response_code="503", response_flags="UO")
            == 3
        )
        assert n1.outbound.in_flight == {}

    run(with_mesh(ws, [http_service()], body))


def test_max_connections_queues_requests_up_to_max_pending_then_overflows_uo() -> None:
    """connectionPool.tcp.maxConnections: 1 and http.http1MaxPendingRequests: 1: one request
    holds the connection, one waits for it (and succeeds), one more overflows at once."""
    from agent.control.istio import ConnectionPool, DestinationRule, TrafficPolicy

    ws = workloads(1)
    dr = DestinationRule("web", "default", "web",
                         TrafficPolicy(pool=ConnectionPool(max_connections=1, max_pending=1)))

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        loop = asyncio.get_running_loop()
        slow = asyncio.ensure_future(asyncio.to_thread(keepalive_requests, port, 1, "/slow"))
        await asyncio.sleep(0.3)
        t0 = loop.time()
        waiting = asyncio.ensure_future(asyncio.to_thread(keepalive_requests, port, 1, "/"))
        await asyncio.sleep(0.2)
        res = await asyncio.to_thread(keepalive_requests, port, 1, "/")
        assert res[0][0] == 503 and "http1MaxPendingRequests" in res[0][1]["raw"]
        assert loop.time() - t0 < 0.6  # the overflow is answered at once, not queued
        assert (await slow)[0][0] == 200
        done = await waiting
        assert done[0][0] == 200 and loop.time() - t0 >= 0.5  # it waited for the slow one
        assert metric(n1, "istio_requests_total", reporter="source", response_flags="UO") == 1
        assert n1.outbound.gates == {}  # every slot came back

    run(with_mesh(ws, [http_service()], body))


def test_max_requests_per_connection_and_connect_timeout_of_the_destination() -> None:
    from agent.control.istio import ConnectionPool, DestinationRule, TrafficPolicy

    ws = workloads(1)
    dr = DestinationRule("web", "default", "web", TrafficPolicy(pool=ConnectionPool(
        max_requests_per_connection=2, connect_timeout_s=0.2, idle_timeout_s=0.5)))

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
        n1 = mesh.nodes["n1"]
        stats = n1.outbound.upstreams.stats
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 6)
        assert [r[0] for r in res] == [200] * 6
        assert stats.dials == 3 and stats.reuses == 3  # a new upstream connection every 2 requests
        # idleTimeout: the destination's, not the pool's default (60 s)
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1)
        assert n1.outbound.upstreams.idle == 1
        assert n1.outbound.upstreams.reap() == 0
        await asyncio.sleep(0.6)
        assert n1.outbound.upstreams.reap() == 1

    run(with_mesh(ws, [http_service()], body))


def test_connect_timeout_of_the_destination_bounds_a_dial_that_hangs() -> None:
    """An endpoint whose listen queue is full drops SYNs: the dial hangs. The destination's
    connectTimeout (0.2 s), not the proxy's default (5 s), bounds each try."""
    from agent.control.istio import ConnectionPool, DestinationRule, TrafficPolicy

    ws = [workload("client", CLIENT, "n1", sa="client"), workload("web-1", "127.0.0.29", "n1", labels=WEB)]
    dr = DestinationRule("web", "default", "web", TrafficPolicy(pool=ConnectionPool(connect_timeout_s=0.2)))
    full = socket.socket()
    full.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    full.bind(("127.0.0.29", 9000))
    full.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue (never accepted)
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.29", 9000))
        fillers.append(c)

    async def go() -> None:
        from agent.dataplane.route import Directory

        async with two_node_mesh(ws, [http_service()]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
            n1 = mesh.nodes["n1"]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1)
            took = loop.time() - t0
            assert res[0][0] == 503 and "upstream connect error" in res[0][1]["raw"]
            assert 0.2 <= took < 2.0, took  # 3 tries of 0.2 s, not 3 x 5 s
            assert metric(n1, "istio_requests_total", response_code="503", response_flags="UF") == 1

    try:
        run(go())
    finally:
        for c in fillers:
            c.close()
        full.close()


def test_tcp_max_connections_refuses_the_connection_over_it_uo() -> None:
    from agent.control.istio import ConnectionPool, DestinationRule, TrafficPolicy
    from tests.component.harness import web_service

    ws = [workload("client", CLIENT, "n1", sa="client"), workload("web-1", "127.0.0.21", "n2", labels=WEB)]
    dr = DestinationRule("web", "default", "web", TrafficPolicy(pool=ConnectionPool(max_connections=1)))

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello\n")
        await w.drain()
        await r.read()
        w.close()

    async def go() -> None:
        from agent.dataplane.route import Directory

        srv = await asyncio.start_server(hold, "127.0.0.21", 9000)
        try:
            async with two_node_mesh(ws, [web_service()]) as mesh:
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
                n1 = mesh.nodes["n1"]
                r1, w1 = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
                assert await asyncio.wait_for(r1.readline(), 5) == b"hello\n"
                r2, w2 = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(r2.readexactly(6), 5)
                assert metric(n1, "nodemesh_outbound_failures_total", response_flags="UO") == 1
                w2.close()
                w1.close()
                await asyncio.sleep(0.3)  # the first connection ends: its slot comes back
                r3, w3 = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
                assert await asyncio.wait_for(r3.readline(), 5) == b"hello\n"
                w3.close()
        finally:
            srv.close()

    run(go())


def test_consistent_hash_keeps_a_key_on_one_endpoint_and_makes_up_a_cookie() -> None:
    from agent.control.istio import ConsistentHash, DestinationRule, LoadBalancer, TrafficPolicy

    ws = workloads(2)
    by_header = DestinationRule(
        "web", "default", "web", TrafficPolicy(
            LoadBalancer(consistent_hash=ConsistentHash("header", "x-user"))
        )
    )
    by_cookie = DestinationRule(
        "web",
        "default",
        "web",
        TrafficPolicy(LoadBalancer(
            consistent_hash=ConsistentHash("cookie", "nm-affinity", "/", 60.0, "maglev", 65537))),
    )

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        snap = mesh.directory.snapshot
        mesh.directory = Directory.build(_with_istio(snap, [], [by_header]))
        port = mesh.nodes["n1"].outbound_port
        seen: dict[str, set[str]] = {}
        for user in [f"user-{i}" for i in range(12)]:
            res = await asyncio.to_thread(keepalive_requests, port, 5, "/", "GET", {"x-user": user})
            seen[user] = {d["pod"] for _, d, _ in res}
        assert all(len(p) == 1 for p in seen.values()), seen  # each key on one endpoint
        assert {p for ps in seen.values() for p in ps} == {"web-1", "web-2"}  # keys spread
        mesh.directory = Directory.build(_with_istio(snap, [], [by_cookie]))
        first = await asyncio.to_thread(keepalive_requests, port, 1, "/")
        cookie = first[0][2]["set-cookie"]
        assert cookie.startswith('nm-affinity="') and "Max-Age=60" in cookie and "Path=/" in cookie
        value = cookie.split(";")[0]
        res = await asyncio.to_thread(keepalive_requests, port, 8, "/", "GET", {"cookie": value})
        assert {d["pod"] for _, d, _ in res} == {first[0][1]["pod"]}
        assert all("set-cookie" not in h for _, _, h in res)  # the client has it: not made up again

    run(with_mesh(ws, [http_service()], body))


def test_locality_load_balancing_stays_in_zone_and_fails_over_when_the_zone_is_ejected() -> None:
    from agent.control.istio import DestinationRule, OutlierDetection, TrafficPolicy

    base = workloads(2)
    loc = {"client": "eu/eu-1a", "web-1": "eu/eu-1a", "web-2": "eu/eu-1b"}
    ws = [dataclasses.replace(w, locality=loc[w.name]) for w in base]
    od = OutlierDetection(consecutive_5xx=2, base_ejection_s=30.0, max_ejection_percent=100)
    # locality LB: on (Istio's default)
    dr = DestinationRule("web", "default", "web", TrafficPolicy(outlier=od))

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [], [dr]))
        port = mesh.nodes["n1"].outbound_port
        res = await asyncio.to_thread(keepalive_requests, port, 10, "/")
        assert {d["pod"] for _, d, _ in res} == {"web-1"}  # the caller's zone only
        res = await asyncio.to_thread(keepalive_requests, port, 10, "/fail-if/web-1")
        codes = [s for s, _, _ in res]
        assert codes[:2] == [500, 500] and codes[2:] == [200] * 8  # ejected: over to the other zone
        assert {d.get("pod") for s, d, _ in res if s == 200} == {"web-2"}

    run(with_mesh(ws, [http_service()], body))


def test_mirror_sends_copies_and_drops_their_answers() -> None:
    from agent.control.istio import (
        Destination,
        DestinationRule,
        HttpRoute,
        RouteDestination,
        Subset,
        VirtualService,
    )

    ws = [workload("client", CLIENT, "n1", sa="client")]
    ws += [workload("web-1", "127.0.0.11", "n2", sa="web", labels={"app": "web", "version": "v1"})]
    ws += [workload("web-2", "127.0.0.12", "n2", sa="web", labels={"app": "web", "version": "v2"})]
    dr = DestinationRule(
        "web",
        "default",
        "web",
        subsets=(Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),))),
    )
    vs = VirtualService(
        "web",
        "default",
        ("web",),
        (
            HttpRoute(
                "main", (), (RouteDestination(Destination("web", "v1")),), mirror=Destination("web", "v2")
            ),
        ),
    )

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], [dr]))
        n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 10, "/")
        assert {d["pod"] for _, d, _ in res} == {"web-1"}  # the client sees the main route only
        deadline = asyncio.get_running_loop().time() + 5
        # (a copy is counted by the source once it has read and dropped the answer: wait for both)
        while (metric(n2, "istio_requests_total", reporter="destination", destination_workload="web-2") < 10
               or n1.outbound.mirrored < 10):
            assert asyncio.get_running_loop().time() < deadline, "the copies did not arrive"
            await asyncio.sleep(0.05)
        assert n1.outbound.mirrored == 10 and n1.outbound.mirror_failures == 0

        def post(payload: bytes) -> tuple[int, Any]:
            conn = http.client.HTTPConnection("127.0.0.1", n1.outbound_port, source_address=(CLIENT, 0),
                                              timeout=10)
            try:
                conn.request("POST", "/up", body=payload, headers={"host": "web.default"})
                r = conn.getresponse()
                return r.status, json.loads(r.read())
            finally:
                conn.close()

        # requests with a body: the copy carries the body (up to 64 KiB), once it has all passed
        before = metric(n2, "istio_request_bytes_sum", reporter="destination", destination_workload="web-2")
        for _ in range(3):
            status, doc = await asyncio.to_thread(post, b"m" * 5000)
            assert status == 200 and doc["pod"] == "web-1" and doc["body"] == "m" * 5000
        while (metric(n2, "istio_requests_total", reporter="destination", destination_workload="web-2") < 13
               or n1.outbound.mirrored < 13):
            assert asyncio.get_running_loop().time() < deadline + 5, "the copies with a body did not arrive"
            await asyncio.sleep(0.05)
        got = metric(n2, "istio_request_bytes_sum", reporter="destination", destination_workload="web-2")
        assert got - before >= 3 * 5000
        status, doc = await asyncio.to_thread(post, b"b" * 100_000)  # over 64 KiB: not mirrored
        assert status == 200 and len(doc["body"]) == 100_000
        assert n1.outbound.mirrors_dropped == 1 and n1.outbound.mirrored == 13

    run(with_mesh(ws, [http_service()], body))


def test_redirect_is_answered_by_the_proxy_with_the_location() -> None:
    from agent.control.istio import HttpMatch, HttpRoute, Redirect, StringMatch, VirtualService

    ws = workloads(1)
    vs = VirtualService(
        "web",
        "default",
        ("web",),
        (
            HttpRoute(
                "moved",
                (HttpMatch(uri=StringMatch("prefix", "/old")),),
                redirect=Redirect(uri="/new", authority="web.example", code=308),
            ),
        ),
    )

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], []))
        n1 = mesh.nodes["n1"]
        res = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 2, "/old/page")
        for status, _, headers in res:  # (the connection stays open: a local answer, no body to skip)
            assert status == 308 and headers["location"] == "http://web.example/new"
            assert headers["server"] == "nodemesh"
        assert metric(n1, "istio_requests_total", reporter="source", response_code="308") == 2

    run(with_mesh(ws, [http_service()], body))


def test_tcp_routes_split_connections_by_weight_and_match_source_labels() -> None:
    """A VirtualService's tcp routes on a TCP port: the client (app=client) matches the first
    route (all to v2); another source falls to the weighted route (50/50 v1/v2, per
    connection); a source no route matches is refused (NR)."""
    from agent.control.istio import (
        Destination,
        DestinationRule,
        RouteDestination,
        Subset,
        TcpMatch,
        TcpRoute,
        VirtualService,
    )
    from tests.component.harness import client_exchange, echo_server, web_service

    other = "127.0.0.6"
    ws = [workload("client", CLIENT, "n1", sa="client", labels={"app": "client"}),
          workload("batch", other, "n1", sa="batch", labels={"app": "batch"}),
          workload("web-1", "127.0.0.21", "n2", labels={"app": "web", "version": "v1"}),
          workload("web-2", "127.0.0.22", "n2", labels={"app": "web", "version": "v2"})]
    dr = DestinationRule("web", "default", "web",
                         subsets=(Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),))))
    vs = VirtualService("web", "default", ("web",), tcp=(
        TcpRoute((TcpMatch(80, (("app", "client"),)),), (RouteDestination(Destination("web", "v2")),)),
        TcpRoute((TcpMatch(source_labels=(("app", "batch"),)),),
                 (RouteDestination(Destination("web", "v1"), 50),
                  RouteDestination(Destination("web", "v2"), 50))),
    ))

    async def go() -> None:
        from agent.dataplane.route import Directory

        servers = [await echo_server(f"127.0.0.2{i}", 9000, f"web-{i}") for i in (1, 2)]
        try:
            async with two_node_mesh(ws, [web_service()]) as mesh:
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                mesh.original_dst[(other, 0)] = (VIP, 80)
                mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], [dr]))
                n1 = mesh.nodes["n1"]
                seen: Counter[str] = Counter()
                for _ in range(10):
                    out = await client_exchange(CLIENT, n1.outbound_port, b"x")
                    seen[out.split(b":")[0].decode()] += 1
                assert seen == {"web-2": 10}
                seen.clear()
                for _ in range(40):
                    out = await client_exchange(other, n1.outbound_port, b"x")
                    seen[out.split(b":")[0].decode()] += 1
                assert seen["web-1"] + seen["web-2"] == 40 and seen["web-1"] >= 8 and seen["web-2"] >= 8
                # a source no tcp route matches: refused, flagged NR
                vs_only_client = dataclasses.replace(vs, tcp=vs.tcp[:1])
                mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs_only_client], [dr]))
                with pytest.raises(ConnectionResetError):
                    await client_exchange(other, n1.outbound_port, b"x")
                assert metric(n1, "nodemesh_outbound_failures_total", response_flags="NR") == 1
        finally:
            for srv in servers:
                srv.close()

    run(go())


def test_cors_preflight_answered_by_the_proxy_and_uri_regex_rewrite() -> None:
    from agent.control.istio import (
        Cors,
        Destination,
        HttpRoute,
        RouteDestination,
        StringMatch,
        VirtualService,
    )

    ws = workloads(1)
    vs = VirtualService("web", "default", ("web",), (HttpRoute(
        "api", (), (RouteDestination(Destination("web")),),
        rewrite_regex=(r"^/service/([^/]+)(/.*)$", r"\2/instance/\1"),
        cors=Cors((StringMatch("prefix", "https://app."),), ("GET", "PUT"), ("x-token",), ("x-served-by",),
                  600, True)),))

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], []))
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        pre = {"origin": "https://app.example", "access-control-request-method": "PUT"}
        res = await asyncio.to_thread(keepalive_requests, port, 1, "/service/a/b", "OPTIONS", pre)
        status, doc, headers = res[0]
        assert status == 200 and headers["server"] == "nodemesh" and doc == {"raw": ""}  # not the pod's
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert headers["access-control-allow-methods"] == "GET,PUT"
        assert headers["access-control-max-age"] == "600"
        res = await asyncio.to_thread(keepalive_requests, port, 1, "/service/a/v1/x?q=1", "GET",
                                      {"origin": "https://app.example"})
        status, doc, headers = res[0]
        assert status == 200 and doc["path"] == "/v1/x/instance/a?q=1"  # what the pod saw
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert headers["access-control-expose-headers"] == "x-served-by"
        assert headers["access-control-allow-credentials"] == "true"
        res = await asyncio.to_thread(keepalive_requests, port, 1, "/service/a/b", "GET",
                                      {"origin": "https://evil.example"})
        assert res[0][0] == 200 and "access-control-allow-origin" not in res[0][2]

    run(with_mesh(ws, [http_service()], body))


def test_max_retries_caps_the_retries_in_flight_overflow_is_passed_on_flagged_uo() -> None:
    """connectionPool.http.maxRetries: 1. Six concurrent requests; those whose first try lands
    on web-1 (500) want a retry on web-2 (slow: 1 s). Only one may retry at a time: the others
    get web-1's 500 passed on, flagged UO (Envoy's retry overflow). Without the limit all
    succeed."""
    from agent.control.istio import (
        ConnectionPool,
        Destination,
        DestinationRule,
        HttpRoute,
        Retry,
        RouteDestination,
        TrafficPolicy,
        VirtualService,
    )

    ws = workloads(2)
    vs = VirtualService("web", "default", ("web",), (HttpRoute(
        "r", (), (RouteDestination(Destination("web")),), retries=Retry(1, None, ("5xx",), ())),))
    limited = DestinationRule("web", "default", "web", TrafficPolicy(pool=ConnectionPool(max_retries=1)))

    async def burst(port: int) -> list[int]:
        calls = [asyncio.to_thread(keepalive_requests, port, 1, "/fail-if/web-1/slow") for _ in range(6)]
        return [r[0][0] for r in await asyncio.gather(*calls)]

    async def body(mesh: Mesh) -> None:
        from agent.dataplane.route import Directory

        n1 = mesh.nodes["n1"]
        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], [limited]))
        codes = await burst(n1.outbound_port)
        failed = codes.count(500)
        assert failed >= 1 and codes.count(200) + failed == 6, codes
        assert metric(n1, "istio_requests_total", reporter="source", response_code="500",
                      response_flags="UO") == failed
        assert n1.outbound.retries == {}  # every retry slot came back
        mesh.directory = Directory.build(_with_istio(mesh.directory.snapshot, [vs], []))
        assert await burst(n1.outbound_port) == [200] * 6

    run(with_mesh(ws, [http_service()], body))


def test_a_new_snapshot_reroutes_new_requests_at_once_and_in_flight_ones_finish_unharmed() -> None:
    """Issue 12's live changes: slow requests in flight on v1 when the VirtualService flips to
    v2 finish on v1 with 200; the next request goes to v2; requests on keep-alive connections
    while the route flips back and forth are all answered (none dropped)."""
    from agent.control.istio import (
        Destination,
        DestinationRule,
        HttpRoute,
        RouteDestination,
        Subset,
        VirtualService,
    )
    from agent.dataplane.route import Directory

    ws = [workload("client", CLIENT, "n1", sa="client")]
    ws += [workload(f"web-{v}", f"127.0.0.1{v}", "n2", sa="web", labels={"app": "web", "version": f"v{v}"})
           for v in (1, 2)]
    dr = DestinationRule("web", "default", "web",
                         subsets=(Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),))))

    def to(subset: str) -> VirtualService:
        return VirtualService("web", "default", ("web",),
                              (HttpRoute("all", (), (RouteDestination(Destination("web", subset)),)),))

    async def body(mesh: Mesh) -> None:
        base = mesh.directory.snapshot
        dirs = {s: Directory.build(dataclasses.replace(_with_istio(base, [to(s)], [dr]), revision=r))
                for r, s in ((2, "v1"), (3, "v2"))}
        mesh.directory = dirs["v1"]
        port = mesh.nodes["n1"].outbound_port
        slow = [asyncio.ensure_future(asyncio.to_thread(keepalive_requests, port, 1, "/slow"))
                for _ in range(3)]
        await asyncio.sleep(0.3)  # in flight on v1
        mesh.directory = dirs["v2"]
        now = await asyncio.to_thread(keepalive_requests, port, 1, "/")
        assert now[0][0] == 200 and now[0][1]["pod"] == "web-2"  # the next request: the new route
        for s in slow:
            (status, doc, _), = await s
            assert status == 200 and doc["pod"] == "web-1"  # finished on the decision it had

        stop = asyncio.Event()

        async def flip() -> None:
            while not stop.is_set():
                for d in (dirs["v1"], dirs["v2"]):
                    mesh.directory = d
                    await asyncio.sleep(0.01)

        flipper = asyncio.ensure_future(flip())
        try:
            runs = await asyncio.gather(*(asyncio.to_thread(keepalive_requests, port, 50) for _ in range(4)))
        finally:
            stop.set()
            await flipper
        codes = Counter(status for res in runs for status, _, _ in res)
        pods = Counter(doc["pod"] for res in runs for _, doc, _ in res)
        assert codes == {200: 200} and pods["web-1"] > 0 and pods["web-2"] > 0

    run(with_mesh(ws, [http_service()], body))
