"""nodemesh's RateLimitPolicy from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``nodemesh.io/v1``), ``kind`` and ``metadata`` and hands the
``spec`` mapping here. Every rate is a positive number of requests (or
connections) per second with an optional integer ``burst`` (default: a tenth of
a second's worth); zero or negative rates, two descriptors (or two identity
overrides) for the same thing, and fields nodemesh does not implement are refused
with the field's line. A ``route`` target (``{virtualService: [<ns>/]<name>, name:
<route name>}``) limits only that VirtualService route's requests (HTTP only). Whether
the target Service and port, and the VirtualService and its named route, exist is
checked at apply time against the registry (:func:`agent.control.apply.plan`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from agent.control.ratelimit import (
    SCOPES,
    Descriptor,
    IdentityLimit,
    Rate,
    RateLimitPolicy,
    default_burst,
    route_id,
)
from agent.control.validate import _at, _Doc, _int, _map, _name, _str, _tname
from agent.control.validate_authz import non_empty_string
from agent.control.validate_istio import _fields, _list

MAX_RATE = 1_000_000.0
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z", re.ASCII)
_METHOD_RE = re.compile(r"[A-Z]{1,20}\Z", re.ASCII)
_TARGET_REFUSED = {"sectionName": "is not supported: name the service port with 'port'"}


def _rate(doc: _Doc, m: Mapping[str, Any], path: str, key: str = "requestsPerSecond") -> Rate:
    v = m.get(key)
    p = _at(path, key)
    if v is None:
        raise doc.fail(p, f"missing required field {key!r}")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise doc.fail(p, f"expected a number, got {_tname(v)} {v!r}")
    if not (v > 0) or not math.isfinite(v):
        raise doc.fail(p, f"a rate must be positive, got {v!r}",
                       hint="to stop all traffic use an AuthorizationPolicy; delete the limit to lift it")
    if v > MAX_RATE:
        raise doc.fail(p, f"{v} is over the largest rate nodemesh takes ({MAX_RATE:g}/s)")
    burst = _int(doc, m, "burst", path, 1, 10_000_000, default=default_burst(float(v)))
    return Rate(float(v), burst)


def _bucket(doc: _Doc, v: Any, path: str, extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], Rate]:
    m = _map(doc, v, path)
    _fields(doc, m, path, ("requestsPerSecond", "burst", *extra))
    return m, _rate(doc, m, path)


def rate_limit_policy(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> RateLimitPolicy:
    _fields(doc, spec, "spec", ("targetRef", "scope", "http", "tcp"))
    if spec.get("targetRef") is None:
        raise doc.fail("spec.targetRef", "missing required field 'targetRef'",
                       hint="targetRef: {kind: Service, name: <service>, port: <service port>}")
    ref = _map(doc, spec["targetRef"], "spec.targetRef")
    _fields(doc, ref, "spec.targetRef", ("kind", "group", "name", "port", "route"), _TARGET_REFUSED)
    kind = _str(doc, ref, "kind", "spec.targetRef", default="Service")
    if kind != "Service":
        raise doc.fail("spec.targetRef.kind", f"a RateLimitPolicy targets a Service, not {kind!r}")
    if _str(doc, ref, "group", "spec.targetRef") not in ("", "core"):
        raise doc.fail("spec.targetRef.group", "a Service's group is '' (core)")
    service = _name(doc, _str(doc, ref, "name", "spec.targetRef", required=True), "spec.targetRef.name")
    port = _int(doc, ref, "port", "spec.targetRef", 1, 65535) if "port" in ref else None
    route = _route(doc, ref["route"], ns) if ref.get("route") is not None else ""
    scope = _str(doc, spec, "scope", "spec", default="endpoint")
    if scope not in SCOPES:
        raise doc.fail("spec.scope", f"unknown scope {scope!r}",
                       hint="endpoint (each endpoint's limit) or service (one limit for all of them)")
    total = per_identity = connections = None
    identities: list[IdentityLimit] = []
    descriptors: list[Descriptor] = []
    max_connections = None
    if spec.get("http") is not None:
        http = _map(doc, spec["http"], "spec.http")
        _fields(doc, http, "spec.http", ("total", "perIdentity", "identities", "descriptors"))
        if http.get("total") is not None:
            total = _bucket(doc, http["total"], "spec.http.total")[1]
        if http.get("perIdentity") is not None:
            per_identity = _bucket(doc, http["perIdentity"], "spec.http.perIdentity")[1]
        seen: dict[str, int] = {}
        for i, v in enumerate(_list(doc, http, "identities", "spec.http")):
            path = f"spec.http.identities[{i}]"
            m, rate = _bucket(doc, v, path, ("principal",))
            principal = non_empty_string(doc, m.get("principal"), f"{path}.principal").removeprefix("spiffe://")
            if principal in seen:
                raise doc.fail(f"{path}.principal", f"identity {principal!r} is listed twice "
                               f"(first at spec.http.identities[{seen[principal]}])")
            seen[principal] = i
            identities.append(IdentityLimit(principal, rate))
        firsts: dict[tuple[str, str, str | None], int] = {}
        for i, v in enumerate(_list(doc, http, "descriptors", "spec.http")):
            path = f"spec.http.descriptors[{i}]"
            d = _descriptor(doc, v, path)
            if d.ident in firsts:
                raise doc.fail(path, f"duplicate descriptor {d.label()} (first at "
                               f"spec.http.descriptors[{firsts[d.ident]}])",
                               hint="one bucket per descriptor: merge the two")
            firsts[d.ident] = i
            descriptors.append(d)
    if spec.get("tcp") is not None:
        tcp = _map(doc, spec["tcp"], "spec.tcp")
        _fields(doc, tcp, "spec.tcp", ("connectionsPerSecond", "burst", "maxConnections"))
        if "connectionsPerSecond" in tcp:
            connections = _rate(doc, tcp, "spec.tcp", "connectionsPerSecond")
        elif "burst" in tcp:
            raise doc.fail("spec.tcp.burst", "a burst needs connectionsPerSecond")
        if "maxConnections" in tcp:
            max_connections = _int(doc, tcp, "maxConnections", "spec.tcp", 1, 10_000_000)
    if route and spec.get("tcp") is not None:
        raise doc.fail("spec.tcp", "a route target limits HTTP requests: no TCP limits",
                       hint="limit TCP connections in a policy that targets the service or its port")
    policy = RateLimitPolicy(name, ns, service, port, scope, total, per_identity, tuple(identities),
                             tuple(descriptors), connections, max_connections, f"{doc.file}:{doc.start_line}",
                             route)
    if not policy.http and not policy.tcp:
        raise doc.fail("spec", "a RateLimitPolicy needs a limit: spec.http or spec.tcp",
                       hint="e.g. http: {total: {requestsPerSecond: 100}}")
    return policy


def _route(doc: _Doc, v: Any, ns: str) -> str:
    """``{virtualService: [<namespace>/]<name>, name: <route name>}`` as a route id (see
    :func:`agent.control.ratelimit.route_id`); the namespace defaults to the policy's."""
    path = "spec.targetRef.route"
    if isinstance(v, str):
        raise doc.fail(path, f"expected {{virtualService: <name>, name: <route name>}}, got {v!r}",
                       hint="the route's name is spec.http[].name of the VirtualService")
    m = _map(doc, v, path)
    _fields(doc, m, path, ("virtualService", "name"))
    ref = _str(doc, m, "virtualService", path, required=True)
    vs_ns, _, vs = ref.rpartition("/")
    vs_ns = _name(doc, vs_ns, f"{path}.virtualService") if vs_ns else ns
    _name(doc, vs, f"{path}.virtualService")
    rname = non_empty_string(doc, m.get("name"), f"{path}.name")
    rid = route_id(vs_ns, vs, rname)
    if not rid:
        raise doc.fail(f"{path}.name", f"{rname!r}: nodemesh carries route names of printable ASCII "
                       "without spaces (at most 300 characters with the VirtualService's name)")
    return rid


def _descriptor(doc: _Doc, v: Any, path: str) -> Descriptor:
    m, rate = _bucket(doc, v, path, ("header", "value", "pathPrefix", "method"))
    kinds = [k for k in ("header", "pathPrefix", "method") if k in m]
    if len(kinds) != 1:
        raise doc.fail(path, "a descriptor needs exactly one of header, pathPrefix, method")
    kind = kinds[0]
    key = non_empty_string(doc, m[kind], f"{path}.{kind}")
    value = None
    if "value" in m:
        if kind != "header":
            raise doc.fail(f"{path}.value", "only a header descriptor takes a value")
        value = non_empty_string(doc, m["value"], f"{path}.value")
    if kind == "header":
        key = key.lower()
        if not _HEADER_RE.match(key) or key.startswith(":"):
            raise doc.fail(f"{path}.header", f"{m[kind]!r} is not a header name")
    elif kind == "pathPrefix" and not key.startswith("/"):
        raise doc.fail(f"{path}.pathPrefix", f"{key!r} does not start with '/'")
    elif kind == "method" and not _METHOD_RE.match(key):
        raise doc.fail(f"{path}.method", f"{key!r} is not an HTTP method (upper case, like POST)")
    return Descriptor(kind, key, value, rate)
