"""Istio's traffic-management kinds as nodemesh holds them: VirtualService and DestinationRule.

How this works: ``validate.py`` turns the YAML users already write for Istio
(``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``) into these frozen
values, refusing by name every field nodemesh does not implement; they are
stored in the registry as JSON (:meth:`to_doc` / :func:`virtual_service_from_doc`,
:func:`destination_rule_from_doc`) and reach the data path in snapshots. What
they mean per request is decided in :mod:`agent.dataplane.http.routing`.

Field names follow Istio's API reference; durations are seconds here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# VirtualService / DestinationRule API versions accepted as they are
ISTIO_NETWORKING_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                             "networking.istio.io/v1alpha3")
MATCH_KINDS = ("exact", "prefix", "regex")


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: str  # exact | prefix | regex (RE2 syntax, whole-string match, as Envoy's safe_regex)
    value: str

    def to_doc(self) -> dict[str, str]:
        return {self.kind: self.value}


@dataclass(frozen=True, slots=True)
class HttpMatch:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()  # names lower-case
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    ignore_uri_case: bool = False
    port: int = 0  # 0: any
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str = ""


@dataclass(frozen=True, slots=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)


@dataclass(frozen=True, slots=True)
class Destination:
    host: str  # as written: short name, FQDN, or <svc>.service.consul
    subset: str = ""
    port: int = 0  # 0: the port the request came to


@dataclass(frozen=True, slots=True)
class RouteDestination:
    destination: Destination
    weight: int = 100
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


# Envoy's retry conditions as Istio's retryOn names them (HTTP and gRPC)
RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
            "retriable-status-codes", "cancelled", "deadline-exceeded", "resource-exhausted",
            "unavailable")


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int  # retries after the first try (Istio's meaning)
    per_try_timeout_s: float | None = None
    retry_on: tuple[str, ...] = ("connect-failure", "refused-stream", "unavailable", "cancelled",
                                 "retriable-status-codes")  # Istio's default
    status_codes: tuple[int, ...] = (503,)  # retriable-status-codes (numbers in retryOn)


@dataclass(frozen=True, slots=True)
class Fault:
    delay_s: float = 0.0
    delay_percent: float = 0.0  # 0-100
    abort_status: int = 0  # HTTP status (0: no abort)
    abort_grpc_status: str = ""  # e.g. "UNAVAILABLE" (gRPC calls get this instead)
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class Redirect:
    """HTTPRedirect: the parts of the request's URL replaced in the Location answered."""

    uri: str = ""  # replaces the path (and query)
    authority: str = ""
    scheme: str = ""
    code: int = 301
    port: int = 0  # replaces the port in the Location (0: as derive_port says, else as received)
    derive_port: str = ""  # FROM_PROTOCOL_DEFAULT (no port: 80/443) | FROM_REQUEST_PORT


@dataclass(frozen=True, slots=True)
class Cors:
    """corsPolicy, as Envoy's CORS filter applies it: a preflight from an allowed origin is
    answered by the proxy; an allowed origin's requests get the allow/expose headers."""

    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age_s: int | None = None
    allow_credentials: bool = False
    unmatched_preflights: str = "FORWARD"  # FORWARD | IGNORE (answered 200 without CORS headers)


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str = ""
    matches: tuple[HttpMatch, ...] = ()  # empty: every request
    route: tuple[RouteDestination, ...] = ()
    timeout_s: float | None = None  # None: no timeout (Istio's default)
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()
    rewrite_uri: str | None = None  # replaces the matched prefix (or the whole path for exact)
    rewrite_authority: str | None = None
    direct_status: int = 0  # directResponse: status (0: none)
    direct_body: str = ""
    retries: Retry | None = None  # None: no retries
    fault: Fault | None = None
    mirror: Destination | None = None  # a copy of each request goes here (response dropped)
    redirect: Redirect | None = None  # answered by the proxy with a redirect
    mirror_percent: float = 100.0  # mirrorPercentage (Istio: 100 when not given)
    rewrite_regex: tuple[str, str] | None = None  # uriRegexRewrite (RE2 match, rewrite with \1)
    cors: Cors | None = None


