"""Egress on loopback: a ServiceEntry's MESH_EXTERNAL endpoints dialled straight from the node by
the production outbound (STATIC and DNS resolution, a VirtualService timeout, Istio metrics
with destination_service = the host), and outboundTrafficPolicy REGISTRY_ONLY refusing an
unknown destination (HTTP 502 NR, TCP reset, counted). Addresses 127.0.0.70-79, ports
20700-20799."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import socket
from typing import Any

from agent.control import dns_wire as w
from agent.control.istio import Destination, HttpRoute, RouteDestination, VirtualService
from agent.control.model import Kind, Workload, resource_key
from agent.control.serviceentry import EntryEndpoint, EntryPort, ServiceEntry, service_entry_doc
from agent.control.snapshot import SnapshotBuilder
from agent.dataplane.egress import Egress, Resolver
from agent.dataplane.route import Directory
from tests.component.harness import (
    Mesh,
    echo_server,
    http_pod,
    metric,
    run,
    two_node_mesh,
    workload,
)

CLIENT = "127.0.0.70"
EXTERNAL = "127.0.0.71"  # the "external" servers (no agent there)
DNS = ("127.0.0.72", 20701)
UNKNOWN = ("127.0.0.73", 20702)
HTTP_PORT, TCP_PORT = 20700, 20703
VIP, VIP_DNS, VIP_TCP = "10.96.7.1", "10.96.7.2", "10.96.7.3"


def entries(*ses: ServiceEntry, vs: VirtualService | None = None, workloads: tuple[Workload, ...] = ()
            ) -> Directory:
    b = SnapshotBuilder()
    puts = {resource_key(Kind.WORKLOAD, x.namespace, x.name): json.dumps(x.to_doc())
            for x in (workload("client", CLIENT, "n1", sa="client"), *workloads)}
    puts.update({resource_key(Kind.SERVICE_ENTRY, se.namespace, se.name): json.dumps(service_entry_doc(se))
                 for se in ses})
    b.apply(puts, [])
    snap = b.build(2)
    if vs is not None:
        snap = dataclasses.replace(snap, virtual_services={(vs.namespace, vs.name): vs})
    return Directory.build(snap)


STATIC = ServiceEntry("ext", "default", ("api.external.test",), (EntryPort(80, "http", "HTTP", HTTP_PORT),),
                      "MESH_EXTERNAL", "STATIC", (VIP,), (EntryEndpoint(EXTERNAL),))
BY_DNS = ServiceEntry("ext-dns", "default", ("dns.external.test",), (EntryPort(80, "http", "HTTP"),),
                      "MESH_EXTERNAL", "DNS", (VIP_DNS,),
                      (EntryEndpoint("backend.external.test", (("http", HTTP_PORT),)),))
TCP = ServiceEntry("ext-tcp", "default", ("db.external.test",), (EntryPort(5432, "tcp-db", "TCP", TCP_PORT),),
                   "MESH_EXTERNAL", "STATIC", (VIP_TCP,), (EntryEndpoint(EXTERNAL),))
SLOW = VirtualService("ext", "default", ("api.external.test",), http=(
    HttpRoute(route=(RouteDestination(Destination("api.external.test")),), timeout_s=0.3),))


def get(port: int, path: str, host: str = "api.external.test") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, source_address=(CLIENT, 0), timeout=10)
    try:
        conn.request("GET", path, headers={"host": host})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


class _Dns(asyncio.DatagramProtocol):
    """An upstream resolver: backend.external.test is EXTERNAL, TTL 60 s; counts queries."""

    def __init__(self) -> None:
        self.queries = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = w.decode(data)
        self.queries += 1
        name = q.questions[0].name
        answers = (w.Record(name, w.A, w.CLASS_IN, 60, EXTERNAL),) if name == "backend.external.test" else ()
        self.transport.sendto(w.encode(w.Message(id=q.id, qr=True, rd=True, ra=True, questions=q.questions,
                                                 rcode=w.NOERROR if answers else w.NXDOMAIN,
                                                 answers=answers)), addr)


def _mesh_with(mesh: Mesh, d: Directory, *, registry_only: bool = False) -> None:
    mesh.directory = d
    for node in mesh.nodes.values():
        node.outbound.config = dataclasses.replace(node.outbound.config, registry_only=registry_only)
        node.outbound.egress = Egress(Resolver(DNS), allow_loopback=True)


def test_service_entry_static_and_dns_endpoints_with_timeout_and_metrics() -> None:
    pod = http_pod(EXTERNAL, HTTP_PORT, "external")

    async def go() -> None:
        loop = asyncio.get_running_loop()
        dns_tr, dns = await loop.create_datagram_endpoint(_Dns, local_addr=DNS)
        try:
            async with two_node_mesh([], []) as mesh:
                _mesh_with(mesh, entries(STATIC, BY_DNS, vs=SLOW))
                n1 = mesh.nodes["n1"]
                port = n1.outbound_port
                mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
                status, body = await asyncio.to_thread(get, port, "/hello")
                assert status == 200 and json.loads(body)["path"] == "/hello"
                seen = json.loads(body)["headers"]  # nothing about the pod leaves the mesh
                assert "x-request-id" in seen and not {"x-forwarded-for", "forwarded",
                                                       "x-forwarded-client-cert"} & set(seen), seen
                # the VirtualService bound to the entry's host: its timeout applies
                status, body = await asyncio.to_thread(get, port, "/slow")
                assert status == 504, body
                labels = {"reporter": "source", "destination_service": "api.external.test",
                          "destination_service_name": "api.external.test",
                          "destination_service_namespace": "default", "source_workload": "client",
                          "connection_security_policy": "none", "destination_principal": "unknown"}
                assert metric(n1, "istio_requests_total", response_code="200", **labels) == 1
                assert metric(n1, "istio_requests_total", response_code="504", response_flags="UT",
                              **labels) == 1
                # DNS resolution: the endpoint's name is resolved through the upstream, cached by TTL
                mesh.original_dst[(CLIENT, 0)] = (VIP_DNS, 80)
                for _ in range(3):
                    status, body = await asyncio.to_thread(get, port, "/dns", "dns.external.test")
                    assert status == 200 and json.loads(body)["pod"] == "external"
                assert dns.queries == 1
                assert metric(n1, "istio_requests_total", destination_service="dns.external.test",
                              response_code="200") == 3
        finally:
            dns_tr.close()

    try:
        run(go())
    finally:
        pod.shutdown()
        pod.server_close()


def test_service_entry_tcp_port_relays_plain_tcp_with_tcp_metrics() -> None:
    async def go() -> None:
        srv = await echo_server(EXTERNAL, TCP_PORT, "db")
        try:
            async with two_node_mesh([], []) as mesh:
                _mesh_with(mesh, entries(TCP))
                n1 = mesh.nodes["n1"]
                mesh.original_dst[(CLIENT, 0)] = (VIP_TCP, 5432)
                r, wr = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
                wr.write(b"select 1")
                wr.write_eof()
                assert await asyncio.wait_for(r.read(), 5) == b"db:select 1"
                wr.close()
                await asyncio.sleep(0.1)
                assert metric(n1, "istio_tcp_connections_closed_total",
                              destination_service="db.external.test", connection_security_policy="none") == 1
        finally:
            srv.close()

    run(go())


def _tcp_outcome(port: int, payload: bytes) -> bytes | str:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(CLIENT, 0))
    try:
        s.sendall(payload)
        return s.recv(1024)
    except ConnectionResetError:
        return "reset"
    finally:
        s.close()


def test_registry_only_refuses_unknown_destinations_http_502_tcp_reset_counted() -> None:
    async def go() -> None:
        async with two_node_mesh([], []) as mesh:
            _mesh_with(mesh, entries(STATIC), registry_only=True)
            n1 = mesh.nodes["n1"]
            port = n1.outbound_port
            mesh.original_dst[(CLIENT, 0)] = UNKNOWN
            status, body = await asyncio.to_thread(get, port, "/", "unknown.example")
            assert status == 502 and "REGISTRY_ONLY" in body
            assert metric(n1, "istio_requests_total", response_code="502", response_flags="NR",
                          destination_service="unknown") == 1
            assert await asyncio.to_thread(_tcp_outcome, port, b"\x16\x03\x01 not http") == "reset"
            assert metric(n1, "nodemesh_outbound_refused_total", reason="registry_only") == 2
            # ALLOW_ANY: what is captured and unknown is reset as before, and not counted as refused
            _mesh_with(mesh, entries(STATIC), registry_only=False)
            assert await asyncio.to_thread(_tcp_outcome, port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n") in (
                "reset", b"")
            assert metric(n1, "nodemesh_outbound_refused_total", reason="registry_only") == 2

    run(go())


INTERNAL_POD = "127.0.0.74"
INTERNAL = ServiceEntry("legacy", "default", ("legacy.internal.test",),
                        (EntryPort(80, "http", "HTTP", 20704),), "MESH_INTERNAL", "STATIC", ("10.96.7.4",),
                        (EntryEndpoint(INTERNAL_POD),))


def test_mesh_internal_endpoints_are_mesh_workloads_reached_over_hbone() -> None:
    pod = http_pod(INTERNAL_POD, 20704, "legacy-1")

    async def go() -> None:
        legacy = workload("legacy-1", INTERNAL_POD, "n2", sa="legacy")
        async with two_node_mesh([workload("client", CLIENT, "n1", sa="client"), legacy], []) as mesh:
            _mesh_with(mesh, entries(INTERNAL, workloads=(legacy,)))
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            mesh.original_dst[(CLIENT, 0)] = ("10.96.7.4", 80)
            status, body = await asyncio.to_thread(get, n1.outbound_port, "/in", "legacy.internal.test")
            assert status == 200 and json.loads(body)["pod"] == "legacy-1", body
            # through the tunnel, with the workload's identity (the pod saw the verified caller)
            assert "URI=spiffe://cluster.local/ns/default/sa/client" in json.loads(body)["headers"][
                "x-forwarded-client-cert"]
            assert metric(n1, "istio_requests_total", reporter="source",
                          destination_service="legacy.internal.test",
                          destination_workload="legacy-1", connection_security_policy="mutual_tls",
                          destination_principal="spiffe://cluster.local/ns/default/sa/legacy") == 1
            assert metric(n2, "istio_requests_total", reporter="destination",
                          destination_workload="legacy-1") == 1

    try:
        run(go())
    finally:
        pod.shutdown()
        pod.server_close()


NONE_ADDR = "127.0.0.75"
PASSTHROUGH = ServiceEntry("legacy-db", "default", ("db.legacy.test",), (EntryPort(20705, "tcp-db", "TCP"),),
                           "MESH_EXTERNAL", "NONE", (NONE_ADDR,))


def test_resolution_none_dials_the_address_the_app_dialled() -> None:
    async def go() -> None:
        srv = await echo_server(NONE_ADDR, 20705, "legacy")
        try:
            async with two_node_mesh([], []) as mesh:
                _mesh_with(mesh, entries(PASSTHROUGH))
                n1 = mesh.nodes["n1"]
                mesh.original_dst[(CLIENT, 0)] = (NONE_ADDR, 20705)
                r, wr = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=(CLIENT, 0))
                wr.write(b"hi")
                wr.write_eof()
                assert await asyncio.wait_for(r.read(), 5) == b"legacy:hi"
                wr.close()
                await asyncio.sleep(0.1)
                assert metric(n1, "istio_tcp_connections_closed_total",
                              destination_service="db.legacy.test") == 1
        finally:
            srv.close()

    run(go())


MISSING = ServiceEntry("ext-missing", "default", ("missing.external.test",), (EntryPort(80, "http", "HTTP"),),
                       "MESH_EXTERNAL", "DNS", ("10.96.7.6",))  # the host itself: NXDOMAIN upstream


def test_a_name_that_does_not_resolve_is_503_uf_and_the_failure_is_cached() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        dns_tr, dns = await loop.create_datagram_endpoint(_Dns, local_addr=DNS)
        try:
            async with two_node_mesh([], []) as mesh:
                _mesh_with(mesh, entries(MISSING))
                n1 = mesh.nodes["n1"]
                mesh.original_dst[(CLIENT, 0)] = ("10.96.7.6", 80)
                for _ in range(2):
                    status, body = await asyncio.to_thread(get, n1.outbound_port, "/",
                                                           "missing.external.test")
                    assert status == 503 and "cannot resolve missing.external.test" in body, body
                assert dns.queries == 1  # (the second within the 2 s a failure is kept)
                assert metric(n1, "istio_requests_total", destination_service="missing.external.test",
                              response_code="503", response_flags="UF") == 2
        finally:
            dns_tr.close()

    run(go())
