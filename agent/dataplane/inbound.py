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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.control.screening import address_key, address_problem
from agent.dataplane.listener import Listener
from agent.dataplane.podsock import open_pod
from agent.dataplane.relay import SOCKET_READ_LIMIT, SocketEnd, TunnelEnd, relay
from agent.dataplane.route import Directory, identity_nodes
from agent.dataplane.tunnel import BufferBudget, TunnelConnection, TunnelLimits, TunnelStream
from agent.identity.errors import PeerRejected
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import ServerContexts, accept_tls_socket
from agent.metrics.istio import ConnLabels, MeshMetrics
from agent.proto import hbone
from agent.proto.h2.connection import H2Config
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

# Ports the mesh agent uses (Istio reserves the same ones): never a pod's port to dial.
RESERVED_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090})


@dataclass(frozen=True, slots=True)
class InboundConfig:
    node: str
    trust_domain: str
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 3600.0
    handshake_timeout_s: float = 3.0  # a TCP connection that never completes TLS holds a descriptor
    # never dialled whatever the registry says: this node's and its peers' addresses
    reserved_addresses: frozenset[str] = frozenset()
    reserved_ports: frozenset[int] = RESERVED_PORTS
    # loopback/link-local/... targets are refused; only in-process tests put pods on loopback
    loopback_pods: bool = False
    # SO_MARK on sockets to local pods: how a STRICT pod's filter knows the proxy (0: none)
    proxy_mark: int = 0


