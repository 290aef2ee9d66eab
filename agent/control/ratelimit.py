"""nodemesh's RateLimitPolicy as the registry holds it. Pure.

How this works: ``validate_ratelimit.py`` turns the YAML (``nodemesh.io/v1``,
kind ``RateLimitPolicy``) into these frozen values; they are stored as JSON
(:func:`rate_limit_doc` / :func:`rate_limit_from_doc`) and reach every node in
snapshots. A policy targets one Service of its namespace (optionally one service
port, or one named route of a VirtualService: ``route``, ``<vs namespace>/<vs
name>/<route name>``, which the source agent tells the destination in
:data:`ROUTE_HEADER`) and carries HTTP limits (the total, per source identity with
overrides for named identities, and per descriptor: a header's value, a path
prefix, a method) and TCP limits (connections per second, concurrent
connections). ``scope`` says whose limit it is: each endpoint's (``endpoint``) or
the whole service's (``service``), shared by the agents hosting its endpoints.
Enforcement is the destination node's business (:mod:`agent.dataplane.ratelimit`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCOPES = ("endpoint", "service")
DESCRIPTOR_KINDS = ("header", "pathPrefix", "method")
# The route a source agent chose, ``<vs namespace>/<vs name>/<route name>``: set by the outbound
# on requests it sends through HBONE, trusted by the inbound only there, never seen by a pod
ROUTE_HEADER = "x-nodemesh-route"
ROUTE_ID_RE = re.compile(r"[\x21-\x7e]{1,300}\Z", re.ASCII)  # (what a header value carries as is)


@functools.lru_cache(maxsize=4096)  # (asked per request by the outbound: built and checked once)
def route_id(namespace: str, virtual_service: str, route: str) -> str:
    """A VirtualService route's name in :data:`ROUTE_HEADER`; "" if it cannot be carried."""
    rid = f"{namespace}/{virtual_service}/{route}"
    return rid if route and ROUTE_ID_RE.match(rid) else ""


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket: ``per_s`` tokens a second, at most ``burst`` saved up."""

    per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_s > 0 and math.isfinite(self.per_s)):
            raise ValueError(f"a rate must be a positive number, got {self.per_s!r}")
        if self.burst < 1:
            raise ValueError(f"a burst must be at least 1, got {self.burst!r}")


def default_burst(per_s: float) -> int:
    """A tenth of a second's worth (at least 1): small, so a window's count stays near the rate."""
    return max(1, math.ceil(per_s / 10))


@dataclass(frozen=True, slots=True)
class IdentityLimit:
    principal: str  # Istio's form: <trust-domain>/ns/<ns>/sa/<sa>
    rate: Rate


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One more bucket for the requests that match: ``kind`` header (``key`` its lower-case
    name; ``value`` None: a bucket per distinct value), pathPrefix or method (in ``key``)."""

    kind: str
    key: str
    value: str | None
    rate: Rate

    @property
    def ident(self) -> tuple[str, str, str | None]:
        return (self.kind, self.key, self.value)

    def label(self) -> str:
        if self.kind == "header":
            return f"header:{self.key}" + (f"={self.value}" if self.value is not None else "")
        return f"{self.kind}:{self.key}"


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    name: str
    namespace: str
    service: str  # a Service of the policy's namespace
    port: int | None = None  # a service port (None: all of them)
    scope: str = "endpoint"  # one of SCOPES
    total: Rate | None = None  # requests/s of all callers together
    per_identity: Rate | None = None  # requests/s of each source identity
    identities: tuple[IdentityLimit, ...] = ()  # per-identity overrides
    descriptors: tuple[Descriptor, ...] = ()
    connections: Rate | None = None  # TCP connections/s
    max_connections: int | None = None  # TCP connections open at once
    source: str = ""  # file:line it was applied from
    route: str = ""  # <vs namespace>/<vs name>/<route name>: only that route's requests

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r} (one of: {', '.join(SCOPES)})")
        if not isinstance(self.service, str) or not (self.port is None or type(self.port) is int):
            raise ValueError("targetRef: a service name and an integer port")
        if self.route and (not isinstance(self.route, str) or self.route.count("/") < 2
                           or not ROUTE_ID_RE.match(self.route)):
            raise ValueError(f"targetRef.route: <vs namespace>/<vs name>/<route name>, got {self.route!r}")
        mc = self.max_connections
        if mc is not None and (type(mc) is not int or mc < 1):
            raise ValueError("maxConnections must be an integer, at least 1")

    @property
    def http(self) -> bool:
        return bool(self.total or self.per_identity or self.identities or self.descriptors)

    @property
    def tcp(self) -> bool:
        return self.connections is not None or self.max_connections is not None


