"""A VirtualService's retries on loopback: gRPC and HTTP/2 (real grpcio client and server, an
h2c server of the ``h2`` library), and HTTP/1.1 requests with bodies, through both node proxies.

Every pod counts the calls it saw, so a test tells a retried request from one that was not, and
answers with what it received of the body, so the try that succeeded shows it got all of it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.client
import json
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from agent.control.istio import Destination as Dest
from agent.control.istio import HttpMatch, HttpRoute, Retry, RouteDestination, StringMatch, VirtualService
from agent.control.model import Service, ServicePort
from agent.dataplane.http.h1 import LoopConfig
from agent.dataplane.route import Directory
from tests.component import harness
from tests.component.harness import VIP, Mesh, http_pod, metric, run, two_node_mesh, workload

CLIENT = "127.0.0.1"  # grpcio cannot bind a source address: the client workload lives here
PODS = (("web-1", "127.0.0.11"), ("web-2", "127.0.0.12"))


class Seen:
    """What the pods saw, across pods: calls per name, and whether the n-th call fails."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def next(self, name: str) -> int:
        with self.lock:
            self.calls[name] += 1
            return self.calls[name]


def _text(v: bytes | str) -> str:  # (the h2 library gives str with header_encoding set)
    return v.decode() if isinstance(v, bytes) else v


def digest(body: bytes) -> str:
    return f"{len(body)}:{hashlib.sha256(body).hexdigest()[:16]}"


# -- pods ------------------------------------------------------------------------------------


def grpc_pod(addr: str, name: str, seen: Seen) -> grpc.Server:
    def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
        if seen.next("flaky") % 3:  # two calls of every three fail, whichever pod gets them
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return f"{name}:{digest(request)}".encode()

    def down(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.next("down")
        context.abort(grpc.StatusCode.UNAVAILABLE, "down for good")

    def missing(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.next("missing")
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def late(request: bytes, context: grpc.ServicerContext) -> Any:
        seen.next("late")
        yield b"first"
        context.abort(grpc.StatusCode.UNAVAILABLE, "after a message")  # (in trailers, after DATA)

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        if seen.next("slow") == 1:
            threading.Event().wait(1.0)  # the first try outlives its per-try timeout
        return f"{name}:{digest(request)}".encode()

    unary = grpc.unary_unary_rpc_method_handler
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Flaky": unary(flaky), "Down": unary(down), "Missing": unary(missing), "Slow": unary(slow),
         "Late": grpc.unary_stream_rpc_method_handler(late)},
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"{addr}:9000")
    srv.start()
    return srv


class H2Pod:
    """An h2c server (the ``h2`` library): ``/flaky`` answers 503 to two requests of every
    three; ``/refuse-once`` refuses the first stream (RST_STREAM REFUSED_STREAM) as soon as its
    headers arrive; ``/goaway-once`` answers the first request's connection with GOAWAY (last
    stream 0) and closes it; ``/status/<code>`` that status. Answers are JSON: pod and
    :func:`digest` of the body received."""

    def __init__(self, name: str, seen: Seen) -> None:
        self.name = name
        self.seen = seen

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        paths: dict[int, str] = {}
        bodies: dict[int, bytearray] = {}
        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        path = next(_text(v) for k, v in ev.headers if _text(k) == ":path")
                        paths[ev.stream_id], bodies[ev.stream_id] = path, bytearray()
                        if path == "/refuse-once" and self.seen.next(path) == 1:
                            conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                            paths.pop(ev.stream_id)
                        elif path == "/goaway-once" and self.seen.next(path) == 1:
                            conn.close_connection(last_stream_id=0)
                            writer.write(conn.data_to_send())
                            await writer.drain()
                            return
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_id in bodies:
                            bodies[ev.stream_id] += ev.data
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in paths:
                        sid = ev.stream_id
                        self._answer(conn, sid, paths.pop(sid), bytes(bodies.pop(sid)))
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    def _answer(self, conn: h2.connection.H2Connection, sid: int, path: str, body: bytes) -> None:
        status = 200
        if path == "/flaky" and self.seen.next(path) % 3:
            status = 503
        elif path.startswith("/status/"):
            self.seen.next(path)
            status = int(path.split("/")[2])
        out = json.dumps({"pod": self.name, "body": digest(body)}).encode()
        conn.send_headers(sid, [(":status", str(status)), ("content-type", "application/json"),
                                ("content-length", str(len(out)))])
        conn.send_data(sid, out, end_stream=True)