class Inbound:
    def __init__(
        self,
        config: InboundConfig,
        *,
        contexts: ServerContexts,
        directory: Callable[[], Directory],
        metrics: MeshMetrics,
        node_address: Callable[[str], str | None],
        h2_config: H2Config | None = None,
        tunnel_limits: TunnelLimits | None = None,
        budget: BufferBudget | None = None,
    ) -> None:
        self.config = config
        self.contexts = contexts
        self.directory = directory
        self.metrics = metrics
        self.node_address = node_address  # node name -> the address its tunnels come from
        self.h2_config = h2_config or H2Config(client=False)
        self.tunnel_limits = tunnel_limits or TunnelLimits()
        self.budget = budget or BufferBudget()
        self.rlog = RateLimitedLog(log)  # what peers provoke: a line per kind per interval
        self._conns: set[TunnelConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._places_of: Directory | None = None
        self._places_cache: Mapping[tuple[str, str], frozenset[str]] = {}

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
            self.rlog.warning(
                reason, "inbound: refused tunnel from %s:%s: %s (%s)", peer[0], peer[1], e, reason
            )
            self.metrics.tunnel_rejections.labels(reason).inc()
            return
        client = tp.peer
        why = self._peer_refusal(client, peer[0])
        if why is not None:
            self.metrics.tunnel_rejections.labels("identity_not_on_peer_node").inc()
            self.rlog.warning(
                "identity_not_on_peer_node", "inbound: refused tunnel from %s: %s", peer[0], why
            )
            writer.transport.abort()
            return

        async def on_stream(stream: TunnelStream) -> None:
            await self._serve_stream(stream, client, peer)

        tunnel = TunnelConnection(
            reader,
            writer,
            client=False,
            on_stream=on_stream,
            config=self.h2_config,
            name=f"from {peer[0]}:{peer[1]}",
            limits=self.tunnel_limits,
            budget=self.budget,
            on_event=self.metrics.tunnel_event,
            rlog=self.rlog,
        )
        self._conns.add(tunnel)
        try:
            await tunnel.wait_closed()
        finally:
            self._conns.discard(tunnel)
            await tunnel.close()

    def _peer_refusal(self, client: SpiffeId, peer_ip: str) -> str | None:
        """Identity is bound to place: ``client`` is accepted only from a node the registry
        places a workload of that identity on (its configured address)."""
        nodes = self._places().get((client.namespace, client.service_account), frozenset())
        return peer_refusal(client.uri, peer_ip, nodes, self.node_address)

    def _places(self) -> Mapping[tuple[str, str], frozenset[str]]:
        d = self.directory()
        if self._places_of is not d:
            self._places_of, self._places_cache = d, identity_nodes(d.snapshot)
        return self._places_cache

    async def _refuse(self, stream: TunnelStream, reason: str, status: int, message: str) -> None:
        self.metrics.tunnel_rejections.labels(reason).inc()
        if reason == "upstream_connect_failed":  # the pod's state, not a peer's misdeed
            self.rlog.info(reason, "inbound: %s", message)
        else:
            self.rlog.warning(reason, "inbound: %s", message)
        await stream.respond(status, message, end=True)

    async def _serve_stream(self, stream: TunnelStream, client: SpiffeId, peer: tuple[str, int]) -> None:
        try:
            req = hbone.parse_connect(stream.request_headers)
        except hbone.HboneRequestError as e:
            return await self._refuse(stream, "bad_request", e.status, str(e))
        why = self._peer_refusal(client, peer[0])  # the registry may have changed since the handshake
        if why is not None:
            return await self._refuse(stream, "identity_not_on_peer_node", 403, why)
        why = dial_refusal(
            req.target,
            self.config.reserved_addresses,
            self.config.reserved_ports,
            loopback_pods=self.config.loopback_pods,
        )
        if why is not None:
            return await self._refuse(stream, "reserved_target", 400, why)
        directory = self.directory()
        w = directory.local_workload_at(req.target.address, self.config.node)
        if w is None:
            return await self._refuse(
                stream,
                "not_local_workload",
                400,
                f"{client.uri} asked for {req.target.authority}, not a workload on node {self.config.node}",
            )
        dst_id = SpiffeId(self.config.trust_domain, w.namespace, w.service_account)
        labels = ConnLabels(
            reporter="destination",
            source_workload=_source_workload(
                directory, client, req.client_address, peer[0], self.node_address
            ),
            source_workload_namespace=client.namespace,
            source_principal=client.uri,
            destination_service="unknown",
            destination_workload=w.name,
            destination_workload_namespace=w.namespace,
            destination_principal=dst_id.uri,
            connection_security_policy="mutual_tls",
        )
        pod: SocketEnd | None = None
        try:
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    r, wr = await open_pod(
                        req.target.address, req.target.port, self.config.proxy_mark, limit=SOCKET_READ_LIMIT
                    )
            except (OSError, TimeoutError) as e:
                return await self._refuse(
                    stream, "upstream_connect_failed", 503, f"cannot connect to {req.target.authority}: {e}"
                )
            pod = SocketEnd(r, wr)
            await stream.respond(200)  # TunnelError if the peer reset the stream meanwhile
            self.metrics.opened(labels)
            self.metrics.active_inbound.inc()
            try:
                res = await relay(TunnelEnd(stream), pod, idle_timeout_s=self.config.idle_timeout_s)
            finally:
                self.metrics.active_inbound.dec()
            # relay(a=tunnel, b=pod): a -> b is the request direction
            self.metrics.closed(labels, res.sent_bytes, res.received_bytes)
        finally:
            if pod is not None:
                if stream.was_reset:
                    pod.abort()  # the client's end was abnormal: so is the pod's
                else:
                    with contextlib.suppress(Exception):
                        pod.close()

    async def close(self) -> None:
        for c in list(self._conns):
            await c.close()
        for t in list(self._tasks):
            t.cancel()


def peer_refusal(
    client_uri: str, peer_ip: str, nodes: frozenset[str], node_address: Callable[[str], str | None]
) -> str | None:
    """Why a tunnel from ``peer_ip`` presenting ``client_uri`` is refused, or None.

    ``nodes`` are the nodes where the registry places a workload of that identity; the
    tunnel must come from one of their configured addresses."""
    if not nodes:
        return f"no workload of {client_uri} is registered on any node"
    addresses = {a for a in map(node_address, nodes) if a is not None}
    if peer_ip not in addresses:
        return (
            f"{client_uri} runs on node(s) {', '.join(sorted(nodes))}, "
            f"not at {peer_ip} (tunnel source address)"
        )
    return None


def dial_refusal(
    target: hbone.Target,
    reserved_addresses: frozenset[str],
    reserved_ports: frozenset[int],
    *,
    loopback_pods: bool = False,
) -> str | None:
    """Why the inbound must never dial ``target`` whatever the registry says, or None: the
    node's and its peers' own addresses, loopback, unspecified, link-local and multicast
    addresses, and the agent's ports (reserved for the mesh, as Istio reserves them).
    The address rules are the registry's own (:func:`address_problem`)."""
    try:
        problem = address_problem(target.address)
        key = address_key(target.address)
    except ValueError:
        return f"{target.authority}: not an IP address"
    if problem is not None and not (loopback_pods and problem.reason == "loopback"):
        return f"{target.authority}: never a pod: {problem.detail}"
    if key in reserved_addresses:
        return f"{target.authority}: a node address, not a pod"
    if target.port in reserved_ports:
        return f"{target.authority}: port {target.port} is reserved for the mesh agent"
    return None


def _source_workload(
    directory: Directory,
    client: SpiffeId,
    claimed_address: str | None,
    peer_ip: str,
    node_address: Callable[[str], str | None],
) -> str:
    """The source workload's name for metrics, from verified facts only: the address the
    peer claims (``forwarded``) names a workload only if that workload has the verified
    identity and lives on the node the tunnel came from."""
    if not claimed_address:
        return "unknown"
    w = directory.workload_at(claimed_address)
    if (
        w is None
        or w.namespace != client.namespace
        or w.service_account != client.service_account
        or node_address(w.node) != peer_ip
    ):
        return "unknown"
    return w.name
