"""A RateLimitPolicy for one named VirtualService route (issue 15): the ``route`` target parsed
and checked at apply (the VirtualService and its route must exist and send to the Service: file,
line and field, nothing applied); only that route's requests are limited; the route header is
the proxies' own (an app's copy removed, a malformed or repeated one not trusted)."""

from __future__ import annotations

import json

import pytest

from agent.control.apply import plan
from agent.control.errors import InputError
from agent.control.ratelimit import RateLimitPolicy, rate_limit_doc, rate_limit_from_doc, route_id
from agent.dataplane.http import headers as hdrs
from agent.dataplane.http.exchange import LocalReply
from tests.unit.test_ratelimit import (
    NET,
    RLP,
    SERVICE,
    ask,
    assert_refused,
    limiter,
    line_of,
    parse,
    policy,
)

ROUTED = RLP.replace("port: 80}", "port: 80, route: {virtualService: api-routes, name: search}}")

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-routes, namespace: shop}
spec:
  hosts: [api]
  http:
  - name: search
    match: [{uri: {prefix: /search}}]
    route: [{destination: {host: api}}]
  - name: rest
    route: [{destination: {host: api.shop.svc.cluster.local}}]
"""


def test_route_target_parsed_and_stored() -> None:
    p = policy(ROUTED)
    assert p.route == "shop/api-routes/search" and p.port == 80 and p.http
    doc = rate_limit_doc(p)  # stored (and shown by describe) as the YAML names it
    assert doc["targetRef"]["route"] == {"virtualService": "shop/api-routes", "name": "search"}
    assert rate_limit_from_doc(json.loads(json.dumps(doc))) == p
    other = policy(ROUTED.replace("virtualService: api-routes", "virtualService: edge/api-routes"))
    assert other.route == "edge/api-routes/search"
    assert route_id("shop", "vs", "") == "" and route_id("shop", "vs", "with space") == ""
    with pytest.raises(ValueError, match=r"targetRef\.route"):
        RateLimitPolicy("x", "shop", "api", route="no-slashes")


REFUSED = {
    # name: (text, line holding the error, field path, reason)
    "tcp limits on a route": (ROUTED.replace("  http:", "  tcp: {maxConnections: 3}\n  http:"), "tcp:",
                              "spec.tcp", "a route target limits HTTP requests"),
    "bad virtualService name": (ROUTED.replace("api-routes", "Api_Routes"), "targetRef",
                                "spec.targetRef.route.virtualService", "not a valid name"),
    "route name not carried": (ROUTED.replace("name: search}", "name: 'sea rch'}"), "targetRef",
                               "spec.targetRef.route.name", "printable ASCII"),
    "route without a name": (ROUTED.replace(", name: search}", "}"), "targetRef",
                             "spec.targetRef.route.name", "expected a non-empty string"),
    "unknown route field": (ROUTED.replace("name: search}", "name: search, port: 80}"), "targetRef",
                            "spec.targetRef.route.port", "unknown field"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_route_target_refused_with_file_line_field(case: str) -> None:
    assert_refused(*REFUSED[case])


def test_route_must_exist_and_send_to_the_service_at_apply() -> None:
    svc = parse(SERVICE)
    (loc,) = parse(ROUTED)
    with pytest.raises(InputError) as ei:  # no such VirtualService: nothing applied
        plan({}, [*svc, loc], NET)
    assert ei.value.path == "spec.targetRef.route.virtualService", str(ei.value)
    assert "unknown VirtualService shop/api-routes" in ei.value.reason
    assert ei.value.line == line_of(ROUTED, "targetRef")
    vs = parse(VS)
    assert "RateLimitPolicy shop/api-limit" in plan({}, [*svc, *vs, loc], NET).created  # same input
    stored = plan({}, [*svc, *vs], NET).puts
    assert plan(stored, [loc], NET).created == ("RateLimitPolicy shop/api-limit",)  # stored
    (other,) = parse(ROUTED.replace("name: search}", "name: browse}"))
    with pytest.raises(InputError) as ei:
        plan(stored, [other], NET)
    assert ei.value.path == "spec.targetRef.route.name" and "no http route named 'browse'" in ei.value.reason
    assert "search, rest" in (ei.value.hint or ""), ei.value.hint
    # the input's VirtualService replaces the stored one: its route now sends elsewhere
    web = SERVICE.replace("name: api,", "name: web,").replace("10.96.5.1", "10.96.5.2")
    moved = VS.replace("route: [{destination: {host: api}}]", "route: [{destination: {host: web}}]")
    with pytest.raises(InputError) as ei:
        plan(stored, [*parse(web), *parse(moved), loc], NET)
    assert ei.value.path == "spec.targetRef.route.name"
    assert "sends nothing to Service shop/api" in ei.value.reason


ROUTED_TOTAL = """\
apiVersion: nodemesh.io/v1
kind: RateLimitPolicy
metadata: {name: search-limit, namespace: shop}
spec:
  targetRef: {name: api, route: {virtualService: api-routes, name: search}}
  http: {total: {requestsPerSecond: 100, burst: 10}}
"""


def test_only_the_routes_requests_are_limited() -> None:
    rl, d, clock = limiter(VS, ROUTED_TOTAL)
    route = "shop/api-routes/search"
    assert [ask(rl, d, route=route) for _ in range(10)] == [200] * 10  # the burst
    refused = ask(rl, d, route=route)
    assert isinstance(refused, LocalReply) and refused.status == 429 and refused.flag == "RL"
    for r in ("", "shop/api-routes/rest", "other/api-routes/search"):  # not that route: not limited
        assert [ask(rl, d, route=r) for _ in range(20)] == [200] * 20
    (st,) = rl.status()
    assert st["route"] == route and st["admitted"] == 10 and st["limited"] == 1
    clock.t += 0.05  # 5 tokens back at 100/s
    assert [ask(rl, d, route=route) == 200 for _ in range(6)] == [True] * 5 + [False]


def test_route_header_is_the_proxies_own() -> None:
    sent = [(b"host", b"api"), (b"x-nodemesh-route", b"shop/api-routes/search"), (b"a", b"b")]
    out = hdrs.forwarding(sent, "10.244.1.5")
    assert all(k != b"x-nodemesh-route" for k, _ in out)  # an app's (or a peer's) copy removed
    assert hdrs.with_route(out, "shop/vs/r")[-1] == (b"x-nodemesh-route", b"shop/vs/r")
    assert hdrs.with_route(out, "") == out and hdrs.without_route(sent) == [sent[0], sent[2]]
    assert hdrs.route_of(sent) == "shop/api-routes/search"
    assert hdrs.route_of([("x-nodemesh-route", "shop/vs/r")]) == "shop/vs/r"  # HTTP/2 headers
    assert hdrs.route_of([(b"x-nodemesh-route", b"a/b/c"), (b"x-nodemesh-route", b"a/b/c")]) == ""  # twice
    assert hdrs.route_of([(b"x-nodemesh-route", b"a b")]) == ""
    assert hdrs.route_of([(b"x-nodemesh-route", b"")]) == ""
    assert hdrs.route_of([(b"a", b"b")]) == ""
