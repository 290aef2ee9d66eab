"""Istio's AuthorizationPolicy as nodemesh holds it, and its evaluation. Pure.

How this works: ``validate_authz.py`` turns the YAML users write for Istio
(``security.istio.io/v1``, ``v1beta1``) into these frozen values; they are
stored as JSON (:func:`policy_doc` / :func:`policy_from_doc`) and reach the
destination node's inbound in snapshots. Per connection (TCP ports) or per
request (HTTP ports) the inbound builds a :class:`Facts` from what the tunnel's
mTLS verified and what the request carries, and :func:`evaluate` returns the
:class:`Verdict` with Istio's order: a matching DENY policy denies; else, if
any ALLOW policy applies to the workload, one must match; AUDIT policies that
match are reported, never deciding.

Which policies apply (:func:`applicable`): those in the mesh's root namespace
without a selector (mesh-wide), those in the workload's namespace without a
selector, and those whose ``selector.matchLabels`` the workload's labels
include — in the root namespace a selector selects in every namespace.

Matching as Istio's: within a ``source`` or ``operation`` every field set must
match (AND), a field's list matches if any value does (OR), ``not*`` fields
must match none; a rule matches when one of its ``from`` entries, one of its
``to`` entries (a missing list matches anything) and all of its ``when``
conditions match. Strings match exactly, by prefix (``abc*``), by suffix
(``*abc``) or by presence (``*``). A policy without rules: ALLOW matches
nothing (so it denies all), DENY and AUDIT never match.

L4 (TCP ports), as Istio's ztunnel: a rule that needs HTTP (methods, paths,
hosts, requestPrincipals, conditions on headers or the request's JWT) cannot
be judged on a TCP connection. An ALLOW rule with such fields never matches;
a DENY (or AUDIT) rule is judged on its L4 fields only (it denies more, never
less). :func:`l7_only_fields` names them for ``describe``/``explain`` warnings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
ACTIONS = ("ALLOW", "DENY", "AUDIT")
DEFAULT_ROOT_NAMESPACE = "istio-system"

# `when` keys Istio documents that nodemesh evaluates (request.headers[...] and
# request.auth.claims[...] take a name in brackets)
WHEN_KEYS = ("request.headers", "source.ip", "remote.ip", "source.namespace", "source.principal",
             "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
             "request.auth.claims", "destination.ip", "destination.port", "connection.sni")
# what only an HTTP request carries
L7_WHEN_KEYS = frozenset({"request.headers", "request.auth.principal", "request.auth.audiences",
                          "request.auth.presenter", "request.auth.claims"})


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()  # CIDRs (a bare address is a /32 or /128)
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str  # e.g. "request.headers[x-token]", "source.ip"
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    sources: tuple[Source, ...] | None = None  # rules[].from[].source; None: any source
    operations: tuple[Operation, ...] | None = None  # rules[].to[].operation; None: anything
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: str = "ALLOW"
    selector: tuple[tuple[str, str], ...] | None = None  # matchLabels; None: every workload
    rules: tuple[Rule, ...] = ()
    source: str = ""  # file:line it was applied from


@dataclass(frozen=True, slots=True)
class Facts:
    """What a decision is made on. ``http`` False: a TCP connection (L4 fields only)."""

    principal: str = ""  # the peer's verified identity, "<td>/ns/<ns>/sa/<sa>" ("" if none)
    namespace: str = ""  # the peer's namespace (from the verified identity)
    source_ip: str = ""  # the peer workload's address
    remote_ip: str = ""  # the original client (x-forwarded-for); else source_ip
    destination_ip: str = ""
    destination_port: int = 0
    sni: str = ""
    http: bool = False
    method: str = ""
    path: str = ""  # normalised, without the query
    host: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names, duplicates joined
    request_principal: str = ""  # "<iss>/<sub>" of a valid JWT ("" if none)
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str = ""  # "<ns>/<name>" of the policy that decided ("" : the default)
    action: str = ""  # ALLOW or DENY: the kind of policy that decided ("" : no policy applies)
    audited: tuple[str, ...] = ()  # AUDIT policies that matched
    why: str = ""


# -- matching ---------------------------------------------------------------------------------


def match_value(pattern: str, value: str) -> bool:
    """Istio's string match: exact, ``prefix*``, ``*suffix``, or ``*`` (any, present)."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _any(patterns: Sequence[str], value: str) -> bool:
    return any(match_value(p, value) for p in patterns)


def _in_blocks(blocks: Sequence[str], ip: str) -> bool:
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in _net(b) for b in blocks)


_NETS: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}


