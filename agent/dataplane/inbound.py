"""Inbound (port 15008): HBONE tunnels from other nodes → local pods.

How this works (steps [5]–[6] of DESIGN §1): TLS 1.3 with a required client
certificate; after the handshake the client's SPIFFE identity is verified
(chain, validity, EKU, one URI SAN in our trust domain) — a peer that fails is
refused, logged and counted by reason before any stream is read. Each CONNECT
stream names a pod ``ip:port``: it must be a workload of this node (else 400 on
that stream only), then the pod is dialled (failure: 503) and, after 200, bytes
are relayed. Connections are counted with Istio's labels (reporter=destination).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent.dataplane import hbone
from agent.dataplane.h2.connection import H2Config
from agent.dataplane.listener import Listener
from agent.dataplane.relay import SocketEnd, TunnelEnd, relay
from agent.dataplane.route import Directory
from agent.dataplane.tunnel import TunnelConnection, TunnelStream
from agent.identity.errors import PeerRejected
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import ServerContexts, accept_tls_socket
from agent.metrics.istio import ConnLabels, MeshMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InboundConfig:
    node: str
    trust_domain: str
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 3600.0
    handshake_timeout_s: float = 3.0  # a TCP connection that never completes TLS holds a descriptor


class Inbound:
    def __init__(
        self,
        config: InboundConfig,
        *,
        contexts: ServerContexts,
        directory: Callable[[], Directory],
        metrics: MeshMetrics,
        h2_config: H2Config | None = None,
    ) -> None:
        self.config = config
        self.contexts = contexts
        self.directory = directory
        self.metrics = metrics
        self.h2_config = h2_config or H2Config(client=False)
        self._conns: set[TunnelConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket, listener: Listener | None = None) -> None:
        """Accept on the listening socket until cancelled; each connection in its own task.

        ``listener`` (limits, EMFILE back-off, what readiness reads) is the agent's; by
        default one with the default limits. The TLS handshake runs on the accepted socket
        itself (not on a stream that is already reading), so a refused client is counted
        and logged with its reason.
        """
        await (listener or Listener("hbone", metrics=self.metrics)).serve(sock, self._accepted)

    async def _accepted(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        task = asyncio.current_task()
        if task is not None:  # close() cancels it
            self._tasks.add(task)
        try:
            await self._handle(conn, peer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            reader, writer, tp = await accept_tls_socket(
                conn, self.contexts, timeout_s=self.config.handshake_timeout_s
            )
        except (PeerRejected, TimeoutError, OSError) as e:
            reason = str(e.reason) if isinstance(e, PeerRejected) else "handshake_failed"
            log.warning("inbound: refused tunnel from %s:%s: %s (%s)", peer[0], peer[1], e, reason)
            self.metrics.tunnel_rejections.labels(reason).inc()
            return
        client = tp.peer

        async def on_stream(stream: TunnelStream) -> None:
            await self._serve_stream(stream, client, peer)

        tunnel = TunnelConnection(
            reader, writer, client=False, on_stream=on_stream, config=self.h2_config, name=f"from {peer}"
        )
        self._conns.add(tunnel)
        try:
            await tunnel.wait_closed()
        finally:
            self._conns.discard(tunnel)
            await tunnel.close()

    async def _serve_stream(self, stream: TunnelStream, client: SpiffeId, peer: tuple[str, int]) -> None:
        try:
            req = hbone.parse_connect(stream.request_headers)
        except hbone.HboneRequestError as e:
            self.metrics.tunnel_rejections.labels("bad_request").inc()
            await stream.respond(e.status, str(e), end=True)
            return
        w = self.directory().local_workload_at(req.target.address, self.config.node)
        if w is None:
            self.metrics.tunnel_rejections.labels("not_local_workload").inc()
            log.warning(
                "inbound: %s asked for %s, not a workload on node %s",
                client.uri,
                req.target.authority,
                self.config.node,
            )
            await stream.respond(400, f"{req.target.authority} is not a workload on this node", end=True)
            return
        dst_id = SpiffeId(self.config.trust_domain, w.namespace, w.service_account)
        labels = ConnLabels(
            reporter="destination",
            source_workload=_workload_of(self.directory(), req.client_address),
            source_workload_namespace=client.namespace,
            source_principal=client.uri,
            destination_service="unknown",
            destination_workload=w.name,
            destination_workload_namespace=w.namespace,
            destination_principal=dst_id.uri,
            connection_security_policy="mutual_tls",
        )
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                r, wr = await asyncio.open_connection(req.target.address, req.target.port, limit=1 << 20)
        except (OSError, TimeoutError) as e:
            self.metrics.tunnel_rejections.labels("upstream_connect_failed").inc()
            await stream.respond(503, f"cannot connect to {req.target.authority}: {e}", end=True)
            return
        pod = SocketEnd(r, wr)
        await stream.respond(200)
        self.metrics.opened(labels)
        self.metrics.active_inbound.inc()
        try:
            res = await relay(TunnelEnd(stream), pod, idle_timeout_s=self.config.idle_timeout_s)
        finally:
            self.metrics.active_inbound.dec()
            with contextlib.suppress(Exception):
                pod.close()
        # relay(a=tunnel, b=pod): a -> b is the request direction
        self.metrics.closed(labels, res.sent_bytes, res.received_bytes)

    async def close(self) -> None:
        for c in list(self._conns):
            await c.close()
        for t in list(self._tasks):
            t.cancel()


def _workload_of(directory: Directory, address: str | None) -> str:
    if not address:
        return "unknown"
    w = directory.workload_at(address)
    return w.name if w is not None else "unknown"
