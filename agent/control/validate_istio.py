"""Istio's VirtualService and DestinationRule from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``), ``kind``
and ``metadata`` and hands the ``spec`` mapping here. Every field is checked
against what nodemesh implements: a field Istio has and we do not is refused by
name ("spec.http[0].retries: retries is not supported yet"), a field Istio does
not have is an unknown field; nothing is silently ignored. Regexes are compiled
with RE2, which is what Envoy (and our node proxy) runs. The result is the
frozen values of :mod:`agent.control.istio`, carrying the ``file:line`` they came
from. Whether a route's hosts and subsets exist is checked at apply time
(:mod:`agent.control.apply`), where the registry is known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import re2

from agent.control.istio import (
    MATCH_KINDS,
    RETRY_ON,
    ConnectionPool,
    ConsistentHash,
    Cors,
    Destination,
    DestinationRule,
    Fault,
    HeaderOps,
    HttpMatch,
    HttpRoute,
    LoadBalancer,
    OutlierDetection,
    PortPolicies,
    Redirect,
    Retry,
    RouteDestination,
    StringMatch,
    Subset,
    TcpMatch,
    TcpRoute,
    TlsMatch,
    TlsRoute,
    TrafficPolicy,
    VirtualService,
    retry_policy,
)
from agent.control.validate import (
    _at,
    _Doc,
    _int,
    _labels,
    _map,
    _name,
    _str,
    _tname,
    parse_duration_s,
)

# A host as Istio takes it: DNS labels, optionally behind a leading wildcard label
_HOST_RE = re.compile(r"(\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)\.?\Z",
                      re.ASCII | re.IGNORECASE)
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z", re.ASCII)
_ISTIO_DURATION_RE = re.compile(r"(\d+(\.\d+)?(ms|s|m|h))+\Z", re.ASCII)
DR_LOAD_BALANCERS = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error comes back to the user as an InputError instead

_YET = "not supported yet"
# Istio fields nodemesh refuses by name, with the reason shown
_VS_REFUSED = {"exportTo": "is not supported (every resource is visible in every namespace)"}
_ROUTE_REFUSED = {

    "mirrors": f"is {_YET} (one mirror per route: use mirror)",
    "mirror_percent": "is deprecated in Istio (use mirrorPercentage)",
    "mirrorPercent": "is deprecated in Istio (use mirrorPercentage)",
    "delegate": "is not supported (a VirtualService holds all its routes)",
}
_MATCH_REFUSED = {"statPrefix": f"is {_YET}",
                  "gateways": f"is {_YET} (bind the whole VirtualService with spec.gateways)"}
_DR_REFUSED = {"exportTo": "is not supported (every resource is visible in every namespace)",
               "workloadSelector": f"is {_YET}"}
_POLICY_REFUSED = {k: f"is {_YET}" for k in ("proxyProtocol", "tunnel")}
_POLICY_FIELDS = ("loadBalancer", "outlierDetection", "connectionPool", "tls")
_LB_REFUSED = {k: f"is {_YET}" for k in (
                                         "warmupDurationSecs", "warmup")}

_VS_FIELDS = ("hosts", "gateways", "http", "tcp", "tls")
_ROUTE_FIELDS = ("name", "match", "route", "timeout", "headers", "rewrite", "directResponse",
                 "retries", "fault", "mirror", "mirrorPercentage", "redirect", "corsPolicy")
_MATCH_FIELDS = ("name", "uri", "scheme", "method", "authority", "headers", "withoutHeaders",
                 "queryParams", "ignoreUriCase", "port", "sourceLabels", "sourceNamespace")


def _fields(doc: _Doc, m: Mapping[str, Any], path: str, allowed: tuple[str, ...],
            refused: Mapping[str, str] | None = None) -> None:
    """Every key of ``m`` is one we implement; an Istio field we do not is refused by name."""
    for k in m:
        if k in allowed:
            continue
        if refused is not None and k in refused:
            raise doc.fail(_at(path, k), f"{k} {refused[k]}",
                           hint=f"supported here: {', '.join(allowed)}")
        raise doc.fail(_at(path, k), f"unknown field {k!r}", hint=f"allowed here: {', '.join(allowed)}")


def _list(doc: _Doc, m: Mapping[str, Any], key: str, path: str, *, required: bool = False,
          ) -> list[Any]:
    v = m.get(key)
    if v is None:
        if required:
            raise doc.fail(_at(path, key), f"missing required field {key!r}")
        return []
    if not isinstance(v, list):
        raise doc.fail(_at(path, key), f"expected a list, got {_tname(v)}")
    return v


def _host(doc: _Doc, v: Any, path: str, *, wildcard: bool) -> str:
    if not isinstance(v, str) or not v:
        raise doc.fail(path, f"expected a host name, got {_tname(v)} {v!r}")
    if not _HOST_RE.match(v) or len(v) > 253:
        raise doc.fail(path, f"{v!r} is not a host name",
                       hint="a service name (reviews), <svc>.<ns>, an FQDN or <svc>.service.consul")
    if v.startswith("*") and not wildcard:
        raise doc.fail(path, f"a route destination cannot be a wildcard host ({v!r})",
                       hint="name the service the traffic goes to")
    return v


# -- VirtualService ---------------------------------------------------------------------------

def virtual_service(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> VirtualService:
    _fields(doc, spec, "spec", _VS_FIELDS, _VS_REFUSED)
    hosts_v = _list(doc, spec, "hosts", "spec", required=True)
    if not hosts_v:
        raise doc.fail("spec.hosts", "expected a non-empty list of hosts")
    hosts = tuple(_host(doc, h, f"spec.hosts[{i}]", wildcard=True) for i, h in enumerate(hosts_v))
    gateways = []
    for i, g in enumerate(_list(doc, spec, "gateways", "spec")):
        gateways.append(_gateway_ref(doc, g, f"spec.gateways[{i}]"))
        if g in gateways[:-1]:
            raise doc.fail(f"spec.gateways[{i}]", f"gateway {g!r} is listed twice")
    routes = tuple(_route(doc, _map(doc, r, f"spec.http[{i}]"), f"spec.http[{i}]")
                   for i, r in enumerate(_list(doc, spec, "http", "spec")))
    tcp = tuple(_tcp_route(doc, _map(doc, r, f"spec.tcp[{i}]"), f"spec.tcp[{i}]")
                for i, r in enumerate(_list(doc, spec, "tcp", "spec")))
    tls = tuple(_tls_route(doc, _map(doc, r, f"spec.tls[{i}]"), f"spec.tls[{i}]")
                for i, r in enumerate(_list(doc, spec, "tls", "spec")))
    if tls and (not gateways or "mesh" in gateways):
        raise doc.fail("spec.tls", f"tls routes for mesh traffic are {_YET}: they route what a "
                       "Gateway's TLS PASSTHROUGH server takes",
                       hint="bind the VirtualService to a Gateway only (gateways: [my-gateway])")
    return VirtualService(name, ns, hosts, routes, tuple(gateways),
                          source=f"{doc.file}:{doc.start_line}", tcp=tcp, tls=tls)


def _gateway_ref(doc: _Doc, g: Any, path: str) -> str:
    """A ``gateways`` entry: ``mesh``, a Gateway's name (in the VirtualService's namespace) or
    ``<namespace>/<name>``. Whether that Gateway exists is checked at apply time."""
    if not isinstance(g, str) or not g:
        raise doc.fail(path, f"expected a gateway name, got {_tname(g)} {g!r}")
    if g == "mesh":
        return g
    ns, sep, name = g.partition("/")
    if sep:
        _name(doc, ns, path)
    _name(doc, name if sep else g, path)
    return g


def _tls_route(doc: _Doc, m: Mapping[str, Any], path: str) -> TlsRoute:
    """A TLSRoute: match on sniHosts (required) and port; weighted destinations."""
    _fields(doc, m, path, ("match", "route"))
    matches = []
    for i, x in enumerate(_list(doc, m, "match", path, required=True)):
        mpath = f"{path}.match[{i}]"
        mm = _map(doc, x, mpath)
        _fields(doc, mm, mpath, ("sniHosts", "port"),
                {k: f"is {_YET}" for k in ("destinationSubnets", "sourceLabels", "sourceNamespace",
                                           "gateways")})
        sni = _list(doc, mm, "sniHosts", mpath, required=True)
        if not sni:
            raise doc.fail(f"{mpath}.sniHosts", "expected a non-empty list of SNI hosts")
        hosts = tuple(_host(doc, h, f"{mpath}.sniHosts[{j}]", wildcard=True).lower().rstrip(".")
                      for j, h in enumerate(sni))
        matches.append(TlsMatch(hosts, _int(doc, mm, "port", mpath, 1, 65535, default=0)))
    if not matches:
        raise doc.fail(f"{path}.match", "a tls route needs at least one match with sniHosts")
    if "route" not in m:
        raise doc.fail(f"{path}.route", "missing required field 'route'")
    dests = _destinations(doc, m, path)
    for i, rd in enumerate(dests):
        if not (rd.request_headers.empty and rd.response_headers.empty):
            raise doc.fail(f"{path}.route[{i}].headers", "a tls route has no headers to change")
    return TlsRoute(tuple(matches), dests)


def _tcp_route(doc: _Doc, m: Mapping[str, Any], path: str) -> TcpRoute:
    """A TCPRoute: match on port, sourceLabels, sourceNamespace; weighted destinations."""
    _fields(doc, m, path, ("match", "route"))
    matches = []
    for i, x in enumerate(_list(doc, m, "match", path)):
        mpath = f"{path}.match[{i}]"
        mm = _map(doc, x, mpath)
        _fields(doc, mm, mpath, ("port", "sourceLabels", "sourceNamespace"),
                {"destinationSubnets": f"is {_YET}", "sourceSubnet": "is deprecated in Istio",
                 "gateways": f"is {_YET} (bind the whole VirtualService with spec.gateways)"})
        port = _int(doc, mm, "port", mpath, 1, 65535, default=0)
        labels = _labels(doc, mm.get("sourceLabels"), f"{mpath}.sourceLabels")
        matches.append(TcpMatch(port, tuple(sorted(labels.items())), _str(doc, mm, "sourceNamespace", mpath)))
    if "route" not in m:
        raise doc.fail(f"{path}.route", "missing required field 'route'")
    dests = _destinations(doc, m, path)
    for i, rd in enumerate(dests):
        if not (rd.request_headers.empty and rd.response_headers.empty):
            raise doc.fail(f"{path}.route[{i}].headers", "a tcp route has no headers to change")
    return TcpRoute(tuple(matches), dests)


def _route(doc: _Doc, m: Mapping[str, Any], path: str) -> HttpRoute:
    _fields(doc, m, path, _ROUTE_FIELDS, _ROUTE_REFUSED)
    has_route, has_direct = "route" in m, "directResponse" in m or "redirect" in m
    both = "directResponse" in m and "redirect" in m
    if has_route == has_direct or both:
        raise doc.fail(path, "an http route needs exactly one of 'route', 'redirect' or "
                       "'directResponse'" + (", not several" if has_route or both else ""))
    matches = tuple(_match(doc, _map(doc, x, f"{path}.match[{i}]"), f"{path}.match[{i}]")
                    for i, x in enumerate(_list(doc, m, "match", path)))
    dests: tuple[RouteDestination, ...] = ()
    direct_status, direct_body = 0, ""
    redirect = None
    if has_route:
        dests = _destinations(doc, m, path)
    elif "redirect" in m:
        redirect = _redirect(doc, m["redirect"], f"{path}.redirect")
    else:
        dpath = f"{path}.directResponse"
        d = _map(doc, m["directResponse"], dpath)
        _fields(doc, d, dpath, ("status", "body"))
        direct_status = _int(doc, d, "status", dpath, 200, 599, required=True)
        if d.get("body") is not None:
            body = _map(doc, d["body"], f"{dpath}.body")
            _fields(doc, body, f"{dpath}.body", ("string",), {"bytes": f"is {_YET}"})
            direct_body = _str(doc, body, "string", f"{dpath}.body")
        if "rewrite" in m:
            raise doc.fail(f"{path}.rewrite", "rewrite cannot be used with directResponse")
    rewrite_uri = rewrite_authority = None
    rewrite_regex: tuple[str, str] | None = None
    if "rewrite" in m:
        rpath = f"{path}.rewrite"
        rw = _map(doc, m["rewrite"], rpath)
        _fields(doc, rw, rpath, ("uri", "authority", "uriRegexRewrite"))
        if not rw:
            raise doc.fail(rpath, "rewrite needs 'uri', 'uriRegexRewrite' or 'authority'")
        if "uri" in rw and "uriRegexRewrite" in rw:
            raise doc.fail(f"{rpath}.uriRegexRewrite", "uri and uriRegexRewrite are alternatives")
        if "uriRegexRewrite" in rw:
            xpath = f"{rpath}.uriRegexRewrite"
            x = _map(doc, rw["uriRegexRewrite"], xpath)
            _fields(doc, x, xpath, ("match", "rewrite"))
            pattern = _string_match(doc, {"regex": _str(doc, x, "match", xpath, required=True)},
                                    f"{xpath}.match").value
            rewrite_regex = (pattern, _str(doc, x, "rewrite", xpath, required=True))
        if "uri" in rw:
            rewrite_uri = _str(doc, rw, "uri", rpath, required=True)
        if "authority" in rw:
            rewrite_authority = _str(doc, rw, "authority", rpath, required=True)
            if not rewrite_authority:
                raise doc.fail(f"{rpath}.authority", "expected a non-empty authority")
    request_ops, response_ops = _header_ops(doc, m.get("headers"), f"{path}.headers")
    return HttpRoute(
        name=_str(doc, m, "name", path), matches=matches, route=dests,
        timeout_s=_timeout(doc, m, path), request_headers=request_ops,
        response_headers=response_ops, rewrite_uri=rewrite_uri, rewrite_authority=rewrite_authority,
        direct_status=direct_status, direct_body=direct_body,
        retries=_retries(doc, m.get("retries"), f"{path}.retries"),
        fault=_fault(doc, m.get("fault"), f"{path}.fault"),
        mirror=_mirror(doc, m.get("mirror"), f"{path}.mirror"),
        mirror_percent=_mirror_percent(doc, m, path),
        redirect=redirect,
        rewrite_regex=rewrite_regex,
        cors=_cors(doc, m.get("corsPolicy"), f"{path}.corsPolicy"),
    )


def _cors(doc: _Doc, v: Any, path: str) -> Cors | None:
    """Istio's CorsPolicy; the deprecated allowOrigin is refused (write allowOrigins)."""
    if v is None:
        return None
    m = _map(doc, v, path)
    _fields(doc, m, path, ("allowOrigins", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge",
                           "allowCredentials", "unmatchedPreflights"),
            {"allowOrigin": "is deprecated in Istio (write allowOrigins)"})
    origins = tuple(_string_match(doc, o, f"{path}.allowOrigins[{i}]")
                    for i, o in enumerate(_list(doc, m, "allowOrigins", path)))
    if not origins:
        raise doc.fail(f"{path}.allowOrigins", "expected a non-empty list of origin matches",
                       hint="e.g. [{exact: https://example.com}] or [{prefix: https://}]")

    def names(key: str) -> tuple[str, ...]:
        out = []
        for i, x in enumerate(_list(doc, m, key, path)):
            if not isinstance(x, str) or not x or (x != "*" and not _HEADER_NAME_RE.match(x)):
                raise doc.fail(f"{path}.{key}[{i}]", f"expected a method or header name, got {x!r}")
            out.append(x)
        return tuple(out)

    max_age = None
    if m.get("maxAge") is not None:
        age = _timeout(doc, {"timeout": m["maxAge"]}, f"{path}.maxAge")
        max_age = int(age or 0)
    cred = m.get("allowCredentials", False)
    if not isinstance(cred, bool):
        raise doc.fail(f"{path}.allowCredentials", f"expected true or false, got {_tname(cred)}")
    unmatched = _str(doc, m, "unmatchedPreflights", path, default="FORWARD") or "FORWARD"
    if unmatched not in ("FORWARD", "IGNORE"):
        raise doc.fail(f"{path}.unmatchedPreflights", f"expected FORWARD or IGNORE, got {unmatched!r}")
    return Cors(origins, names("allowMethods"), names("allowHeaders"), names("exposeHeaders"), max_age,
                cred, unmatched)


