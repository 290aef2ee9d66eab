"""The per-connection reduction of AuthorizationPolicies (:func:`agent.control.authz_decider.decider`)
gives the verdicts :func:`agent.control.authz.evaluate` gives: for random policies and random
HTTP requests on random connections (the L4 facts the decider was made for, the L7 facts of
each request), and for the cases that decide by L4 facts alone."""

from __future__ import annotations

import random

from agent.control.authz import (
    AuthorizationPolicy,
    Condition,
    Facts,
    Operation,
    Rule,
    Source,
    evaluate,
)
from agent.control.authz_decider import decider

PRINCIPALS = ("cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/y", "")
NAMESPACES = ("a", "b", "")
IPS = ("10.244.1.5", "10.244.2.7", "")
PORTS = (8080, 9090)
METHODS = ("GET", "POST", "DELETE")
PATHS = ("/api/items", "/admin/x", "/public")
HOSTS = ("web.a.svc.cluster.local", "web:8080", "other")
REQUEST_PRINCIPALS = ("https://iss/alice", "https://iss/bob", "")
WHEN = {
    "request.headers[x-tenant]": ("acme", "beta"),
    "source.ip": ("10.244.1.0/24", "10.244.2.7"),
    "remote.ip": ("10.244.1.5",),
    "source.namespace": NAMESPACES[:2],
    "source.principal": PRINCIPALS[:2],
    "request.auth.principal": REQUEST_PRINCIPALS[:2],
    "request.auth.audiences": ("web", "api"),
    "request.auth.presenter": ("cli",),
    "request.auth.claims[groups]": ("admins", "dev"),
    "destination.port": ("8080", "9090"),
    "destination.ip": ("10.244.3.0/24",),
    "connection.sni": ("web.a",),
}


