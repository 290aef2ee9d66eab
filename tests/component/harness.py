"""A two-node mesh in one process on loopback: real TLS, real sockets, real HTTP/2.

No root and no eBPF: the original destination that the kernel would record is
given by a lookup function, and the "pods" are listeners on 127.0.0.x
addresses. Everything else — routing, load balancing, the pooled HBONE
tunnel, identity verification, relaying, metrics — is the production code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import uvloop
from prometheus_client import CollectorRegistry

from agent.admin import listen_tcp
from agent.control.model import Kind, Service, ServicePort, Workload, resource_key
from agent.control.snapshot import Snapshot, SnapshotBuilder
from agent.dataplane.authorize import Authorizer
from agent.dataplane.inbound import Inbound, InboundConfig
from agent.dataplane.lb import Balancer
from agent.dataplane.outbound import Outbound, OutboundConfig
from agent.dataplane.pool import TunnelPool
from agent.dataplane.route import Directory
from agent.identity.ca import MeshCA
from agent.identity.clock import Clock, SystemClock
from agent.identity.spiffe import SpiffeId
from agent.identity.store import CertManager, LocalIssuer
from agent.identity.tls import ClientContexts, ServerContexts
from agent.metrics.istio import MeshMetrics

T = TypeVar("T")
TD = "cluster.local"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test's main on uvloop, the event loop the agent runs on."""
    return uvloop.run(coro)


VIP = "10.96.0.10"


def build_snapshot(services: list[Service], workloads: list[Workload], revision: int = 1) -> Snapshot:
    b = SnapshotBuilder()
    puts = {resource_key(Kind.SERVICE, s.namespace, s.name): json.dumps(s.to_doc()) for s in services}
    puts.update({resource_key(Kind.WORKLOAD, w.namespace, w.name): json.dumps(w.to_doc()) for w in workloads})
    b.apply(puts, [])
    return b.build(revision)


@dataclass
class Node:
    name: str
    metrics: MeshMetrics
    registry: CollectorRegistry
    certs: CertManager
    server_contexts: ServerContexts
    outbound: Outbound
    inbound: Inbound
    outbound_port: int = 0
    hbone_port: int = 0
    servers: list[asyncio.Server] = field(default_factory=list)
    inbound_task: asyncio.Task[None] | None = None


@dataclass
class Mesh:
    ca: MeshCA
    directory: Directory
    nodes: dict[str, Node]
    original_dst: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def set_snapshot(self, snap: Snapshot) -> None:
        self.directory = Directory.build(snap)


async def start_node(
    mesh: Mesh,
    name: str,
    hbone_ports: dict[str, int],
    *,
    ca: MeshCA | None = None,
    clock: Clock | None = None,
) -> Node:
    ca = ca or mesh.ca
    clock = clock or SystemClock()
    certs = CertManager(LocalIssuer(ca), clock, ttl_s=4 * 3600)
    registry = CollectorRegistry()
    metrics = MeshMetrics(registry)
    server_contexts = ServerContexts(ca.bundle, trust_domain=TD)
    certs.subscribe(server_contexts.set_identity)
    pool = TunnelPool(
        certs.ensure,
        ClientContexts(ca.bundle, trust_domain=TD),
        connect_timeout_s=3.0,
        on_event=metrics.tunnel_event,
    )

    def lookup(peer: tuple[str, int], local: tuple[str, int]) -> tuple[str, int] | None:
        return mesh.original_dst.get(peer) or mesh.original_dst.get((peer[0], 0))

    authorizer = Authorizer(lambda: mesh.directory, metrics)  # shared, as the agent's
    outbound = Outbound(
        OutboundConfig(node=name, trust_domain=TD, connect_timeout_s=3.0, hbone_port=0),
        directory=lambda: mesh.directory,
        original_dst=lookup,
        node_address=lambda n: "127.0.0.1" if n in hbone_ports else None,
        pool=pool,
        balancer=Balancer(),
        metrics=metrics,
        authorizer=authorizer,
    )
    inbound = Inbound(
        InboundConfig(node=name, trust_domain=TD, loopback_pods=True),
        contexts=server_contexts,
        directory=lambda: mesh.directory,
        metrics=metrics,
        node_address=lambda n: "127.0.0.1" if n in hbone_ports or n == name else None,
        authorizer=authorizer,
    )
    node = Node(name, metrics, registry, certs, server_contexts, outbound, inbound)
    # certs for the workloads this node hosts (the agent does this on each snapshot)
    for w in mesh.directory.snapshot.workloads.values():
        if w.node == name:
            await certs.ensure(SpiffeId(TD, w.namespace, w.service_account))
    ob = await asyncio.start_server(outbound.handle, "127.0.0.1", 0)
    ib_sock = listen_tcp("127.0.0.1", 0)
    node.inbound_task = asyncio.create_task(inbound.serve(ib_sock))
    node.servers = [ob]
    node.outbound_port = ob.sockets[0].getsockname()[1]
    node.hbone_port = ib_sock.getsockname()[1]
    hbone_ports[name] = node.hbone_port
    return node