def _net(block: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    n = _NETS.get(block)
    if n is None:
        if len(_NETS) > 4096:
            _NETS.clear()
        n = _NETS[block] = ipaddress.ip_network(block, strict=False)
    return n


def _field(values: Sequence[str], nots: Sequence[str], value: str, *, present: bool = True) -> bool:
    """A field and its not-field: any of ``values`` (if given) and none of ``nots``."""
    if values and not (present and _any(values, value)):
        return False
    return not (nots and present and _any(nots, value))


def source_l7(s: Source) -> bool:
    return bool(s.request_principals or s.not_request_principals)


def operation_l7(o: Operation) -> bool:
    return bool(o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths)


def condition_l7(c: Condition) -> bool:
    return c.key.split("[", 1)[0] in L7_WHEN_KEYS


def _source(s: Source, f: Facts) -> bool:
    if not _field(s.principals, s.not_principals, f.principal, present=bool(f.principal)):
        return False
    if not _field(s.namespaces, s.not_namespaces, f.namespace, present=bool(f.namespace)):
        return False
    if s.ip_blocks and not _in_blocks(s.ip_blocks, f.source_ip):
        return False
    if s.not_ip_blocks and _in_blocks(s.not_ip_blocks, f.source_ip):
        return False
    remote = f.remote_ip or f.source_ip
    if s.remote_ip_blocks and not _in_blocks(s.remote_ip_blocks, remote):
        return False
    if s.not_remote_ip_blocks and _in_blocks(s.not_remote_ip_blocks, remote):
        return False
    if not f.http:
        return True  # (L7 fields: decided by the caller, see _rule)
    rp = f.request_principal
    return _field(s.request_principals, s.not_request_principals, rp, present=bool(rp))


def _operation(o: Operation, f: Facts) -> bool:
    port = f.destination_port
    if o.ports and port not in o.ports:
        return False
    if o.not_ports and port in o.not_ports:
        return False
    if not f.http:
        return True
    if o.hosts or o.not_hosts:  # case-insensitive; with or without the port
        host = f.host.lower()
        cands = (host, _host_only(host))
        if o.hosts and not any(_any(o.hosts, c) for c in cands):
            return False
        if o.not_hosts and any(_any(o.not_hosts, c) for c in cands):
            return False
    if not _field(o.methods, o.not_methods, f.method):
        return False
    return _field(o.paths, o.not_paths, f.path)


def _host_only(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _condition(c: Condition, f: Facts) -> bool:
    base, _, rest = c.key.partition("[")
    name = rest[:-1] if rest.endswith("]") else ""
    values: Iterable[str]
    if base == "request.headers":
        v = f.headers.get(name.lower())
        values = [] if v is None else [v]
    elif base in ("source.ip", "remote.ip", "destination.ip"):
        ip = {"source.ip": f.source_ip, "remote.ip": f.remote_ip or f.source_ip,
              "destination.ip": f.destination_ip}[base]
        ok = not c.values or _in_blocks(c.values, ip)
        return ok and not (c.not_values and _in_blocks(c.not_values, ip))
    elif base == "source.namespace":
        values = [f.namespace] if f.namespace else []
    elif base == "source.principal":
        values = [f.principal] if f.principal else []
    elif base == "request.auth.principal":
        values = [f.request_principal] if f.request_principal else []
    elif base == "request.auth.audiences":
        values = list(f.audiences)
    elif base == "request.auth.presenter":
        values = [f.presenter] if f.presenter else []
    elif base == "request.auth.claims":
        values = _claim(f.claims, name)
    elif base == "destination.port":
        values = [str(f.destination_port)]
    elif base == "connection.sni":
        values = [f.sni] if f.sni else []
    else:
        return False
    values = list(values)
    ok = not c.values or any(_any(c.values, v) for v in values)
    return ok and not (c.not_values and any(_any(c.not_values, v) for v in values))


def _claim(claims: Mapping[str, Any], name: str) -> list[str]:
    """``request.auth.claims[a]`` or nested ``[a][b]`` (written ``a][b``): string values, or
    each string of a list claim."""
    v: Any = claims
    for part in name.split("]["):
        if not isinstance(v, Mapping) or part not in v:
            return []
        v = v[part]
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [x for x in v if isinstance(x, str)]
    return []


def _rule(r: Rule, f: Facts, action: str) -> bool:
    """Does rule ``r`` of a policy with ``action`` match? On a TCP connection an ALLOW rule
    needing HTTP never matches; a DENY/AUDIT rule is judged on its L4 fields alone."""
    if not f.http and action == "ALLOW" and rule_needs_http(r):
        return False
    if r.sources is not None and not any(_source(s, f) for s in r.sources):
        return False
    if r.operations is not None and not any(_operation(o, f) for o in r.operations):
        return False
    for c in r.when:
        if not f.http and condition_l7(c):
            continue  # (a DENY/AUDIT rule: its L4 part decides)
        if not _condition(c, f):
            return False
    return True


def rule_needs_http(r: Rule) -> bool:
    return (
        any(source_l7(s) for s in r.sources or ())
        or any(operation_l7(o) for o in r.operations or ())
        or any(condition_l7(c) for c in r.when)
    )


def l7_only_fields(p: AuthorizationPolicy) -> list[str]:
    """The fields of ``p`` a TCP port cannot judge, as paths (``rules[0].to[0].operation.paths``)."""
    out: list[str] = []
    for i, r in enumerate(p.rules):
        for j, s in enumerate(r.sources or ()):
            for name in ("requestPrincipals", "notRequestPrincipals"):
                if getattr(s, _snake(name)):
                    out.append(f"rules[{i}].from[{j}].source.{name}")
        for j, o in enumerate(r.operations or ()):
            for name in ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"):
                if getattr(o, _snake(name)):
                    out.append(f"rules[{i}].to[{j}].operation.{name}")
        for j, c in enumerate(r.when):
            if condition_l7(c):
                out.append(f"rules[{i}].when[{j}] ({c.key})")
    return out


def _snake(name: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name)


def policy_matches(p: AuthorizationPolicy, f: Facts) -> bool:
    return any(_rule(r, f, p.action) for r in p.rules)


# -- which policies, and the verdict --------------------------------------------------------


def applicable(
    policies: Iterable[AuthorizationPolicy], namespace: str, labels: Mapping[str, str],
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> list[AuthorizationPolicy]:
    """The policies that apply to a workload of ``namespace`` with ``labels``."""
    out = []
    for p in policies:
        if p.namespace != namespace and p.namespace != root_namespace:
            continue
        if p.selector is not None and not all(labels.get(k) == v for k, v in p.selector):
            continue
        out.append(p)
    return out


def evaluate(policies: Sequence[AuthorizationPolicy], f: Facts) -> Verdict:
    """Istio's order over the policies that apply (see :func:`applicable`)."""
    audited = tuple(_id(p) for p in policies if p.action == "AUDIT" and policy_matches(p, f))
    for p in policies:
        if p.action == "DENY" and policy_matches(p, f):
            return Verdict(False, _id(p), "DENY", audited, f"denied by {_id(p)}")
    allows = [p for p in policies if p.action == "ALLOW"]
    if not allows:
        return Verdict(True, "", "", audited, "no ALLOW policy applies")
    for p in allows:
        if policy_matches(p, f):
            return Verdict(True, _id(p), "ALLOW", audited, f"allowed by {_id(p)}")
    names = ", ".join(_id(p) for p in allows)
    return Verdict(False, "", "ALLOW", audited, f"no ALLOW policy matched ({names})")


def _id(p: AuthorizationPolicy) -> str:
    return f"{p.namespace}/{p.name}"


# -- JSON documents ---------------------------------------------------------------------------

_SOURCE_FIELDS = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
                  "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_FIELDS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")


def policy_doc(p: AuthorizationPolicy) -> dict[str, Any]:
    rules = []
    for r in p.rules:
        d: dict[str, Any] = {}
        if r.sources is not None:
            d["from"] = [{k: list(getattr(s, _snake(k))) for k in _SOURCE_FIELDS if getattr(s, _snake(k))}
                         for s in r.sources]
        if r.operations is not None:
            d["to"] = [{k: list(getattr(o, _snake(k))) for k in _OPERATION_FIELDS if getattr(o, _snake(k))}
                       for o in r.operations]
        if r.when:
            d["when"] = [{"key": c.key, "values": list(c.values), "notValues": list(c.not_values)}
                         for c in r.when]
        rules.append(d)
    return {"name": p.name, "namespace": p.namespace, "action": p.action,
            "selector": dict(p.selector) if p.selector is not None else None, "rules": rules,
            "source": p.source}


def policy_from_doc(d: Mapping[str, Any]) -> AuthorizationPolicy:
    rules = []
    for r in d.get("rules", ()):
        sources = tuple(Source(**{_snake(k): tuple(v) for k, v in s.items()}) for s in r["from"]) \
            if "from" in r else None
        ops = tuple(Operation(**{_snake(k): tuple(v) for k, v in o.items()}) for o in r["to"]) \
            if "to" in r else None
        when = tuple(Condition(c["key"], tuple(c.get("values", ())), tuple(c.get("notValues", ())))
                     for c in r.get("when", ()))
        rules.append(Rule(sources, ops, when))
    sel = d.get("selector")
    return AuthorizationPolicy(d["name"], d["namespace"], d.get("action", "ALLOW"),
                               tuple(sorted(sel.items())) if sel is not None else None, tuple(rules),
                               d.get("source", ""))
