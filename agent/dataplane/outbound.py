"""Outbound (port 15001): captured app connections → endpoint, direct or through HBONE.

How this works, per accepted connection (steps [2]–[4] of DESIGN §1):
the eBPF sock_ops map gives the original destination for the (peer, local)
4-tuple; the peer address names the source workload, whose identity is the
client certificate; :func:`agent.dataplane.route.decide` turns the original
destination into the service, its port's protocol and its healthy endpoints.
Then :mod:`agent.dataplane.protocol` says whether the connection is HTTP
(declared, or sniffed from the first bytes).

TCP: the service's policy picks one endpoint; a same-node endpoint is dialled
directly, another node's through the pooled tunnel; a failed connect tries the
next endpoint, up to ``max_attempts``; bytes are relayed both ways
(:mod:`agent.dataplane.tcp`) and the connection is counted with Istio's labels
(reporter=source).

HTTP/1.1: the request loop (:mod:`agent.dataplane.http.h1`) asks
:class:`OutboundHttp` for an upstream per request: the route is decided again
(a new snapshot applies to the next request), the policy picks an endpoint
(per request; LEAST_REQUEST counts requests in flight), and a pooled upstream
connection to it is reused or dialled (:mod:`agent.dataplane.http.upstream`).
Each request is counted and logged (reporter=source; for a same-node endpoint,
whose requests no other proxy sees, reporter=destination too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.control import authz
from agent.control.istio import ConnectionPool, ConsistentHash, Destination, host_fqdn
from agent.control.model import Service, Workload
from agent.control.ratelimit import ROUTE_HEADER, route_id
from agent.control.snapshot import Endpoint
from agent.dataplane import protocol
from agent.dataplane.authorize import DENIED_BODY, DENIED_FLAG, Authorizer, principal_of
from agent.dataplane.egress import Egress, Resolver
from agent.dataplane.http import headers as hdrs
from agent.dataplane.http import routing
from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.http.h1 import H1Loop, LoopConfig
from agent.dataplane.http.h2 import H2Loop
from agent.dataplane.http.h2session import H2Session
from agent.dataplane.http.hashing import Hashers
from agent.dataplane.http.normalize import (
    PathNormalization,
)
from agent.dataplane.http.outlier import Outliers
from agent.dataplane.http.upstream import H2Pool, Upstream, UpstreamPool
from agent.dataplane.lb import Balancer, Policy, endpoint_key
from agent.dataplane.podsock import open_pod
from agent.dataplane.pool import TunnelPool
from agent.dataplane.report import Flow, Party, Reporter, party
from agent.dataplane.route import Directory, Route, RouteError, UnknownDestination, decide
from agent.dataplane.tcp import SOCKET_READ_LIMIT, End, SocketEnd, TunnelEnd, relay
from agent.dataplane.tunnel import TunnelError
from agent.identity.spiffe import SpiffeId
from agent.metrics.istio import MeshMetrics, RequestLabels
from agent.proto import hbone, http1
from agent.proto.h2.connection import Headers as H2Headers
from agent.proto.http1 import Header, RequestHead
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

MAX_MIRRORS = 256  # mirror copies in flight at once; more are dropped (and counted)
MIRROR_BODY_BYTES = 64 * 1024  # a request body up to this is mirrored (with the copies in flight: 16 MiB)
MIRROR_TIMEOUT_S = 10.0

OUTBOUND_PORT = 15001

OriginalDstLookup = Callable[[tuple[str, int], tuple[str, int]], tuple[str, int] | None]
# a host service's connection (from a node address): its workload (agent/hostsvc.py)
HostSource = Callable[[tuple[str, int], tuple[str, int]], Workload | None]
NodeAddress = Callable[[str], str | None]


@dataclass(slots=True)
class _Gate:
    """A cluster's upstream connections in use (``connectionPool.tcp.maxConnections``) and the
    requests waiting for one (``http1MaxPendingRequests``), first come first served."""

    busy: int = 0
    waiting: deque[asyncio.Future[None]] = dataclasses.field(default_factory=deque)


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
    sniff_timeout_s: float = protocol.DEFAULT_SNIFF_TIMEOUT_S  # undeclared port, silent client: TCP
    http: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    # a same-node destination's requests are normalised here, as its node's inbound would
    path_normalization: PathNormalization = PathNormalization.BASE
    # outboundTrafficPolicy REGISTRY_ONLY: a destination neither in the registry nor a ServiceEntry
    # is refused (HTTP 502 NR, TCP reset; nodemesh_outbound_refused_total{reason="registry_only"})
    registry_only: bool = False


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
        upstreams: UpstreamPool | None = None,
        h2_upstreams: H2Pool | None = None,
        reporter: Reporter | None = None,
        rng: random.Random | None = None,
        authorizer: Authorizer | None = None,
        host_source: HostSource | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.config = config
        self.egress = egress or Egress(Resolver(None))  # ServiceEntry MESH_EXTERNAL endpoints
        self.host_source = host_source
        self.authorizer = authorizer or Authorizer(directory, metrics)  # same-node destinations
        self.upstreams = upstreams or UpstreamPool()
        self.h2_upstreams = h2_upstreams or H2Pool(self.upstreams.limits)
        self.reporter = reporter or Reporter(metrics)
        self.rng = rng or random.Random()
        self._table_of: Directory | None = None
        self._table: routing.RouteTable | None = None
        self.outliers = Outliers()  # outlier detection state, per cluster and endpoint
        self.in_flight: dict[str, int] = {}  # requests in flight per cluster (connectionPool)
        self.gates: dict[str, _Gate] = {}  # connections in use per cluster (connectionPool)
        self.retries: dict[str, int] = {}  # requests retrying per cluster (connectionPool.http.maxRetries)
        self.hashers = Hashers()  # consistent-hash rings and Maglev tables per endpoint set
        self._mirrors: set[asyncio.Task[None]] = set()
        self.mirrored = self.mirror_failures = self.mirrors_dropped = 0
        self.directory = directory
        self.original_dst = original_dst
        self.node_address = node_address
        self.pool = pool
        self.balancer = balancer
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusal_log = RateLimitedLog(log)  # REGISTRY_ONLY refusals: one line per 10 s

    def mirror(
        self, side: OutboundHttp, dest: Destination, namespace: str, port: int, method: str, target: str,
        headers: list[Header], body: bytes | None = None,
    ) -> None:
        """Send a copy of a request to ``dest`` (a route's ``mirror``): fire and forget, its
        response read and dropped, never waited for (Envoy's request mirroring; the copy's
        authority gets ``-shadow`` appended, as Envoy's does). At most MAX_MIRRORS at once."""
        if len(self._mirrors) >= MAX_MIRRORS:
            self.mirrors_dropped += 1
            return
        if body is not None and len(body) > MIRROR_BODY_BYTES:
            self.mirrors_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._mirror(side, dest, namespace, port, method, target, headers, body)
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    def mirror_h2(
        self, side: OutboundHttp, dest: Destination, namespace: str, port: int, headers: H2Headers,
        body: bytes | None = None,
    ) -> None:
        """As :meth:`mirror`, for an HTTP/2 request (gRPC included): the copy goes as HTTP/2."""
        if len(self._mirrors) >= MAX_MIRRORS or (body is not None and len(body) > MIRROR_BODY_BYTES):
            self.mirrors_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._mirror_h2(side, dest, namespace, port, headers, body)
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    def _mirror_endpoint(self, dest: Destination, namespace: str, port: int) -> Endpoint | None:
        table = self.route_table()
        svc = table.service_of.get(host_fqdn(dest.host, namespace))
        if svc is None:
            return None
        if dest.port:
            port = dest.port
        elif not any(p.port == port for p in svc.ports) and len(svc.ports) == 1:
            port = svc.ports[0].port
        eps, _ = routing.subset_endpoints(table, svc, port, dest.subset)
        return self.balancer.pick(f"{svc.namespace}/{svc.name}/{dest.subset}/mirror", Policy.ROUND_ROBIN, eps)

    async def _mirror_h2(
        self, side: OutboundHttp, dest: Destination, namespace: str, port: int, headers: H2Headers,
        body: bytes | None,
    ) -> None:
        session: H2Session | None = None
        st = None
        try:
            ep = self._mirror_endpoint(dest, namespace, port)
            if ep is None:
                return
            shadow = [(k, v + "-shadow" if k == ":authority" else v) for k, v in headers
                      if k != ROUTE_HEADER]  # (the route is the primary's, not the copy's)
            async with asyncio.timeout(MIRROR_TIMEOUT_S):
                session = await self.h2_upstreams.acquire(
                    (side.src_ip, ep.address, ep.port, "h2"), functools.partial(side._dial, ep)
                )
                st = session.request(shadow, end=not body)
                if body:
                    await st.write(body)
                    st.end()
                await st.headers
                while True:  # the answer, read and dropped
                    data, credit = await st.read()
                    st.ack(credit)
                    if not data and not credit:
                        break
            self.mirrored += 1
        except Exception as e:  # a mirror never affects anything: count, log at debug
            self.mirror_failures += 1
            log.debug("outbound: mirror to %s failed: %s", dest.host, e)
        finally:
            if session is not None and st is not None:
                session.forget(st)

    async def _mirror(
        self, side: OutboundHttp, dest: Destination, namespace: str, port: int, method: str, target: str,
        headers: list[Header], body: bytes | None,
    ) -> None:
        up: Upstream | None = None
        try:
            ep = self._mirror_endpoint(dest, namespace, port)
            if ep is None:
                return
            shadow = [(k, v + b"-shadow" if k == b"host" else v) for k, v in hdrs.without_route(headers)]
            async with asyncio.timeout(MIRROR_TIMEOUT_S):
                up = await self.upstreams.acquire(
                    (side.src_ip, ep.address, ep.port, "h1"), functools.partial(side._dial, ep)
                )
                framing = [(b"content-length", b"%d" % len(body))] if body is not None else []
                await up.end.write(http1.request_head(method, target, shadow, framing) + (body or b""))
                rr = http1.ResponseReader(head_only=method == "HEAD")
                while not rr.done:
                    data, credit = await up.end.read()
                    try:
                        rr.feed(data) if data else rr.eof()
                    finally:
                        up.end.ack(credit)
            self.mirrored += 1
            final = rr.final
            self.upstreams.release(up, final is not None and final.keep_alive and not rr.extra)
            up = None
        except Exception as e:  # a mirror never affects anything: count, log at debug
            self.mirror_failures += 1
            log.debug("outbound: mirror to %s failed: %s", dest.host, e)
        finally:
            if up is not None:
                self.upstreams.discard(up)

    async def take_connection(self, cluster: str, limit: int, max_pending: int) -> None:
        """A connection slot of ``cluster`` (at most ``limit`` in use): at once, or after waiting
        behind at most ``max_pending`` others (0: no bound); over that, 503 ``UO`` as Envoy's
        pending-request circuit breaker."""
        g = self.gates.get(cluster)
        if g is None:
            g = self.gates[cluster] = _Gate()
        if g.busy < limit:
            g.busy += 1
            return
        if max_pending and len(g.waiting) >= max_pending:
            raise LocalReply(503, f"upstream overflow: {g.busy} connections to {cluster} in use "
                             f"(maxConnections) and {len(g.waiting)} requests waiting "
                             "(http1MaxPendingRequests)", "UO")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        g.waiting.append(fut)
        try:
            await fut  # the slot is handed over by give_connection
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give_connection(cluster)  # handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    g.waiting.remove(fut)
            raise

    def give_connection(self, cluster: str) -> None:
        g = self.gates.get(cluster)
        if g is None:
            return
        while g.waiting:
            f = g.waiting.popleft()
            if not f.done():
                f.set_result(None)  # the slot passes on: busy stays
                return
        g.busy -= 1
        if g.busy <= 0:
            del self.gates[cluster]

    def route_table(self) -> routing.RouteTable:
        """The VirtualService/DestinationRule index of the current snapshot (built once per
        snapshot: a new directory is a new snapshot)."""
        d = self.directory()
        if self._table_of is not d:
            self._table_of, self._table = d, routing.RouteTable.build(d.snapshot)
        assert self._table is not None
        return self._table

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
        src = None
        if self.host_source is not None:
            src = self.host_source((peer[0], peer[1]), (local[0], local[1]))
        if src is not None:  # a host service: its source address is its host address
            peer = (src.address, peer[1])
        else:
            src = directory.workload_at(peer[0])
        if src is None:
            return self._fail(app, "UAEX", f"source {peer[0]} is not a registered workload")
        src_id = self.identity(src.namespace, src.service_account)
        try:
            route = decide(directory, dst_ip, dst_port)
        except RouteError as e:
            if self.config.registry_only and isinstance(e, UnknownDestination):
                return await self._refuse(app, src, src_id, peer, (dst_ip, dst_port), str(e))
            return self._fail(app, e.flag, str(e))
        wire, first = await protocol.resolve(route.protocol, app, self.config.sniff_timeout_s)
        if wire is not protocol.Wire.TCP:
            return await self._http(app, OutboundHttp(self, src, src_id, peer[0], (dst_ip, dst_port)), wire,
                                    first, peer)
        pool: ConnectionPool | None = None
        if route.service is not None and self.route_table().applies(route.service):
            try:  # a VirtualService's tcp routes, a DestinationRule's policy
                plan = routing.decide_tcp(self.route_table(), route.service, route.port, src, self.rng)
            except LocalReply as e:
                return self._fail(app, e.flag, str(e))
            if plan is not None:
                route = Route(plan.service, plan.port, plan.endpoints, plan.policy, route.protocol)
                pool = plan.pool
            else:
                pool = self._tcp_pool(route)
        if not route.endpoints:
            return self._fail(app, "UH", f"service {route.service_key} has no healthy endpoint")
        if pool is not None and pool.max_connections:
            g = self.gates.get(route.service_key)
            if g is not None and g.busy >= pool.max_connections:
                return self._fail(app, "UO", f"upstream overflow: {g.busy} connections to "
                                  f"{route.service_key} open (maxConnections)")
            self.gates.setdefault(route.service_key, _Gate()).busy += 1
            try:
                return await self._tcp(app, src, src_id, route, first, peer, dst_ip, pool)
            finally:
                self.give_connection(route.service_key)
        return await self._tcp(app, src, src_id, route, first, peer, dst_ip, pool)

    async def _refuse(self, app: SocketEnd, src: Workload, src_id: SpiffeId, peer: tuple[str, int],
                      dst: tuple[str, int], why: str) -> None:
        """outboundTrafficPolicy REGISTRY_ONLY, an unknown destination (Envoy's BlackHoleCluster):
        counted, logged (one line per 10 s), HTTP answered 502 ``NR`` per request, TCP reset."""
        self.metrics.outbound_refused.labels("registry_only").inc()
        self.refusal_log.log(logging.WARNING, "registry_only", "outbound: refused %s -> %s:%d: %s "
                             "(outboundTrafficPolicy REGISTRY_ONLY; add a ServiceEntry for it)",
                             src.name, dst[0], dst[1], why)
        wire, first = await protocol.resolve(None, app, self.config.sniff_timeout_s)
        if wire is protocol.Wire.TCP:
            return self._fail(app, "NR", f"{why} (REGISTRY_ONLY)")
        return await self._http(app, OutboundHttp(self, src, src_id, peer[0], dst, refused=why), wire, first,
                                peer)

    async def _http(self, app: SocketEnd, side: OutboundHttp, wire: protocol.Wire, first: bytes,
                    peer: tuple[str, int]) -> None:
        """The request loop of an HTTP/1.1 or HTTP/2 client connection."""
        self.metrics.active_outbound.inc()
        try:
            if wire is protocol.Wire.HTTP1:
                await H1Loop(app, side, self.config.http).run(first)
            else:
                await H2Loop(app, side, name=f"from {peer[0]}:{peer[1]}",
                             retry_buffer_bytes=self.config.http.retry_buffer_bytes).run(first)
        finally:
            self.metrics.active_outbound.dec()

    def _tcp_pool(self, route: Route) -> ConnectionPool | None:
        """The connectionPool of the DestinationRule for a TCP connection's service port."""
        svc = route.service
        if svc is None:
            return None
        rule = self.route_table().rule(svc)
        return rule.resolve(route.port, "").pool if rule is not None else None

    async def _tcp(
        self, app: SocketEnd, src: Workload, src_id: SpiffeId, route: Route, first: bytes,
        peer: tuple[str, int], dst_ip: str, pool: ConnectionPool | None,
    ) -> None:
        directory = self.directory()
        tried: set[tuple[str, int]] = set()
        last_error = ""
        timeout = pool.connect_timeout_s if pool is not None else None
        for _ in range(self.config.max_attempts):
            ep = self.balancer.pick(
                route.service_key or dst_ip, route.policy, route.endpoints, frozenset(tried)
            )
            if ep is None:
                break
            tried.add(endpoint_key(ep))
            dst_id = self.identity(ep.namespace, ep.service_account)
            flow = Flow(
                "source",
                party(src, src_id.uri),
                party(directory.workload_for(ep.address, ep.port), "" if ep.external else dst_id.uri,
                      namespace=ep.namespace),
                route.service,
                mutual_tls=ep.node != self.config.node and not ep.external,
            )
            local = directory.workload_for(ep.address, ep.port) if ep.node == self.config.node else None
            facts = None
            release: Callable[[], None] | None = None  # a RateLimitPolicy's connection slot
            if local is not None:  # a same-node destination: its policies are judged here
                facts = authz.Facts(principal=principal_of(src_id.uri), namespace=src.namespace,
                                    source_ip=peer[0], destination_ip=ep.address, destination_port=ep.port)
                v = self.authorizer.check(local, facts)
                if v is not None and not v.allowed:
                    return self._fail(app, DENIED_FLAG, f"{DENIED_BODY}: {v.why}")
                if self.authorizer.limits is not None:  # and its rate limits
                    release, why = self.authorizer.limits.admit_connection(local, ep.port)
                    if release is None:
                        return self._fail(app, "RL", why)
            try:
                upstream = await self._connect(ep, src_id, dst_id, peer[0], peer[1], timeout)
            except (OSError, TunnelError, TimeoutError) as e:
                if release is not None:
                    release()
                last_error = f"{ep.address}:{ep.port}: {e}"
                log.info("outbound: endpoint %s failed: %s; trying the next", ep.workload, e)
                continue
            if first:
                try:
                    await upstream.write(first)
                except (OSError, TunnelError) as e:
                    upstream.abort()
                    if release is not None:
                        release()
                    return self._fail(app, "UC", f"{ep.address}:{ep.port}: {e}")
            token = self.authorizer.opened(local, facts, app.abort) if local and facts else 0
            try:
                await self._relay(app, upstream, ep, flow, len(first))
            finally:
                if token:
                    self.authorizer.closed(token)
                if release is not None:
                    release()
            return None
        return self._fail(app, "UF", f"no endpoint of {route.service_key or dst_ip} reachable ({last_error})")

    async def _connect(
        self, ep: Endpoint, src_id: SpiffeId, dst_id: SpiffeId, src_ip: str, src_port: int = 0,
        timeout_s: float | None = None, parsed: bool = False,
    ) -> End:
        """A connection to ``ep``, within ``timeout_s`` (the destination's connectTimeout) or the
        proxy's connect timeout; ``parsed``: for requests this agent parses (said in the CONNECT)."""
        timeout_s = timeout_s or self.config.connect_timeout_s
        if ep.external:  # a ServiceEntry's MESH_EXTERNAL endpoint: no agent there, plain TCP
            return await self.egress.dial(ep, timeout_s)
        if ep.node == self.config.node:
            async with asyncio.timeout(timeout_s):
                r, w = await open_pod(ep.address, ep.port, self.config.proxy_mark, limit=SOCKET_READ_LIMIT)
            return SocketEnd(r, w)
        node_addr = self.node_address(ep.node)
        if node_addr is None:
            raise TunnelError(f"node {ep.node!r} of workload {ep.workload} has no known address")
        # (a pooled HTTP upstream stream carries many client connections: no one port)
        headers = hbone.connect_headers(hbone.Target(ep.address, ep.port), src_ip, src_port)
        if parsed:
            headers.append(hdrs.PARSED)
        async with asyncio.timeout(timeout_s):
            stream = await self.pool.open_stream(src_id, dst_id, node_addr, headers, self.config.hbone_port)
        return TunnelEnd(stream)

    async def _relay(self, app: SocketEnd, upstream: End, ep: Endpoint, flow: Flow, sent: int) -> None:
        labels = flow.conn_labels()
        start = time.monotonic()
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
        self.metrics.closed(final, res.sent_bytes + sent, res.received_bytes)
        self.reporter.tcp(
            flow, final, res.sent_bytes + sent, res.received_bytes, (time.monotonic() - start) * 1000,
            f"{ep.address}:{ep.port}",
        )

    async def drain(self, timeout_s: float) -> None:
        """Let open connections finish for up to ``timeout_s``, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for t in pending:
                t.cancel()


def chosen_route(ex: Exchange) -> str:
    """The VirtualService route chosen for ``ex`` as :data:`ROUTE_HEADER` names it ("": none, or
    a route without a name)."""
    plan = ex.plan
    if isinstance(plan, routing.Decision) and plan.vs is not None and plan.route is not None \
            and plan.route.name:
        return route_id(plan.vs.namespace, plan.vs.name, plan.route.name)
    return ""


def _count_down(counts: dict[str, int], key: str) -> None:
    """One less for ``key`` in a per-cluster count (circuit breakers); none left: no entry."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


@dataclass(slots=True)
class _Choice:
    """The endpoint a request went to, and the labels its report carries."""

    endpoint: Endpoint
    flow: Flow
    labels: RequestLabels
    same_node: tuple[Flow, RequestLabels] | None  # also reported as the destination


class OutboundHttp:
    """The source node's side of the request loop, for one app connection."""

    bound = False

    def __init__(
        self, out: Outbound, src: Workload, src_id: SpiffeId, src_ip: str, dst: tuple[str, int],
        refused: str = "",
    ) -> None:
        self.out = out
        self.src = src
        self.src_id = src_id
        self.src_party = party(src, src_id.uri)
        self.src_ip = src_ip
        self.forwarded_for = src_ip  # x-forwarded-for (a gateway: its client's address)
        self.dst = dst
        self.refused = refused  # REGISTRY_ONLY refused the destination: every request 502 NR
        self._choices: dict[tuple[tuple[str, int], str, str], _Choice] = {}
        self._route: Route | None = None

    def _decide(self) -> Route:
        if self.refused:
            raise LocalReply(502, f"{self.refused} (outboundTrafficPolicy REGISTRY_ONLY)", "NR")
        try:
            route = decide(self.out.directory(), *self.dst)
        except RouteError as e:
            raise LocalReply(404 if e.flag == "NR" else 503, str(e), e.flag) from None
        if route is not self._route:  # a new snapshot: labels may have changed
            self._route = route
            self._choices.clear()
        return route

    def _choice(self, service: Service | None, ep: Endpoint) -> _Choice:
        key = (endpoint_key(ep), *((service.namespace, service.name) if service is not None else ("", "")))
        c = self._choices.get(key)
        if c is None:
            out = self.out
            dst_id = out.identity(ep.namespace, ep.service_account)
            dst = party(out.directory().workload_for(ep.address, ep.port), "" if ep.external else dst_id.uri,
                        namespace=ep.namespace)
            remote = ep.node != out.config.node
            flow = Flow("source", self.src_party, dst, service, mutual_tls=remote and not ep.external)
            same = None
            if not remote:
                dflow = Flow("destination", self.src_party, dst, service, mutual_tls=False)
                same = (dflow, dflow.request_labels())
            c = self._choices[key] = _Choice(ep, flow, flow.request_labels(), same)
        return c

    async def open(self, head: RequestHead, ex: Exchange, *, fresh: bool) -> Upstream:
        return await self._open(ex, fresh, "h1", head.headers, "http")  # type: ignore[return-value]

    async def open_h2(self, ex: Exchange, headers: H2Headers, *, fresh: bool) -> H2Session:
        regular = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers if not k.startswith(":")]
        scheme = next((v for k, v in headers if k == ":scheme"), "http")
        return await self._open(ex, fresh, "h2", regular, scheme)  # type: ignore[return-value]

    def _plan(
        self, route: Route, ex: Exchange, headers: list[Header], scheme: str
    ) -> routing.Decision | None:
        """The VirtualService decision for this request, or None when no VirtualService applies
        to the service (then the request goes to the service itself: no per-request cost)."""
        svc = route.service
        if svc is None:
            return None
        table = self.out.route_table()
        if not table.applies(svc):
            return None  # (a DestinationRule alone applies too: its policy, its outlier detection)
        facts = routing.RequestFacts(
            ex.method, ex.path, ex.authority, scheme, routing.LazyHeaders(headers), route.port, self.src
        )
        return self._take(routing.decide(table, svc, facts, self.out.rng), facts, ex, table)

    def _take(
        self, plan: routing.Decision, facts: routing.RequestFacts, ex: Exchange, table: routing.RouteTable
    ) -> routing.Decision:
        """What a route decision sets on the exchange: CORS, hash key, timeout, rewrite, retries."""
        ex.plan = plan
        if plan.route is not None and plan.route.cors is not None:
            answer, extra = routing.cors(plan.route.cors, facts, table.matcher)
            if answer:  # a preflight: the proxy answers it
                raise LocalReply(200, "", "-", headers=tuple(extra))
            ex.response_extra = extra or None
        if plan.consistent_hash is not None:
            ex.hash_key = self._hash_key(plan.consistent_hash, facts, ex)
        ex.timeout_s = plan.timeout_s
        if plan.path is not None:
            ex.target = plan.path
        if plan.route is not None:
            ex.retry = plan.route.retries
        return plan

    def _hash_key(self, ch: ConsistentHash, facts: routing.RequestFacts, ex: Exchange) -> str | None:
        """The request's consistent-hash key (:func:`routing.hash_key`); a cookie with a ttl the
        request does not carry is made up and set on the response, as Envoy does."""
        key = routing.hash_key(ch, facts, self.src_ip)
        if key is not None or ch.key != "cookie" or ch.cookie_ttl_s is None:
            return key
        value = f"{self.out.rng.getrandbits(64):016x}"
        attrs = f"; Max-Age={int(ch.cookie_ttl_s)}" + (f"; Path={ch.cookie_path}" if ch.cookie_path else "")
        ex.set_cookie = f'{ch.name}="{value}"{attrs}; HttpOnly'
        return value

    async def _inject(self, ex: Exchange, plan: routing.Decision, grpc: bool) -> None:
        """The route's fault: a delay (flag ``DI``) and/or an abort (``FI``), each for its
        percentage of requests, as Envoy's fault filter."""
        f = plan.route.fault if plan.route is not None else None
        if f is None:
            return
        rng = self.out.rng
        if f.delay_percent and rng.uniform(0, 100) < f.delay_percent:
            ex.flags = "DI"
            await asyncio.sleep(f.delay_s)
        if f.abort_percent and rng.uniform(0, 100) < f.abort_percent:
            if grpc and f.abort_grpc_status:
                raise LocalReply(200, "fault filter abort", "FI", grpc_status=f.abort_grpc_status)
            raise LocalReply(f.abort_status or 503, "fault filter abort", "FI")

    async def _open(
        self, ex: Exchange, fresh: bool, kind: str, headers: list[Header], scheme: str
    ) -> Upstream | H2Session:
        """Decide the route (a VirtualService's, if one applies), pick an endpoint (per request)
        and get a pooled upstream to it; a connect failure tries the next endpoint, up to
        ``max_attempts``."""
        out = self.out
        route = self._decide()
        plan = ex.plan if isinstance(ex.plan, routing.Decision) else self._plan(route, ex, headers, scheme)
        if plan is not None and plan.route is not None and plan.route.fault is not None and ex.tries == 0 \
                and not fresh:
            await self._inject(ex, plan, any(k == b"content-type" and v.startswith(b"application/grpc")
                                             for k, v in headers))
        service: Service | None
        if plan is not None:
            service, endpoints, policy, bkey = plan.service, plan.endpoints, plan.policy, plan.balancer_key
        else:
            service, endpoints, policy = route.service, route.endpoints, route.policy
            bkey = route.service_key or self.dst[0]
        if plan is not None and plan.max_requests and ex.tries == 0 and not ex.holds_slot:
            n = out.in_flight.get(bkey, 0)
            if n >= plan.max_requests:  # Envoy's circuit breaker: overflow, not a queue
                raise LocalReply(
                    503, f"upstream overflow: {n} requests in flight to {bkey} (http2MaxRequests)", "UO"
                )
            out.in_flight[bkey] = n + 1
            ex.holds_slot = True
        pool = plan.pool if plan is not None else None
        if pool is not None and pool.max_retries and ex.retry is not None and ex.retry_gate is None:
            ex.retry_gate = functools.partial(self._may_retry, ex, bkey, pool.max_retries)
        if pool is not None and pool.max_connections and kind == "h1" and not ex.conn_slot:
            # (an HTTP/1.1 upstream connection carries one request at a time: a request holds one)
            await out.take_connection(bkey, pool.max_connections, pool.max_pending)
            ex.conn_slot = bkey
        if plan is not None and plan.outlier is not None:
            endpoints = out.outliers.available(bkey, endpoints, plan.outlier)
            if plan.locality_lb:
                endpoints = routing.by_locality(endpoints, self.src.locality)
        if not endpoints:
            what = f"{service.namespace}/{service.name}" if service is not None else self.dst[0]
            why = f"no healthy upstream: service {what} has no healthy endpoint"
            raise LocalReply(503, why, "UH")
        tried: set[tuple[str, int]] = set(ex.tried or ())
        last_error = ""
        ch = plan.consistent_hash if plan is not None else None
        for _ in range(out.config.max_attempts):
            if ch is not None and ex.hash_key is not None:
                ep = out.hashers.pick(bkey, endpoints, ch.algorithm, ch.size, ex.hash_key, frozenset(tried))
            else:
                ep = out.balancer.pick(bkey, policy, endpoints, frozenset(tried))
            if ep is None and ex.tried and tried == ex.tried:  # a retry with every endpoint tried
                ep = out.balancer.pick(bkey, policy, endpoints)
            if ep is None:
                break
            tried.add(endpoint_key(ep))
            c = self._choice(service, ep)
            ex.state = c
            ex.upstream = f"{ep.address}:{ep.port}"
            out.balancer.started(ep)  # LEAST_REQUEST: requests in flight
            if ep.node == out.config.node:
                self._authorize_local(ex, ep, headers)
            key = (self.src_ip, ep.address, ep.port, kind)
            dial = functools.partial(self._dial, ep, pool.connect_timeout_s if pool is not None else None)
            try:
                if kind == "h2":
                    return await out.h2_upstreams.acquire(key, dial, fresh=fresh)
                up = await out.upstreams.acquire(key, dial, fresh=fresh)
                if pool is not None:
                    up.max_requests = pool.max_requests_per_connection
                    up.idle_timeout_s = pool.idle_timeout_s or 0.0
                return up
            except (OSError, TunnelError, TimeoutError) as e:
                out.balancer.finished(ep)
                ex.state = None
                if plan is not None and plan.outlier is not None:  # a connect failure: local origin
                    out.outliers.observe(bkey, endpoint_key(ep), 0, "UF", plan.outlier, len(plan.endpoints))
                last_error = f"{ep.address}:{ep.port}: {e}"
                log.info("outbound: endpoint %s failed: %s; trying the next", ep.workload, e)
        ex.upstream = ""
        what = bkey
        raise LocalReply(503, f"upstream connect error: no endpoint of {what} reachable ({last_error})", "UF")

    def _may_retry(self, ex: Exchange, cluster: str, limit: int) -> bool:
        """connectionPool.http.maxRetries: at most ``limit`` requests of the cluster retrying at
        once (a request counts from its first retry until it ends)."""
        if ex.retrying:
            return True
        n = self.out.retries.get(cluster, 0)
        if n >= limit:
            return False
        self.out.retries[cluster] = n + 1
        ex.retrying = cluster
        return True

    def _authorize_local(self, ex: Exchange, ep: Endpoint, headers: list[Header]) -> None:
        """A same-node destination: no other proxy sees the request, so what its node's inbound
        would do is done here (:meth:`Authorizer.judge_request`)."""
        out = self.out

        def conn() -> authz.Facts:
            return authz.Facts(principal=principal_of(self.src_id.uri), namespace=self.src.namespace,
                               source_ip=self.src_ip, destination_ip=ep.address, destination_port=ep.port)

        out.authorizer.judge_request(out.directory().workload_for(ep.address, ep.port), conn, ex, headers,
                                     out.config.path_normalization, chosen_route(ex))

    async def _dial(self, ep: Endpoint, timeout_s: float | None = None) -> End:
        out = self.out
        dst_id = out.identity(ep.namespace, ep.service_account)
        return await out._connect(ep, self.src_id, dst_id, self.src_ip, timeout_s=timeout_s, parsed=True)

    def headers(self, head: RequestHead, ex: Exchange) -> list[Header]:
        h = http1.end_to_end(head.headers)
        plan = ex.plan
        if isinstance(plan, routing.Decision):
            if plan.authority is not None:
                h = [(k, v) for k, v in h if k != b"host"] + [(b"host", plan.authority.encode("latin-1"))]
            h = routing.apply_ops(h, plan.request_ops)
        out = self._rewrite(h, ex)
        route = plan.route if isinstance(plan, routing.Decision) else None
        if route is not None and route.mirror is not None and not ex.mirrored:
            ex.mirrored = True  # (once per request, whatever the tries)
            assert isinstance(plan, routing.Decision) and plan.vs is not None
            if route.mirror_percent >= 100 or self.out.rng.uniform(0, 100) < route.mirror_percent:
                mirror = functools.partial(self.out.mirror, self, route.mirror, plan.vs.namespace, plan.port,
                                           head.method, ex.target or head.target, out)
                if not head.has_body:
                    mirror()
                elif head.content_length is not None and head.content_length > MIRROR_BODY_BYTES:
                    self.out.mirrors_dropped += 1
                else:  # sent once the whole body has passed (the request loop keeps a copy)
                    ex.on_body = lambda body: mirror(body=body)
        return out

    def headers_h2(self, headers: H2Headers, ex: Exchange, *, ended: bool = False) -> H2Headers:
        """The request headers to send upstream; ``ended``: the request has no body to follow
        (then a mirror copy goes at once, else once its body has passed)."""
        pseudo, regular = hdrs.split_h2(headers)
        plan = ex.plan
        if ex.target:  # rewritten by the route, or normalised for a same-node destination
            pseudo = [(k, ex.target if k == ":path" else v) for k, v in pseudo]
        if isinstance(plan, routing.Decision):
            if plan.authority is not None:
                pseudo = [(k, plan.authority if k == ":authority" else v) for k, v in pseudo]
            regular = routing.apply_ops(regular, plan.request_ops)
        out = hdrs.join_h2(pseudo, self._rewrite(regular, ex))
        route = plan.route if isinstance(plan, routing.Decision) else None
        if route is not None and route.mirror is not None and not ex.mirrored:
            ex.mirrored = True
            assert isinstance(plan, routing.Decision) and plan.vs is not None
            if route.mirror_percent >= 100 or self.out.rng.uniform(0, 100) < route.mirror_percent:
                mirror = functools.partial(self.out.mirror_h2, self, route.mirror, plan.vs.namespace,
                                           plan.port, out)
                if ended:
                    mirror()
                else:  # sent once the whole body has passed (the request loop keeps a copy)
                    ex.on_body = lambda body: mirror(body=body)
        return out

    def _observe(self, ex: Exchange, c: _Choice, status: int, flags: str) -> None:
        plan = ex.plan
        if isinstance(plan, routing.Decision) and plan.outlier is not None:
            ep = c.endpoint
            if self.out.outliers.observe(plan.balancer_key, endpoint_key(ep), status, flags, plan.outlier,
                                         len(plan.endpoints)):
                log.info("outbound: endpoint %s ejected by outlier detection of %s", ep.workload,
                         plan.balancer_key)

    def abandon(self, ex: Exchange, up: Upstream) -> None:
        """A try to be retried: its connection is dropped, its endpoint not tried again while
        another is left (Istio's retries go to another host)."""
        self.out.upstreams.discard(up)
        self.abandon_h2(ex, None)

    def abandon_h2(self, ex: Exchange, session: H2Session | None) -> None:
        """As :meth:`abandon` for an HTTP/2 try (its stream was reset; the shared session stays)."""
        c = ex.state
        if isinstance(c, _Choice):
            self._observe(ex, c, ex.status or 503, "UC" if not ex.status else "-")
            self.out.balancer.finished(c.endpoint)
            if ex.tried is None:
                ex.tried = set()
            ex.tried.add(endpoint_key(c.endpoint))
        ex.state = None

    def response_headers(self, ex: Exchange, headers: list[Header]) -> list[Header]:
        plan = ex.plan
        if isinstance(plan, routing.Decision) and plan.response_ops:
            headers = routing.apply_ops(headers, plan.response_ops)
        if ex.set_cookie:
            headers = [*headers, (b"set-cookie", ex.set_cookie.encode("latin-1"))]
        if ex.response_extra:
            drop = {k for k, _ in ex.response_extra}
            headers = [(k, v) for k, v in headers if k not in drop] + ex.response_extra
        return headers

    def _rewrite(self, h: list[Header], ex: Exchange) -> list[Header]:
        h, ex.request_id, ex.trace_id = hdrs.tracing(h, self.out.rng)
        c = ex.state
        if isinstance(c, _Choice) and c.endpoint.external:  # outside the mesh (a ServiceEntry): the app's
            # headers as it sent them but a route header, no pod address or identity added (as Envoy's egress)
            return hdrs.without_route(h)
        same_node = isinstance(c, _Choice) and c.same_node is not None
        if same_node and ex.header_edit is not None:  # the destination's RequestAuthentication
            h = ex.header_edit(h)
        out = hdrs.forwarding(  # (an app's route header removed too)
            h,
            self.forwarded_for,
            by=c.flow.destination.principal if same_node and isinstance(c, _Choice) else "",
            client_principal=self.src_id.uri if same_node else "",
        )
        # through HBONE: the route chosen here, for the destination's route-targeted rate limits
        return out if same_node or not isinstance(c, _Choice) else hdrs.with_route(out, chosen_route(ex))

    def finished(self, ex: Exchange, up: Upstream | None, reusable: bool) -> None:
        if up is not None:
            if ex.flags == "-" or reusable:
                self.out.upstreams.release(up, reusable)
            else:
                self.out.upstreams.discard(up)
        self._report(ex, "http")

    def finished_h2(self, ex: Exchange, session: H2Session | None, grpc: bool) -> None:
        self._report(ex, "grpc" if grpc else "http")

    def _report(self, ex: Exchange, request_protocol: str) -> None:
        out = self.out
        if ex.holds_slot and isinstance(ex.plan, routing.Decision):
            _count_down(out.in_flight, ex.plan.balancer_key)
            ex.holds_slot = False
        if ex.conn_slot:
            out.give_connection(ex.conn_slot)
            ex.conn_slot = ""
        if ex.retrying:
            _count_down(out.retries, ex.retrying)
            ex.retrying = ""
        c = ex.state
        if isinstance(c, _Choice):
            out.balancer.finished(c.endpoint)
            self._observe(ex, c, ex.status, ex.flags)
            out.reporter.request(c.flow, c.labels, ex, request_protocol)
            if c.same_node is not None:
                out.reporter.request(c.same_node[0], c.same_node[1], ex, request_protocol)
        else:
            plan = ex.plan
            route = self._route
            svc = plan.service if isinstance(plan, routing.Decision) else (route.service if route else None)
            flow = Flow("source", self.src_party, Party(), svc, mutual_tls=False)
            out.reporter.request(flow, flow.request_labels(), ex, request_protocol)
