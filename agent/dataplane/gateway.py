"""The ingress gateway: listeners for the Gateways this agent serves, and their traffic.

How this works: an agent whose ``agent.yaml`` has a ``gateway:`` section runs
:meth:`IngressGateway.run`. When a new snapshot arrives it builds a
:class:`~agent.dataplane.gatewayplan.GatewayTable` (which Gateways select this
gateway's labels, their servers by port, the VirtualServices bound to them) and
opens or closes one listener per server port on ``gateway.address``. A
connection is served by its port's kind, looked up when it is accepted:

- ``http``: the request loops of the node proxy (:mod:`agent.dataplane.http.h1`,
  ``h2``; HTTP/2 by prior knowledge) with :class:`GatewayHttp`, the outbound
  side whose route comes from the gateway's table by Host instead of from a
  service VIP; everything else (weights, retries, timeouts, faults, headers,
  rewrites, redirects, mirrors, outlier detection, endpoints over HBONE or
  direct, reporter=source metrics, access log) is the outbound's own code.
- ``https``: the ClientHello is peeked (never consumed) for its SNI, which picks
  the server and so its ``credentialName``; TLS is then terminated on the socket
  with that server's context (:class:`Credentials`: ``<dir>/<name>.crt``,
  ``<name>.key``, for MUTUAL ``<name>-ca.crt``, read again when the files change;
  connections already open keep their handshake); ALPN offers HTTP/1.1, and HTTP/2 too
  where every route of the server leads to a port declared ``http2`` or ``grpc``
  (requests keep their protocol upstream).
- ``tls`` (PASSTHROUGH): the peeked SNI picks a VirtualService ``tls`` route; the
  bytes, ClientHello included, are relayed to the endpoint untouched.
- ``tcp``: the bound VirtualServices' ``tcp`` routes.

Upstream, the gateway is a workload of its own (``gateway.namespace``,
``service_account``): other nodes' endpoints are reached through HBONE with its
SPIFFE identity, so the destination's AuthorizationPolicies judge it; same-node
endpoints are dialled directly and judged here, as for a same-node pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.admin import listen_tcp
from agent.control.gateway import ServerTls, credential_files
from agent.control.model import Protocol, Workload
from agent.dataplane import gatewayplan, protocol
from agent.dataplane.gatewayplan import GatewayConfig
from agent.dataplane.http import routing
from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.http.h1 import H1Loop
from agent.dataplane.http.h2 import H2Loop
from agent.dataplane.http.upstream import Upstream
from agent.dataplane.lb import Policy
from agent.dataplane.listener import Listener
from agent.dataplane.outbound import Outbound, OutboundHttp
from agent.dataplane.route import Directory, Route
from agent.dataplane.tcp import SOCKET_READ_LIMIT, SocketEnd
from agent.identity.spiffe import SpiffeId
from agent.proto.http1 import Header, RequestHead
from agent.proto.tls_hello import MAX_RECORD_BYTES, NotTls, client_hello_sni
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0  # ClientHello and TLS handshake, each
CREDENTIAL_RECHECK_S = 0.5  # how often a credential's files are looked at (stat) for changes
RETRY_LISTEN_S = 1.0  # a port that could not be opened (a predecessor still draining) is tried again


class CredentialError(Exception):
    """A server's credential cannot be used (files missing or unreadable, key not matching)."""


@dataclass(slots=True)
class _Loaded:
    signature: tuple[tuple[int, int, int], ...]
    context: ssl.SSLContext
    checked_s: float


