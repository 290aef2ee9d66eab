"""Inbound (port 15008): HBONE tunnels from other nodes → local pods.

How this works (steps [5]–[6] of DESIGN §1): TLS 1.3 with a required client
certificate; after the handshake the client's SPIFFE identity is verified
(chain, validity, EKU, one URI SAN in our trust domain) — a peer that fails is
refused, logged and counted by reason before any stream is read. Each CONNECT
stream names a pod ``ip:port``: it must be a workload of this node (else 400 on
that stream only), then the pod is dialled (failure: 503) and, after 200, the
stream is served by the pod port's protocol (:mod:`agent.dataplane.protocol`:
declared, or sniffed from the first bytes): TCP ports relay bytes and count
the connection; HTTP ports run the request loop (:mod:`agent.dataplane.http.h1`)
with :class:`InboundHttp` as its side, so every request is parsed, counted and
logged here too (reporter=destination), and judged per request by
:meth:`agent.dataplane.authorize.Authorizer.judge_request` (normalise, JWT,
AuthorizationPolicy, then rate limits) on the identity the tunnel verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.control import authz
from agent.control.model import Protocol, Workload
from agent.control.screening import address_key, address_problem
from agent.dataplane import protocol
from agent.dataplane.authorize import DENIED_BODY, Authorizer, principal_of
from agent.dataplane.http import headers as hdrs
from agent.dataplane.http.exchange import Exchange, LocalReply, UpstreamGone
from agent.dataplane.http.h1 import H1Loop, LoopConfig
from agent.dataplane.http.h2 import H2Loop
from agent.dataplane.http.h2session import H2Session
from agent.dataplane.http.normalize import (
    PathNormalization,
)
from agent.dataplane.http.upstream import Upstream
from agent.dataplane.listener import Listener
from agent.dataplane.podsock import open_pod
from agent.dataplane.ratepeers import RateShare, reserved_target
from agent.dataplane.report import Flow, Reporter, party
from agent.dataplane.route import Directory, identity_nodes
from agent.dataplane.tcp import SOCKET_READ_LIMIT, SocketEnd, TunnelEnd, relay
from agent.dataplane.tunnel import BufferBudget, TunnelConnection, TunnelLimits, TunnelStream
from agent.identity.errors import PeerRejected
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import ServerContexts, accept_tls_socket
from agent.metrics.istio import MeshMetrics, RequestLabels
from agent.proto import hbone, http1
from agent.proto.h2.connection import H2Config
from agent.proto.h2.connection import Headers as H2Headers
from agent.proto.http1 import Header, RequestHead
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
    sniff_timeout_s: float = protocol.DEFAULT_SNIFF_TIMEOUT_S
    http: LoopConfig = field(default_factory=LoopConfig)
    # Istio's meshConfig.pathNormalization: what requests' paths become here, matched by the
    # authorization policies and forwarded to the pod
    path_normalization: PathNormalization = PathNormalization.BASE


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
        reporter: Reporter | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.config = config
        self.reporter = reporter or Reporter(metrics)
        self.authorizer = authorizer or Authorizer(directory, metrics)
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
        self.rate_share: RateShare | None = None  # service-wide rate limits: the peers' reports

    async def serve(self, sock: socket.socket, listener: Listener | None = None) -> None:
        """Accept on the listening socket until cancelled; each connection in its own task.

        ``listener`` (limits, EMFILE back-off, what readiness reads) is the agent's; by
        default one with the default limits. The TLS handshake runs on the accepted socket
        itself (not on a stream that is already reading), so a refused client is counted
        and logged with its reason.
        """
        watch = asyncio.create_task(self.authorizer.watch(), name="authz watch")
        share = (asyncio.create_task(self.rate_share.run(), name="ratelimit share")
                 if self.rate_share is not None else None)
        try:
            await (listener or Listener("hbone", metrics=self.metrics)).serve(sock, self._accepted)
        finally:
            watch.cancel()
            if share is not None:
                share.cancel()

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
        if self.rate_share is not None and reserved_target(req.target, self.node_address(self.config.node)):
            nodes = self._places().get((client.namespace, client.service_account), frozenset())
            return await self.rate_share.serve(stream, peer[0], nodes)  # a peer agent's demand
        directory = self.directory()
        w = directory.local_workload_at(req.target.address, self.config.node, req.target.port)
        why = dial_refusal(
            req.target,
            self.config.reserved_addresses,
            self.config.reserved_ports,
            loopback_pods=self.config.loopback_pods,
            host_service=w is not None and directory.hosts.get((req.target.address, req.target.port)) is w,
        )
        if why is not None:
            return await self._refuse(stream, "reserved_target", 400, why)
        if w is None:
            return await self._refuse(
                stream,
                "not_local_workload",
                400,
                f"{client.uri} asked for {req.target.authority}, not a workload on node {self.config.node}",
            )
        dst_id = SpiffeId(self.config.trust_domain, w.namespace, w.service_account)
        src_w = _source_workload(directory, client, req.client_address, peer[0], self.node_address)
        flow = Flow(
            "destination",
            party(src_w, client.uri, namespace=client.namespace),
            party(w, dst_id.uri),
            None,
            mutual_tls=True,
        )
        # L4 facts: only what this node verified (the tunnel's identity; the source address the
        # registry ties to it, else the address the tunnel came from)
        facts = authz.Facts(
            principal=principal_of(client.uri), namespace=client.namespace,
            source_ip=src_w.address if src_w is not None else peer[0],
            destination_ip=req.target.address, destination_port=req.target.port,
        )
        declared = directory.pod_port_protocol(w, req.target.port)
        if declared is Protocol.TCP:  # judged before the pod is dialled
            v = self.authorizer.check(w, facts)
            if v is not None and not v.allowed:
                return await self._refuse(stream, "authz_denied", 403, f"{DENIED_BODY} ({v.why})")
        limits = self.authorizer.limits  # RateLimitPolicy: TCP connections/s and open at once
        release: Callable[[], None] | None = None
        if declared is Protocol.TCP and limits is not None:
            release, why = limits.admit_connection(w, req.target.port)
            if release is None:
                return await self._refuse(stream, "rate_limited", 429, why)
        pod: SocketEnd | None = None
        token = 0
        try:
            try:
                pod = await self._dial(req.target)
            except (OSError, TimeoutError) as e:
                return await self._refuse(
                    stream, "upstream_connect_failed", 503, f"cannot connect to {req.target.authority}: {e}"
                )
            await stream.respond(200)  # TunnelError if the peer reset the stream meanwhile
            down = TunnelEnd(stream)
            wire, first = await protocol.resolve(declared, down, self.config.sniff_timeout_s)
            if wire is not protocol.Wire.TCP:
                side = InboundHttp(
                    self, flow, pod, req.target, src_w.address if src_w is not None else None, w, facts,
                    trusts_route=hdrs.PARSED in stream.request_headers,  # (the route its agent chose)
                )
                self.metrics.active_inbound.inc()
                try:
                    if wire is protocol.Wire.HTTP1:
                        await H1Loop(down, side, self.config.http).run(first)
                    else:
                        side.pod = None  # (HTTP/2 to the pod: its own session, on the first request)
                        pod.close()
                        h2 = H2Loop(down, side, name=f"stream {stream.stream_id}", refuse_through=True)
                        await h2.run(first)
                finally:
                    self.metrics.active_inbound.dec()
                    pod = side.pod
                    if side.session is not None:
                        await side.session.close()
                return None
            if declared is not Protocol.TCP:  # sniffed as TCP: judged now
                v = self.authorizer.check(w, facts)
                if v is not None and not v.allowed:
                    self.metrics.tunnel_rejections.labels("authz_denied").inc()
                    down.abort()
                    return None
                if limits is not None:
                    release, why = limits.admit_connection(w, req.target.port)
                    if release is None:
                        self.metrics.tunnel_rejections.labels("rate_limited").inc()
                        down.abort()
                        return None
            token = self.authorizer.opened(w, facts, down.abort)  # a policy change may close it
            labels = flow.conn_labels()
            start = time.monotonic()
            self.metrics.opened(labels)
            self.metrics.active_inbound.inc()
            try:
                if first:
                    await pod.write(first)
                res = await relay(down, pod, idle_timeout_s=self.config.idle_timeout_s)
            finally:
                self.metrics.active_inbound.dec()
            # relay(a=tunnel, b=pod): a -> b is the request direction
            sent = res.sent_bytes + len(first)
            self.metrics.closed(labels, sent, res.received_bytes)
            self.reporter.tcp(
                flow, labels, sent, res.received_bytes, (time.monotonic() - start) * 1000,
                req.target.authority,
            )
        finally:
            if token:
                self.authorizer.closed(token)
            if release is not None:
                release()
            if pod is not None:
                if stream.was_reset:
                    pod.abort()  # the client's end was abnormal: so is the pod's
                else:
                    with contextlib.suppress(Exception):
                        pod.close()

    async def _dial(self, target: hbone.Target) -> SocketEnd:
        async with asyncio.timeout(self.config.connect_timeout_s):
            r, wr = await open_pod(
                target.address, target.port, self.config.proxy_mark, limit=SOCKET_READ_LIMIT
            )
        return SocketEnd(r, wr)

    async def close(self) -> None:
        for c in list(self._conns):
            await c.close()
        for t in list(self._tasks):
            t.cancel()
        self.authorizer.jwt.cache.close()  # (JWKS fetches in flight)


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
    host_service: bool = False,
) -> str | None:
    """Why the inbound must never dial ``target`` whatever the registry says, or None: the
    node's and its peers' own addresses, loopback, unspecified, link-local and multicast
    addresses, and the agent's ports (reserved for the mesh, as Istio reserves them).
    The address rules are the registry's own (:func:`address_problem`). ``host_service``:
    the target is a host workload of this node (a service on the node itself), at this
    node's host address: that address is allowed, the agent's ports never are."""
    try:
        problem = address_problem(target.address)
        key = address_key(target.address)
    except ValueError:
        return f"{target.authority}: not an IP address"
    if problem is not None and not (loopback_pods and problem.reason == "loopback"):
        return f"{target.authority}: never a pod: {problem.detail}"
    if key in reserved_addresses and not host_service:
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
) -> Workload | None:
    """The source workload, from verified facts only: the address the peer claims
    (``forwarded``) names a workload only if that workload has the verified identity and
    lives on the node the tunnel came from."""
    if not claimed_address:
        return None
    w = directory.workload_at(claimed_address)
    if (
        w is None
        or w.namespace != client.namespace
        or w.service_account != client.service_account
        or node_address(w.node) != peer_ip
    ):
        return None
    return w


class InboundHttp:
    """The destination node's side of the request loop, for one CONNECT stream: requests go
    to the stream's pod connection; when the pod ends that connection, the stream ends too."""

    bound = True

    def __init__(
        self,
        inbound: Inbound,
        flow: Flow,
        pod: SocketEnd,
        target: hbone.Target,
        client_address: str | None,
        workload: Workload | None = None,
        facts: authz.Facts | None = None,
        trusts_route: bool = False,
    ) -> None:
        self.inbound = inbound
        # the source agent parsed these requests: their route header is its (else not read)
        self.trusts_route = trusts_route
        self.workload = workload  # the destination (authorization)
        self.facts = facts or authz.Facts()  # the connection's verified L4 facts
        self.flow = flow
        self.labels: RequestLabels = flow.request_labels()
        self.pod: SocketEnd | None = pod
        self.target = target
        self.client_address = client_address  # verified (see _source_workload), else None
        self.key = (flow.source.principal, target.address, target.port, "h1")
        self._served = 0
        self.session: H2Session | None = None
        self._dialing: asyncio.Lock = asyncio.Lock()

    def response_headers(self, ex: Exchange, headers: list[Header]) -> list[Header]:
        return headers

    def abandon(self, ex: Exchange, up: Upstream) -> None:  # (no retries on this side)
        if self.pod is not None and up.end is self.pod:
            self.pod.abort()
            self.pod = None

    def abandon_h2(self, ex: Exchange, session: H2Session) -> None:  # (no retries on this side)
        pass

    def _authorize(self, ex: Exchange, headers: Sequence[tuple[str | bytes, str | bytes]]) -> None:
        """Once per request (:meth:`Authorizer.judge_request`): normalised, authenticated,
        authorized — or answered 400/401/403 here."""
        if not ex.authorized:
            ex.authorized = True
            self.inbound.authorizer.judge_request(self.workload, self._conn_facts, ex, headers,
                                                  self.inbound.config.path_normalization,
                                                  hdrs.route_of(headers) if self.trusts_route else "")

    def _conn_facts(self) -> authz.Facts:
        return self.facts

    async def open_h2(self, ex: Exchange, headers: H2Headers, *, fresh: bool) -> H2Session:
        self._authorize(ex, headers)
        ex.upstream = self.target.authority
        async with self._dialing:  # concurrent requests share one new session
            s = self.session
            if s is not None and not fresh and s.can_open():
                return s
            if s is not None:
                await s.close()
                self.session = None
            try:
                end = await self.inbound._dial(self.target)
            except (OSError, TimeoutError) as e:
                raise LocalReply(503, f"upstream connect error: {self.target.authority}: {e}", "UF") from None
            self.session = s = H2Session(end, client=True, name=f"pod {self.target.authority}")
            s.start()
            return s

    def headers_h2(self, headers: H2Headers, ex: Exchange, *, ended: bool = False) -> H2Headers:
        pseudo, regular = hdrs.split_h2(headers)
        if ex.target:  # the normalised path
            pseudo = [(k, ex.target if k == ":path" else v) for k, v in pseudo]
        return hdrs.join_h2(pseudo, self._rewrite(regular, ex))

    def finished_h2(self, ex: Exchange, session: H2Session | None, grpc: bool) -> None:
        self.inbound.reporter.request(self.flow, self.labels, ex, "grpc" if grpc else "http")

    async def open(self, head: RequestHead, ex: Exchange, *, fresh: bool) -> Upstream:
        """The stream's pod connection. One the pod closed ends the stream unanswered
        (:class:`UpstreamGone`): the source node retries on a fresh stream, whose CONNECT
        dials the pod again (and, should that fail, moves on to another endpoint)."""
        self._authorize(ex, head.headers)
        ex.upstream = self.target.authority
        pod = self.pod
        if pod is not None and not fresh and pod.reusable():
            self._served += 1
            return Upstream(self.key, pod, reused=self._served > 1)
        if pod is not None:
            pod.close()
            self.pod = None
        raise UpstreamGone(f"the connection to {self.target.authority} was closed by the pod")

    def headers(self, head: RequestHead, ex: Exchange) -> list[Header]:
        return self._rewrite(http1.end_to_end(head.headers), ex)

    def _rewrite(self, h: list[Header], ex: Exchange) -> list[Header]:
        """What the pod gets: the forwarding headers this node vouches for; the route header, as
        any a peer sent under those names, removed (:func:`hdrs.forwarding`)."""
        if ex.header_edit is not None:  # RequestAuthentication: the token removed, the payload added
            h = ex.header_edit(h)
        ex.request_id, ex.trace_id = hdrs.trace_id_of(h)
        flow = self.flow
        return hdrs.forwarding(
            h, self.client_address, by=flow.destination.principal, client_principal=flow.source.principal
        )

    def finished(self, ex: Exchange, up: Upstream | None, reusable: bool) -> None:
        if up is not None and not reusable and self.pod is not None and up.end is self.pod:
            if ex.flags == "-":
                self.pod.close()
            else:
                self.pod.abort()
            self.pod = None
        self.inbound.reporter.request(self.flow, self.labels, ex, "http")
