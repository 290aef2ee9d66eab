"""RateLimitPolicy enforced at the destination, on loopback: a real HTTP/1.1 client and a real
grpcio client through outbound -> HBONE (mTLS) -> inbound, a same-node pod judged by the
source agent, raw TCP connections, and a limit on one VirtualService route (the route the
source agent chose, which no app can forge). Addresses 127.0.0.80-89, pod ports 20800-20899."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
from collections.abc import Coroutine
from concurrent import futures
from http.server import ThreadingHTTPServer
from typing import Any

import grpc

from agent.control.istio import (
    Destination,
    HttpMatch,
    HttpRoute,
    RouteDestination,
    StringMatch,
    VirtualService,
)
from agent.control.model import Service, ServicePort
from agent.control.ratelimit import Rate, RateLimitPolicy
from agent.dataplane.ratelimit import RateLimits
from agent.dataplane.ratepeers import RateShare
from agent.dataplane.route import Directory, decide
from agent.dataplane.tcp import End
from tests.component.harness import TD, VIP, Mesh, http_pod, metric, run, two_node_mesh, workload

CLIENT = "127.0.0.80"
WEB = {"app": "web"}


def with_limits(mesh: Mesh, *policies: RateLimitPolicy, vs: VirtualService | None = None) -> None:
    snap = mesh.directory.snapshot
    mesh.directory = Directory.build(dataclasses.replace(
        snap, revision=snap.revision + 1, rate_limit_policies={(p.namespace, p.name): p for p in policies},
        virtual_services={(vs.namespace, vs.name): vs} if vs is not None else snap.virtual_services))


def two_routes(limited: str, prefix: str, other: str) -> VirtualService:
    """VirtualService default/web: route ``limited`` for paths under ``prefix``, ``other`` for the rest."""
    to_web = (RouteDestination(Destination("web")),)
    return VirtualService("web", "default", ("web",), (
        HttpRoute(limited, (HttpMatch(uri=StringMatch("prefix", prefix)),), to_web),
        HttpRoute(other, (), to_web)))


def limits_on(mesh: Mesh) -> None:
    for n in mesh.nodes.values():  # as the agent does: one RateLimits per node, on its Authorizer
        n.inbound.authorizer.limits = RateLimits(lambda: mesh.directory, n.name, n.registry)


def run_with_pods(main: Coroutine[Any, Any, None], pods: list[ThreadingHTTPServer]) -> None:
    """Run a test's main, then stop its HTTP pods (also on failure)."""
    try:
        run(main)
    finally:
        for p in pods:
            p.shutdown()
            p.server_close()


def requests(port: int, n: int) -> list[tuple[int, dict[str, str]]]:
    """n requests on one keep-alive connection: (status, headers) each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(CLIENT, 0), timeout=10)
    out = []
    try:
        for _ in range(n):
            conn.request("GET", "/", headers={"host": "web.default"})
            r = conn.getresponse()
            r.read()
            out.append((r.status, {k.lower(): v for k, v in r.getheaders()}))
    finally:
        conn.close()
    return out


async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A TCP pod: greets, then holds the connection until the client ends it."""
    w.write(b"hello\n")
    await w.drain()
    await r.read()
    w.close()


