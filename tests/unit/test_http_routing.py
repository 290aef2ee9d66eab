"""Per-request routing over one snapshot: VirtualService matches, weights, subsets, rewrites,
header operations, timeouts, direct responses. Pure: no sockets."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest

from agent.control.istio import (
    Destination,
    DestinationRule,
    HeaderOps,
    HttpMatch,
    HttpRoute,
    LoadBalancer,
    RouteDestination,
    StringMatch,
    Subset,
    TrafficPolicy,
    VirtualService,
)
from agent.control.model import Kind, Service, ServicePort, Workload, resource_key
from agent.control.snapshot import SnapshotBuilder
from agent.dataplane.http import routing
from agent.dataplane.http.exchange import LocalReply
from agent.dataplane.lb import Policy

REVIEWS = Service("reviews", "default", "10.96.0.20", (ServicePort("http", 80, 9080),), {"app": "reviews"})
RATINGS = Service("ratings", "default", "10.96.0.21", (ServicePort("http", 80, 9080),), {"app": "ratings"})
CLIENT = Workload(
    name="web-1",
    namespace="default",
    address="10.244.1.2",
    node="n1",
    service_account="web",
    labels={"app": "web", "tier": "front"},
)


def wl(name: str, addr: str, app: str, version: str) -> Workload:
    return Workload(
        name=name,
        namespace="default",
        address=addr,
        node="n2",
        service_account=app,
        labels={"app": app, "version": version},
    )


WORKLOADS = [
    CLIENT,
    wl("reviews-v1", "10.244.2.2", "reviews", "v1"),
    wl("reviews-v2", "10.244.2.3", "reviews", "v2"),
    wl("ratings-v1", "10.244.2.4", "ratings", "v1"),
]


def table(vss: list[VirtualService], drs: list[DestinationRule] = ()) -> routing.RouteTable:  # type: ignore[assignment]
    b = SnapshotBuilder()
    puts = {
        resource_key(Kind.SERVICE, s.namespace, s.name): json.dumps(s.to_doc()) for s in (REVIEWS, RATINGS)
    }
    puts.update({resource_key(Kind.WORKLOAD, w.namespace, w.name): json.dumps(w.to_doc()) for w in WORKLOADS})
    b.apply(puts, [])
    snap = dataclasses.replace(b.build(1), virtual_services={(v.namespace, v.name): v for v in vss},
                               destination_rules={(d.namespace, d.name): d for d in drs})
    return routing.RouteTable.build(snap)


DR = DestinationRule(
    "reviews",
    "default",
    "reviews",
    subsets=(
        Subset("v1", (("version", "v1"),)),
        Subset("v2", (("version", "v2"),), TrafficPolicy(LoadBalancer("LEAST_REQUEST"))),
    ),
)


def req(
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    source: Workload = CLIENT,
    port: int = 80,
) -> routing.RequestFacts:
    return routing.RequestFacts(method, path, "reviews", "http", headers or {}, port, source)


def to(host: str, subset: str = "", weight: int = 100) -> RouteDestination:
    return RouteDestination(Destination(host, subset), weight)


def test_without_a_virtual_service_the_request_goes_to_the_service() -> None:
    d = routing.decide(table([]), REVIEWS, req(), random.Random(1))
    assert (
        d.route is None and d.service is REVIEWS and len(d.endpoints) == 2 and d.policy is Policy.ROUND_ROBIN
    )


def test_header_match_routes_to_a_subset_first_match_wins_and_subset_policy_applies() -> None:
    vs = VirtualService(
        "reviews",
        "default",
        ("reviews",),
        (
            HttpRoute(
                "jason",
                (HttpMatch(headers=(("end-user", StringMatch("exact", "jason")),)),),
                (to("reviews", "v2"),),
            ),
            HttpRoute("rest", (), (to("reviews", "v1"),)),
        ),
    )
    t, rng = table([vs], [DR]), random.Random(1)
    d = routing.decide(t, REVIEWS, req(headers={"end-user": "jason"}), rng)
    assert (d.route_index, [e.workload for e in d.endpoints], d.policy) == (
        0,
        ["reviews-v2"],
        Policy.LEAST_REQUEST,
    )
    d = routing.decide(t, REVIEWS, req(headers={"end-user": "jasonx"}), rng)  # exact means exact
    assert (d.route_index, [e.workload for e in d.endpoints]) == (1, ["reviews-v1"])


def test_weights_split_the_requests() -> None:
    vs = VirtualService(
        "reviews",
        "default",
        ("reviews.default.svc.cluster.local",),
        (HttpRoute("split", (), (to("reviews", "v1", 90), to("reviews", "v2", 10))),),
    )
    t, rng = table([vs], [DR]), random.Random(7)
    got = Counter(routing.decide(t, REVIEWS, req(), rng).endpoints[0].workload for _ in range(10_000))
    assert 8_850 <= got["reviews-v1"] <= 9_150  # 9,000 ± 5 sigma (sigma = 30)


def test_uri_prefix_regex_and_case_rewrite_and_no_match() -> None:
    vs = VirtualService(
        "reviews",
        "default",
        ("reviews",),
        (
            HttpRoute(
                "api",
                (HttpMatch(uri=StringMatch("prefix", "/api/v1")),),
                (to("ratings"),),
                rewrite_uri="/v1",
                rewrite_authority="ratings.internal",
            ),
            HttpRoute(
                "re",
                (HttpMatch(uri=StringMatch("regex", "/items/[0-9]+"), method=StringMatch("exact", "GET")),),
                (to("reviews", "v1"),),
            ),
            HttpRoute(
                "ci",
                (HttpMatch(uri=StringMatch("exact", "/Health"), ignore_uri_case=True),),
                (to("reviews"),),
            ),
        ),
    )
    t, rng = table([vs], [DR]), random.Random(1)
    d = routing.decide(t, REVIEWS, req("/api/v1/stars?x=1"), rng)
    assert d.service == RATINGS and d.path == "/v1/stars?x=1" and d.authority == "ratings.internal"
    assert routing.decide(t, REVIEWS, req("/items/42"), rng).route_index == 1
    with pytest.raises(LocalReply) as e:  # a regex matches the whole path (Envoy's safe_regex)
        routing.decide(t, REVIEWS, req("/items/42/x"), rng)
    assert (e.value.status, e.value.flag) == (404, "NR")
    with pytest.raises(LocalReply):
        routing.decide(t, REVIEWS, req("/items/42", method="POST"), rng)
    assert routing.decide(t, REVIEWS, req("/HEALTH"), rng).route_index == 2


def test_without_headers_query_params_source_and_port() -> None:
    m1 = HttpMatch(
        without_headers=(("x-canary", StringMatch("exact", "1")),),
        query_params=(("debug", StringMatch("exact", "true")),),
    )
    m2 = HttpMatch(source_labels=(("tier", "front"),), source_namespace="default", port=80)
    vs = VirtualService(
        "reviews",
        "default",
        ("reviews",),
        (HttpRoute("q", (m1,), (to("reviews", "v2"),)), HttpRoute("src", (m2,), (to("reviews", "v1"),))),
    )
    t, rng = table([vs], [DR]), random.Random(1)
    assert routing.decide(t, REVIEWS, req("/?debug=true"), rng).route_index == 0
    assert routing.decide(t, REVIEWS, req("/?debug=true", headers={"x-canary": "1"}), rng).route_index == 1
    other = Workload(
        name="batch", namespace="jobs", address="10.244.1.9", node="n1", service_account="b", labels={}
    )
    with pytest.raises(LocalReply):
        routing.decide(t, REVIEWS, req("/", source=other), rng)


def test_direct_response_timeout_and_header_operations() -> None:
    ops = HeaderOps(set=(("x-route", "a"),), add=(("x-multi", "2"),), remove=("x-secret",))
    vs = VirtualService(
        "reviews",
        "default",
        ("reviews",),
        (
            HttpRoute(
                "down",
                (HttpMatch(uri=StringMatch("prefix", "/maintenance")),),
                direct_status=503,
                direct_body="come back later",
            ),
            HttpRoute("main", (), (to("reviews"),), timeout_s=0.5, request_headers=ops),
        ),
    )
    t, rng = table([vs]), random.Random(1)
    with pytest.raises(LocalReply) as e:
        routing.decide(t, REVIEWS, req("/maintenance/x"), rng)
    assert (e.value.status, str(e.value)) == (503, "come back later")
    d = routing.decide(t, REVIEWS, req("/"), rng)
    assert d.timeout_s == 0.5
    h = routing.apply_ops([(b"x-secret", b"1"), (b"x-route", b"old"), (b"x-multi", b"1")], d.request_ops)
    assert h == [(b"x-multi", b"1"), (b"x-route", b"a"), (b"x-multi", b"2")]


def test_unknown_subset_at_request_time_is_503_and_other_gateways_do_not_apply() -> None:
    vs = VirtualService("reviews", "default", ("reviews",), (HttpRoute("r", (), (to("reviews", "v9"),)),))
    with pytest.raises(LocalReply) as e:
        routing.decide(table([vs], [DR]), REVIEWS, req(), random.Random(1))
    assert e.value.status == 503
    gw_only = VirtualService(
        "reviews", "default", ("reviews",), (HttpRoute("r", (), (to("ratings"),)),), gateways=("my-gateway",)
    )
    assert routing.decide(table([gw_only]), REVIEWS, req(), random.Random(1)).route is None


def test_uri_regex_rewrite_replaces_every_match_in_the_path_and_keeps_the_query() -> None:
    route = HttpRoute("svc", (), (to("reviews"),),
                      rewrite_regex=(r"^/service/([^/]+)(/.*)$", r"\2/instance/\1"))
    vs = VirtualService("reviews", "default", ("reviews",), (route,))
    d = routing.decide(table([vs]), REVIEWS, req("/service/foo/v1/api?x=1"), random.Random(1))
    assert d.path == "/v1/api/instance/foo?x=1"
    slashes = HttpRoute("s", (), (to("reviews"),), rewrite_regex=("/+", "/"))
    vs = VirtualService("reviews", "default", ("reviews",), (slashes,))
    assert routing.decide(table([vs]), REVIEWS, req("//a///b"), random.Random(1)).path == "/a/b"


def test_redirect_port_and_derive_port() -> None:
    from agent.control.istio import Redirect

    def location(rd: Redirect, authority: str = "reviews:8080", port: int = 8080) -> str:
        vs = VirtualService("reviews", "default", ("reviews",), (HttpRoute("r", (), redirect=rd),))
        facts = routing.RequestFacts("GET", "/a", authority, "http", {}, port, CLIENT)
        with pytest.raises(LocalReply) as ei:
            routing.decide(table([vs]), REVIEWS, facts, random.Random(1))
        return dict(ei.value.headers)[b"location"].decode()

    assert location(Redirect(port=9090)) == "http://reviews:9090/a"
    assert location(Redirect(scheme="https", derive_port="FROM_PROTOCOL_DEFAULT")) == "https://reviews/a"
    assert location(Redirect(authority="new", derive_port="FROM_REQUEST_PORT")) == "http://new:8080/a"
    assert location(Redirect(port=80), authority="reviews") == "http://reviews/a"  # the default: no port
    assert location(Redirect(uri="/b")) == "http://reviews:8080/b"  # no port field: as received


def test_cors_preflight_is_answered_and_allowed_origins_get_headers() -> None:
    from agent.control.istio import Cors

    policy = Cors((StringMatch("exact", "https://a.example"), StringMatch("regex", r"https://.*\.b\.example")),
                  ("GET", "POST"), ("x-token",), ("x-trace",), 3600, True)
    m = routing.RouteTable.build(table([]).snapshot).matcher
    pre = {"origin": "https://x.b.example", "access-control-request-method": "POST"}
    answer, headers = routing.cors(policy, req(method="OPTIONS", headers=pre), m)
    assert answer and dict(headers) == {
        b"access-control-allow-origin": b"https://x.b.example", b"access-control-allow-credentials": b"true",
        b"access-control-allow-methods": b"GET,POST", b"access-control-allow-headers": b"x-token",
        b"access-control-max-age": b"3600"}
    answer, headers = routing.cors(policy, req(headers={"origin": "https://a.example"}), m)
    assert not answer and dict(headers) == {
        b"access-control-allow-origin": b"https://a.example", b"access-control-allow-credentials": b"true",
        b"access-control-expose-headers": b"x-trace"}
    # an origin not allowed: nothing added; its preflight forwarded (FORWARD) or answered bare (IGNORE)
    evil = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    assert routing.cors(policy, req(method="OPTIONS", headers=evil), m) == (False, [])
    ignore = dataclasses.replace(policy, unmatched_preflights="IGNORE")
    assert routing.cors(ignore, req(method="OPTIONS", headers=evil), m) == (True, [])
    assert routing.cors(policy, req(), m) == (False, [])  # no Origin: not a CORS request
