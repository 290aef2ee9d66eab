"""AuthorizationPolicy enforced at the destination, on loopback: a real HTTP client and raw
TCP clients through outbound -> HBONE (mTLS) -> inbound, and to a same-node pod.

The caller's identity is the one its tunnel certificate carries (cluster.local/ns/default/sa/
client); what decides is checked in the destination's metrics."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from agent.control.authz import AuthorizationPolicy, Condition, Operation, Rule, Source
from agent.dataplane.route import Directory
from tests.component.harness import (
    VIP,
    Mesh,
    http_pod,
    http_service,
    metric,
    run,
    two_node_mesh,
    web_service,
    workload,
)
from tests.component.test_http_loopback import CLIENT, keepalive_requests

WEB = {"app": "web"}
CLIENT_ID = "cluster.local/ns/default/sa/client"


def with_policies(mesh: Mesh, *policies: AuthorizationPolicy) -> None:
    snap = mesh.directory.snapshot
    mesh.directory = Directory.build(dataclasses.replace(
        snap, revision=snap.revision + 1,
        authorization_policies={(p.namespace, p.name): p for p in policies}))


def allow(name: str, *rules: Rule, ns: str = "default", selector: Any = (("app", "web"),),
          action: str = "ALLOW") -> AuthorizationPolicy:
    return AuthorizationPolicy(name, ns, action, selector, rules)


def test_http_requests_are_judged_per_request_with_istio_order_and_counted() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"), workload("web-1", "127.0.0.11", "n2", sa="web",
                                                                   labels=WEB)]
    pods = [http_pod("127.0.0.11", 9000, "web-1")]

    async def go() -> None:
        async with two_node_mesh(ws, [http_service()]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            port = n1.outbound_port

            def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
                (status, doc, _), = keepalive_requests(port, 1, path, "GET", headers)
                return status, doc.get("raw", doc.get("pod", ""))

            # no policy: everything passes
            assert (await asyncio.to_thread(get, "/admin"))[0] == 200
            with_policies(
                mesh,
                allow("public", Rule(sources=(Source(principals=(CLIENT_ID,)),),
                                     operations=(Operation(methods=("GET",), paths=("/public/*",)),))),
                allow("no-debug", Rule(when=(Condition("request.headers[x-debug]", ("1",)),)),
                      action="DENY"),
                allow("audit-all", Rule(), action="AUDIT"),
            )
            assert await asyncio.to_thread(get, "/public/a") == (200, "web-1")
            status, body = await asyncio.to_thread(get, "/admin")  # ALLOW policies apply, none matches
            assert (status, body) == (403, "RBAC: access denied\n")
            assert (await asyncio.to_thread(get, "/public/a?x=/admin"))[0] == 200  # the query is not the path
            assert (await asyncio.to_thread(get, "/public/a", {"X-Debug": "1"}))[0] == 403  # DENY first
            # the path is normalised before it is matched (and forwarded): no way around /public/*
            for sneaky in ("/public/../admin", "/public/%2e%2e/admin", "/public/.%2E/admin",
                           "/public/..\\admin"):
                assert (await asyncio.to_thread(get, sneaky))[0] == 403, sneaky
            (status, doc, _), = await asyncio.to_thread(keepalive_requests, port, 1, "/x/../public/%7Eb")
            assert status == 200 and doc["path"] == "/public/~b"  # what the pod saw
            assert (await asyncio.to_thread(get, "/public/a%00"))[0] == 400
            assert metric(n2, "istio_requests_total", reporter="destination", response_code="403",
                          response_flags="RBAC") == 6
            assert metric(n2, "nodemesh_authz_decisions_total", policy="default/public", action="ALLOW",
                          result="allowed") == 3
            assert metric(n2, "nodemesh_authz_decisions_total", policy="-", action="ALLOW",
                          result="denied") == 5
            assert metric(n2, "nodemesh_authz_decisions_total", policy="default/no-debug", action="DENY",
                          result="denied") == 1
            # a mesh-wide deny-all (root namespace, no selector, no rules) with a per-service allow
            with_policies(
                mesh,
                allow("deny-all", ns="istio-system", selector=None),
                allow("web-get", Rule(operations=(Operation(methods=("GET",)),))),
            )
            assert (await asyncio.to_thread(get, "/anything"))[0] == 200
            (status, _, _), = await asyncio.to_thread(keepalive_requests, port, 1, "/x", "DELETE")
            assert status == 403

    try:
        run(go())
    finally:
        for p in pods:
            p.shutdown()
            p.server_close()


def test_tcp_connections_judged_on_l4_fields_and_closed_when_a_new_policy_denies_them() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"), workload("web-1", "127.0.0.21", "n2", labels=WEB),
          workload("web-2", "127.0.0.22", "n1", labels=WEB)]

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello\n")
        await w.drain()
        await r.read()
        w.close()

    async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT, 0))

    async def go() -> None:
        servers = [await asyncio.start_server(hold, a, 9000) for a in ("127.0.0.21", "127.0.0.22")]
        try:
            async with two_node_mesh(ws, [web_service()]) as mesh:
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                n1 = mesh.nodes["n1"]
                # an ALLOW rule with an HTTP-only field never matches on a TCP port (ztunnel's rule)
                with_policies(mesh, allow("paths", Rule(operations=(Operation(paths=("/*",)),))))
                for _ in range(2):  # each endpoint, remote (inbound) and same node (outbound)
                    r, w = await connect(n1.outbound_port)
                    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                        await asyncio.wait_for(r.readexactly(6), 5)
                    w.close()
                # a DENY rule with an HTTP-only field denies on its L4 part (here: the principal)
                with_policies(mesh, allow("deny-client", Rule(
                    sources=(Source(principals=(CLIENT_ID,)),), operations=(Operation(methods=("POST",)),)),
                    action="DENY"))
                r, w = await connect(n1.outbound_port)
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    await asyncio.wait_for(r.readexactly(6), 5)
                w.close()
                # allowed by principal and port; then a new policy closes the open connections
                with_policies(mesh, allow("client", Rule(sources=(Source(principals=(CLIENT_ID,)),),
                                                         operations=(Operation(ports=(9000,)),))))
                conns = [await connect(n1.outbound_port) for _ in range(2)]
                for r, _ in conns:
                    assert await asyncio.wait_for(r.readline(), 5) == b"hello\n"
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with_policies(mesh, allow("client", Rule(sources=(Source(principals=("nobody",)),))))
                for r, w in conns:
                    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                        await asyncio.wait_for(r.readexactly(1), 5)
                    w.close()
                assert loop.time() - t0 < 1.0, "denied connections must close within 1 s"
        finally:
            for srv in servers:
                srv.close()

    run(go())


def test_same_node_http_destination_is_judged_by_the_source_agent() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"), workload("web-1", "127.0.0.11", "n1", sa="web",
                                                                   labels=WEB)]
    pods = [http_pod("127.0.0.11", 9000, "web-1")]

    async def go() -> None:
        async with two_node_mesh(ws, [http_service()]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            n1 = mesh.nodes["n1"]
            with_policies(mesh, allow("only-get", Rule(operations=(Operation(methods=("GET",)),))))
            (status, _, _), = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1, "/", "GET")
            assert status == 200
            (status, doc, _), = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1, "/a/../b")
            assert status == 200 and doc["path"] == "/b"  # normalised here, as the inbound does
            (status, doc, headers), = await asyncio.to_thread(keepalive_requests, n1.outbound_port, 1, "/",
                                                             "PUT")
            assert status == 403 and doc["raw"] == "RBAC: access denied\n" and headers["server"] == "nodemesh"
            assert metric(n1, "istio_requests_total", reporter="destination", response_code="403",
                          response_flags="RBAC") == 1

    try:
        run(go())
    finally:
        for p in pods:
            p.shutdown()
            p.server_close()

