"""Outbound (port 15001): captured app connections → endpoint, direct or through HBONE.

How this works, per accepted connection (steps [2]–[4] of DESIGN §1):
the eBPF sock_ops map gives the original destination for the (peer, local)
4-tuple; the peer address names the source workload, whose identity is the
client certificate; :func:`agent.dataplane.route.decide` turns the original
destination into healthy endpoints; the service's policy picks one. A
same-node endpoint is dialled directly, another node's through the pooled
tunnel. A failed connect tries the next endpoint, up to ``max_attempts``.
Then bytes are relayed both ways and the connection is counted with Istio's
labels (reporter=source).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.control.snapshot import Endpoint
from agent.dataplane.lb import Balancer, endpoint_key
from agent.dataplane.podsock import open_pod
from agent.dataplane.pool import TunnelPool
from agent.dataplane.relay import SOCKET_READ_LIMIT, End, SocketEnd, TunnelEnd, relay
from agent.dataplane.route import Directory, RouteError, decide
from agent.dataplane.tunnel import TunnelError
from agent.identity.spiffe import SpiffeId
from agent.metrics.istio import ConnLabels, MeshMetrics
from agent.proto import hbone

log = logging.getLogger(__name__)

OUTBOUND_PORT = 15001

OriginalDstLookup = Callable[[tuple[str, int], tuple[str, int]], tuple[str, int] | None]
NodeAddress = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    node: str
    trust_domain: str
    connect_timeout_s: float = 5.0
    max_attempts: int = 3
    idle_timeout_s: float = 3600.0
    hbone_port: int = 15008
    # SO_MARK on sockets to local pods: how a STRICT pod's filter knows the proxy (0: none)
    proxy_mark: int = 0


class Outbound:
    def __init__(
        self,
        config: OutboundConfig,
        *,
        directory: Callable[[], Directory],
        original_dst: OriginalDstLookup,
        node_address: NodeAddress,
        pool: TunnelPool,
        balancer: Balancer,
        metrics: MeshMetrics,
    ) -> None:
        self.config = config
        self.directory = directory
        self.original_dst = original_dst
        self.node_address = node_address
        self.pool = pool
        self.balancer = balancer
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def identity(self, namespace: str, service_account: str) -> SpiffeId:
        return SpiffeId(self.config.trust_domain, namespace, service_account)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        app = SocketEnd(reader, writer)
        try:
            await self._serve(app)
        except asyncio.CancelledError:
            app.abort()
            raise
        except Exception:
            log.exception("outbound: unexpected failure")
            app.abort()
        finally:
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    def _fail(self, app: SocketEnd, flag: str, why: str) -> None:
        log.info("outbound: %s (%s)", why, flag)
        self.metrics.outbound_failures.labels(flag).inc()
        app.abort()

    async def _serve(self, app: SocketEnd) -> None:
        peer = app.writer.get_extra_info("peername")
        local = app.writer.get_extra_info("sockname")
        orig = self.original_dst((peer[0], peer[1]), (local[0], local[1]))
        if orig is None:
            return self._fail(app, "NR", f"no original destination recorded for {peer[0]}:{peer[1]}")
        dst_ip, dst_port = orig
        directory = self.directory()
        src = directory.workload_at(peer[0])
        if src is None:
            return self._fail(app, "UAEX", f"source {peer[0]} is not a registered workload")
        src_id = self.identity(src.namespace, src.service_account)
        try:
            route = decide(directory, dst_ip, dst_port)
        except RouteError as e:
            return self._fail(app, e.flag, str(e))
        tried: set[tuple[str, int]] = set()
        last_error = ""
        for _ in range(self.config.max_attempts):
            ep = self.balancer.pick(
                route.service_key or dst_ip, route.policy, route.endpoints, frozenset(tried)
            )
            if ep is None:
                break
            tried.add(endpoint_key(ep))
            dst_id = self.identity(ep.namespace, ep.service_account)
            labels = ConnLabels(
                reporter="source",
                source_workload=src.name,
                source_workload_namespace=src.namespace,
                source_principal=src_id.uri,
                destination_service=route.service_host,
                destination_workload=ep.workload,
                destination_workload_namespace=ep.namespace,
                destination_principal=dst_id.uri,
                connection_security_policy="mutual_tls" if ep.node != self.config.node else "none",
            )
            try:
                upstream = await self._connect(ep, src_id, dst_id, peer)
            except (OSError, TunnelError, TimeoutError) as e:
                last_error = f"{ep.address}:{ep.port}: {e}"
                log.info("outbound: endpoint %s failed: %s; trying the next", ep.workload, e)
                continue
            await self._relay(app, upstream, ep, labels)
            return None
        return self._fail(app, "UF", f"no endpoint of {route.service_key or dst_ip} reachable ({last_error})")

    async def _connect(self, ep: Endpoint, src_id: SpiffeId, dst_id: SpiffeId, peer: tuple[str, int]) -> End:
        if ep.node == self.config.node:
            async with asyncio.timeout(self.config.connect_timeout_s):
                r, w = await open_pod(ep.address, ep.port, self.config.proxy_mark, limit=SOCKET_READ_LIMIT)
            return SocketEnd(r, w)
        node_addr = self.node_address(ep.node)
        if node_addr is None:
            raise TunnelError(f"node {ep.node!r} of workload {ep.workload} has no known address")
        headers = hbone.connect_headers(hbone.Target(ep.address, ep.port), peer[0], peer[1])
        async with asyncio.timeout(self.config.connect_timeout_s):
            stream = await self.pool.open_stream(src_id, dst_id, node_addr, headers, self.config.hbone_port)
        return TunnelEnd(stream)

    async def _relay(self, app: SocketEnd, upstream: End, ep: Endpoint, labels: ConnLabels) -> None:
        self.metrics.opened(labels)
        self.metrics.active_outbound.inc()
        self.balancer.started(ep)
        try:
            res = await relay(app, upstream, idle_timeout_s=self.config.idle_timeout_s)
        finally:
            self.balancer.finished(ep)
            self.metrics.active_outbound.dec()
        if isinstance(upstream, SocketEnd):
            upstream.close()
        flags = "-" if not res.error else "UC"
        if res.idle_timeout:
            flags = "IT"
        final = labels if flags == "-" else dataclasses.replace(labels, response_flags=flags)
        self.metrics.closed(final, res.sent_bytes, res.received_bytes)

    async def drain(self, timeout_s: float) -> None:
        """Let open connections finish for up to ``timeout_s``, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for t in pending:
                t.cancel()