def connect(port: int) -> tuple[socket.socket, bytes]:
    """A TCP client through the outbound: its socket and what it got first (or <reset>)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(CLIENT, 0))
    try:
        return s, s.recv(64)
    except ConnectionResetError:
        return s, b"<reset>"


def test_http_limit_answers_429_rl_with_headers_at_the_destination_and_for_a_same_node_pod() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"),
          workload("web-1", "127.0.0.81", "n2", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("http-web", 80, 20800),), WEB)
    pods = [http_pod("127.0.0.81", 20800, "web-1"), http_pod("127.0.0.82", 20800, "web-2")]

    async def go() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            limits_on(mesh)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            assert {s for s, _ in await asyncio.to_thread(requests, n1.outbound_port, 20)} == {200}
            with_limits(mesh, RateLimitPolicy("web-limit", "default", "web", 80, total=Rate(2.0, 5)))
            got = await asyncio.to_thread(requests, n1.outbound_port, 8)  # well within 1 s
            assert [s for s, _ in got] == [200] * 5 + [429] * 3, got
            h = got[-1][1]
            assert h["retry-after"] == "1" and h["x-ratelimit-limit"] == "2, 2;w=1", h
            assert h["x-ratelimit-remaining"] == "0" and h["x-ratelimit-reset"] == "1", h
            assert metric(n2, "istio_requests_total", reporter="destination", response_code="429",
                          response_flags="RL") == 3
            assert metric(n2, "nodemesh_ratelimit_decisions_total", policy="default/web-limit", kind="http",
                          result="limited") == 3
            assert metric(n1, "istio_requests_total", reporter="source", response_code="429") == 3
            (st,) = n2.inbound.authorizer.limits.status()  # type: ignore[union-attr]
            assert st["policy"] == "default/web-limit" and st["limited"] == 3 and st["admitted"] == 5
            await asyncio.sleep(1.0)  # 2 tokens back
            assert [s for s, _ in await asyncio.to_thread(requests, n1.outbound_port, 3)] == [200, 200, 429]
            # the endpoint moves to the client's node: the source agent judges it (endpoint scope)
            mesh.directory = Directory.build(dataclasses.replace(
                mesh.directory.snapshot, revision=99,
                workloads={("default", "client"): ws[0], ("default", "web-2"): workload(
                    "web-2", "127.0.0.82", "n1", sa="web", labels=WEB)},
                members={("default", "web"): (("default", "web-2"),)}))
            got = await asyncio.to_thread(requests, n1.outbound_port, 7)
            assert [s for s, _ in got] == [200] * 5 + [429] * 2, got
            assert metric(n1, "nodemesh_ratelimit_decisions_total", policy="default/web-limit",
                          result="limited") == 2
            with_limits(mesh)  # removed: no limit
            assert {s for s, _ in await asyncio.to_thread(requests, n1.outbound_port, 20)} == {200}

    run_with_pods(go(), pods)


def test_grpc_call_over_the_limit_is_resource_exhausted() -> None:
    client = "127.0.0.1"  # grpcio cannot bind a source address
    ws = [workload("client", client, "n1", sa="client"),
          workload("web-1", "127.0.0.83", "n2", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("grpc-echo", 80, 20801),), WEB)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}),))
    srv.add_insecure_port("127.0.0.83:20801")
    srv.start()

    def calls(port: int) -> list[object]:
        out: list[object] = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            say = ch.unary_unary("/echo.Echo/Say")
            for _ in range(4):
                try:
                    out.append(say(b"hi", timeout=10))
                except grpc.RpcError as e:
                    out.append(e.code())
        return out

    async def go() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            mesh.original_dst[(client, 0)] = (VIP, 80)
            limits_on(mesh)
            with_limits(mesh, RateLimitPolicy("web-limit", "default", "web", total=Rate(0.5, 2)))
            got = await asyncio.to_thread(calls, mesh.nodes["n1"].outbound_port)
            limited = grpc.StatusCode.RESOURCE_EXHAUSTED
            assert got == [b"hi", b"hi", limited, limited]
            assert metric(mesh.nodes["n2"], "istio_requests_total", reporter="destination",
                          grpc_response_status="8", response_flags="RL") == 2

    try:
        run(go())
    finally:
        srv.stop(0)


def test_tcp_connections_over_the_limit_are_refused_and_counted() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"),
          workload("web-1", "127.0.0.84", "n2", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("tcp-web", 80, 20802),), WEB)

    async def go() -> None:
        pod = await asyncio.start_server(hold, "127.0.0.84", 20802)
        try:
            async with two_node_mesh(ws, [svc]) as mesh:
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                limits_on(mesh)
                with_limits(mesh, RateLimitPolicy("web-conns", "default", "web", max_connections=2,
                                                  connections=Rate(100.0, 100)))
                port = mesh.nodes["n1"].outbound_port
                held = [await asyncio.to_thread(connect, port) for _ in range(3)]
                assert [b for _, b in held][:2] == [b"hello\n", b"hello\n"], held
                assert held[2][1] in (b"", b"<reset>"), held  # the third: refused at the destination
                n2 = mesh.nodes["n2"]
                assert metric(n2, "nodemesh_ratelimit_decisions_total", kind="tcp", result="limited") >= 1
                assert metric(n2, "nodemesh_tunnel_rejections_total", reason="rate_limited") >= 1
                held[0][0].close()
                for _ in range(30):  # the closed one gives its slot back (once its relay ended)
                    await asyncio.sleep(0.1)
                    s, first = await asyncio.to_thread(connect, port)
                    s.close()
                    if first == b"hello\n":
                        break
                assert first == b"hello\n"
                for x, _ in held:
                    x.close()
        finally:
            pod.close()

    run(go())


def test_agents_exchange_demand_over_hbone_and_fall_back_to_the_static_share() -> None:
    ws = [workload("web-1", "127.0.0.85", "n1", sa="web", labels=WEB),
          workload("web-2", "127.0.0.86", "n2", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("http-web", 80, 20803),), WEB)
    key = ("default", "web-limit")

    async def go() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            limits_on(mesh)
            with_limits(mesh, RateLimitPolicy("web-limit", "default", "web", scope="service",
                                              total=Rate(40.0, 4)))
            await asyncio.sleep(0.05)  # the inbounds serve (without an exchange: it is started here)
            shares: dict[str, RateShare] = {}
            tasks = {}
            for n in mesh.nodes.values():
                other = next(o for o in mesh.nodes.values() if o is not n)
                limits = n.inbound.authorizer.limits
                assert limits is not None
                n.inbound.rate_share = shares[n.name] = RateShare(
                    limits, lambda: mesh.directory, n.name, n.inbound.node_address, n.outbound.pool, TD,
                    hbone_port=other.hbone_port)
                tasks[n.name] = asyncio.create_task(shares[n.name].run())
            for _ in range(15):  # 1.5 s of demand: n1 60/s, n2 20/s (2x the limit together)
                await asyncio.sleep(0.1)
                for name, per_tick in (("n1", 6), ("n2", 2)):
                    lim = mesh.nodes[name].inbound.authorizer.limits
                    assert lim is not None
                    lim.service_policies()[key].offered += per_tick
            got = {name: mesh.nodes[name].inbound.authorizer.limits.status()[0]  # type: ignore[union-attr]
                   for name in ("n1", "n2")}
            assert got["n1"]["sharing"] == got["n2"]["sharing"] == "by demand", got
            assert got["n1"]["peers"] == {"n2": "reachable"}, got
            assert abs(got["n1"]["share"] - 0.75) < 0.1 and abs(got["n2"]["share"] - 0.25) < 0.1, got
            assert shares["n1"].reports_received >= 5 and shares["n2"].reports_received >= 5
            tasks["n2"].cancel()  # n2's agent stops talking: n1 falls back within the stale time
            await asyncio.sleep(0.9)
            st = mesh.nodes["n1"].inbound.authorizer.limits.status()[0]  # type: ignore[union-attr]
            assert st["sharing"] == "static" and st["share"] == 0.5 and "n2" in st["fallback"], st
            tasks["n1"].cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    run(go())


def test_same_node_tcp_connection_over_the_limit_is_refused_by_the_source_agent() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"),
          workload("web-1", "127.0.0.87", "n1", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("tcp-web", 80, 20804),), WEB)

    async def go() -> None:
        pod = await asyncio.start_server(hold, "127.0.0.87", 20804)
        try:
            async with two_node_mesh(ws, [svc]) as mesh:
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                limits_on(mesh)
                with_limits(mesh, RateLimitPolicy("web-conns", "default", "web", max_connections=1))
                port = mesh.nodes["n1"].outbound_port
                first = await asyncio.to_thread(connect, port)
                second = await asyncio.to_thread(connect, port)
                assert first[1] == b"hello\n" and second[1] in (b"", b"<reset>"), (first, second)
                assert metric(mesh.nodes["n1"], "nodemesh_ratelimit_decisions_total", kind="tcp",
                              result="limited") == 1
                assert metric(mesh.nodes["n1"], "nodemesh_outbound_failures_total", response_flags="RL") == 1
                for s, _ in (first, second):
                    s.close()
        finally:
            pod.close()

    run(go())


def get(port: int, asks: list[tuple[str, dict[str, str]]]) -> list[tuple[int, dict[str, str]]]:
    """Requests (path, headers) on one keep-alive connection: (status, the headers the pod saw
    (none: the proxy answered))."""
    conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(CLIENT, 0), timeout=10)
    out = []
    try:
        for path, headers in asks:
            conn.request("GET", path, headers={"host": "web.default", **headers})
            r = conn.getresponse()
            body = r.read()
            out.append((r.status, json.loads(body)["headers"] if r.status == 200 else {}))
    finally:
        conn.close()
    return out


async def raw_request(up: End, path: str, headers: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request written as bytes to an HBONE stream: (status, response body)."""
    await up.write(b"GET " + path.encode() + b" HTTP/1.1\r\nhost: web\r\n" + headers + b"\r\n")
    got = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < int(
                got.lower().partition(b"content-length:")[2].split(b"\r\n")[0] or 0):
            data, credit = await up.read()
            up.ack(credit)
            assert data, got
            got += data
    return int(got.split(b" ", 2)[1]), got.partition(b"\r\n\r\n")[2]


