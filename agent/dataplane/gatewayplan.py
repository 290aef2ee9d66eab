"""What an ingress gateway serves, and where each request or connection goes. Pure.

How this works: :meth:`GatewayTable.build` reads one snapshot once (a new
snapshot is a new table): the Gateways whose selector the agent's gateway labels
match, their servers grouped by port (:class:`PortPlan`: one port serves one
kind, ``http``, ``https``, ``tls`` passthrough or ``tcp``; a server that would
clash with another Gateway's on the same port, or with the agent's own ports, is
left out and its reason kept in ``refused``), and for each Gateway the
VirtualServices bound to it (``gateways: [name]`` or ``[ns/name]``), by
namespace and name. Then, per request or connection:

- :func:`http_target`: the server whose ``hosts`` take the request's host (exact
  before wildcard), then the first bound VirtualService with a host taking it
  that the server's ``namespace/`` part lets bind; none: 404 ``NR``. An HTTP
  server with ``tls.httpsRedirect`` answers 301 to ``https://``.
- :func:`tls_target`: a TLS passthrough port's connection by its SNI: the first
  bound VirtualService's first ``tls`` route whose ``sniHosts`` (and ``port``)
  take it.
- :func:`tcp_target`: a TCP port's connection (or a TLS one the gateway
  terminated): the first bound VirtualService with a ``tcp`` route taking it.
- :func:`h2_upstream`: whether an HTTPS server may offer HTTP/2 in ALPN: only when
  every route its VirtualServices have leads to a service port declared ``http2``
  or ``grpc`` (requests keep their protocol upstream; nodemesh does not translate).

The route's own decision (matches, weights, subsets, policies) is
:mod:`agent.dataplane.http.routing`'s, the same as for mesh traffic.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.control.gateway import (
    Gateway,
    GatewayServer,
    bound,
    host_match,
    host_of,
    name_match,
    namespace_allows,
    selects,
)
from agent.control.istio import VirtualService, host_fqdn
from agent.control.model import Protocol, Workload, l7_protocol
from agent.control.snapshot import Snapshot
from agent.dataplane.http import routing
from agent.dataplane.http.exchange import LocalReply


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """agent.yaml's ``gateway:`` section: the ingress gateway this agent also is."""

    labels: Mapping[str, str]
    address: str
    credentials_dir: str = "/etc/nodemesh/gateway-certs"
    name: str = "istio-ingressgateway"
    namespace: str = "istio-system"
    service_account: str = "istio-ingressgateway-service-account"


@dataclass(frozen=True, slots=True)
class Served:
    """One server of one Gateway, as this gateway serves it."""

    gateway: Gateway
    server: GatewayServer


@dataclass(frozen=True, slots=True)
class PortPlan:
    port: int
    kind: str  # http | https | tls | tls-terminated | tcp
    servers: tuple[Served, ...]


def port_kind(s: GatewayServer) -> str:
    """http | https | tls (passed through) | tls-terminated (then tcp routes) | tcp"""
    if s.protocol == "TLS" and s.tls is not None and s.tls.mode != "PASSTHROUGH":
        return "tls-terminated"
    return s.protocol.lower()


@dataclass(frozen=True, slots=True)
class HttpTarget:
    served: Served
    vs: VirtualService | None  # None: an httpsRedirect server (no VirtualService needed)


@dataclass(slots=True)
class GatewayTable:
    snapshot: Snapshot
    ports: Mapping[int, PortPlan]
    bound_vs: Mapping[tuple[str, str], tuple[VirtualService, ...]]  # Gateway (ns, name) -> its VSs
    refused: tuple[str, ...] = ()  # servers left out, and why (logged once per table)
    routes: routing.RouteTable | None = None
    h2: dict[int, bool] = field(default_factory=dict)  # id(Served) -> h2_upstream (this table's)

    @classmethod
    def build(cls, snapshot: Snapshot, labels: Mapping[str, str],
              reserved_ports: frozenset[int] = frozenset()) -> GatewayTable:
        gateways = sorted((g for g in snapshot.gateways.values() if selects(g, labels)),
                          key=lambda g: (g.namespace, g.name))
        ports: dict[int, PortPlan] = {}
        refused: list[str] = []
        for g in gateways:
            for s in g.servers:
                where = f"Gateway {g.namespace}/{g.name} port {s.port}"
                if s.port in reserved_ports:
                    refused.append(f"{where}: the agent itself listens on port {s.port}")
                    continue
                plan = ports.get(s.port)
                kind = port_kind(s)
                if plan is None:
                    ports[s.port] = PortPlan(s.port, kind, (Served(g, s),))
                elif plan.kind != kind:
                    first = plan.servers[0].gateway
                    refused.append(f"{where}: the port is already a {plan.kind} server of Gateway "
                                   f"{first.namespace}/{first.name}")
                else:
                    ports[s.port] = PortPlan(s.port, kind, (*plan.servers, Served(g, s)))
        vss = sorted(snapshot.virtual_services.values(), key=lambda v: (v.namespace, v.name))
        bound_vs = {(g.namespace, g.name): tuple(v for v in vss if bound(v.gateways, v.namespace, g))
                    for g in gateways}
        return cls(snapshot, MappingProxyType(ports), MappingProxyType(bound_vs), tuple(refused))

    def route_table(self) -> routing.RouteTable:
        if self.routes is None:
            self.routes = routing.RouteTable.build(self.snapshot)
        return self.routes


