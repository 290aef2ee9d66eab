"""Istio's AuthorizationPolicy from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``security.istio.io/v1``, ``v1beta1``), ``kind`` and
``metadata`` and hands the ``spec`` mapping here. Every field is checked as
Istio's validation does, and against what nodemesh evaluates: a field Istio has
and we do not (``CUSTOM``, ``provider``, ``targetRef``) is refused by name, a
field Istio does not have is an unknown field. Values are checked where Istio
would only find out at request time: CIDRs and addresses parse, ports are
1-65535, string patterns are exact, ``prefix*``, ``*suffix`` or ``*`` (Envoy's
RBAC has nothing else), methods are upper case and hosts are lower-cased. The
result is the frozen values of :mod:`agent.control.authz`, carrying the
``file:line`` they came from; what they mean per connection or request is
:func:`agent.control.authz.evaluate`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from agent.control.authz import (
    ACTIONS,
    WHEN_KEYS,
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
)
from agent.control.validate import _Doc, _labels, _map, _tname
from agent.control.validate_istio import _HEADER_NAME_RE, _fields, _list

_NO_AUTHORIZER = "is not supported: nodemesh has no external authorizer"
_SPEC_REFUSED = {
    "provider": f"{_NO_AUTHORIZER} (CUSTOM action)",
    "targetRef": "is not supported: policies apply to workloads by selector (nodemesh has no "
                 "waypoints or gateways to attach them to)",
    "targetRefs": "is not supported: policies apply to workloads by selector (nodemesh has no "
                  "waypoints or gateways to attach them to)",
}
_SOURCE_REFUSED = {k: "is not supported yet (write principals: <trust-domain>/ns/<ns>/sa/<sa>)"
                   for k in ("serviceAccounts", "notServiceAccounts")}
# field -> what its values are
_SOURCE_FIELDS = {"principals": "principal", "notPrincipals": "principal",
                  "requestPrincipals": "pattern", "notRequestPrincipals": "pattern",
                  "namespaces": "pattern", "notNamespaces": "pattern",
                  "ipBlocks": "cidr", "notIpBlocks": "cidr",
                  "remoteIpBlocks": "cidr", "notRemoteIpBlocks": "cidr"}
_OPERATION_FIELDS = {"hosts": "host", "notHosts": "host", "ports": "port", "notPorts": "port",
                     "methods": "method", "notMethods": "method", "paths": "path", "notPaths": "path"}
_SNAKE = {k: re.sub(r"[A-Z]", lambda c: "_" + c.group(0).lower(), k)
          for k in (*_SOURCE_FIELDS, *_OPERATION_FIELDS)}  # ipBlocks -> ip_blocks
_NAMED_KEYS = ("request.headers", "request.auth.claims")  # need [name]
_IP_KEYS = ("source.ip", "remote.ip", "destination.ip")
_KEY_RE = re.compile(r"([a-z.]+)(?:\[(.*)\])?\Z", re.ASCII)
_CLAIM_PART_RE = re.compile(r"[^\[\]]+\Z")


def authorization_policy(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> AuthorizationPolicy:
    action = spec.get("action", "ALLOW")
    if action is None:
        action = "ALLOW"
    if not isinstance(action, str):
        raise doc.fail("spec.action", f"expected a string, got {_tname(action)} {action!r}")
    if action == "CUSTOM":
        raise doc.fail("spec.action", "CUSTOM is not supported: nodemesh has no external authorizer",
                       hint="one of: " + ", ".join(ACTIONS))
    if action not in ACTIONS:
        raise doc.fail("spec.action", f"unknown action {action!r}", hint="one of: " + ", ".join(ACTIONS))
    _fields(doc, spec, "spec", ("selector", "action", "rules"), _SPEC_REFUSED)
    selector = workload_selector(doc, spec)
    rules = tuple(_rule(doc, _map(doc, r, f"spec.rules[{i}]"), f"spec.rules[{i}]")
                  for i, r in enumerate(_list(doc, spec, "rules", "spec")))
    return AuthorizationPolicy(name, ns, action, selector, rules, f"{doc.file}:{doc.start_line}")


def _rule(doc: _Doc, m: Mapping[str, Any], path: str) -> Rule:
    """A rule: ``from`` (any source), ``to`` (any operation), ``when`` (all conditions)."""
    _fields(doc, m, path, ("from", "to", "when"))
    sources = None
    if m.get("from") is not None:
        sources = tuple(_source(doc, e, f"{path}.from[{i}]")
                        for i, e in enumerate(_nonempty(doc, m, "from", path)))
    operations = None
    if m.get("to") is not None:
        operations = tuple(_operation(doc, e, f"{path}.to[{i}]")
                           for i, e in enumerate(_nonempty(doc, m, "to", path)))
    when = tuple(_condition(doc, _map(doc, c, f"{path}.when[{i}]"), f"{path}.when[{i}]")
                 for i, c in enumerate(_list(doc, m, "when", path)))
    return Rule(sources, operations, when)


def _nonempty(doc: _Doc, m: Mapping[str, Any], key: str, path: str) -> list[Any]:
    items = _list(doc, m, key, path)
    if not items:
        raise doc.fail(f"{path}.{key}", f"{key} must not be empty (Istio refuses it)",
                       hint=f"leave {key} out to match any {'source' if key == 'from' else 'operation'}")
    return items


def _source(doc: _Doc, v: Any, path: str) -> Source:
    m = _map(doc, v, path)
    _fields(doc, m, path, ("source",))
    spath = f"{path}.source"
    if m.get("source") is None:
        raise doc.fail(spath, "missing required field 'source'")
    s = _map(doc, m["source"], spath)
    _fields(doc, s, spath, tuple(_SOURCE_FIELDS), _SOURCE_REFUSED)
    values = {k: _values(doc, s, k, spath, _SOURCE_FIELDS[k]) for k in _SOURCE_FIELDS}
    if not any(values.values()):
        raise doc.fail(spath, "a source needs at least one field (Istio refuses an empty one)",
                       hint="leave 'from' out to match any source")
    return Source(**{_SNAKE[k]: tuple(v) for k, v in values.items()})


def _operation(doc: _Doc, v: Any, path: str) -> Operation:
    m = _map(doc, v, path)
    _fields(doc, m, path, ("operation",))
    opath = f"{path}.operation"
    if m.get("operation") is None:
        raise doc.fail(opath, "missing required field 'operation'")
    o = _map(doc, m["operation"], opath)
    _fields(doc, o, opath, tuple(_OPERATION_FIELDS))
    values = {k: _values(doc, o, k, opath, _OPERATION_FIELDS[k]) for k in _OPERATION_FIELDS}
    if not any(values.values()):
        raise doc.fail(opath, "an operation needs at least one field (Istio refuses an empty one)",
                       hint="leave 'to' out to match any operation")
    ports = {k: tuple(int(x) for x in values.pop(k)) for k in ("ports", "notPorts")}
    return Operation(ports=ports["ports"], not_ports=ports["notPorts"],
                     **{_SNAKE[k]: tuple(v) for k, v in values.items()})


def _condition(doc: _Doc, m: Mapping[str, Any], path: str) -> Condition:
    _fields(doc, m, path, ("key", "values", "notValues"))
    kpath = f"{path}.key"
    key = m.get("key")
    if not isinstance(key, str) or not key:
        raise doc.fail(kpath, "missing required field 'key'" if key is None
                       else f"expected a condition key, got {_tname(key)} {key!r}")
    km = _KEY_RE.match(key)
    base, name = (km.group(1), km.group(2)) if km else (key, None)
    if base not in WHEN_KEYS:
        raise doc.fail(kpath, f"unknown condition key {key!r}", hint="known keys: " + ", ".join(
            f"{k}[NAME]" if k in _NAMED_KEYS else k for k in WHEN_KEYS))
    if base in _NAMED_KEYS:
        what = "header" if base == "request.headers" else "claim"
        if not name:
            raise doc.fail(kpath, f"{base} needs a {what} name: {base}[NAME]")
        if base == "request.headers" and not _HEADER_NAME_RE.match(name):
            raise doc.fail(kpath, f"{name!r} is not an HTTP header name")
        if base == "request.auth.claims" and not all(_CLAIM_PART_RE.match(p) for p in name.split("][")):
            raise doc.fail(kpath, f"{name!r} is not a claim name (nested claims: [a][b])")
    elif km is None or name is not None:
        raise doc.fail(kpath, f"{base} takes no name in brackets (got {key!r})")
    kind = "cidr" if base in _IP_KEYS else "port" if base == "destination.port" else "pattern"
    values = _values(doc, m, "values", path, kind)
    not_values = _values(doc, m, "notValues", path, kind)
    if not values and not not_values:
        raise doc.fail(path, f"condition {key!r} needs values or notValues (Istio refuses neither)")
    return Condition(key, tuple(values), tuple(not_values))


def workload_selector(doc: _Doc, spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """``spec.selector.matchLabels`` of the security kinds (None: every workload in scope)."""
    if spec.get("selector") is None:
        return None
    sel = _map(doc, spec["selector"], "spec.selector")
    _fields(doc, sel, "spec.selector", ("matchLabels",))
    return tuple(sorted(_labels(doc, sel.get("matchLabels"), "spec.selector.matchLabels").items()))


# -- values -----------------------------------------------------------------------------------

def _values(doc: _Doc, m: Mapping[str, Any], key: str, path: str, kind: str) -> list[str]:
    check = _CHECKS[kind]
    return [check(doc, v, f"{path}.{key}[{i}]") for i, v in enumerate(_list(doc, m, key, path))]


def non_empty_string(doc: _Doc, v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise doc.fail(path, f"expected a non-empty string, got {_tname(v)} {v!r}")
    return v


def _pattern(doc: _Doc, v: Any, path: str) -> str:
    """Istio's string match: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""
    s = non_empty_string(doc, v, path)
    stars = s.count("*")
    if stars and s != "*" and (stars > 1 or not (s.startswith("*") or s.endswith("*"))):
        raise doc.fail(path, f"{s!r}: Istio supports only prefix, suffix and presence matching",
                       hint="write an exact value, 'prefix*', '*suffix' or '*'")
    return s