def test_route_limit_applies_to_its_route_only_and_an_app_cannot_forge_the_route() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"),
          workload("web-1", "127.0.0.88", "n2", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("http-web", 80, 20805),), WEB)
    vs = two_routes("search", "/search", "rest")
    limit = RateLimitPolicy("search-limit", "default", "web", total=Rate(1.0, 3), route="default/web/search")
    pods = [http_pod("127.0.0.88", 20805, "web-1"), http_pod("127.0.0.89", 20805, "web-2")]
    forged = {"x-nodemesh-route": "default/web/search"}  # what an app would send to spend others' budget

    async def go() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            limits_on(mesh)
            with_limits(mesh, limit, vs=vs)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            # the search route: 3 (the burst), then 429; an app's route header changes nothing
            asks = [("/search", {"x-nodemesh-route": "x/y/z"})] * 5
            got = await asyncio.to_thread(get, n1.outbound_port, asks)
            assert [s for s, _ in got] == [200] * 3 + [429] * 2, got
            assert all("x-nodemesh-route" not in h for _, h in got), got  # the pod never sees it
            # another route of the same service, with a forged header naming the limited route
            got = await asyncio.to_thread(get, n1.outbound_port, [("/api", forged)] * 6)
            assert [s for s, _ in got] == [200] * 6, got
            assert all("x-nodemesh-route" not in h for _, h in got), got
            assert metric(n2, "nodemesh_ratelimit_decisions_total", policy="default/search-limit",
                          result="limited") == 2
            assert metric(n2, "nodemesh_ratelimit_decisions_total", policy="default/search-limit",
                          result="admitted") == 3
            # an HBONE stream whose CONNECT does not say its agent parsed the requests (an app's
            # HTTP relayed as TCP): its route header is not trusted, and removed for the pod
            (ep,) = decide(mesh.directory, VIP, 80).endpoints
            out = n1.outbound
            up = await out._connect(ep, out.identity("default", "client"), out.identity("default", "web"),
                                    CLIENT)
            try:
                for _ in range(2):
                    status, body = await raw_request(
                        up, "/search", b"x-nodemesh-route: default/web/search\r\n")
                    assert status == 200 and "x-nodemesh-route" not in json.loads(body)["headers"], body
            finally:
                up.abort()
            # the endpoint moves to the client's node: the source agent uses its own decision
            mesh.directory = Directory.build(dataclasses.replace(
                mesh.directory.snapshot, revision=99,
                workloads={("default", "client"): ws[0], ("default", "web-2"): workload(
                    "web-2", "127.0.0.89", "n1", sa="web", labels=WEB)},
                members={("default", "web"): (("default", "web-2"),)}))
            asks = [("/api", forged)] * 4 + [("/search", {})] * 4
            got = await asyncio.to_thread(get, n1.outbound_port, asks)
            assert [s for s, _ in got] == [200] * 7 + [429], got
            assert all("x-nodemesh-route" not in h for _, h in got), got
            assert metric(n1, "nodemesh_ratelimit_decisions_total", policy="default/search-limit",
                          result="limited") == 1

    run_with_pods(go(), pods)


