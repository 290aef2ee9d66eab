"""HTTP/2 and gRPC through the node proxy on loopback: a real grpcio client and server.

The client speaks h2c with prior knowledge to the outbound; each call is balanced on
its own (one channel, one TCP connection), crosses the pooled HBONE tunnel as HTTP/2,
is parsed again by the inbound, and reaches a grpcio server per pod."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent import futures
from typing import Any

import grpc

from agent.control.model import Protocol, Service, ServicePort
from tests.component.harness import VIP, Mesh, metric, run, two_node_mesh, workload

CLIENT = "127.0.0.1"  # grpcio cannot bind a source address: the client workload lives here


def grpc_pod(addr: str, name: str) -> grpc.Server:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        md = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-served-by", name),))
        return f"{name}:{request.decode()}:{md.get('x-forwarded-for', '')}".encode()

    def count(request: bytes, context: grpc.ServicerContext) -> Any:
        for i in range(int(request)):
            yield b"%d" % i

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"{addr}:9000")
    srv.start()
    return srv


def calls(port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        say = ch.unary_unary("/echo.Echo/Say")
        answers = []
        for i in range(20):
            resp, call = say.with_call(b"hi%d" % i, timeout=10)
            answers.append((resp.decode(), dict(call.trailing_metadata())))
        out["answers"] = answers
        try:
            say(b"missing", timeout=10)
        except grpc.RpcError as e:
            out["missing"] = (e.code(), e.details())
        out["stream"] = [m.decode() for m in ch.unary_stream("/echo.Echo/Count")(b"50", timeout=10)]
    return out


def test_grpc_calls_are_balanced_per_call_with_status_trailers_and_metrics_from_both_reporters() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client")]
    ws += [workload(f"web-{i}", f"127.0.0.{10 + i}", "n2", sa="web", labels={"app": "web"}) for i in (1, 2)]
    svc = Service("web", "default", VIP, (ServicePort("grpc-echo", 80, 9000),), {"app": "web"})
    pods = [grpc_pod(w.address, w.name) for w in ws[1:]]

    async def body() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            out = await asyncio.to_thread(calls, n1.outbound_port)
            who = Counter(a.split(":")[0] for a, _ in out["answers"])
            assert who == {"web-1": 10, "web-2": 10}  # one channel, balanced per call
            assert all(a.endswith(f":{CLIENT}") for a, _ in out["answers"])  # x-forwarded-for
            assert all(t["x-served-by"] == a.split(":")[0] for a, t in out["answers"])  # trailers pass
            assert out["missing"] == (grpc.StatusCode.NOT_FOUND, "no such thing")
            assert out["stream"] == [str(i) for i in range(50)]
            for node, reporter in ((n1, "source"), (n2, "destination")):
                ok = metric(node, "istio_requests_total", reporter=reporter, request_protocol="grpc",
                            response_code="200", grpc_response_status="0")
                assert ok == 21, (reporter, ok)
                assert metric(node, "istio_requests_total", reporter=reporter, grpc_response_status="5") == 1
            assert n1.outbound.h2_upstreams.stats.dials <= 2  # sessions shared by the calls
            await _unreachable_is_a_grpc_unavailable(mesh)

    try:
        run(body())
    finally:
        for p in pods:
            p.stop(None)


async def _unreachable_is_a_grpc_unavailable(mesh: Mesh) -> None:
    n1 = mesh.nodes["n1"]
    mesh.original_dst[(CLIENT, 0)] = (VIP, 81)  # a port the service does not have

    def one() -> tuple[Any, str]:
        with grpc.insecure_channel(f"127.0.0.1:{n1.outbound_port}") as ch:
            try:
                ch.unary_unary("/echo.Echo/Say")(b"x", timeout=5)
            except grpc.RpcError as e:
                return e.code(), e.details()
        return None, ""

    # no route for the port: refused before any protocol (a TCP reset): gRPC sees UNAVAILABLE
    code, _ = await asyncio.to_thread(one)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_declared_protocol_names() -> None:
    from agent.control.model import l7_protocol

    assert l7_protocol(ServicePort("grpc-echo", 80, 9000)) is Protocol.GRPC
    assert l7_protocol(ServicePort("http2", 80, 9000)) is Protocol.HTTP2
    assert l7_protocol(ServicePort("http-web", 80, 9000)) is Protocol.HTTP
    assert l7_protocol(ServicePort("tcp-db", 80, 9000)) is Protocol.TCP
    assert l7_protocol(ServicePort("mysql", 3306, 3306)) is Protocol.TCP
    assert l7_protocol(ServicePort("web", 80, 9000)) is None  # sniffed
    assert l7_protocol(ServicePort("web", 80, 9000, app_protocol="kubernetes.io/h2c")) is Protocol.HTTP2
    assert l7_protocol(ServicePort("web", 80, 9000, app_protocol="http")) is Protocol.HTTP
    assert l7_protocol(ServicePort("http-web", 80, 9000, Protocol.TCP)) is Protocol.TCP  # declared wins


def test_grpc_calls_are_mirrored_with_their_messages_and_the_answers_dropped() -> None:
    """A route's mirror for gRPC: each call (its request message included) is copied to v2 over
    HTTP/2; the client gets v1's answers only; the mirror's answers are read and dropped."""
    import dataclasses

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
    ws += [workload(f"web-{i}", f"127.0.0.{10 + i}", "n2", sa="web",
                    labels={"app": "web", "version": f"v{i}"}) for i in (1, 2)]
    svc = Service("web", "default", VIP, (ServicePort("grpc-echo", 80, 9000),), {"app": "web"})
    dr = DestinationRule("web", "default", "web",
                         subsets=(Subset("v1", (("version", "v1"),)), Subset("v2", (("version", "v2"),))))
    vs = VirtualService("web", "default", ("web",), (
        HttpRoute("main", (), (RouteDestination(Destination("web", "v1")),),
                  mirror=Destination("web", "v2")),))
    seen: Counter[bytes] = Counter()

    def echo(name: str) -> Any:
        def say(request: bytes, context: grpc.ServicerContext) -> bytes:
            if name == "web-2":
                seen[request] += 1
            return f"{name}:{request.decode()}".encode()

        handler = grpc.method_handlers_generic_handler(
            "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        srv.add_generic_rpc_handlers((handler,))
        srv.add_insecure_port(f"127.0.0.{10 + int(name[-1])}:9000")
        srv.start()
        return srv

    pods = [echo("web-1"), echo("web-2")]

    def say_all(port: int) -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            say = ch.unary_unary("/echo.Echo/Say")
            return [say(b"m%d" % i, timeout=10).decode() for i in range(10)]

    async def body() -> None:
        async with two_node_mesh(ws, [svc]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            snap = mesh.directory.snapshot
            mesh.directory = Directory.build(dataclasses.replace(
                snap, virtual_services={("default", "web"): vs}, destination_rules={("default", "web"): dr}))
            n1 = mesh.nodes["n1"]
            answers = await asyncio.to_thread(say_all, n1.outbound_port)
            assert answers == [f"web-1:m{i}" for i in range(10)]  # the client sees the main route only
            deadline = asyncio.get_running_loop().time() + 5
            # (the pod sees a copy before the proxy has read and dropped its answer, which is
            # when the copy is counted: wait for both)
            while sum(seen.values()) < 10 or n1.outbound.mirrored < 10:
                assert asyncio.get_running_loop().time() < deadline, \
                    f"copies seen: {seen}, mirrored: {n1.outbound.mirrored}"
                await asyncio.sleep(0.05)
            assert seen == {b"m%d" % i: 1 for i in range(10)}  # each message, once
            assert n1.outbound.mirrored == 10 and n1.outbound.mirror_failures == 0

    try:
        run(body())
    finally:
        for p in pods:
            p.stop(None)