class Credentials:
    """TLS server contexts by credentialName from files in one directory: ``<name>.crt`` (the
    chain), ``<name>.key``, and for MUTUAL ``<name>-ca.crt`` (the CAs client certificates must
    chain to). The files are looked at again at most every CREDENTIAL_RECHECK_S; a change
    (replace them by rename, as Kubernetes does with mounted secrets) builds a new context for
    the next handshakes. Files that do not load keep the last good context serving (logged)."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.clock = clock
        self._cache: dict[tuple[str, str, str, tuple[str, ...]], _Loaded] = {}
        self.reloads = 0
        self.rlog = RateLimitedLog(log)

    def paths(self, tls: ServerTls) -> tuple[str, ...]:
        return tuple(os.path.join(self.directory, f) for f in credential_files(tls))

    def context(self, tls: ServerTls, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        """The server context for ``tls``'s credential, offering ``alpn`` (none: no ALPN)."""
        key = (tls.credential_name, tls.mode, tls.min_protocol_version, alpn)
        entry = self._cache.get(key)
        now = self.clock()
        if entry is not None and now - entry.checked_s < CREDENTIAL_RECHECK_S:
            return entry.context
        paths = self.paths(tls)
        try:
            sig = tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, paths))
            if entry is not None and entry.signature == sig:
                entry.checked_s = now
                return entry.context
            ctx = server_context(tls, paths, alpn)
        except (OSError, ssl.SSLError) as e:
            reason = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
            why = f"credential {tls.credential_name!r} in {self.directory}: {reason}"
            if entry is None:
                raise CredentialError(why) from None
            entry.checked_s = now  # keep serving the last good one
            self.rlog.warning(f"credential {tls.credential_name}", "gateway: %s; the previous certificate "
                              "keeps serving", why)
            return entry.context
        if entry is not None:
            self.reloads += 1
            log.info("gateway: credential %r reloaded", tls.credential_name)
        self._cache[key] = _Loaded(sig, ctx, now)
        return ctx