def _redirect(doc: _Doc, v: Any, path: str) -> Redirect:
    """HTTPRedirect: uri, authority, scheme, redirectCode (301 by default); port and derivePort
    are refused by name."""
    m = _map(doc, v, path)
    _fields(doc, m, path, ("uri", "authority", "scheme", "redirectCode", "port", "derivePort"))
    if not m:
        raise doc.fail(path, "a redirect needs at least one of uri, authority, scheme, port")
    port = _int(doc, m, "port", path, 1, 65535, default=0)
    derive = _str(doc, m, "derivePort", path)
    if derive and derive not in ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"):
        raise doc.fail(f"{path}.derivePort",
                       f"expected FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT, got {derive!r}")
    if port and derive:
        raise doc.fail(f"{path}.derivePort", "port and derivePort are alternatives")
    code = _int(doc, m, "redirectCode", path, 300, 399, default=301)
    scheme = _str(doc, m, "scheme", path)
    if scheme and scheme not in ("http", "https"):
        raise doc.fail(f"{path}.scheme", f"expected http or https, got {scheme!r}")
    uri = _str(doc, m, "uri", path)
    if uri and not uri.startswith("/"):
        raise doc.fail(f"{path}.uri", f"expected a path starting with /, got {uri!r}")
    return Redirect(uri, _str(doc, m, "authority", path), scheme, code, port, derive)