def patterns(rng: random.Random, values: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for _ in range(rng.randint(1, 2)):
        v = rng.choice([x for x in values if x] or ["x"])
        out.append(rng.choice([v, v[:3] + "*", "*" + v[-3:], "*"]))
    return tuple(out)


def maybe(rng: random.Random, values: tuple[str, ...]) -> tuple[str, ...]:
    return patterns(rng, values) if rng.random() < 0.3 else ()


def source(rng: random.Random) -> Source:
    return Source(
        principals=maybe(rng, PRINCIPALS), not_principals=maybe(rng, PRINCIPALS),
        request_principals=maybe(rng, REQUEST_PRINCIPALS),
        not_request_principals=maybe(rng, REQUEST_PRINCIPALS),
        namespaces=maybe(rng, NAMESPACES), not_namespaces=maybe(rng, NAMESPACES),
        ip_blocks=("10.244.1.0/24",) if rng.random() < 0.2 else (),
        not_ip_blocks=("10.244.2.7",) if rng.random() < 0.1 else (),
        remote_ip_blocks=("10.244.0.0/16",) if rng.random() < 0.1 else ())


def operation(rng: random.Random) -> Operation:
    return Operation(
        hosts=maybe(rng, HOSTS), not_hosts=maybe(rng, HOSTS),
        ports=(rng.choice(PORTS),) if rng.random() < 0.3 else (),
        not_ports=(rng.choice(PORTS),) if rng.random() < 0.1 else (),
        methods=maybe(rng, METHODS), not_methods=maybe(rng, METHODS),
        paths=maybe(rng, PATHS), not_paths=maybe(rng, PATHS))


def rule(rng: random.Random) -> Rule:
    sources = tuple(source(rng) for _ in range(rng.randint(1, 2))) if rng.random() < 0.7 else None
    ops = tuple(operation(rng) for _ in range(rng.randint(1, 2))) if rng.random() < 0.6 else None
    when = []
    for _ in range(rng.choice((0, 0, 1, 2))):
        key = rng.choice(sorted(WHEN))
        values = WHEN[key]
        if rng.random() < 0.7:
            when.append(Condition(key, values=tuple(rng.sample(values, 1))))
        else:
            when.append(Condition(key, not_values=tuple(rng.sample(values, 1))))
    return Rule(sources, ops, tuple(when))


def policies(rng: random.Random) -> list[AuthorizationPolicy]:
    out = []
    for i in range(rng.randint(0, 5)):
        action = rng.choice(("ALLOW", "ALLOW", "DENY", "AUDIT"))
        rules = tuple(rule(rng) for _ in range(rng.choice((0, 1, 1, 2, 3))))
        out.append(AuthorizationPolicy(f"p{i}", "a", action, None, rules))
    return out


def connection(rng: random.Random) -> Facts:
    principal = rng.choice(PRINCIPALS)
    return Facts(principal=principal, namespace=rng.choice(NAMESPACES), source_ip=rng.choice(IPS),
                 remote_ip=rng.choice(IPS), destination_ip=rng.choice(("10.244.3.4", "10.244.4.4")),
                 destination_port=rng.choice(PORTS), sni=rng.choice(("web.a", "")))


def request(rng: random.Random, conn: Facts) -> Facts:
    claims = rng.choice(({}, {"groups": ["admins"]}, {"groups": "dev"}))
    return Facts(conn.principal, conn.namespace, conn.source_ip, conn.remote_ip, conn.destination_ip,
                 conn.destination_port, conn.sni, True, rng.choice(METHODS), rng.choice(PATHS),
                 rng.choice(HOSTS), rng.choice(({}, {"x-tenant": "acme"}, {"x-tenant": "beta,acme"})),
                 rng.choice(REQUEST_PRINCIPALS), tuple(rng.sample(("web", "api"), rng.randint(0, 2))),
                 rng.choice(("cli", "")), claims)


def test_the_decider_agrees_with_evaluate_on_random_policies_and_requests() -> None:
    rng = random.Random(13)
    decided: set[tuple[bool, str]] = set()
    fixed = 0
    for _ in range(3000):
        ps = policies(rng)
        conn = connection(rng)
        d = decider(ps, conn)
        for _ in range(8):
            f = request(rng, conn)
            want = evaluate(ps, f)
            assert d.decide(f) == want, (ps, f)
            assert d.fixed is None or d.fixed == want, (ps, f)  # (the verdict of every request)
            decided.add((want.allowed, want.action))
        fixed += d.fixed is not None
    # every kind of outcome was met: allowed by an ALLOW, denied by a DENY, no ALLOW matched,
    # no ALLOW policy at all
    assert decided == {(True, "ALLOW"), (False, "DENY"), (False, "ALLOW"), (True, "")}
    assert 300 < fixed < 2700, fixed  # (connections the L4 facts decide, and others)


def test_a_connection_the_l4_fields_decide_for_needs_no_request_check() -> None:
    allow_x = AuthorizationPolicy("allow-x", "a", "ALLOW", None,
                                  (Rule(sources=(Source(principals=(PRINCIPALS[0],)),)),))
    deny_ip = AuthorizationPolicy("deny-ip", "a", "DENY", None,
                                  (Rule(sources=(Source(ip_blocks=("10.244.2.7",)),)),))
    get_only = AuthorizationPolicy("get-only", "a", "ALLOW", None,
                                   (Rule(sources=(Source(principals=(PRINCIPALS[1],)),),
                                         operations=(Operation(methods=("GET",)),)),))
    conn = Facts(principal=PRINCIPALS[0], source_ip="10.244.1.5")
    d = decider([deny_ip, allow_x, get_only], conn)
    # deny-ip and get-only can never match this connection: gone; allow-x always matches
    assert d.denies == () and len(d.allows) == 1 and d.allows[0][0] is None
    assert d.decide(request(random.Random(1), conn)).policy == "a/allow-x"
    assert d.fixed is not None and d.fixed.policy == "a/allow-x"  # (no request facts needed)
    # another peer: get-only's method check is all that is left
    conn_y = Facts(principal=PRINCIPALS[1], source_ip="10.244.2.7")
    d = decider([deny_ip, allow_x, get_only], conn_y)
    assert d.denies[0][0] is None  # denied by address whatever the request
    assert d.decide(request(random.Random(1), conn_y)).policy == "a/deny-ip"
    assert d.fixed is not None and not d.fixed.allowed
    d = decider([allow_x, get_only], conn_y)
    assert [v.policy for _, v in d.allows] == ["a/get-only"] and d.fixed is None
    assert d.otherwise.why == "no ALLOW policy matched (a/allow-x, a/get-only)"