def rate_limit_summary(p: RateLimitPolicy) -> str:
    """One line for tables: ``total=100/s per-identity=10/s 2 overrides conn=20/s max-conn=50``."""
    parts = [f"route={p.route}"] if p.route else []
    if p.total:
        parts.append(f"total={p.total.per_s:g}/s")
    if p.per_identity:
        parts.append(f"per-identity={p.per_identity.per_s:g}/s")
    if p.identities:
        parts.append(f"{len(p.identities)} override(s)")
    if p.descriptors:
        parts.append(f"{len(p.descriptors)} descriptor(s)")
    if p.connections:
        parts.append(f"conn={p.connections.per_s:g}/s")
    if p.max_connections is not None:
        parts.append(f"max-conn={p.max_connections}")
    return " ".join(parts)


# -- JSON documents ---------------------------------------------------------------------------


def _rate_doc(r: Rate | None) -> dict[str, Any] | None:
    return None if r is None else {"requestsPerSecond": r.per_s, "burst": r.burst}


def _rate(d: Any) -> Rate | None:
    return None if d is None else Rate(float(d["requestsPerSecond"]), int(d["burst"]))


def rate_limit_doc(p: RateLimitPolicy) -> dict[str, Any]:
    return {
        "name": p.name, "namespace": p.namespace,
        "targetRef": {"kind": "Service", "name": p.service,
                      **({"port": p.port} if p.port is not None else {}),
                      **({"route": _route_doc(p.route)} if p.route else {})},
        "scope": p.scope,
        "http": {
            "total": _rate_doc(p.total), "perIdentity": _rate_doc(p.per_identity),
            "identities": [{"principal": i.principal, **(_rate_doc(i.rate) or {})} for i in p.identities],
            "descriptors": [{d.kind: d.key, **({"value": d.value} if d.value is not None else {}),
                             **(_rate_doc(d.rate) or {})} for d in p.descriptors],
        },
        "tcp": {"connections": _rate_doc(p.connections), "maxConnections": p.max_connections},
        "source": p.source,
    }


def rate_limit_from_doc(d: Mapping[str, Any]) -> RateLimitPolicy:
    http = d.get("http") or {}
    tcp = d.get("tcp") or {}
    descriptors = []
    for x in http.get("descriptors") or ():
        kind = next((k for k in DESCRIPTOR_KINDS if k in x), None)
        if kind is None:
            raise ValueError(f"a descriptor without {', '.join(DESCRIPTOR_KINDS)}")
        descriptors.append(Descriptor(kind, str(x[kind]), x.get("value"), _rate(x) or Rate(1, 1)))
    ref = d["targetRef"]
    return RateLimitPolicy(
        d["name"], d["namespace"], ref["name"], ref.get("port"), d.get("scope", "endpoint"),
        _rate(http.get("total")), _rate(http.get("perIdentity")),
        tuple(IdentityLimit(i["principal"], _rate(i) or Rate(1, 1)) for i in http.get("identities") or ()),
        tuple(descriptors), _rate(tcp.get("connections")), tcp.get("maxConnections"), d.get("source", ""),
        _route_of_doc(ref.get("route")),
    )


def _route_doc(rid: str) -> dict[str, str]:
    """A route id as the YAML names it: ``{virtualService: <ns>/<name>, name: <route>}``."""
    ns, vs, name = rid.split("/", 2)
    return {"virtualService": f"{ns}/{vs}", "name": name}


def _route_of_doc(d: Any) -> str:
    if d is None:
        return ""
    vs = d.get("virtualService") if isinstance(d, Mapping) else None
    name = d.get("name") if isinstance(d, Mapping) else None
    if not isinstance(vs, str) or "/" not in vs or not isinstance(name, str):
        raise ValueError(f"targetRef.route: {{virtualService: <ns>/<name>, name: <route>}}, got {d!r}")
    return f"{vs}/{name}"