def _mirror_percent(doc: _Doc, m: Mapping[str, Any], path: str) -> float:
    if m.get("mirrorPercentage") is None:
        return 100.0  # Istio: every request when not given
    if "mirror" not in m:
        raise doc.fail(f"{path}.mirrorPercentage", "mirrorPercentage without a mirror")
    pp = f"{path}.mirrorPercentage"
    pm = _map(doc, m["mirrorPercentage"], pp)
    _fields(doc, pm, pp, ("value",))
    v = pm.get("value", 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
        raise doc.fail(f"{pp}.value", f"expected a percentage 0-100, got {v!r}")
    return float(v)


def _mirror(doc: _Doc, v: Any, path: str) -> Destination | None:
    return None if v is None else _destination(doc, v, path)


def _destination(doc: _Doc, v: Any, path: str) -> Destination:
    """A Destination: host (a service, never a wildcard), subset, port.number."""
    d = _map(doc, v, path)
    _fields(doc, d, path, ("host", "subset", "port"))
    if "host" not in d:
        raise doc.fail(f"{path}.host", "missing required field 'host'")
    host = _host(doc, d["host"], f"{path}.host", wildcard=False)
    subset = _name(doc, _str(doc, d, "subset", path), f"{path}.subset") if "subset" in d else ""
    port = 0
    if d.get("port") is not None:
        pm = _map(doc, d["port"], f"{path}.port")
        _fields(doc, pm, f"{path}.port", ("number",))
        port = _int(doc, pm, "number", f"{path}.port", 1, 65535, required=True)
    return Destination(host, subset, port)


def _retries(doc: _Doc, v: Any, path: str) -> Retry | None:
    """Istio's HTTPRetry: attempts, perTryTimeout, retryOn (Envoy's conditions and status codes).
    ``retryRemoteLocalities`` and ``retryIgnorePreviousHosts`` are refused by name (retries
    always go to another endpoint while one is left)."""
    if v is None:
        return None
    m = _map(doc, v, path)
    _fields(doc, m, path, ("attempts", "perTryTimeout", "retryOn"),
            {"retryRemoteLocalities": f"is {_YET}", "retryIgnorePreviousHosts": f"is {_YET}",
             "backoff": f"is {_YET}"})
    attempts = _int(doc, m, "attempts", path, 0, 100, required=True)
    per_try = _timeout(doc, {"timeout": m["perTryTimeout"]}, f"{path}.perTryTimeout") \
        if m.get("perTryTimeout") is not None else None
    names: list[str] = []
    codes: list[int] = []
    if m.get("retryOn") is not None:
        text = m["retryOn"]
        if not isinstance(text, str):
            raise doc.fail(f"{path}.retryOn", f"expected a comma-separated string, got {_tname(text)}")
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            if item.isdigit() and 100 <= int(item) <= 599:
                codes.append(int(item))
            elif item in RETRY_ON:
                names.append(item)
            else:
                raise doc.fail(f"{path}.retryOn", f"unknown retry condition {item!r}",
                               hint="one of: " + ", ".join(RETRY_ON) + ", or HTTP status codes")
    return retry_policy(attempts, per_try, names, codes)


def _percent(doc: _Doc, m: Mapping[str, Any], path: str) -> float:
    if m.get("percentage") is None:
        if "percent" in m:
            raise doc.fail(f"{path}.percent", "percent is deprecated in Istio and not supported",
                           hint="write percentage: {value: 10}")
        return 0.0  # Istio: unspecified injects nothing
    pm = _map(doc, m["percentage"], f"{path}.percentage")
    _fields(doc, pm, f"{path}.percentage", ("value",))
    v = pm.get("value", 0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 100:
        raise doc.fail(f"{path}.percentage.value", f"expected a percentage 0-100, got {v!r}")
    return float(v)


def _fault(doc: _Doc, v: Any, path: str) -> Fault | None:
    if v is None:
        return None
    m = _map(doc, v, path)
    _fields(doc, m, path, ("delay", "abort"))
    if not m:
        raise doc.fail(path, "a fault needs 'delay' or 'abort'")
    delay_s = delay_pct = 0.0
    if m.get("delay") is not None:
        dpath = f"{path}.delay"
        d = _map(doc, m["delay"], dpath)
        _fields(doc, d, dpath, ("fixedDelay", "percentage"), {"exponentialDelay": f"is {_YET}",
                                                                "percent": "is deprecated"})
        if d.get("fixedDelay") is None:
            raise doc.fail(f"{dpath}.fixedDelay", "missing required field 'fixedDelay'")
        delay_s = _timeout(doc, {"timeout": d["fixedDelay"]}, f"{dpath}.fixedDelay") or 0.0
        delay_pct = _percent(doc, d, dpath)
    status, grpc, abort_pct = 0, "", 0.0
    if m.get("abort") is not None:
        apath = f"{path}.abort"
        a = _map(doc, m["abort"], apath)
        _fields(doc, a, apath, ("httpStatus", "grpcStatus", "percentage"), {"http2Error": f"is {_YET}",
                                                                            "percent": "is deprecated"})
        if "httpStatus" not in a and "grpcStatus" not in a:
            raise doc.fail(apath, "an abort needs 'httpStatus' or 'grpcStatus'")
        if "httpStatus" in a:
            status = _int(doc, a, "httpStatus", apath, 200, 599, required=True)
        if "grpcStatus" in a:
            grpc = _str(doc, a, "grpcStatus", apath).upper()
            if grpc not in GRPC_STATUS_NAMES:
                raise doc.fail(f"{apath}.grpcStatus", f"unknown gRPC status {grpc!r}",
                               hint="one of: " + ", ".join(GRPC_STATUS_NAMES))
        abort_pct = _percent(doc, a, apath)
    return Fault(delay_s, delay_pct, status, grpc, abort_pct)


GRPC_STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                     "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                     "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                     "UNAUTHENTICATED")


def _destinations(doc: _Doc, m: Mapping[str, Any], path: str) -> tuple[RouteDestination, ...]:
    items = _list(doc, m, "route", path)
    if not items:
        raise doc.fail(f"{path}.route", "expected a non-empty list of destinations")
    out = []
    for i, item in enumerate(items):
        rpath = f"{path}.route[{i}]"
        rd = _map(doc, item, rpath)
        _fields(doc, rd, rpath, ("destination", "weight", "headers"))
        if "destination" not in rd:
            raise doc.fail(f"{rpath}.destination", "missing required field 'destination'")
        dest = _destination(doc, rd["destination"], f"{rpath}.destination")
        # Istio: a lone destination takes all traffic, whatever its weight says
        weight = _int(doc, rd, "weight", rpath, 0, 100, default=0 if len(items) > 1 else 100)
        if len(items) == 1:
            weight = 100
        request_ops, response_ops = _header_ops(doc, rd.get("headers"), f"{rpath}.headers")
        out.append(RouteDestination(dest, weight, request_ops, response_ops))
    total = sum(r.weight for r in out)
    if len(out) > 1 and total != 100:
        raise doc.fail(f"{path}.route", f"the weights of the destinations sum to {total}, not 100",
                       hint="with more than one destination every weight must be given and "
                            "they must add up to 100 (Istio's rule)")
    return tuple(out)


def _timeout(doc: _Doc, m: Mapping[str, Any], path: str) -> float | None:
    if m.get("timeout") is None:
        return None
    v, p = m["timeout"], f"{path}.timeout"
    if not isinstance(v, str | int | float) or isinstance(v, bool):
        raise doc.fail(p, f"expected a duration, got {_tname(v)}", hint="like 1.5s, 300ms, 1m")
    if not isinstance(v, str) or not _ISTIO_DURATION_RE.match(v):
        raise doc.fail(p, f"{v!r} is not a duration", hint="like 1.5s, 300ms, 1m (a unit is required)")
    s = parse_duration_s(v)
    if s == 0:
        return None  # Envoy's and Istio's 0s: no timeout
    if s < 0.001:
        raise doc.fail(p, f"{v!r} is shorter than 1ms (Istio's smallest duration)")
    return s


def _header_ops(doc: _Doc, v: Any, path: str) -> tuple[HeaderOps, HeaderOps]:
    if v is None:
        return HeaderOps(), HeaderOps()
    m = _map(doc, v, path)
    _fields(doc, m, path, ("request", "response"))
    return _ops(doc, m.get("request"), f"{path}.request"), _ops(doc, m.get("response"), f"{path}.response")


def _ops(doc: _Doc, v: Any, path: str) -> HeaderOps:
    if v is None:
        return HeaderOps()
    m = _map(doc, v, path)
    _fields(doc, m, path, ("set", "add", "remove"))
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for key in ("set", "add"):
        if m.get(key) is None:
            pairs[key] = ()
            continue
        kv = _map(doc, m[key], f"{path}.{key}")
        for name, value in kv.items():
            _header_name(doc, name, f"{path}.{key}.{name}")
            if not isinstance(value, str):
                raise doc.fail(f"{path}.{key}.{name}", f"expected a string value, got {_tname(value)} "
                               f"{value!r}", hint="quote it: '...'")
        pairs[key] = tuple(kv.items())
    removed = _list(doc, m, "remove", path)
    for i, name in enumerate(removed):
        if not isinstance(name, str):
            raise doc.fail(f"{path}.remove[{i}]", f"expected a header name, got {_tname(name)}")
        _header_name(doc, name, f"{path}.remove[{i}]")
    return HeaderOps(pairs["set"], pairs["add"], tuple(removed))


def _header_name(doc: _Doc, name: str, path: str) -> str:
    if not _HEADER_NAME_RE.match(name):
        raise doc.fail(path, f"{name!r} is not an HTTP header name")
    return name


def _match(doc: _Doc, m: Mapping[str, Any], path: str) -> HttpMatch:
    _fields(doc, m, path, _MATCH_FIELDS, _MATCH_REFUSED)
    sm = {k: _string_match(doc, m[k], f"{path}.{k}") if m.get(k) is not None else None
          for k in ("uri", "scheme", "method", "authority")}
    ignore = m.get("ignoreUriCase", False)
    if not isinstance(ignore, bool):
        raise doc.fail(f"{path}.ignoreUriCase", f"expected true or false, got {_tname(ignore)} {ignore!r}")
    source_ns = _str(doc, m, "sourceNamespace", path)
    if source_ns:
        _name(doc, source_ns, f"{path}.sourceNamespace")
    return HttpMatch(
        name=_str(doc, m, "name", path), uri=sm["uri"], scheme=sm["scheme"], method=sm["method"],
        authority=sm["authority"],
        headers=_named_matches(doc, m.get("headers"), f"{path}.headers", lower=True),
        without_headers=_named_matches(doc, m.get("withoutHeaders"), f"{path}.withoutHeaders",
                                       lower=True),
        query_params=_named_matches(doc, m.get("queryParams"), f"{path}.queryParams", lower=False),
        ignore_uri_case=ignore, port=_int(doc, m, "port", path, 1, 65535, default=0),
        source_labels=tuple(_labels(doc, m.get("sourceLabels"), f"{path}.sourceLabels").items()),
        source_namespace=source_ns,
    )


def _named_matches(doc: _Doc, v: Any, path: str, *, lower: bool,
                   ) -> tuple[tuple[str, StringMatch], ...]:
    if v is None:
        return ()
    out: dict[str, StringMatch] = {}
    for name, sv in _map(doc, v, path).items():
        p = f"{path}.{name}"
        if lower:
            _header_name(doc, name, p)
            name = name.lower()
            if name in out:
                raise doc.fail(p, f"header {name!r} is listed twice (header names ignore case)")
        out[name] = _string_match(doc, sv, p)
    return tuple(out.items())


def _string_match(doc: _Doc, v: Any, path: str) -> StringMatch:
    m = _map(doc, v, path)
    _fields(doc, m, path, MATCH_KINDS)
    if len(m) != 1:
        raise doc.fail(path, "expected exactly one of " + ", ".join(MATCH_KINDS)
                       + (f", got {len(m)}" if m else ""),
                       hint=None if m else "an empty match (Istio's presence test) is not supported "
                                           "yet; {regex: '.*'} matches any value")
    (kind, value), = m.items()
    if not isinstance(value, str):
        raise doc.fail(f"{path}.{kind}", f"expected a string, got {_tname(value)} {value!r}")
    if kind == "regex":
        try:
            re2.compile(value, options=_RE2_OPTIONS)
        except re2.error as e:
            reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) \
                else str(e)
            raise doc.fail(f"{path}.regex", f"invalid regex {value!r}: {reason}",
                           hint="regexes are RE2 syntax (no lookaround or backreferences) and "
                                "must match the whole value") from None
    return StringMatch(kind, value)