def test_grpc_route_limit_over_http2_and_the_pod_never_sees_the_route() -> None:
    client = "127.0.0.1"  # grpcio cannot bind a source address
    ws = [workload("client", client, "n1", sa="client"),
          workload("web-1", "127.0.0.88", "n2", sa="web", labels=WEB)]
    svc = Service("web", "default", VIP, (ServicePort("grpc-echo", 80, 20806),), WEB)
    vs = two_routes("say", "/echo.Echo/Say", "other")
    limit = RateLimitPolicy("say-limit", "default", "web", total=Rate(0.5, 2), route="default/web/say")
    seen: list[set[str]] = []  # the metadata keys each call reached the pod with

    def echo(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        seen.append({k for k, _ in ctx.invocation_metadata()})
        return req

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(echo)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": handler, "Other": handler}),))
    srv.add_insecure_port("127.0.0.88:20806")
    srv.start()

    def calls(port: int, method: str, forged: str) -> list[object]:
        out: list[object] = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary(f"/echo.Echo/{method}")
            for _ in range(3):
                try:
                    out.append(call(b"hi", timeout=10, metadata=(("x-nodemesh-route", forged),)))
                except grpc.RpcError as e:
                    out.append(e.code())
        return out

    async def go() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            mesh.original_dst[(client, 0)] = (VIP, 80)
            limits_on(mesh)
            with_limits(mesh, limit, vs=vs)
            port = mesh.nodes["n1"].outbound_port
            got = await asyncio.to_thread(calls, port, "Say", "default/web/other")
            assert got == [b"hi", b"hi", grpc.StatusCode.RESOURCE_EXHAUSTED], got
            got = await asyncio.to_thread(calls, port, "Other", "default/web/say")  # claims the limited route
            assert got == [b"hi"] * 3, got
            assert len(seen) == 5 and not any("x-nodemesh-route" in keys for keys in seen), seen

    try:
        run(go())
    finally:
        srv.stop(0)
