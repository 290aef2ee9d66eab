"""Istio's AuthorizationPolicy as nodemesh holds it, and its evaluation. Pure.

How this works: ``validate_authz.py`` turns the YAML users write for Istio
(``security.istio.io/v1``, ``v1beta1``) into these frozen values; they are
stored as JSON (:func:`policy_doc` / :func:`policy_from_doc`) and reach the
destination node's inbound in snapshots. Per connection (TCP ports) or per
request (HTTP ports) the inbound builds a :class:`Facts` from what the tunnel's
mTLS verified and what the request carries, and :func:`evaluate` returns the
:class:`Verdict` with Istio's order: a matching DENY policy denies; else, if
any ALLOW policy applies to the workload, one must match; AUDIT policies that
match are reported, never deciding. Each policy is compiled once, on first use, into the checks
its set fields need (see "compiled once per policy" below); a request runs only those. HTTP
requests are judged by :mod:`agent.control.authz_decider`, which reduces these checks once per
connection to the ones its L4 facts leave.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol, TypeVar

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


def source_l7(s: Source) -> bool:
    return bool(s.request_principals or s.not_request_principals)


def operation_l7(o: Operation) -> bool:
    return bool(o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths)


def condition_l7(c: Condition) -> bool:
    return c.key.split("[", 1)[0] in L7_WHEN_KEYS


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
    return _compiled(p).match(f)


# -- the same matching, compiled once per policy ---------------------------------------------
#
# Per request only the checks a policy's set fields need run: each policy is compiled on first
# use into closures (a pattern list into an exact set plus prefix and suffix tuples, which
# str.startswith/endswith take whole; a source, operation or rule into the checks of its set
# fields, L4 ones first) and cached by identity (the cache keeps the policy alive, so its id
# cannot be reused while cached; cleared past _MAX_COMPILED, as _NETS). The semantics are the
# ones described above and in the module doc; only the work per request differs.

_Match = Callable[[Facts], bool]


def _always(v: str) -> bool:
    return True


def _patterns(patterns: Sequence[str]) -> Callable[[str], bool]:
    """``match_value`` over a list: does any pattern match?"""
    if "*" in patterns:
        return _always
    exact = frozenset(p for p in patterns if not p.endswith("*") and not p.startswith("*"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
    suffixes = tuple(p[1:] for p in patterns if p.startswith("*") and not p.endswith("*"))
    if not prefixes and not suffixes:  # (the usual lists: one kind of pattern, one call)
        return exact.__contains__
    if not exact and not suffixes:
        return lambda v: v.startswith(prefixes)

    def match(v: str) -> bool:
        return v in exact or v.startswith(prefixes) or v.endswith(suffixes)

    return match


def _string_check(values: Sequence[str], nots: Sequence[str], get: Callable[[Facts], str], *,
                  present: bool) -> _Match | None:
    """A field and its not-field: any of ``values`` (if given) and none of ``nots``. ``present``:
    an empty value is an absent one (matches no list; excluded by no not-list)."""
    if not values and not nots:
        return None
    yes = _patterns(values) if values else None
    no = _patterns(nots) if nots else None
    if yes is not None and no is None:  # (the usual field: fewer steps per request)
        if not present:
            return lambda f: yes(get(f))

        def only_yes(f: Facts) -> bool:
            v = get(f)
            return v != "" and yes(v)

        return only_yes

    def check(f: Facts) -> bool:
        v = get(f)
        if present and not v:
            return yes is None
        if yes is not None and not yes(v):
            return False
        return no is None or not no(v)

    return check


def _ip_check(blocks: Sequence[str], get: Callable[[Facts], str], *, inside: bool) -> _Match:
    return lambda f: _in_blocks(blocks, get(f)) == inside


def _remote_ip(f: Facts) -> str:
    return f.remote_ip or f.source_ip


def _checks(l4: Sequence[_Match | None], l7: Sequence[_Match | None]) -> _Match:
    """All of ``l4``, and on HTTP all of ``l7`` too (None: a field not set)."""
    first = tuple(c for c in l4 if c is not None)
    then = tuple(c for c in l7 if c is not None)
    if len(first) == 1 and not then:
        return first[0]

    def match(f: Facts) -> bool:
        for c in first:
            if not c(f):
                return False
        if then and f.http:
            for c in then:
                if not c(f):
                    return False
        return True

    return match


_Parts = tuple[tuple[_Match, ...], tuple[_Match, ...]]  # (L4 checks, L7 checks), all must hold


def _parts(l4: Sequence[_Match | None], l7: Sequence[_Match | None]) -> _Parts:
    return tuple(c for c in l4 if c is not None), tuple(c for c in l7 if c is not None)


def _source_checks(s: Source) -> tuple[list[_Match | None], list[_Match | None]]:
    return ([
        _string_check(s.principals, s.not_principals, attrgetter("principal"), present=True),
        _string_check(s.namespaces, s.not_namespaces, attrgetter("namespace"), present=True),
        _ip_check(s.ip_blocks, attrgetter("source_ip"), inside=True) if s.ip_blocks else None,
        _ip_check(s.not_ip_blocks, attrgetter("source_ip"), inside=False) if s.not_ip_blocks else None,
        _ip_check(s.remote_ip_blocks, _remote_ip, inside=True) if s.remote_ip_blocks else None,
        _ip_check(s.not_remote_ip_blocks, _remote_ip, inside=False) if s.not_remote_ip_blocks else None,
    ], [
        _string_check(s.request_principals, s.not_request_principals, attrgetter("request_principal"),
                      present=True),
    ])


def _operation_checks(o: Operation) -> tuple[list[_Match | None], list[_Match | None]]:
    ports, not_ports = frozenset(o.ports), frozenset(o.not_ports)
    return ([
        (lambda f: f.destination_port in ports) if ports else None,
        (lambda f: f.destination_port not in not_ports) if not_ports else None,
    ], [
        _hosts_check(o.hosts, o.not_hosts),
        _string_check(o.methods, o.not_methods, attrgetter("method"), present=False),
        _string_check(o.paths, o.not_paths, attrgetter("path"), present=False),
    ])


def _hosts_check(hosts: Sequence[str], not_hosts: Sequence[str]) -> _Match | None:
    """Case-insensitive; with or without the port."""
    if not hosts and not not_hosts:
        return None
    yes = _patterns(hosts) if hosts else None
    no = _patterns(not_hosts) if not_hosts else None

    def check(f: Facts) -> bool:
        host = f.host.lower()
        only = _host_only(host)
        if yes is not None and not (yes(host) or yes(only)):
            return False
        return no is None or not (no(host) or no(only))

    return check


def _compile_condition(c: Condition) -> _Match:
    base, _, rest = c.key.partition("[")
    if base != "request.headers":
        return lambda f: _condition(c, f)
    name = (rest[:-1] if rest.endswith("]") else "").lower()
    yes = _patterns(c.values) if c.values else None
    no = _patterns(c.not_values) if c.not_values else None

    def header(f: Facts) -> bool:
        v = f.headers.get(name)
        if v is None:
            return yes is None
        if yes is not None and not yes(v):
            return False
        return no is None or not no(v)

    return header


def _any_of(matches: tuple[_Match, ...]) -> _Match:
    """One of ``matches`` (none: nothing matches)."""
    if len(matches) == 1:
        return matches[0]

    def match(f: Facts) -> bool:
        for m in matches:  # noqa: SIM110 (a loop: no generator per call)
            if m(f):
                return True
        return False

    return match


@dataclass(frozen=True, slots=True)
class _RuleParts:
    """A rule's checks split by what they read (for :mod:`agent.control.authz_decider`): each
    ``from`` source and each ``to`` operation as (L4, L7) checks (None: no such list, anything
    matches), its conditions on the connection and on the request."""

    sources: tuple[_Parts, ...] | None
    operations: tuple[_Parts, ...] | None
    l4_when: tuple[_Match, ...]
    l7_when: tuple[_Match, ...]


def _rule_parts(r: Rule) -> _RuleParts:
    return _RuleParts(
        None if r.sources is None else tuple(_parts(*_source_checks(s)) for s in r.sources),
        None if r.operations is None else tuple(_parts(*_operation_checks(o)) for o in r.operations),
        tuple(_compile_condition(c) for c in r.when if not condition_l7(c)),
        tuple(_compile_condition(c) for c in r.when if condition_l7(c)),
    )


def _compile_rule(r: Rule, action: str, rp: _RuleParts) -> _Match:
    """Does rule ``r`` of a policy with ``action`` match? On a TCP connection an ALLOW rule
    needing HTTP never matches; a DENY/AUDIT rule is judged on its L4 fields alone."""
    body = _checks([
        None if rp.sources is None else _any_of(tuple(_checks(*s) for s in rp.sources)),
        None if rp.operations is None else _any_of(tuple(_checks(*o) for o in rp.operations)),
        *rp.l4_when,
    ], rp.l7_when)
    if action == "ALLOW" and rule_needs_http(r):
        return lambda f: f.http and body(f)
    return body


@dataclass(frozen=True, slots=True)
class _Compiled:
    policy: AuthorizationPolicy
    match: _Match
    name: str  # "<ns>/<name>"
    decided: Verdict  # its verdict when it decides and no AUDIT policy matched (the usual case)
    rules: tuple[_RuleParts, ...]  # (for agent.control.authz_decider)


_MAX_COMPILED = 4096
_COMPILED: dict[int, _Compiled] = {}


def _compiled(p: AuthorizationPolicy) -> _Compiled:
    got = _COMPILED.get(id(p))
    if got is not None and got.policy is p:
        return got
    name = _id(p)
    decided = (Verdict(False, name, "DENY", (), f"denied by {name}") if p.action == "DENY"
               else Verdict(True, name, "ALLOW", (), f"allowed by {name}"))
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.clear()
    parts = tuple(_rule_parts(r) for r in p.rules)
    got = _COMPILED[id(p)] = _Compiled(
        p, _any_of(tuple(_compile_rule(r, p.action, rp) for r, rp in zip(p.rules, parts, strict=True))),
        name, decided, parts)
    return got


# -- which policies, and the verdict --------------------------------------------------------


class Selecting(Protocol):
    """A security resource that applies by namespace and workload selector."""

    @property
    def namespace(self) -> str: ...
    @property
    def selector(self) -> tuple[tuple[str, str], ...] | None: ...


S = TypeVar("S", bound=Selecting)


def applicable(
    policies: Iterable[S], namespace: str, labels: Mapping[str, str],
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> list[S]:
    """The resources (AuthorizationPolicies, RequestAuthentications) that apply to a workload
    of ``namespace`` with ``labels``: its namespace's and the root namespace's, each without a
    selector or with one the labels satisfy."""
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
    audited: list[str] = []
    denied: _Compiled | None = None
    allows: list[_Compiled] = []
    cache = _COMPILED
    for p in policies:
        c = cache.get(id(p))
        if c is None or c.policy is not p:
            c = _compiled(p)
        action = p.action
        if action == "ALLOW":
            allows.append(c)  # (judged only if no DENY matches)
        elif action == "DENY":
            if denied is None and c.match(f):
                denied = c
        elif action == "AUDIT" and c.match(f):
            audited.append(c.name)
    if denied is not None:
        return _with_audited(denied.decided, audited)
    if not allows:
        return Verdict(True, "", "", tuple(audited), "no ALLOW policy applies")
    for c in allows:
        if c.match(f):
            return _with_audited(c.decided, audited)
    names = ", ".join(c.name for c in allows)
    return Verdict(False, "", "ALLOW", tuple(audited), f"no ALLOW policy matched ({names})")


def _with_audited(v: Verdict, audited: list[str]) -> Verdict:
    return Verdict(v.allowed, v.policy, v.action, tuple(audited), v.why) if audited else v


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