# -- DestinationRule --------------------------------------------------------------------------

def destination_rule(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> DestinationRule:
    _fields(doc, spec, "spec", ("host", "trafficPolicy", "subsets"), _DR_REFUSED)
    if "host" not in spec:
        raise doc.fail("spec.host", "missing required field 'host'")
    host = _host(doc, spec["host"], "spec.host", wildcard=True)
    policy, ports = _traffic_policy(doc, spec.get("trafficPolicy"), "spec.trafficPolicy")
    subsets: list[Subset] = []
    for i, item in enumerate(_list(doc, spec, "subsets", "spec")):
        path = f"spec.subsets[{i}]"
        s = _map(doc, item, path)
        _fields(doc, s, path, ("name", "labels", "trafficPolicy"))
        sname = _name(doc, _str(doc, s, "name", path, required=True), f"{path}.name")
        if any(x.name == sname for x in subsets):
            raise doc.fail(f"{path}.name", f"subset {sname!r} is defined twice")
        labels = _labels(doc, s.get("labels"), f"{path}.labels")
        sp, sports = _traffic_policy(doc, s.get("trafficPolicy"), f"{path}.trafficPolicy")
        subsets.append(Subset(sname, tuple(sorted(labels.items())), sp, sports))
    return DestinationRule(name, ns, host, policy, tuple(subsets), f"{doc.file}:{doc.start_line}", ports)


def _traffic_policy(doc: _Doc, v: Any, path: str) -> tuple[TrafficPolicy, PortPolicies]:
    """A trafficPolicy (the rule's or a subset's) and its portLevelSettings."""
    if v is None:
        return TrafficPolicy(), ()
    m = _map(doc, v, path)
    _fields(doc, m, path, (*_POLICY_FIELDS, "portLevelSettings"), _POLICY_REFUSED)
    policy = _policy_fields(doc, m, path)
    ports: list[tuple[int, TrafficPolicy]] = []
    for i, item in enumerate(_list(doc, m, "portLevelSettings", path)):
        ppath = f"{path}.portLevelSettings[{i}]"
        pm = _map(doc, item, ppath)
        _fields(doc, pm, ppath, ("port", *_POLICY_FIELDS), _POLICY_REFUSED)
        if pm.get("port") is None:
            raise doc.fail(f"{ppath}.port", "missing required field 'port'")
        port_m = _map(doc, pm["port"], f"{ppath}.port")
        _fields(doc, port_m, f"{ppath}.port", ("number",))
        number = _int(doc, port_m, "number", f"{ppath}.port", 1, 65535, required=True)
        if any(n == number for n, _ in ports):
            raise doc.fail(f"{ppath}.port.number", f"port {number} has settings twice")
        pp = _policy_fields(doc, pm, ppath)
        if pp.empty:
            raise doc.fail(ppath, f"port {number} has no settings",
                           hint="give loadBalancer, connectionPool or outlierDetection")
        ports.append((number, pp))
    return policy, tuple(ports)


def _policy_fields(doc: _Doc, m: Mapping[str, Any], path: str) -> TrafficPolicy:
    if m.get("tls") is not None:  # what mesh traffic always is here; other modes originate TLS
        t = _map(doc, m["tls"], f"{path}.tls")
        _fields(doc, t, f"{path}.tls", ("mode",))
        if t.get("mode") != "ISTIO_MUTUAL":
            raise doc.fail(f"{path}.tls.mode", f"tls mode {t.get('mode')!r} is {_YET}",
                           hint="ISTIO_MUTUAL (mesh mTLS, which every mesh hop already uses)")
    return TrafficPolicy(
        _load_balancer(doc, m["loadBalancer"], f"{path}.loadBalancer")
        if m.get("loadBalancer") is not None else None,
        _outlier(doc, m["outlierDetection"], f"{path}.outlierDetection")
        if m.get("outlierDetection") is not None else None,
        _connection_pool(doc, m["connectionPool"], f"{path}.connectionPool")
        if m.get("connectionPool") is not None else None,
    )


def _load_balancer(doc: _Doc, v: Any, path: str) -> LoadBalancer:
    """loadBalancer: simple or consistentHash (alternatives), and localityLbSetting.enabled."""
    lb = _map(doc, v, path)
    _fields(doc, lb, path, ("simple", "consistentHash", "localityLbSetting"), _LB_REFUSED)
    locality = True
    if lb.get("localityLbSetting") is not None:
        spath = f"{path}.localityLbSetting"
        ls = _map(doc, lb["localityLbSetting"], spath)
        _fields(doc, ls, spath, ("enabled",), {k: f"is {_YET}" for k in (
            "distribute", "failover", "failoverPriority")})
        if "enabled" in ls and not isinstance(ls["enabled"], bool):
            raise doc.fail(f"{spath}.enabled", f"expected true or false, got {_tname(ls['enabled'])}")
        locality = ls.get("enabled", True) is not False
    consistent = None
    if lb.get("consistentHash") is not None:
        if "simple" in lb:
            raise doc.fail(path, "simple and consistentHash are alternatives")
        consistent = _consistent_hash(doc, lb["consistentHash"], f"{path}.consistentHash")
    simple = ""
    if "simple" in lb:
        simple = _str(doc, lb, "simple", path, required=True)
        if simple not in DR_LOAD_BALANCERS:
            why = ("PASSTHROUGH is not supported: behind a service VIP there is no original destination "
                   "to pass the request through to (nodemesh has no kube-proxy; a pod dialled by its "
                   "address is reached as it is)") if simple == "PASSTHROUGH" \
                else f"unknown load balancer {simple!r}"
            hint = "one of: " + ", ".join(DR_LOAD_BALANCERS)
            if simple == "LEAST_CONN":
                hint += " (LEAST_REQUEST is LEAST_CONN's current name)"
            raise doc.fail(f"{path}.simple", why, hint=hint)
    return LoadBalancer(simple, consistent, locality)


def _consistent_hash(doc: _Doc, v: Any, path: str) -> ConsistentHash:
    """loadBalancer.consistentHash: exactly one key (httpHeaderName, httpCookie, useSourceIp,
    httpQueryParameterName) and optionally ringHash.minimumRingSize or maglev.tableSize."""
    m = _map(doc, v, path)
    keys = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
    _fields(doc, m, path, (*keys, "ringHash", "maglev", "minimumRingSize"))
    given = [k for k in keys if m.get(k) not in (None, False)]
    if len(given) != 1:
        raise doc.fail(path, "consistentHash needs exactly one of " + ", ".join(keys)
                       + (f" (it has {', '.join(given)})" if given else ""))
    k = given[0]
    name, cpath, ttl = "", "", None
    if k == "httpHeaderName":
        key, name = "header", _str(doc, m, k, path, required=True).lower()
        _header_name(doc, name, f"{path}.{k}")
    elif k == "httpQueryParameterName":
        key, name = "query", _str(doc, m, k, path, required=True)
    elif k == "useSourceIp":
        if m[k] is not True:
            raise doc.fail(f"{path}.{k}", "expected true")
        key = "source_ip"
    else:
        key = "cookie"
        cp = f"{path}.httpCookie"
        c = _map(doc, m[k], cp)
        _fields(doc, c, cp, ("name", "path", "ttl"), {"attributes": f"is {_YET}"})
        name = _str(doc, c, "name", cp, required=True)
        cpath = _str(doc, c, "path", cp)
        if c.get("ttl") is not None:
            ttl = _timeout(doc, {"timeout": c["ttl"]}, f"{cp}.ttl")
    algorithm, size = "ring", 1024
    if m.get("maglev") is not None:
        if m.get("ringHash") is not None or m.get("minimumRingSize") is not None:
            raise doc.fail(f"{path}.maglev", "maglev and ringHash are alternatives")
        mg = _map(doc, m["maglev"], f"{path}.maglev")
        _fields(doc, mg, f"{path}.maglev", ("tableSize",))
        algorithm, size = "maglev", _int(doc, mg, "tableSize", f"{path}.maglev", 7, 5_000_011, default=65537)
        if any(size % p == 0 for p in range(2, int(size ** 0.5) + 1)):
            raise doc.fail(f"{path}.maglev.tableSize", f"{size} is not a prime (Maglev's table size must be)")
    elif m.get("ringHash") is not None:
        rh = _map(doc, m["ringHash"], f"{path}.ringHash")
        _fields(doc, rh, f"{path}.ringHash", ("minimumRingSize",))
        size = _int(doc, rh, "minimumRingSize", f"{path}.ringHash", 1, 8_388_608, default=1024)
    elif m.get("minimumRingSize") is not None:
        size = _int(doc, m, "minimumRingSize", path, 1, 8_388_608)
    return ConsistentHash(key, name, cpath, ttl, algorithm, size)


def _connection_pool(doc: _Doc, v: Any, path: str) -> ConnectionPool:
    """connectionPool: Envoy's circuit breakers (over a limit: 503 ``UO``) and the upstream
    connections' connect and idle timeouts. Settings nodemesh does not implement are refused."""
    m = _map(doc, v, path)
    _fields(doc, m, path, ("tcp", "http"))
    t: Mapping[str, Any] = {}
    tpath = f"{path}.tcp"
    if m.get("tcp") is not None:
        t = _map(doc, m["tcp"], tpath)
        _fields(doc, t, tpath, ("maxConnections", "connectTimeout"),
                {k: f"is {_YET}" for k in ("tcpKeepalive", "maxConnectionDuration", "idleTimeout")})
    h: Mapping[str, Any] = {}
    hpath = f"{path}.http"
    if m.get("http") is not None:
        h = _map(doc, m["http"], hpath)
        _fields(doc, h, hpath, ("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection",
                                "maxRetries", "idleTimeout", "useClientProtocol"),
                {"h2UpgradePolicy": f"is {_YET} (the client's protocol is kept upstream)",
                 "maxConcurrentStreams": f"is {_YET}"})
        if "useClientProtocol" in h and h["useClientProtocol"] is not True:
            raise doc.fail(f"{hpath}.useClientProtocol", "only true is supported: nodemesh always "
                           "keeps the client's protocol upstream")

    def dur(mm: Mapping[str, Any], key: str, p: str) -> float | None:
        if mm.get(key) is None:
            return None
        s = _timeout(doc, {"timeout": mm[key]}, f"{p}.{key}")
        if not s:
            raise doc.fail(f"{p}.{key}", "expected a positive duration")
        return s

    big = 1 << 31
    return ConnectionPool(
        _int(doc, t, "maxConnections", tpath, 1, big, default=0),
        dur(t, "connectTimeout", tpath),
        _int(doc, h, "http1MaxPendingRequests", hpath, 1, big, default=0),
        _int(doc, h, "http2MaxRequests", hpath, 1, big, default=0),
        _int(doc, h, "maxRequestsPerConnection", hpath, 1, big, default=0),
        _int(doc, h, "maxRetries", hpath, 1, big, default=0),
        dur(h, "idleTimeout", hpath),
    )


def _outlier(doc: _Doc, v: Any, path: str) -> OutlierDetection:
    """Istio's OutlierDetection: ejection after consecutive 5xx (or gateway) errors, for
    baseEjectionTime times the ejection count, at most maxEjectionPercent of the endpoints."""
    m = _map(doc, v, path)
    _fields(doc, m, path, ("consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                           "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
                           "consecutiveErrors", "splitExternalLocalOriginErrors",
                           "consecutiveLocalOriginFailures"))
    if "splitExternalLocalOriginErrors" in m and not isinstance(m["splitExternalLocalOriginErrors"], bool):
        raise doc.fail(f"{path}.splitExternalLocalOriginErrors",
                       f"expected true or false, got {_tname(m['splitExternalLocalOriginErrors'])}")
    if "consecutiveErrors" in m:
        raise doc.fail(f"{path}.consecutiveErrors", "consecutiveErrors is deprecated in Istio",
                       hint="write consecutive5xxErrors")
    d = OutlierDetection()

    def dur(key: str, default: float) -> float:
        if m.get(key) is None:
            return default
        s = _timeout(doc, {"timeout": m[key]}, f"{path}.{key}")
        if s is None:
            raise doc.fail(f"{path}.{key}", "expected a positive duration")
        return s

    return OutlierDetection(
        _int(doc, m, "consecutive5xxErrors", path, 0, 1_000_000, default=d.consecutive_5xx),
        _int(doc, m, "consecutiveGatewayErrors", path, 0, 1_000_000, default=d.consecutive_gateway),
        dur("interval", d.interval_s),
        dur("baseEjectionTime", d.base_ejection_s),
        _int(doc, m, "maxEjectionPercent", path, 0, 100, default=d.max_ejection_percent),
        _int(doc, m, "minHealthPercent", path, 0, 100, default=d.min_health_percent),
        bool(m.get("splitExternalLocalOriginErrors", False)),
        _int(doc, m, "consecutiveLocalOriginFailures", path, 0, 1_000_000,
             default=d.consecutive_local_origin),
    )