def h2_request(port: int, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """One request on a new h2c connection (the ``h2`` library, prior knowledge), blocking:
    (status, JSON answer), or (-code, {}) when the stream was reset."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST" if body else "GET"), (":scheme", "http"),
                                (":authority", "web.default"), (":path", path)], end_stream=not body)
        s.sendall(conn.data_to_send())
        rest, status, answer, json_answer = memoryview(body), 0, b"", False
        while True:
            while rest:  # as much of the body as the windows take
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(rest))
                if n <= 0:
                    break
                conn.send_data(sid, bytes(rest[:n]), end_stream=n == len(rest))
                rest = rest[n:]
            s.sendall(conn.data_to_send())
            data = s.recv(65536)
            if not data:
                raise ConnectionError("the proxy closed the connection")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    head = {_text(k): _text(v) for k, v in ev.headers}
                    status, json_answer = int(head[":status"]), head.get("content-type") == "application/json"
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    answer += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, json.loads(answer) if json_answer else {"raw": answer.decode()}
                elif isinstance(ev, h2.events.StreamReset):
                    return -int(ev.error_code), {}


# -- the mesh --------------------------------------------------------------------------------


def service(port_name: str) -> Service:
    return Service("web", "default", VIP, (ServicePort(port_name, 80, 9000),), {"app": "web"})


def routes(*rs: tuple[str, Retry | None]) -> VirtualService:
    """A VirtualService for web: one route per (path prefix, retry policy)."""
    web = (RouteDestination(Dest("web")),)
    return VirtualService("web", "default", ("web",), tuple(
        HttpRoute(prefix.strip("/") or "all", (HttpMatch(uri=StringMatch("prefix", prefix)),), web, retries=r)
        for prefix, r in rs
    ))


async def mesh_with(
    port_name: str, vs: VirtualService, pods: contextlib.AbstractAsyncContextManager[None],
    body: Callable[[Mesh], Awaitable[None]], *, retry_buffer_bytes: int | None = None,
) -> None:
    """The two-node mesh with ``vs`` in force, the pods on n2, the client on n1 (and, if
    given, n1's retry buffer limit)."""
    ws = [workload("client", CLIENT, "n1", sa="client")]
    ws += [workload(n, a, "n2", sa="web", labels={"app": "web"}) for n, a in PODS]
    async with pods, two_node_mesh(ws, [service(port_name)]) as mesh:
        snap = dataclasses.replace(mesh.directory.snapshot, virtual_services={("default", "web"): vs})
        mesh.directory = Directory.build(snap)
        mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
        if retry_buffer_bytes is not None:
            out = mesh.nodes["n1"].outbound
            limit = LoopConfig(retry_buffer_bytes=retry_buffer_bytes)
            out.config = dataclasses.replace(out.config, http=limit)
        await body(mesh)


@contextlib.asynccontextmanager
async def grpc_pods(seen: Seen) -> AsyncIterator[None]:
    servers = [grpc_pod(a, n, seen) for n, a in PODS]
    try:
        yield
    finally:
        for s in servers:
            s.stop(None)


@contextlib.asynccontextmanager
async def h2_pods(seen: Seen) -> AsyncIterator[None]:
    servers = [await asyncio.start_server(H2Pod(n, seen).handle, a, 9000) for n, a in PODS]
    try:
        yield
    finally:
        for s in servers:
            s.close()


# -- gRPC ------------------------------------------------------------------------------------

UNAVAILABLE = Retry(2, None, ("unavailable",), ())
PAYLOAD = bytes(range(256)) * 200  # 51,200 bytes: a gRPC message over several DATA frames


def test_grpc_unavailable_is_retried_and_other_codes_and_late_statuses_are_not() -> None:
    seen = Seen()
    vs = routes(("/echo.Echo/Flaky", UNAVAILABLE), ("/echo.Echo/Down", UNAVAILABLE),
                ("/echo.Echo/Missing", UNAVAILABLE), ("/echo.Echo/Late", UNAVAILABLE),
                ("/echo.Echo/Slow", Retry(2, 0.2, ("reset",), ())))

    def calls(port: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            answers = []
            for _ in range(120):
                try:
                    answers.append(ch.unary_unary("/echo.Echo/Flaky")(PAYLOAD, timeout=10).decode())
                except grpc.RpcError as e:
                    answers.append(f"error {e.code()}")
            out["flaky"] = answers
            for name in ("Down", "Missing"):
                try:
                    ch.unary_unary(f"/echo.Echo/{name}")(b"x", timeout=10)
                except grpc.RpcError as e:
                    out[name] = e.code()
            got: list[bytes] = []
            try:
                got.extend(ch.unary_stream("/echo.Echo/Late")(b"x", timeout=10))
            except grpc.RpcError as e:
                out["Late"] = (got, e.code())
            out["Slow"] = ch.unary_unary("/echo.Echo/Slow")(PAYLOAD, timeout=10).decode()
        return out

    async def body(mesh: Mesh) -> None:
        n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
        out = await asyncio.to_thread(calls, n1.outbound_port)
        ok = [a for a in out["flaky"] if not a.startswith("error")]
        assert len(ok) >= 0.99 * 120, Counter(out["flaky"])
        assert all(a.endswith(f":{digest(PAYLOAD)}") for a in ok)  # the whole message, on each retry
        assert seen.calls["Flaky".lower()] == 3 * 120  # two UNAVAILABLE tries and one that worked
        src = {"reporter": "source", "request_protocol": "grpc"}
        assert metric(n1, "istio_requests_total", **src, grpc_response_status="0") == len(ok) + 1  # (+ Slow)
        # the destination node counts each try
        assert metric(n2, "istio_requests_total", reporter="destination", grpc_response_status="14") >= 240
        # retries spent: the last try's status goes to the client, flagged URX
        assert out["Down"] == grpc.StatusCode.UNAVAILABLE and seen.calls["down"] == 3
        assert metric(n1, "istio_requests_total", **src, grpc_response_status="14", response_flags="URX") == 1
        # a code the policy does not name is not retried
        assert out["Missing"] == grpc.StatusCode.NOT_FOUND and seen.calls["missing"] == 1
        # UNAVAILABLE in trailers after a message: the response had begun, not retried (as Envoy)
        assert out["Late"] == ([b"first"], grpc.StatusCode.UNAVAILABLE) and seen.calls["late"] == 1
        # the first try of Slow outlives its per-try timeout (0.2 s): the second answers
        assert out["Slow"].endswith(f":{digest(PAYLOAD)}") and seen.calls["slow"] == 2

    run(mesh_with("grpc-echo", vs, grpc_pods(seen), body))


def test_grpc_call_whose_body_is_over_the_retry_buffer_is_forwarded_once_not_retried() -> None:
    seen = Seen()

    def call(port: int, payload: bytes) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                return str(ch.unary_unary("/echo.Echo/Flaky")(payload, timeout=10).decode())
            except grpc.RpcError as e:
                return f"error {e.code()}"

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        # 51,200 bytes, over the 16 KiB buffer: the first try's UNAVAILABLE is the answer
        got = await asyncio.to_thread(call, n1.outbound_port, PAYLOAD)
        assert got == f"error {grpc.StatusCode.UNAVAILABLE}"
        assert seen.calls["flaky"] == 1
        assert metric(n1, "istio_requests_total", reporter="source", grpc_response_status="14",
                      response_flags="-") == 1  # not URX: the policy gave up on it, not spent
        # a small one fits: retried (the second call fails once more, then the third works)
        small = b"s" * 1000
        assert (await asyncio.to_thread(call, n1.outbound_port, small)).endswith(f":{digest(small)}")
        assert seen.calls["flaky"] == 3

    run(mesh_with("grpc-echo", routes(("/", UNAVAILABLE)), grpc_pods(seen), body, retry_buffer_bytes=16384))


# -- HTTP/2 ----------------------------------------------------------------------------------

BIG = bytes(range(256)) * 800  # 204,800 bytes: more than HTTP/2's initial window


def test_h2_5xx_refused_and_goaway_streams_are_retried_with_the_body_sent_again() -> None:
    seen = Seen()
    vs = routes(("/flaky", Retry(2, None, ("5xx",), ())),
                ("/refuse-once", Retry(1, None, ("refused-stream",), ())),
                ("/goaway-once", Retry(1, None, ("refused-stream",), ())),
                ("/status/500", Retry(1, None, ("5xx",), ())))

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        port = n1.outbound_port
        for _ in range(30):
            status, doc = await asyncio.to_thread(h2_request, port, "/flaky", BIG)
            assert status == 200 and doc["body"] == digest(BIG), (status, doc)
        assert seen.calls["/flaky"] == 90
        assert metric(n1, "istio_requests_total", reporter="source", request_protocol="http",
                      response_code="200") == 30
        # the pod refuses the first stream as soon as its headers arrive (its body still coming):
        # the destination node refuses it in turn, and the source retries it
        status, doc = await asyncio.to_thread(h2_request, port, "/refuse-once", BIG)
        assert status == 200 and doc["body"] == digest(BIG) and seen.calls["/refuse-once"] == 2
        # GOAWAY with last stream 0: the stream was never processed, so it counts as refused
        status, doc = await asyncio.to_thread(h2_request, port, "/goaway-once", b"small body")
        assert status == 200 and doc["body"] == digest(b"small body") and seen.calls["/goaway-once"] == 2
        # spent: the last try's 500 goes to the client, flagged URX
        status, _ = await asyncio.to_thread(h2_request, port, "/status/500", b"x")
        assert status == 500 and seen.calls["/status/500"] == 2
        assert metric(n1, "istio_requests_total", reporter="source", response_code="500",
                      response_flags="URX") == 1

    run(mesh_with("http2-web", vs, h2_pods(seen), body))


def test_h2_refused_stream_without_a_retry_policy_is_503_not_retried() -> None:
    seen = Seen()

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        status, _ = await asyncio.to_thread(h2_request, n1.outbound_port, "/refuse-once", b"x")
        assert status == 503 and seen.calls["/refuse-once"] == 1
        assert metric(n1, "istio_requests_total", reporter="source", response_code="503",
                      response_flags="UC") == 1

    run(mesh_with("http2-web", routes(("/", None)), h2_pods(seen), body))


# -- HTTP/1.1 with bodies --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def h1_pods() -> AsyncIterator[None]:
    servers = [http_pod(a, 9000, n) for n, a in PODS]
    with harness._FLAKY_LOCK:
        harness._FLAKY["all"] = 0  # the next request to /flaky fails, and the one after it
    try:
        yield
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def flaky_count() -> int:
    with harness._FLAKY_LOCK:
        return harness._FLAKY.get("all", 0)


def post(port: int, path: str, body: bytes, *, chunked: bool = False) -> tuple[int, dict[str, Any]]:
    """One POST on a keep-alive connection (http.client), chunked with a trailer if asked."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if chunked:
            pieces = [body[i:i + 8192] for i in range(0, len(body), 8192)]
            conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("host", "web.default")
            conn.putheader("transfer-encoding", "chunked")
            conn.endheaders()
            for p in pieces:
                conn.send(b"%x\r\n%s\r\n" % (len(p), p))
            conn.send(b"0\r\nx-checksum: " + digest(body).encode() + b"\r\n\r\n")
        else:
            conn.request("POST", path, body=body, headers={"host": "web.default"})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if r.getheader("content-type") == "application/json" else {}
    finally:
        conn.close()


def test_h1_post_is_retried_with_its_whole_body_chunked_with_trailers_too() -> None:
    vs = routes(("/flaky", Retry(2, None, ("5xx",), ())))
    body_cl = bytes(range(256)) * 1200  # 307,200 bytes, with a content-length
    body_ch = b"chunked " * 20000  # 160,000 bytes, chunked, with a trailer

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        for _ in range(10):
            status, doc = await asyncio.to_thread(post, n1.outbound_port, "/flaky", body_cl)
            assert status == 200 and doc["body"].encode("latin-1") == body_cl
        status, doc = await asyncio.to_thread(post, n1.outbound_port, "/flaky", body_ch, chunked=True)
        assert status == 200 and doc["body"].encode("latin-1") == body_ch
        assert doc["trailers"] == [f"x-checksum: {digest(body_ch)}"]
        assert flaky_count() == 3 * 11  # each request failed twice, then was answered
        assert metric(n1, "istio_requests_total", reporter="source", response_code="200") == 11

    run(mesh_with("http-web", vs, h1_pods(), body))


def test_h1_post_over_the_retry_buffer_is_forwarded_once_not_retried() -> None:
    vs = routes(("/flaky", Retry(2, None, ("5xx",), ())))
    big = b"b" * 100_000  # over the 64 KiB buffer
    small = b"s" * 10_000

    async def body(mesh: Mesh) -> None:
        n1 = mesh.nodes["n1"]
        status, doc = await asyncio.to_thread(post, n1.outbound_port, "/flaky", big)  # content-length
        assert status == 503 and doc["body"].encode() == big and flaky_count() == 1
        status, doc = await asyncio.to_thread(post, n1.outbound_port, "/flaky", big, chunked=True)
        assert status == 503 and doc["body"].encode() == big and flaky_count() == 2  # (overflowed)
        assert metric(n1, "istio_requests_total", reporter="source", response_code="503",
                      response_flags="-") == 2  # forwarded as answered: not URX
        # a body that fits is retried
        with harness._FLAKY_LOCK:
            harness._FLAKY["all"] = 0
        status, doc = await asyncio.to_thread(post, n1.outbound_port, "/flaky", small, chunked=True)
        assert status == 200 and doc["body"].encode() == small and flaky_count() == 3

    run(mesh_with("http-web", vs, h1_pods(), body, retry_buffer_bytes=65536))