def server_context(tls: ServerTls, paths: tuple[str, ...], alpn: tuple[str, ...] = ("http/1.1",),
                   ) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_protocol_version == "TLSV1_3" \
        else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(paths[0], paths[1])
    if tls.mode == "MUTUAL":
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(paths[2])
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def peek_sni(sock: socket.socket, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """The SNI of the ClientHello waiting on ``sock`` ("" if none), read with MSG_PEEK so the
    bytes stay for the handshake or the relay. NotTls, ConnectionError, TimeoutError."""
    loop = asyncio.get_running_loop()
    seen = -1
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                data = sock.recv(MAX_RECORD_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                await _readable(loop, sock)
                continue
            if not data:
                raise ConnectionError("closed before its ClientHello")
            sni = client_hello_sni(data)
            if sni is not None:
                return sni
            if len(data) == seen:  # the rest of the record is on its way (the socket stays readable)
                await asyncio.sleep(0.005)
            seen = len(data)


class GatewayHttp(OutboundHttp):
    """The outbound side of the request loops for one gateway client connection: the route
    comes from the gateway's Host rules; the source is the gateway's workload."""

    def __init__(self, gw: IngressGateway, client_ip: str, port: int, scheme: str) -> None:
        super().__init__(gw.outbound, gw.workload(), gw.identity, gw.config.address,
                         (gw.config.address, port))
        self.gw = gw
        self.forwarded_for = client_ip
        self.port = port
        self.scheme = scheme
        self._proto = scheme.encode("ascii")
        self._none = Route(None, port, (), Policy.ROUND_ROBIN)

    def _decide(self) -> Route:
        return self._none  # (every gateway request has a plan or a LocalReply)

    async def open(self, head: RequestHead, ex: Exchange, *, fresh: bool) -> Upstream:
        return await self._open(ex, fresh, "h1", head.headers, self.scheme)  # type: ignore[return-value]

    def _rewrite(self, h: list[Header], ex: Exchange) -> list[Header]:
        """The outbound's forwarding headers, and ``x-forwarded-proto`` as the gateway received
        the request (what a client sent under that name is replaced, as Envoy's edge does)."""
        out = [(k, v) for k, v in super()._rewrite(h, ex) if k != b"x-forwarded-proto"]
        out.append((b"x-forwarded-proto", self._proto))
        return out

    def _plan(self, route: Route, ex: Exchange, headers: list[Header], scheme: str) -> routing.Decision:
        table = self.gw.table()
        hit = gatewayplan.http_target(table, self.port, ex.authority)
        if hit.vs is None:
            raise gatewayplan.https_redirect(ex.authority, ex.path)
        rt = self.out.route_table()
        facts = routing.RequestFacts(ex.method, ex.path, ex.authority, scheme, routing.LazyHeaders(headers),
                                     self.port, self.src)
        return self._take(routing.decide_route(rt, hit.vs, facts, self.out.rng), facts, ex, rt)


@dataclass(slots=True)
class _Port:
    sock: socket.socket
    listener: Listener
    task: asyncio.Task[None]


@dataclass(slots=True)
class IngressGateway:
    config: GatewayConfig
    node: str
    trust_domain: str
    outbound: Outbound
    directory: Callable[[], Directory]
    reserved_ports: frozenset[int] = frozenset()
    rng: random.Random = field(default_factory=random.Random)
    credentials: Credentials = field(init=False)
    identity: SpiffeId = field(init=False)
    ports: dict[int, _Port] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)  # port -> why it is not served
    _table: gatewayplan.GatewayTable | None = None
    _table_of: Directory | None = None
    _rlog: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))
    _conns: set[asyncio.Task[object]] = field(default_factory=set)  # connections being served

    def __post_init__(self) -> None:
        self.credentials = Credentials(self.config.credentials_dir)
        self.identity = SpiffeId(self.trust_domain, self.config.namespace, self.config.service_account)

    def table(self) -> gatewayplan.GatewayTable:
        d = self.directory()
        if self._table is None or self._table_of is not d:
            old = self._table.refused if self._table is not None else ()
            self._table_of = d
            self._table = gatewayplan.GatewayTable.build(d.snapshot, self.config.labels, self.reserved_ports)
            self._table.routes = self.outbound.route_table()  # (the mesh's, for this same snapshot)
            for why in set(self._table.refused) - set(old):
                log.error("gateway: not served: %s", why)
        return self._table

    def workload(self) -> Workload:
        """The gateway as a source: the registered workload at its address (labels for metrics),
        else one made from the config."""
        c = self.config
        w = self.directory().workload_at(c.address)
        if w is not None and (w.namespace, w.service_account) == (c.namespace, c.service_account):
            return w
        return Workload(c.name, c.namespace, c.address, self.node, c.service_account, dict(c.labels))

    def status(self) -> dict[str, object]:
        t = self.table()
        return {"address": self.config.address, "identity": self.identity.uri,
                "ports": {str(p): t.ports[p].kind for p in sorted(self.ports) if p in t.ports},
                "problems": {str(p): why for p, why in sorted(self.problems.items())},
                "refused": list(t.refused), "credential_reloads": self.credentials.reloads}

    def problem_lines(self) -> list[str]:
        """What readiness and status report: each port the gateway should serve and cannot."""
        return [f"gateway port {p}: {why}" for p, why in sorted(self.problems.items())]

    # -- listeners -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, drain_s: float = 10.0) -> None:
        """Keep one listener per served port, following the snapshots, until ``stop``; then stop
        accepting and let open connections finish for up to ``drain_s``."""
        retry_at = 0.0
        seen: gatewayplan.GatewayTable | None = None
        try:
            while not stop.is_set():
                t = self.table()
                if t is not seen or (self.problems and time.monotonic() >= retry_at):
                    seen = t
                    self.sync(t)
                    retry_at = time.monotonic() + RETRY_LISTEN_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
        finally:
            await self.close(drain_s)

    def sync(self, t: gatewayplan.GatewayTable) -> None:
        for port in [p for p in self.ports if p not in t.ports]:
            self._stop(port)
        self.problems = {p: why for p, why in self.problems.items() if p in t.ports}
        for port in t.ports:
            if port in self.ports:
                continue
            try:
                # SO_REUSEPORT: a restarted agent binds the gateway ports while its predecessor
                # still drains (both accept until the old one closes), so a restart refuses nothing
                sock = listen_tcp(self.config.address, port, reuse_port=True)
            except OSError as e:
                if self.problems.get(port) is None:
                    log.error("gateway: cannot listen on %s:%d: %s", self.config.address, port, e.strerror)
                self.problems[port] = f"cannot listen on {self.config.address}:{port}: {e.strerror}"
                continue
            self.problems.pop(port, None)
            lst = Listener(f"gateway-{port}", metrics=self.outbound.metrics)

            async def handle(conn: socket.socket, addr: tuple[str, int], port: int = port) -> None:
                task = asyncio.current_task()
                if task is not None:
                    self._conns.add(task)
                try:
                    await self.handle(port, conn, addr)
                finally:
                    if task is not None:
                        self._conns.discard(task)

            task = asyncio.get_running_loop().create_task(lst.serve(sock, handle), name=f"gateway {port}")
            self.ports[port] = _Port(sock, lst, task)
            log.info("gateway: listening on %s:%d (%s)", self.config.address, port, t.ports[port].kind)

    def _stop(self, port: int) -> None:
        p = self.ports.pop(port)
        p.task.cancel()
        p.sock.close()
        log.info("gateway: port %d no longer served", port)

    async def close(self, drain_s: float = 0.0) -> None:
        """Stop accepting; connections still open after ``drain_s`` are cancelled."""
        ports = list(self.ports.values())
        for port in list(self.ports):
            self._stop(port)
        for p in ports:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await p.task
        if self._conns and drain_s > 0:
            await asyncio.wait(list(self._conns), timeout=drain_s)
        for p in ports:
            await p.listener.cancel_connections()

    # -- connections ---------------------------------------------------------------------------

    async def handle(self, port: int, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Serve one accepted connection by its port's kind (it owns ``conn`` and closes it)."""
        plan = self.table().ports.get(port)
        if plan is None:
            return conn.close()
        sni: str | None = None
        ctx: ssl.SSLContext | None = None
        if plan.kind not in ("http", "tcp"):
            try:
                sni = await peek_sni(conn)
            except (NotTls, ConnectionError, TimeoutError, OSError) as e:
                self._rlog.info("hello", "gateway: port %d, %s: no ClientHello (%s)", port, addr[0], e)
                return conn.close()
        if plan.kind in ("https", "tls-terminated"):
            sv = gatewayplan.server_for(plan.servers, sni or "") or plan.servers[0]
            tls = sv.server.tls or ServerTls()  # (a terminating server always has its tls: validated)
            alpn: tuple[str, ...] = ()
            if plan.kind == "https":  # h2 only where every route leads to an http2/grpc port
                alpn = ("h2", "http/1.1") if gatewayplan.h2_upstream(self.table(), sv) else ("http/1.1",)
            try:
                ctx = self.credentials.context(tls, alpn)
            except CredentialError as e:
                self._rlog.warning(f"cred {tls.credential_name}", "gateway: port %d: not served: %s", port, e)
                return conn.close()
        app = await self._accept(conn, addr, port, ctx)
        if app is None:
            return None
        try:
            if plan.kind in ("http", "https"):
                await self._http(app, addr, port, ctx is not None)
            else:  # tcp, tls-terminated: tcp routes; tls (passthrough): tls routes by the SNI
                await self._connection(app, port, sni if plan.kind == "tls" else None)
        finally:
            if app.failure() is not None:
                app.abort()
            else:
                app.writer.close()

    async def _accept(self, conn: socket.socket, addr: tuple[str, int], port: int,
                      ctx: ssl.SSLContext | None) -> SocketEnd | None:
        """Streams over the accepted socket, TLS terminated with ``ctx`` when given."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=SOCKET_READ_LIMIT)
        proto = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: proto, conn, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if ctx else None)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            self._rlog.info("handshake", "gateway: port %d, %s: TLS handshake failed: %s", port, addr[0], e)
            conn.close()
            return None
        return SocketEnd(reader, asyncio.StreamWriter(transport, proto, reader, loop))

    async def _http(self, app: SocketEnd, addr: tuple[str, int], port: int, tls: bool) -> None:
        side = GatewayHttp(self, addr[0], port, "https" if tls else "http")
        out = self.outbound
        if tls:
            tls_obj = app.writer.get_extra_info("ssl_object")
            h2 = tls_obj is not None and tls_obj.selected_alpn_protocol() == "h2"
            wire, first = (protocol.Wire.HTTP2 if h2 else protocol.Wire.HTTP1), b""
        else:
            wire, first = await protocol.resolve(Protocol.HTTP, app, out.config.sniff_timeout_s)
        if wire is protocol.Wire.HTTP2:
            await H2Loop(app, side, name=f"gateway from {addr[0]}:{addr[1]}",
                         retry_buffer_bytes=out.config.http.retry_buffer_bytes).run(first)
        else:
            await H1Loop(app, side, out.config.http).run(first)

    async def _connection(self, app: SocketEnd, port: int, sni: str | None) -> None:
        """A TCP connection (or one whose TLS the gateway terminated): the tcp routes; a TLS
        passthrough one (``sni``): the tls routes. Then relayed as the outbound relays."""
        out = self.outbound
        src = self.workload()
        try:
            t = self.table()
            plan = gatewayplan.tls_target(t, port, sni, self.rng) if sni is not None \
                else gatewayplan.tcp_target(t, port, src, self.rng)
        except LocalReply as e:
            return out._fail(app, e.flag, f"gateway port {port}: {e}")
        if not plan.endpoints:
            return out._fail(app, "UH", f"gateway port {port}: {plan.balancer_key}: no healthy endpoint")
        route = Route(plan.service, plan.port, plan.endpoints, plan.policy)
        address = self.config.address
        await out._tcp(app, src, self.identity, route, b"", (address, 0), address, plan.pool)
        return None
