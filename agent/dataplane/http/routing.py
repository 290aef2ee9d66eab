"""Per-request routing on the source node: VirtualService match, destination, subset, policy. Pure.

How this works: :class:`RouteTable` indexes one snapshot's VirtualServices and
DestinationRules once (a new snapshot is a new table): for each service, the
VirtualService that applies to it (hosts resolved as Istio does, ``mesh``
gateway; when several do, the first by namespace and name), and for each
service the DestinationRule for its host. :func:`decide` takes the facts of one
request (:class:`RequestFacts`) and returns a :class:`Decision`: the matched
route (first match wins, Istio's order), the destination picked by weight, its
service, port and subset endpoints, the load-balancing policy in force, and
what to do to the request (rewrite, header operations, timeout) — or a
:class:`~agent.dataplane.http.exchange.LocalReply` (no route matched: 404
``NR``; a direct response). With no VirtualService for the service, the
request goes to the service itself, as before.

Regexes are RE2 (``google-re2``): linear time whatever a request carries, and
they must match the whole string, as Envoy's ``safe_regex`` does.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

import re2

from agent.control.istio import (
    ConnectionPool,
    ConsistentHash,
    Cors,
    DestinationRule,
    HeaderOps,
    HttpMatch,
    HttpRoute,
    OutlierDetection,
    RouteDestination,
    StringMatch,
    TrafficPolicy,
    VirtualService,
    host_fqdn,
    host_matches,
)
from agent.control.model import Service, Workload
from agent.control.serviceentry import EntryService, route_names
from agent.control.snapshot import Endpoint, Snapshot, healthy_endpoints
from agent.dataplane.http.exchange import LocalReply
from agent.dataplane.lb import Policy


class LazyHeaders(Mapping[str, str]):
    """A request's headers for matching, read only when a route asks (most routes match on the
    path alone): lower-case names, repeated headers joined with ","."""

    __slots__ = ("_d", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._d: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        d = self._d
        if d is None:
            d = self._d = {}
            for k, v in self._raw:
                name, text = k.decode("latin-1"), v.decode("latin-1")
                d[name] = f"{d[name]},{text}" if name in d else text
        return d

    def __getitem__(self, name: str) -> str:
        return self._dict()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self._dict().get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())


def service_fqdn(svc: Service) -> str:
    return svc.fqdn  # (a ServiceEntry's host for its services)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    method: str
    path: str  # request target: path and query
    authority: str
    scheme: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ","
    port: int  # the service port the app dialled
    source: Workload


NO_POLICY = TrafficPolicy()


@dataclass(frozen=True, slots=True)
class Decision:
    service: Service  # the destination service
    port: int  # its port
    endpoints: tuple[Endpoint, ...]  # healthy, of the subset
    policy: Policy
    balancer_key: str  # the balancer's state is per service and subset
    vs: VirtualService | None = None
    route_index: int = -1
    route: HttpRoute | None = None
    destination: RouteDestination | None = None
    path: str | None = None  # rewritten request target (None: as received)
    authority: str | None = None  # rewritten authority
    request_ops: tuple[HeaderOps, ...] = ()
    response_ops: tuple[HeaderOps, ...] = ()
    timeout_s: float | None = None
    rule: DestinationRule | None = None  # the destination service's DestinationRule
    traffic: TrafficPolicy = NO_POLICY  # its policy for this port and subset (merged)

    @property
    def outlier(self) -> OutlierDetection | None:
        return self.traffic.outlier

    @property
    def pool(self) -> ConnectionPool | None:
        return self.traffic.pool

    @property
    def max_requests(self) -> int:  # connectionPool.http.http2MaxRequests (0: none)
        pool = self.traffic.pool
        return pool.max_requests if pool is not None else 0

    @property
    def consistent_hash(self) -> ConsistentHash | None:
        lb = self.traffic.load_balancer
        return lb.consistent_hash if lb is not None else None

    @property
    def locality_lb(self) -> bool:  # locality-aware: Istio's condition is outlierDetection set
        lb = self.traffic.load_balancer
        return (lb is None or lb.locality) and self.traffic.outlier is not None


_NO_OPS: tuple[HeaderOps, ...] = ()
MAX_PLANS = 65536  # cached decisions per table (routes x destinations x ports dialled)


class _Matcher:
    """Compiled StringMatches (RE2), kept per table."""

    def __init__(self) -> None:
        self._re: dict[str, Any] = {}

    def test(self, m: StringMatch, value: str, *, ignore_case: bool = False) -> bool:
        if m.kind == "exact":
            return value.lower() == m.value.lower() if ignore_case else value == m.value
        if m.kind == "prefix":
            return value.lower().startswith(m.value.lower()) if ignore_case else value.startswith(m.value)
        return self.regex(m.value).fullmatch(value) is not None

    def regex(self, pattern: str) -> Any:
        rx = self._re.get(pattern)
        if rx is None:
            rx = self._re[pattern] = re2.compile(pattern)
        return rx


@dataclass(slots=True)
class RouteTable:
    snapshot: Snapshot
    vs_of: Mapping[tuple[str, str], VirtualService]  # service (ns, name) -> its VirtualService
    dr_of: Mapping[tuple[str, str], DestinationRule]  # service (ns, name) -> its DestinationRule
    service_of: Mapping[str, Service]  # FQDN -> service
    matcher: _Matcher = field(default_factory=_Matcher)
    compiled: dict[int, tuple[_Check, ...]] = field(default_factory=dict)  # id(HttpMatch) -> checks
    # (VirtualService, route index, destination, port) -> the decision without the per-request
    # path rewrite (the table's snapshot keeps those objects, so their ids stay theirs)
    plans: dict[tuple[int, int, int, int], Decision] = field(default_factory=dict)
    # (service namespace, name, port, subset) -> (healthy endpoints of the subset, the rule's
    # policy for that port and subset); the snapshot is immutable, so computed once per table
    # (bounded by the routes' subsets)
    subsets: dict[tuple[str, str, int, str], tuple[tuple[Endpoint, ...], TrafficPolicy]] = field(
        default_factory=dict)

    @classmethod
    def build(cls, snapshot: Snapshot) -> RouteTable:
        services = {service_fqdn(s): s for s in snapshot.services.values()}
        for host, es in snapshot.entry_services.items():  # ServiceEntry hosts (agent.control.serviceentry)
            services.update((n, es) for n in route_names(host))
        vss = sorted(snapshot.virtual_services.values(), key=lambda v: (v.namespace, v.name))
        drs = sorted(snapshot.destination_rules.values(), key=lambda d: (d.namespace, d.name))
        vs_of: dict[tuple[str, str], VirtualService] = {}
        for vs in vss:
            if vs.gateways and "mesh" not in vs.gateways:
                continue
            patterns = [host_fqdn(h, vs.namespace) for h in vs.hosts]
            for fq, svc in services.items():
                key = (svc.namespace, svc.name)
                if key not in vs_of and any(host_matches(p, fq) for p in patterns):
                    vs_of[key] = vs
        dr_of: dict[tuple[str, str], DestinationRule] = {}
        for dr in drs:
            p = host_fqdn(dr.host, dr.namespace)
            for fq, svc in services.items():
                key = (svc.namespace, svc.name)
                if key not in dr_of and host_matches(p, fq):
                    dr_of[key] = dr
        return cls(snapshot, MappingProxyType(vs_of), MappingProxyType(dr_of), MappingProxyType(services))

    def virtual_service(self, svc: Service) -> VirtualService | None:
        return self.vs_of.get((svc.namespace, svc.name))

    def rule(self, svc: Service) -> DestinationRule | None:
        return self.dr_of.get((svc.namespace, svc.name))

    def applies(self, svc: Service) -> bool:
        """A VirtualService or a DestinationRule applies to the service (else: no decision)."""
        key = (svc.namespace, svc.name)
        return key in self.vs_of or key in self.dr_of

    # -- matching ----------------------------------------------------------------------------

    def _checks(self, m: HttpMatch) -> tuple[_Check, ...]:
        checks = self.compiled.get(id(m))
        if checks is None:
            checks = self.compiled[id(m)] = _compile(m, self.matcher)
        return checks

    def match(self, vs: VirtualService, req: RequestFacts) -> tuple[int, HttpRoute, HttpMatch | None] | None:
        """The first route whose matches (any of them; none = all requests) take the request."""
        path, _, query = req.path.partition("?")
        for i, route in enumerate(vs.http):
            if not route.matches:
                return i, route, None
            for m in route.matches:
                for check in self._checks(m):
                    if not check(req, path, query):
                        break
                else:
                    return i, route, m
        return None


_Check = Callable[[RequestFacts, str, str], bool]  # (request, path, query) -> does it hold


def _test(matcher: _Matcher, sm: StringMatch, ignore_case: bool = False) -> Callable[[str], bool]:
    """A StringMatch as one function of the value (exact, prefix, or RE2 over the whole value)."""
    value = sm.value
    if sm.kind == "exact":
        if ignore_case:
            low = value.lower()
            return lambda v: v.lower() == low
        return lambda v: v == value
    if sm.kind == "prefix":
        if ignore_case:
            low = value.lower()
            return lambda v: v.lower().startswith(low)
        return lambda v: v.startswith(value)
    rx = matcher.regex(value)
    return lambda v: rx.fullmatch(v) is not None


def _compile(m: HttpMatch, matcher: _Matcher) -> tuple[_Check, ...]:
    """One check per condition the match sets, cheapest first (a request fails at its first
    failing check): what :meth:`RouteTable.match` runs per request, built once per table."""
    checks: list[_Check] = []
    if m.port:
        port = m.port
        checks.append(lambda r, p, q: r.port == port)
    if m.method is not None:
        f_method = _test(matcher, m.method)
        checks.append(lambda r, p, q: f_method(r.method))
    if m.uri is not None:
        f_uri = _test(matcher, m.uri, m.ignore_uri_case)
        checks.append(lambda r, p, q: f_uri(p))
    if m.authority is not None:
        f_auth = _test(matcher, m.authority)
        checks.append(lambda r, p, q: f_auth(r.authority))
    if m.scheme is not None:
        f_scheme = _test(matcher, m.scheme)
        checks.append(lambda r, p, q: f_scheme(r.scheme))
    for name, sm in m.headers:
        checks.append(_header_check(name, _test(matcher, sm), present=True))
    for name, sm in m.without_headers:
        checks.append(_header_check(name, _test(matcher, sm), present=False))
    if m.query_params:
        params = tuple((name, _test(matcher, sm)) for name, sm in m.query_params)

        def query(r: RequestFacts, p: str, q: str) -> bool:
            if not q:
                return False  # (every parameter asked for is missing)
            got = dict(parse_qsl(q, keep_blank_values=True))
            return all((v := got.get(n)) is not None and f(v) for n, f in params)

        checks.append(query)
    if m.source_namespace:
        ns = m.source_namespace
        checks.append(lambda r, p, q: r.source.namespace == ns)
    if m.source_labels:
        labels = m.source_labels
        checks.append(lambda r, p, q: all(r.source.labels.get(k) == v for k, v in labels))
    return tuple(checks)


def _header_check(name: str, f: Callable[[str], bool], *, present: bool) -> _Check:
    if present:
        return lambda r, p, q: (v := r.headers.get(name)) is not None and f(v)
    return lambda r, p, q: (v := r.headers.get(name)) is None or not f(v)


def _weighted(dests: tuple[RouteDestination, ...], rng: random.Random) -> RouteDestination:
    if len(dests) == 1:
        return dests[0]
    total = sum(d.weight for d in dests)
    x = rng.uniform(0, total)
    for d in dests:
        x -= d.weight
        if x < 0:
            return d
    return dests[-1]


def _rewrite(path: str, route: HttpRoute, m: HttpMatch | None, matcher: _Matcher) -> str | None:
    new = route.rewrite_uri
    if route.rewrite_regex is not None:  # Envoy's regex_rewrite: every match in the path, not the query
        pattern, sub = route.rewrite_regex
        p, sep, query = path.partition("?")
        new_path: str = matcher.regex(pattern).sub(sub, p)
        return new_path + sep + query
    if new is None:
        return None
    p, sep, query = path.partition("?")
    if m is not None and m.uri is not None and m.uri.kind == "prefix":
        n = len(m.uri.value)
        p = new + p[n:] if new or p[n:] else "/"
    else:
        p = new
    return p + sep + query


def subset_endpoints(
    table: RouteTable, svc: Service, port: int, subset: str
) -> tuple[tuple[Endpoint, ...], TrafficPolicy]:
    """Healthy endpoints of the service port, of ``subset``'s labels; and the DestinationRule's
    policy for that port and subset (Istio's merge: :meth:`DestinationRule.resolve`)."""
    key = (svc.namespace, svc.name, port, subset)
    hit = table.subsets.get(key)
    if hit is None:
        hit = table.subsets[key] = _compute_subset(table, svc, port, subset)
    return hit


def _compute_subset(
    table: RouteTable, svc: Service, port: int, subset: str
) -> tuple[tuple[Endpoint, ...], TrafficPolicy]:
    eps = healthy_endpoints(table.snapshot, svc, port)
    dr = table.rule(svc)
    if not subset:
        return eps, dr.resolve(port, "") if dr is not None else NO_POLICY
    sub = next((s for s in dr.subsets if s.name == subset), None) if dr is not None else None
    if dr is None or sub is None:
        raise LocalReply(503, f"no subset {subset!r} of {service_fqdn(svc)} is defined", "NR")
    wl = table.snapshot.workloads
    entry_labels = svc.labels_of if isinstance(svc, EntryService) else {}  # a ServiceEntry's endpoints
    keep = []
    for e in eps:
        w = wl.get((e.namespace, e.workload))
        labels = w.labels if w is not None else entry_labels.get(e.address)
        if labels is not None and all(labels.get(k) == v for k, v in sub.labels):
            keep.append(e)
    return tuple(keep), dr.resolve(port, subset)


def decide(table: RouteTable, svc: Service, req: RequestFacts, rng: random.Random) -> Decision:
    """Where this request goes. Raises LocalReply for no matching route or a direct response."""
    vs = table.virtual_service(svc)
    if vs is None:
        eps, traffic = subset_endpoints(table, svc, req.port, "")
        return Decision(svc, req.port, eps, _policy(svc, traffic), f"{svc.namespace}/{svc.name}/",
                        rule=table.rule(svc), traffic=traffic)
    return decide_route(table, vs, req, rng)


def decide_route(table: RouteTable, vs: VirtualService, req: RequestFacts, rng: random.Random) -> Decision:
    """Where this request goes by ``vs``'s http routes (the service's VirtualService, or one bound
    to the gateway that took the request). Raises LocalReply as :func:`decide`."""
    hit = table.match(vs, req)
    if hit is None:
        raise LocalReply(404, f"no route of VirtualService {vs.namespace}/{vs.name} matched", "NR")
    i, route, m = hit
    if route.direct_status:
        raise LocalReply(route.direct_status, route.direct_body, "-")
    if route.redirect is not None:
        rd = route.redirect
        path = req.path
        if rd.uri:  # the path is replaced; the request's query is kept unless the uri has one
            query = req.path.partition("?")[2]
            path = rd.uri if "?" in rd.uri or not query else f"{rd.uri}?{query}"
        scheme = rd.scheme or req.scheme
        authority = rd.authority or req.authority
        port = rd.port
        if rd.derive_port == "FROM_REQUEST_PORT":
            port = req.port
        if port or rd.derive_port == "FROM_PROTOCOL_DEFAULT":
            host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
            default = 443 if scheme == "https" else 80
            authority = host if not port or port == default else f"{host}:{port}"
        location = f"{scheme}://{authority}{path}"
        raise LocalReply(rd.code, f"redirected to {location}", "-",
                         headers=((b"location", location.encode("latin-1")),))
    d = _weighted(route.route, rng)
    key = (id(vs), i, id(d), req.port)
    plan = table.plans.get(key)
    if plan is None:  # what depends only on the route, the destination and the port: once per table
        target, port = _target(table, vs, d, req.port)
        eps, traffic = subset_endpoints(table, target, port, d.destination.subset)
        plan = Decision(
            target,
            port,
            eps,
            _policy(target, traffic),
            f"{target.namespace}/{target.name}/{d.destination.subset}",
            vs,
            i,
            route,
            d,
            None,
            route.rewrite_authority,
            tuple(o for o in (route.request_headers, d.request_headers) if not o.empty) or _NO_OPS,
            tuple(o for o in (route.response_headers, d.response_headers) if not o.empty) or _NO_OPS,
            route.timeout_s,
            table.rule(target),
            traffic,
        )
        if len(table.plans) < MAX_PLANS:
            table.plans[key] = plan
    if route.rewrite_uri is not None or route.rewrite_regex is not None:
        return dataclasses.replace(plan, path=_rewrite(req.path, route, m, table.matcher))
    return plan


def decide_tcp(
    table: RouteTable, svc: Service, port: int, source: Workload, rng: random.Random
) -> Decision | None:
    """Where a TCP connection goes when a VirtualService with ``tcp`` routes applies to the
    service (None: none does; the connection goes to the service itself). The first route
    whose matches (port, source labels, source namespace; none = all) take the connection
    wins; its destinations are weighted per connection. No route: LocalReply ``NR``."""
    vs = table.virtual_service(svc)
    if vs is None or not vs.tcp:
        return None
    return decide_tcp_route(table, vs, port, source, rng)


def decide_tcp_route(
    table: RouteTable, vs: VirtualService, port: int, source: Workload, rng: random.Random
) -> Decision:
    """:func:`decide_tcp` once the VirtualService is known (a gateway's, or the service's)."""
    for i, route in enumerate(vs.tcp):
        if route.matches and not any(
            (not m.port or m.port == port)
            and (not m.source_namespace or m.source_namespace == source.namespace)
            and all(source.labels.get(k) == v for k, v in m.source_labels)
            for m in route.matches
        ):
            continue
        return connection_decision(table, vs, i, route.route, port, rng)
    raise LocalReply(503, f"no tcp route of VirtualService {vs.namespace}/{vs.name} matched", "NR")


def connection_decision(
    table: RouteTable, vs: VirtualService, index: int, dests: tuple[RouteDestination, ...], port: int,
    rng: random.Random,
) -> Decision:
    """A connection's destination (tcp and tls routes): picked by weight, its subset's endpoints
    and the DestinationRule's policy for them."""
    d = _weighted(dests, rng)
    target, tport = _target(table, vs, d, port)
    eps, traffic = subset_endpoints(table, target, tport, d.destination.subset)
    return Decision(target, tport, eps, _policy(target, traffic),
                    f"{target.namespace}/{target.name}/{d.destination.subset}", vs, index,
                    destination=d, rule=table.rule(target), traffic=traffic)


def _target(table: RouteTable, vs: VirtualService, d: RouteDestination, port: int) -> tuple[Service, int]:
    """A route destination's service and port (the port dialled unless the destination names
    one; a service with a single port takes it)."""
    target = table.service_of.get(host_fqdn(d.destination.host, vs.namespace))
    if target is None:
        raise LocalReply(503, f"route to unknown host {d.destination.host!r}", "NR")
    tport = d.destination.port or port
    if not any(p.port == tport for p in target.ports):
        if len(target.ports) == 1 and not d.destination.port:
            tport = target.ports[0].port
        else:
            raise LocalReply(503, f"{service_fqdn(target)} has no port {tport}", "NR")
    return target, tport


def cors(policy: Cors, req: RequestFacts, matcher: _Matcher) -> tuple[bool, list[tuple[bytes, bytes]]]:
    """Envoy's CORS filter for a route's corsPolicy: (answer now, headers). A preflight
    (OPTIONS with Origin and Access-Control-Request-Method) from an allowed origin is answered
    by the proxy with the allow headers; from another origin it is forwarded (or, with
    unmatchedPreflights IGNORE, answered without CORS headers). Any other request from an
    allowed origin gets the allow-origin/credentials/expose headers on its response."""
    origin = req.headers.get("origin")
    if origin is None:
        return False, []
    allowed = any(matcher.test(m, origin) for m in policy.allow_origins)
    preflight = req.method == "OPTIONS" and req.headers.get("access-control-request-method") is not None
    if not allowed:
        return preflight and policy.unmatched_preflights == "IGNORE", []
    out = [(b"access-control-allow-origin", origin.encode("latin-1"))]
    if policy.allow_credentials:
        out.append((b"access-control-allow-credentials", b"true"))
    if preflight:
        if policy.allow_methods:
            out.append((b"access-control-allow-methods", ",".join(policy.allow_methods).encode("latin-1")))
        if policy.allow_headers:
            out.append((b"access-control-allow-headers", ",".join(policy.allow_headers).encode("latin-1")))
        if policy.max_age_s is not None:
            out.append((b"access-control-max-age", b"%d" % policy.max_age_s))
        return True, out
    if policy.expose_headers:
        out.append((b"access-control-expose-headers", ",".join(policy.expose_headers).encode("latin-1")))
    return False, out


def by_locality(endpoints: tuple[Endpoint, ...], source_locality: str) -> tuple[Endpoint, ...]:
    """Istio's locality load balancing: the endpoints sharing the most of the caller's
    region/zone/subzone (same subzone, else same zone, else same region, else any) — so traffic
    fails over to the next locality only when a whole locality is unhealthy or ejected."""
    if not source_locality or not endpoints:
        return endpoints
    src = source_locality.split("/")
    levels: list[int] = []
    for e in endpoints:
        parts = e.locality.split("/") if e.locality else []
        level = 0
        while level < min(len(src), len(parts)) and src[level] == parts[level]:
            level += 1
        levels.append(level)
    best = max(levels)
    if best == 0:
        return endpoints
    return tuple(e for e, lv in zip(endpoints, levels, strict=True) if lv == best)


def _policy(svc: Service, traffic: TrafficPolicy) -> Policy:
    lb = traffic.load_balancer
    return Policy.parse((lb.simple if lb is not None else "") or svc.lb_policy)


_Encoded = tuple[frozenset[bytes], list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]
_ENCODED: dict[HeaderOps, _Encoded] = {}


def _encoded(o: HeaderOps) -> _Encoded:
    """(names removed or replaced, headers set, headers added), as bytes, coded once per ops."""
    e = _ENCODED.get(o)
    if e is None:
        if len(_ENCODED) >= 4096:
            _ENCODED.clear()
        sets = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in o.set]
        drop = frozenset({n.lower().encode("latin-1") for n in o.remove} | {n for n, _ in sets})
        adds = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in o.add]
        e = _ENCODED[o] = (drop, sets, adds)
    return e


def apply_ops(headers: list[tuple[bytes, bytes]], ops: tuple[HeaderOps, ...]) -> list[tuple[bytes, bytes]]:
    """Istio's header operations, in order: remove, then set (replaces), then add (appends)."""
    for o in ops:
        drop, sets, adds = _encoded(o)
        if drop:
            headers = [(k, v) for k, v in headers if k not in drop]
        if sets or adds:
            headers = headers + sets + adds
    return headers


def hash_key(ch: ConsistentHash, req: RequestFacts, source_address: str) -> str | None:
    """The request's consistent-hash key (None: the request has none: the policy's fallback)."""
    if ch.key == "source_ip":
        return source_address
    if ch.key == "header":
        return req.headers.get(ch.name)
    if ch.key == "query":
        return dict(parse_qsl(req.path.partition("?")[2], keep_blank_values=True)).get(ch.name)
    for part in (req.headers.get("cookie") or "").replace(",", ";").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == ch.name:
            return value.strip('"')
    return None