@dataclass(frozen=True, slots=True)
class TcpMatch:
    port: int = 0  # 0: any
    source_labels: tuple[tuple[str, str], ...] = ()
    source_namespace: str = ""


@dataclass(frozen=True, slots=True)
class TcpRoute:
    """A VirtualService ``tcp`` route: for connections to a TCP port, per connection."""

    matches: tuple[TcpMatch, ...] = ()  # empty: every connection
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsMatch:
    sni_hosts: tuple[str, ...]  # lower-case names or wildcards (required, as in Istio)
    port: int = 0  # 0: any


@dataclass(frozen=True, slots=True)
class TlsRoute:
    """A VirtualService ``tls`` route: a TLS connection a gateway passes through, by its SNI."""

    matches: tuple[TlsMatch, ...]
    route: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    http: tuple[HttpRoute, ...] = ()
    # empty or ("mesh",): mesh traffic; Gateway names ("gw" or "ns/gw") bind it to those gateways
    gateways: tuple[str, ...] = ()
    source: str = ""  # file:line it was applied from (for `describe` and `explain`)
    tcp: tuple[TcpRoute, ...] = ()
    tls: tuple[TlsRoute, ...] = ()  # gateway traffic only (TLS PASSTHROUGH servers)


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Envoy's outlier detection as Istio configures it (durations in seconds)."""

    consecutive_5xx: int = 5  # consecutive5xxErrors (0: off); local-origin failures count too
    consecutive_gateway: int = 0  # consecutiveGatewayErrors: 502/503/504 (0: off)
    interval_s: float = 10.0  # (Envoy sweeps at this interval; nodemesh ejects at once)
    base_ejection_s: float = 30.0  # baseEjectionTime, times the endpoint's ejection count
    max_ejection_percent: int = 10  # at most this share of endpoints ejected (at least one)
    min_health_percent: int = 0  # below this share of available endpoints: no ejection at all
    # splitExternalLocalOriginErrors: local-origin failures (connect failure, reset, timeout)
    # are counted apart, against consecutiveLocalOriginFailures, not as 5xx
    split_local_origin: bool = False
    consecutive_local_origin: int = 5  # consecutiveLocalOriginFailures (with the split; 0: off)


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """loadBalancer.consistentHash: what to hash, and how (Envoy's ring hash or Maglev)."""

    key: str  # header | cookie | source_ip | query
    name: str = ""  # the header, cookie or query parameter name
    cookie_path: str = ""
    cookie_ttl_s: float | None = None  # a cookie with a ttl is generated when the request has none
    algorithm: str = "ring"  # ring | maglev
    size: int = 1024  # ringHash.minimumRingSize / maglev.tableSize (65537 by default)


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """trafficPolicy.loadBalancer: one of simple and consistentHash, and the locality setting."""

    simple: str = ""  # ROUND_ROBIN | LEAST_REQUEST | RANDOM ("": the service's policy)
    consistent_hash: ConsistentHash | None = None
    # localityLbSetting.enabled (Istio's default: on), effective only with outlierDetection
    locality: bool = True


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """trafficPolicy.connectionPool: Envoy's circuit breakers and connection settings for the
    destination (per source proxy, as in Envoy). 0 / None: no limit, the proxy's default."""

    max_connections: int = 0  # tcp.maxConnections: upstream connections open at once
    connect_timeout_s: float | None = None  # tcp.connectTimeout
    max_pending: int = 0  # http.http1MaxPendingRequests: requests waiting for a connection
    max_requests: int = 0  # http.http2MaxRequests: requests in flight
    max_requests_per_connection: int = 0  # http.maxRequestsPerConnection
    max_retries: int = 0  # http.maxRetries: retries in flight at once
    idle_timeout_s: float | None = None  # http.idleTimeout: an idle upstream connection closes


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One level of a DestinationRule's trafficPolicy (the rule's, a port's, a subset's). A
    field left unset (None) is inherited; a field set replaces the inherited one as a whole,
    as Istio merges subset and port-level policies."""

    load_balancer: LoadBalancer | None = None
    outlier: OutlierDetection | None = None
    pool: ConnectionPool | None = None

    def over(self, base: TrafficPolicy) -> TrafficPolicy:
        """This policy's fields over ``base``'s."""
        return TrafficPolicy(
            self.load_balancer if self.load_balancer is not None else base.load_balancer,
            self.outlier if self.outlier is not None else base.outlier,
            self.pool if self.pool is not None else base.pool,
        )

    @property
    def empty(self) -> bool:
        return self.load_balancer is None and self.outlier is None and self.pool is None


PortPolicies = tuple[tuple[int, TrafficPolicy], ...]  # portLevelSettings: port -> policy


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: tuple[tuple[str, str], ...]
    policy: TrafficPolicy = TrafficPolicy()
    ports: PortPolicies = ()

    @property
    def load_balancer(self) -> str:
        lb = self.policy.load_balancer
        return lb.simple if lb is not None else ""


@dataclass(frozen=True, slots=True)
class DestinationRule:
    name: str
    namespace: str
    host: str
    policy: TrafficPolicy = TrafficPolicy()  # trafficPolicy
    subsets: tuple[Subset, ...] = ()
    source: str = ""
    ports: PortPolicies = ()  # trafficPolicy.portLevelSettings

    def resolve(self, port: int, subset: str) -> TrafficPolicy:
        """The policy in force for a port of a subset, as Istio merges them: the rule's, the
        rule's port-level settings over it, the subset's over that, the subset's port-level
        settings over all."""
        p = self.policy
        for n, pp in self.ports:
            if n == port:
                p = pp.over(p)
        if subset:
            for s in self.subsets:
                if s.name == subset:
                    p = s.policy.over(p)
                    for n, pp in s.ports:
                        if n == port:
                            p = pp.over(p)
        return p

    # the rule-level policy, for listings
    @property
    def load_balancer(self) -> str:
        lb = self.policy.load_balancer
        return lb.simple if lb is not None else ""

    @property
    def outlier(self) -> OutlierDetection | None:
        return self.policy.outlier

    @property
    def consistent_hash(self) -> ConsistentHash | None:
        lb = self.policy.load_balancer
        return lb.consistent_hash if lb is not None else None

    @property
    def max_requests(self) -> int:
        pool = self.policy.pool
        return pool.max_requests if pool is not None else 0


# -- JSON documents (what the registry stores) -----------------------------------------------


def _sm(d: Mapping[str, Any] | None) -> StringMatch | None:
    if not d:
        return None
    (k, v), = d.items()
    return StringMatch(k, v)


def _pairs_sm(d: Mapping[str, Any] | None) -> tuple[tuple[str, StringMatch], ...]:
    return tuple((k, StringMatch(*next(iter(v.items())))) for k, v in (d or {}).items())


def _ops(d: Mapping[str, Any] | None) -> HeaderOps:
    d = d or {}
    return HeaderOps(tuple(d.get("set", {}).items()), tuple(d.get("add", {}).items()),
                     tuple(d.get("remove", ())))


def _ops_doc(o: HeaderOps) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if o.set:
        out["set"] = dict(o.set)
    if o.add:
        out["add"] = dict(o.add)
    if o.remove:
        out["remove"] = list(o.remove)
    return out


def _match_doc(m: HttpMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.name:
        out["name"] = m.name
    for key in ("uri", "scheme", "method", "authority"):
        v = getattr(m, key)
        if v is not None:
            out[key] = v.to_doc()
    if m.headers:
        out["headers"] = {k: v.to_doc() for k, v in m.headers}
    if m.without_headers:
        out["withoutHeaders"] = {k: v.to_doc() for k, v in m.without_headers}
    if m.query_params:
        out["queryParams"] = {k: v.to_doc() for k, v in m.query_params}
    if m.ignore_uri_case:
        out["ignoreUriCase"] = True
    if m.port:
        out["port"] = m.port
    if m.source_labels:
        out["sourceLabels"] = dict(m.source_labels)
    if m.source_namespace:
        out["sourceNamespace"] = m.source_namespace
    return out


def _route_doc(r: HttpRoute) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if r.name:
        out["name"] = r.name
    if r.matches:
        out["match"] = [_match_doc(m) for m in r.matches]
    if r.route:
        out["route"] = []
        for rd in r.route:
            d = _dest_doc(rd)
            h = {k: _ops_doc(o) for k, o in (("request", rd.request_headers),
                                               ("response", rd.response_headers)) if not o.empty}
            if h:
                d["headers"] = h
            out["route"].append(d)
    if r.timeout_s is not None:
        out["timeout"] = f"{r.timeout_s!r}s"
    h = {k: _ops_doc(o) for k, o in (("request", r.request_headers),
                                       ("response", r.response_headers)) if not o.empty}
    if h:
        out["headers"] = h
    rw: dict[str, Any] = {k: v for k, v in (("uri", r.rewrite_uri), ("authority", r.rewrite_authority))
                          if v is not None}
    if r.rewrite_regex is not None:
        rw["uriRegexRewrite"] = {"match": r.rewrite_regex[0], "rewrite": r.rewrite_regex[1]}
    if r.cors is not None:
        c = r.cors
        out["corsPolicy"] = {
            "allowOrigins": [m.to_doc() for m in c.allow_origins], "allowMethods": list(c.allow_methods),
            "allowHeaders": list(c.allow_headers), "exposeHeaders": list(c.expose_headers),
            "maxAge": c.max_age_s, "allowCredentials": c.allow_credentials,
            "unmatchedPreflights": c.unmatched_preflights,
        }
    if rw:
        out["rewrite"] = rw
    if r.direct_status:
        out["directResponse"] = {"status": r.direct_status, "body": {"string": r.direct_body}}
    if r.retries is not None:
        rt = r.retries
        codes = rt.status_codes if "retriable-status-codes" in rt.retry_on else ()
        retry: dict[str, Any] = {"attempts": rt.attempts,
                                 "retryOn": ",".join([*rt.retry_on, *map(str, codes)])}
        if rt.per_try_timeout_s is not None:
            retry["perTryTimeout"] = f"{rt.per_try_timeout_s!r}s"
        out["retries"] = retry
    if r.redirect is not None:
        redir = r.redirect
        out["redirect"] = {k: v for k, v in (("uri", redir.uri), ("authority", redir.authority),
                                            ("scheme", redir.scheme), ("redirectCode", redir.code),
                                            ("port", redir.port), ("derivePort", redir.derive_port)) if v}
    if r.mirror is not None:
        m: dict[str, Any] = {"host": r.mirror.host}
        if r.mirror.subset:
            m["subset"] = r.mirror.subset
        if r.mirror.port:
            m["port"] = {"number": r.mirror.port}
        out["mirror"] = m
        out["mirrorPercentage"] = {"value": r.mirror_percent}
    if r.fault is not None:
        f = r.fault
        fault: dict[str, Any] = {}
        if f.delay_percent:
            fault["delay"] = {"fixedDelay": f"{f.delay_s!r}s", "percentage": {"value": f.delay_percent}}
        if f.abort_percent:
            abort: dict[str, Any] = {"percentage": {"value": f.abort_percent}}
            if f.abort_grpc_status:
                abort["grpcStatus"] = f.abort_grpc_status
            if f.abort_status:
                abort["httpStatus"] = f.abort_status
            fault["abort"] = abort
        out["fault"] = fault
    return out


def _dest_doc(rd: RouteDestination) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": rd.destination.host}, "weight": rd.weight}
    if rd.destination.subset:
        d["destination"]["subset"] = rd.destination.subset
    if rd.destination.port:
        d["destination"]["port"] = {"number": rd.destination.port}
    return d


def _tcp_doc(r: TcpRoute) -> dict[str, Any]:
    out: dict[str, Any] = {"route": [_dest_doc(rd) for rd in r.route]}
    if r.matches:
        out["match"] = [{k: v for k, v in (("port", m.port), ("sourceLabels", dict(m.source_labels)),
                                           ("sourceNamespace", m.source_namespace)) if v}
                        for m in r.matches]
    return out


def virtual_service_doc(vs: VirtualService) -> dict[str, Any]:
    doc = {"name": vs.name, "namespace": vs.namespace, "hosts": list(vs.hosts),
           "gateways": list(vs.gateways), "http": [_route_doc(r) for r in vs.http],
           "source": vs.source}
    if vs.tcp:
        doc["tcp"] = [_tcp_doc(r) for r in vs.tcp]
    if vs.tls:
        doc["tls"] = [{"match": [{"sniHosts": list(m.sni_hosts), **({"port": m.port} if m.port else {})}
                                 for m in r.matches],
                       "route": [_dest_doc(rd) for rd in r.route]} for r in vs.tls]
    return doc


def _policy_doc(p: TrafficPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lb = p.load_balancer
    if lb is not None:
        d: dict[str, Any] = {"simple": lb.simple, "locality": lb.locality}
        ch = lb.consistent_hash
        if ch is not None:
            d["consistentHash"] = {"key": ch.key, "name": ch.name, "cookiePath": ch.cookie_path,
                                   "cookieTtl": ch.cookie_ttl_s, "algorithm": ch.algorithm,
                                   "size": ch.size}
        out["loadBalancer"] = d
    o = p.outlier
    if o is not None:
        out["outlierDetection"] = {
            "consecutive5xxErrors": o.consecutive_5xx, "consecutiveGatewayErrors": o.consecutive_gateway,
            "interval": f"{o.interval_s!r}s", "baseEjectionTime": f"{o.base_ejection_s!r}s",
            "maxEjectionPercent": o.max_ejection_percent, "minHealthPercent": o.min_health_percent,
            "splitExternalLocalOriginErrors": o.split_local_origin,
            "consecutiveLocalOriginFailures": o.consecutive_local_origin,
        }
    c = p.pool
    if c is not None:
        out["connectionPool"] = {
            "maxConnections": c.max_connections, "connectTimeout": c.connect_timeout_s,
            "maxPending": c.max_pending, "maxRequests": c.max_requests,
            "maxRequestsPerConnection": c.max_requests_per_connection, "maxRetries": c.max_retries,
            "idleTimeout": c.idle_timeout_s,
        }
    return out


def _ports_doc(ports: PortPolicies) -> list[dict[str, Any]]:
    return [{"port": n, "policy": _policy_doc(p)} for n, p in ports]


def destination_rule_doc(dr: DestinationRule) -> dict[str, Any]:
    return {"name": dr.name, "namespace": dr.namespace, "host": dr.host, "source": dr.source,
            "policy": _policy_doc(dr.policy), "ports": _ports_doc(dr.ports),
            "subsets": [{"name": s.name, "labels": dict(s.labels), "policy": _policy_doc(s.policy),
                         "ports": _ports_doc(s.ports)} for s in dr.subsets]}


def _policy_from(d: Mapping[str, Any]) -> TrafficPolicy:
    lb = d.get("loadBalancer")
    o = d.get("outlierDetection")
    c = d.get("connectionPool")
    return TrafficPolicy(
        LoadBalancer(
            lb.get("simple", ""),
            ConsistentHash(ch["key"], ch["name"], ch["cookiePath"], ch["cookieTtl"], ch["algorithm"],
                           int(ch["size"])) if (ch := lb.get("consistentHash")) else None,
            bool(lb.get("locality", True)),
        ) if lb is not None else None,
        OutlierDetection(
            int(o["consecutive5xxErrors"]), int(o["consecutiveGatewayErrors"]),
            parse_duration(o["interval"]), parse_duration(o["baseEjectionTime"]),
            int(o["maxEjectionPercent"]), int(o["minHealthPercent"]),
            bool(o.get("splitExternalLocalOriginErrors", False)),
            int(o.get("consecutiveLocalOriginFailures", 5)),
        ) if o is not None else None,
        ConnectionPool(
            int(c["maxConnections"]), c["connectTimeout"], int(c["maxPending"]), int(c["maxRequests"]),
            int(c["maxRequestsPerConnection"]), int(c["maxRetries"]), c["idleTimeout"],
        ) if c is not None else None,
    )


def _ports_from(items: Any) -> PortPolicies:
    return tuple((int(x["port"]), _policy_from(x["policy"])) for x in items or ())


def _match_from(d: Mapping[str, Any]) -> HttpMatch:
    return HttpMatch(
        name=d.get("name", ""), uri=_sm(d.get("uri")), scheme=_sm(d.get("scheme")),
        method=_sm(d.get("method")), authority=_sm(d.get("authority")),
        headers=_pairs_sm(d.get("headers")), without_headers=_pairs_sm(d.get("withoutHeaders")),
        query_params=_pairs_sm(d.get("queryParams")), ignore_uri_case=bool(d.get("ignoreUriCase")),
        port=int(d.get("port", 0)), source_labels=tuple(d.get("sourceLabels", {}).items()),
        source_namespace=d.get("sourceNamespace", ""),
    )


def _route_from(d: Mapping[str, Any]) -> HttpRoute:
    headers = d.get("headers", {})
    rw = d.get("rewrite", {})
    direct = d.get("directResponse")
    return HttpRoute(
        name=d.get("name", ""),
        matches=tuple(_match_from(m) for m in d.get("match", ())),
        route=tuple(_dest_from(rd) for rd in d.get("route", ())),
        timeout_s=parse_duration(d["timeout"]) if "timeout" in d else None,
        request_headers=_ops(headers.get("request")),
        response_headers=_ops(headers.get("response")),
        rewrite_uri=rw.get("uri"),
        rewrite_authority=rw.get("authority"),
        direct_status=int(direct["status"]) if direct else 0,
        direct_body=(direct.get("body") or {}).get("string", "") if direct else "",
        retries=_retry_from(d["retries"]) if "retries" in d else None,
        fault=_fault_from(d["fault"]) if "fault" in d else None,
        mirror=Destination(d["mirror"]["host"], d["mirror"].get("subset", ""),
                           int(d["mirror"].get("port", {}).get("number", 0))) if "mirror" in d else None,
        mirror_percent=float(d.get("mirrorPercentage", {}).get("value", 100.0)),
        redirect=Redirect(d["redirect"].get("uri", ""), d["redirect"].get("authority", ""),
                          d["redirect"].get("scheme", ""), int(d["redirect"].get("redirectCode", 301)),
                          int(d["redirect"].get("port", 0)), d["redirect"].get("derivePort", ""))
        if "redirect" in d else None,
        rewrite_regex=(rw["uriRegexRewrite"]["match"], rw["uriRegexRewrite"]["rewrite"])
        if "uriRegexRewrite" in rw else None,
        cors=Cors(
            tuple(s for s in (_sm(o) for o in c["allowOrigins"]) if s is not None),
            tuple(c["allowMethods"]), tuple(c["allowHeaders"]), tuple(c["exposeHeaders"]),
            c["maxAge"], bool(c["allowCredentials"]), c["unmatchedPreflights"],
        ) if (c := d.get("corsPolicy")) else None,
    )


def parse_duration(text: str) -> float:
    """Istio/protobuf durations: "1.5s", "300ms", "2m", "1h", "100us" -> seconds. ValueError."""
    t = text.strip()
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0),
                        ("m", 60.0), ("h", 3600.0)):
        if t.endswith(unit):
            value = float(t[: -len(unit)])
            if value < 0:
                raise ValueError(f"negative duration {text!r}")
            return value * scale
    raise ValueError(f"not a duration: {text!r} (expected e.g. 1.5s, 300ms, 2m)")


def _retry_from(d: Mapping[str, Any]) -> Retry:
    names: list[str] = []
    codes: list[int] = []
    for item in str(d.get("retryOn", "")).split(","):
        item = item.strip()
        if item.isdigit():
            codes.append(int(item))
        elif item:
            names.append(item)
    return retry_policy(
        int(d.get("attempts", 0)),
        parse_duration(d["perTryTimeout"]) if d.get("perTryTimeout") else None,
        names,
        codes,
    )


def retry_policy(attempts: int, per_try_s: float | None, names: list[str], codes: list[int]) -> Retry:
    """A Retry from Istio's retryOn parts: no conditions means Istio's default; status codes
    imply retriable-status-codes; without that condition no codes are kept."""
    default = Retry(attempts)
    if codes and "retriable-status-codes" not in names:
        names = [*names, "retriable-status-codes"]
    if not names:
        return Retry(attempts, per_try_s, default.retry_on, tuple(codes) or default.status_codes)
    if "retriable-status-codes" not in names:
        return Retry(attempts, per_try_s, tuple(names), ())
    return Retry(attempts, per_try_s, tuple(names), tuple(codes) or default.status_codes)


def _fault_from(d: Mapping[str, Any]) -> Fault:
    delay = d.get("delay") or {}
    abort = d.get("abort") or {}
    return Fault(
        parse_duration(delay["fixedDelay"]) if delay.get("fixedDelay") else 0.0,
        # (Istio: an unspecified percentage injects nothing)
        float((delay.get("percentage") or {}).get("value", 0.0)),
        int(abort.get("httpStatus", 0)),
        str(abort.get("grpcStatus", "")),
        float((abort.get("percentage") or {}).get("value", 0.0)),
    )


def _dest_from(rd: Mapping[str, Any]) -> RouteDestination:
    return RouteDestination(
        Destination(rd["destination"]["host"], rd["destination"].get("subset", ""),
                    int(rd["destination"].get("port", {}).get("number", 0))),
        int(rd.get("weight", 100)),
        _ops(rd.get("headers", {}).get("request")),
        _ops(rd.get("headers", {}).get("response")),
    )


def _tcp_from(d: Mapping[str, Any]) -> TcpRoute:
    return TcpRoute(
        tuple(TcpMatch(int(m.get("port", 0)), tuple(m.get("sourceLabels", {}).items()),
                       m.get("sourceNamespace", "")) for m in d.get("match", ())),
        tuple(_dest_from(rd) for rd in d.get("route", ())),
    )


def virtual_service_from_doc(d: Mapping[str, Any]) -> VirtualService:
    return VirtualService(d["name"], d["namespace"], tuple(d["hosts"]),
                          tuple(_route_from(r) for r in d.get("http", ())),
                          tuple(d.get("gateways", ())), d.get("source", ""),
                          tuple(_tcp_from(r) for r in d.get("tcp", ())),
                          tuple(TlsRoute(tuple(TlsMatch(tuple(m["sniHosts"]), int(m.get("port", 0)))
                                               for m in r.get("match", ())),
                                         tuple(_dest_from(rd) for rd in r.get("route", ())))
                                for r in d.get("tls", ())))


def destination_rule_from_doc(d: Mapping[str, Any]) -> DestinationRule:
    return DestinationRule(
        d["name"], d["namespace"], d["host"], _policy_from(d.get("policy", {})),
        tuple(Subset(s["name"], tuple(s.get("labels", {}).items()), _policy_from(s.get("policy", {})),
                     _ports_from(s.get("ports"))) for s in d.get("subsets", ())),
        d.get("source", ""),
        _ports_from(d.get("ports")),
    )


def host_fqdn(host: str, namespace: str) -> str:
    """A VirtualService/DestinationRule host as Istio reads it: a short name is a service in
    the resource's namespace (``reviews`` -> ``reviews.<ns>.svc.cluster.local``), ``<svc>.<ns>``
    and ``<svc>.<ns>.svc`` are completed, an FQDN or a wildcard (``*``, ``*.example.com``)
    stays, and Consul's ``<svc>.service.consul`` is the service in ``default``."""
    h = host.lower().rstrip(".")
    if h.startswith("*"):
        return h
    if h.endswith(".service.consul"):
        return f"{h[: -len('.service.consul')]}.default.svc.cluster.local"
    parts = h.split(".")
    if len(parts) == 1:
        return f"{h}.{namespace}.svc.cluster.local"
    if len(parts) == 2:
        return f"{h}.svc.cluster.local"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{h}.cluster.local"
    return h


def host_matches(pattern_fqdn: str, service_fqdn: str) -> bool:
    """Does a (resolved) VirtualService host select the service? Wildcards match by suffix."""
    if pattern_fqdn == "*":
        return True
    if pattern_fqdn.startswith("*."):
        return service_fqdn.endswith(pattern_fqdn[1:])
    return pattern_fqdn == service_fqdn