def _path(doc: _Doc, v: Any, path: str) -> str:
    s = non_empty_string(doc, v, path)
    if "{*}" in s or "{**}" in s:
        raise doc.fail(path, f"{s!r}: path templates ({{*}}, {{**}}) are not supported yet",
                       hint="write an exact path, '/prefix/*', '*suffix' or '*'")
    return _pattern(doc, s, path)


def _principal(doc: _Doc, v: Any, path: str) -> str:
    s = _pattern(doc, v, path)
    if s.startswith("spiffe://"):
        raise doc.fail(path, f"{s!r}: a principal is written without 'spiffe://'",
                       hint=f"write {s[len('spiffe://'):]!r} (<trust-domain>/ns/<ns>/sa/<sa>)")
    return s


def _host(doc: _Doc, v: Any, path: str) -> str:
    return _pattern(doc, v, path).lower()


def _method(doc: _Doc, v: Any, path: str) -> str:
    s = _pattern(doc, v, path)
    if s != s.upper():
        raise doc.fail(path, f"{s!r}: methods are matched as sent, and HTTP methods are upper case",
                       hint=f"write {s.upper()!r}")
    return s


def _port(doc: _Doc, v: Any, path: str) -> str:
    """A port as Istio writes it (a string) or as a number: 1-65535, kept as its digits."""
    if type(v) is int or (isinstance(v, str) and v.isascii() and v.isdigit()):
        n = int(v)
        if 1 <= n <= 65535:
            return str(n)
        raise doc.fail(path, f"port {v!r} is out of range 1-65535")
    raise doc.fail(path, f"expected a port (1-65535, a number or a string of digits), got {_tname(v)} {v!r}")


def _cidr(doc: _Doc, v: Any, path: str) -> str:
    """An address or a CIDR block, as Go's net.ParseIP / net.ParseCIDR take them."""
    s = non_empty_string(doc, v, path)
    addr, slash, bits = s.partition("/")
    why = ""
    if "%" in addr:
        why = " (an address with a zone is not one)"
    elif slash and not (bits.isascii() and bits.isdigit()):
        why = f" (the prefix length {bits!r} is not a number)"
    try:
        ipaddress.ip_network(s, strict=False)
    except ValueError:
        ok = False
    else:
        ok = not why
    if not ok:
        raise doc.fail(path, f"{s!r} is not an IP address or CIDR block{why}",
                       hint="e.g. 10.244.1.0/24, 10.244.1.7 or fd00::/64")
    return s


_CHECKS: dict[str, Callable[[_Doc, Any, str], str]] = {
    "pattern": _pattern, "principal": _principal, "host": _host, "method": _method, "path": _path,
    "port": _port, "cidr": _cidr,
}