def server_for(servers: tuple[Served, ...], host: str) -> Served | None:
    """The server whose hosts take ``host``: an exact name before a wildcard (the longest
    wildcard first), as Envoy picks a virtual host or a filter chain; None: none does."""
    best: tuple[int, Served] | None = None
    for sv in servers:
        for h in sv.server.hosts:
            if not name_match(h.host, host):
                continue
            rank = 1 << 20 if h.host == host else len(h.host)
            if best is None or rank > best[0]:
                best = (rank, sv)
    return None if best is None else best[1]


def _vs_for(table: GatewayTable, sv: Served, host: str, kind: str) -> VirtualService | None:
    """The first VirtualService bound to the server's Gateway (by namespace and name) with a
    host taking ``host``, from a namespace the server's hosts let bind, with routes of ``kind``."""
    g = sv.gateway
    for vs in table.bound_vs.get((g.namespace, g.name), ()):
        if not getattr(vs, kind):
            continue
        if not any(namespace_allows(h, g.namespace, vs.namespace) and name_match(h.host, host)
                   for h in sv.server.hosts):
            continue
        if any(host_match(p, host, vs.namespace) for p in vs.hosts):
            return vs
    return None


def http_target(table: GatewayTable, port: int, authority: str) -> HttpTarget:
    """Which server and VirtualService take a request to ``port`` with this Host/:authority.
    Raises LocalReply 404 ``NR`` when none does."""
    plan = table.ports.get(port)
    host = host_of(authority)
    sv = server_for(plan.servers, host) if plan is not None else None
    if sv is None:
        raise LocalReply(404, f"no server of the gateway on port {port} takes host {host!r}", "NR")
    if sv.server.tls is not None and sv.server.tls.https_redirect:
        return HttpTarget(sv, None)
    vs = _vs_for(table, sv, host, "http")
    if vs is None:
        raise LocalReply(404, f"no VirtualService bound to Gateway {sv.gateway.namespace}/{sv.gateway.name} "
                         f"routes host {host!r}", "NR")
    return HttpTarget(sv, vs)


def https_redirect(authority: str, path: str) -> LocalReply:
    """tls.httpsRedirect: 301 to the same host and path over https (default port)."""
    location = f"https://{host_of(authority)}{path}"
    return LocalReply(301, f"redirected to {location}", "-",
                      headers=((b"location", location.encode("latin-1")),))


def tls_target(table: GatewayTable, port: int, sni: str, rng: random.Random) -> routing.Decision:
    """Where a TLS passthrough connection with this SNI goes. LocalReply ``NR``: nowhere."""
    plan = table.ports.get(port)
    sv = server_for(plan.servers, sni) if plan is not None and sni else None
    if sv is None:
        raise LocalReply(404, f"no server of the gateway on port {port} takes SNI {sni!r}", "NR")
    vs = _vs_for(table, sv, sni, "tls")
    if vs is not None:
        for i, r in enumerate(vs.tls):
            if any((not m.port or m.port == port) and any(name_match(h, sni) for h in m.sni_hosts)
                   for m in r.matches):
                return routing.connection_decision(table.route_table(), vs, i, r.route, port, rng)
    raise LocalReply(404, f"no tls route of a VirtualService bound to Gateway {sv.gateway.namespace}/"
                     f"{sv.gateway.name} takes SNI {sni!r}", "NR")


def h2_upstream(table: GatewayTable, sv: Served) -> bool:
    """May the HTTPS server ``sv`` offer HTTP/2 (ALPN h2)? Yes when it has bound VirtualServices
    and every destination of their http routes is a service port declared http2 or grpc."""
    hit = table.h2.get(id(sv))
    if hit is not None:
        return hit
    g, rt = sv.gateway, table.route_table()
    ok = False
    for vs in table.bound_vs.get((g.namespace, g.name), ()):
        if not any(namespace_allows(h, g.namespace, vs.namespace)
                   and any(name_match(h.host, p.lower()) or name_match(p.lower(), h.host) for p in vs.hosts)
                   for h in sv.server.hosts):
            continue
        for r in vs.http:
            for d in r.route:
                svc = rt.service_of.get(host_fqdn(d.destination.host, vs.namespace))
                ports = [p for p in svc.ports if p.port == d.destination.port] if svc is not None else []
                if svc is not None and not d.destination.port and len(svc.ports) == 1:
                    ports = list(svc.ports)
                if len(ports) != 1 or l7_protocol(ports[0]) not in (Protocol.HTTP2, Protocol.GRPC):
                    table.h2[id(sv)] = False
                    return False
            ok = ok or bool(r.route)
    table.h2[id(sv)] = ok
    return ok


def tcp_target(table: GatewayTable, port: int, source: Workload, rng: random.Random) -> routing.Decision:
    """Where a connection to a TCP server goes: the bound VirtualServices' tcp routes, in order."""
    plan = table.ports.get(port)
    if plan is not None:
        for sv in plan.servers:
            g = sv.gateway
            for vs in table.bound_vs.get((g.namespace, g.name), ()):
                if not vs.tcp:
                    continue
                try:
                    return routing.decide_tcp_route(table.route_table(), vs, port, source, rng)
                except LocalReply as e:
                    if e.flag != "NR":
                        raise
    raise LocalReply(404, f"no tcp route of a VirtualService bound to the gateway takes port {port}", "NR")