def metric(node: Node, name: str, **labels: str) -> float:
    """The sum of a node's samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for fam in node.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def echo_server(host: str, port: int, name: str) -> asyncio.Server:
    """A pod: answers each connection with '<name>:' + everything it received, after EOF."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            data = await r.read()
            w.write(name.encode() + b":" + data)
            await w.drain()
        finally:
            w.close()

    return await asyncio.start_server(handle, host, port)


async def client_exchange(src: str, port: int, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    w.write(payload)
    await w.drain()
    w.write_eof()
    data = await r.read()
    w.close()
    return data


@contextlib.asynccontextmanager
async def two_node_mesh(
    workloads: list[Workload], services: list[Service], *, clock: Clock | None = None
) -> AsyncIterator[Mesh]:
    ca = MeshCA.create(TD, now=datetime.now(UTC) - timedelta(days=1))
    mesh = Mesh(ca, Directory.build(build_snapshot(services, workloads)), {})
    ports: dict[str, int] = {}
    for n in ("n1", "n2"):
        mesh.nodes[n] = await start_node(mesh, n, ports, clock=clock)
    # one node's outbound dials the other's inbound
    for node in mesh.nodes.values():
        other = next(p for name, p in ports.items() if name != node.name)
        cfg = node.outbound.config
        node.outbound.config = OutboundConfig(
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            connect_timeout_s=cfg.connect_timeout_s,
            hbone_port=other,
        )
    try:
        yield mesh
    finally:
        for node in mesh.nodes.values():
            for s in node.servers:
                s.close()
            if node.inbound_task is not None:
                node.inbound_task.cancel()
            await node.inbound.close()
            await node.outbound.pool.close()


def web_service(port: int = 80, target: int = 9000, policy: str = "") -> Service:
    return Service(
        name="web",
        namespace="default",
        vip=VIP,
        ports=(ServicePort("tcp-web", port, target),),
        selector={"app": "web"},
    )


def workload(
    name: str,
    address: str,
    node: str,
    *,
    sa: str = "default",
    weight: int = 1,
    labels: dict[str, str] | None = None,
) -> Workload:
    return Workload(
        name=name,
        namespace="default",
        address=address,
        node=node,
        service_account=sa,
        labels=labels or {},
        weight=weight,
    )


_FLAKY: dict[str, int] = {}
_FLAKY_LOCK = threading.Lock()


class _PodHandler(BaseHTTPRequestHandler):
    """A real HTTP/1.1 server (the standard library's) answering with what it saw as JSON."""

    protocol_version = "HTTP/1.1"
    pod_name = "pod"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    trailers: list[str] = []
                    while (line := self.rfile.readline()) not in (b"\r\n", b""):
                        trailers.append(line.decode().strip())
                    self.trailers[:] = trailers
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _answer(self, status: int = 200) -> None:
        self.trailers: list[str] = []
        body = self._body()
        if self.path.startswith("/status/"):
            status = int(self.path.split("/")[2])
        if self.path.startswith("/slow") or self.path.endswith("/slow"):
            time.sleep(1.0)
        if self.path.startswith("/fail-if/") and self.path.split("/")[2] == self.pod_name:
            status = 500  # this pod is broken (for this path)
        if "flaky" in self.path:  # the service fails two requests of every three
            with _FLAKY_LOCK:
                _FLAKY["all"] = n = _FLAKY.get("all", 0) + 1
            if n % 3:
                status = 503
        doc = {
            "pod": self.pod_name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("latin-1"),
            "trailers": self.trailers,
        }
        out = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer


def http_pod(host: str, port: int, name: str) -> ThreadingHTTPServer:
    """Start a real HTTP server for one pod in a thread; ``shutdown()`` + ``server_close()`` end it."""
    handler = type(f"Handler_{name}", (_PodHandler,), {"pod_name": name})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def http_service(
    port: int = 80, target: int = 9000, name: str = "http-web", policy: str = "ROUND_ROBIN"
) -> Service:
    return Service(
        name="web",
        namespace="default",
        vip=VIP,
        ports=(ServicePort(name, port, target),),
        selector={"app": "web"},
        lb_policy=policy,
    )
