"""Istio's authorization semantics as :func:`agent.control.authz.evaluate` decides them: the order
of DENY, ALLOW and AUDIT, which policies apply to a workload, the matching of each field, and
ztunnel's rule for HTTP-only fields on TCP connections. Policies are written as users write them
(YAML through the validator), so these tests also pin what the parsed values mean."""

from __future__ import annotations

import pytest

from agent.control.authz import (
    AuthorizationPolicy,
    Facts,
    Verdict,
    applicable,
    evaluate,
    match_value,
)
from agent.control.validate import parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")
FRONTEND = "cluster.local/ns/shop/sa/frontend"


def ap(spec: str, name: str = "p", namespace: str = "shop") -> AuthorizationPolicy:
    """An AuthorizationPolicy from the YAML of its spec (indented by two spaces)."""
    text = (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")
    (loc,) = parse_yaml(text, "p.yaml", NET)
    assert isinstance(loc.resource, AuthorizationPolicy)
    return loc.resource


def http(**kw: object) -> Facts:
    base: dict[str, object] = dict(principal=FRONTEND, namespace="shop", source_ip="10.244.1.5",
                                   destination_ip="10.244.2.9", destination_port=8080, http=True,
                                   method="GET", path="/api/items", host="web.shop.svc.cluster.local")
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def tcp(**kw: object) -> Facts:
    base: dict[str, object] = dict(principal=FRONTEND, namespace="shop", source_ip="10.244.1.5",
                                   destination_ip="10.244.2.9", destination_port=5432)
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def decide(policies: list[AuthorizationPolicy], f: Facts, namespace: str = "shop",
           labels: dict[str, str] | None = None) -> Verdict:
    return evaluate(applicable(policies, namespace, labels or {"app": "web"}), f)


ALLOW_FRONTEND = ap("  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]\n",
                    "allow-frontend")
DENY_ADMIN = ap("  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin/*]}}]\n", "deny-admin")


# -- the order ------------------------------------------------------------------------------

def test_deny_is_decided_before_allow() -> None:
    v = decide([ALLOW_FRONTEND, DENY_ADMIN], http(path="/admin/users"))
    assert (v.allowed, v.action, v.policy) == (False, "DENY", "shop/deny-admin")
    v = decide([ALLOW_FRONTEND, DENY_ADMIN], http(path="/api/items"))
    assert (v.allowed, v.action, v.policy) == (True, "ALLOW", "shop/allow-frontend")


def test_allow_policies_present_and_none_matching_denies() -> None:
    v = decide([ALLOW_FRONTEND], http(principal="cluster.local/ns/shop/sa/other"))
    assert (v.allowed, v.action, v.policy) == (False, "ALLOW", "")
    assert "shop/allow-frontend" in v.why


def test_no_allow_policy_allows() -> None:
    assert decide([], http()) == Verdict(True, "", "", (), "no ALLOW policy applies")
    v = decide([DENY_ADMIN], http(path="/api"))
    assert (v.allowed, v.action) == (True, "")


def test_audit_is_reported_and_never_decides() -> None:
    audit = ap("  action: AUDIT\n  rules: [{}]\n", "audit-all")
    v = decide([audit], http())
    assert (v.allowed, v.audited) == (True, ("shop/audit-all",))
    v = decide([audit, ALLOW_FRONTEND], http(principal="cluster.local/ns/x/sa/y"))
    assert (v.allowed, v.audited) == (False, ("shop/audit-all",))  # AUDIT does not allow either
    v = decide([ap("  action: AUDIT\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n")], http())
    assert v.audited == ()


def test_allow_without_rules_denies_all_and_an_empty_rule_allows_all() -> None:
    deny_all = ap("  {}\n", "deny-all")
    assert decide([deny_all], http()).allowed is False
    assert decide([deny_all], tcp()).allowed is False
    allow_all = ap("  rules: [{}]\n", "allow-all")
    assert decide([deny_all, allow_all], http()).allowed is True
    assert decide([deny_all, allow_all], tcp()).allowed is True
    # DENY without rules matches nothing
    assert decide([ap("  action: DENY\n")], http()).allowed is True


# -- which policies apply --------------------------------------------------------------------

def test_root_namespace_policy_applies_to_every_namespace() -> None:
    mesh_deny = ap("  {}\n", "deny-all", namespace="istio-system")
    for ns in ("shop", "ops", "istio-system"):
        assert applicable([mesh_deny], ns, {}) == [mesh_deny]
        assert decide([mesh_deny], http(), namespace=ns).allowed is False
    # a per-namespace allow opens only its namespace
    assert decide([mesh_deny, ALLOW_FRONTEND], http(), namespace="shop").allowed is True
    assert decide([mesh_deny, ALLOW_FRONTEND], http(), namespace="ops").allowed is False
    # another namespace's policy does not apply; another root namespace can be given
    other = ap("  {}\n", "deny-all", namespace="ops")
    assert applicable([other], "shop", {}) == []
    assert applicable([other], "shop", {}, root_namespace="ops") == [other]


def test_selector_matching() -> None:
    web_only = ap("  selector: {matchLabels: {app: web, tier: front}}\n", "web-deny")
    assert applicable([web_only], "shop", {"app": "web", "tier": "front", "v": "1"}) == [web_only]
    assert applicable([web_only], "shop", {"app": "web"}) == []
    assert applicable([web_only], "shop", {"app": "web", "tier": "back"}) == []
    # in the root namespace a selector selects in every namespace
    root_sel = ap("  selector: {matchLabels: {app: web}}\n", "r", namespace="istio-system")
    assert applicable([root_sel], "ops", {"app": "web"}) == [root_sel]
    assert applicable([root_sel], "ops", {"app": "db"}) == []


# -- matching -----------------------------------------------------------------------------------

def test_prefix_suffix_presence_and_exact() -> None:
    assert match_value("/api/*", "/api/x") and not match_value("/api/*", "/apix")
    assert match_value("*.png", "/a/b.png") and not match_value("*.png", "/a/b.jpg")
    assert match_value("*", "") and match_value("*", "anything")
    assert match_value("/exact", "/exact") and not match_value("/exact", "/exact/")
    p = ap("  rules:\n  - to: [{operation: {paths: [/api/*, '*.png', /healthz]}}]\n")
    paths = ("/api/a", "/x.png", "/healthz", "/healthz/", "/")
    assert [decide([p], http(path=x)).allowed for x in paths] == [True, True, True, False, False]
    # presence on a header: '*' needs the header, notValues '*' needs it absent
    has = ap("  rules:\n  - when: [{key: 'request.headers[X-Token]', values: ['*']}]\n")
    assert decide([has], http(headers={"x-token": ""})).allowed is True
    assert decide([has], http()).allowed is False
    lacks = ap("  rules:\n  - when: [{key: 'request.headers[x-token]', notValues: ['*']}]\n")
    assert decide([lacks], http()).allowed is True
    assert decide([lacks], http(headers={"x-token": "t"})).allowed is False


def test_not_fields() -> None:
    p = ap("  rules:\n  - from: [{source: {namespaces: ['*'], notNamespaces: [test]}}]\n"
           "    to: [{operation: {notMethods: [DELETE], notPaths: [/admin/*], notPorts: ['9090']}}]\n")
    assert decide([p], http()).allowed is True
    assert decide([p], http(namespace="test")).allowed is False
    assert decide([p], http(method="DELETE")).allowed is False
    assert decide([p], http(path="/admin/x")).allowed is False
    assert decide([p], http(destination_port=9090)).allowed is False
    # a not-field alone matches the absent value: notPrincipals on a peer without identity
    q = ap("  action: DENY\n  rules:\n  - from: [{source: {notPrincipals: ['*']}}]\n")
    assert decide([q], http(principal="", namespace="")).allowed is False  # plaintext peer denied
    assert decide([q], http()).allowed is True
    # a field with values does not match the absent value
    r = ap("  rules:\n  - from: [{source: {principals: ['*']}}]\n")
    assert decide([r], http(principal="", namespace="")).allowed is False


def test_fields_and_entries_combine_as_istio() -> None:
    # within a source: AND; between sources of a rule: OR; between rules: OR; when: AND
    p = ap("  rules:\n"
           "  - from: [{source: {namespaces: [shop], ipBlocks: [10.244.1.0/24]}},\n"
           "           {source: {namespaces: [ops]}}]\n"
           "    when:\n"
           "    - {key: destination.port, values: ['8080']}\n"
           "    - {key: connection.sni, notValues: ['*.evil']}\n")
    assert decide([p], http()).allowed is True
    assert decide([p], http(source_ip="10.244.9.5")).allowed is False  # shop, outside the block
    assert decide([p], http(namespace="ops", source_ip="10.244.9.5")).allowed is True
    assert decide([p], http(destination_port=8081)).allowed is False
    assert decide([p], http(sni="x.evil")).allowed is False


def test_ip_blocks_cidrs() -> None:
    p = ap("  rules:\n  - from: [{source: {ipBlocks: [10.244.1.0/24, 10.244.3.7, 'fd00::/64'],"
           " notIpBlocks: [10.244.1.66]}}]\n")
    ips = ("10.244.1.5", "10.244.3.7", "10.244.3.8", "10.244.1.66", "fd00::5", "fd01::5", "")
    assert [decide([p], http(source_ip=ip)).allowed for ip in ips] == \
        [True, True, False, False, True, False, False]
    # remoteIpBlocks read the original client when the request names one, else the peer
    r = ap("  rules:\n  - from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]\n")
    assert decide([r], http(remote_ip="192.0.2.9")).allowed is True
    assert decide([r], http(source_ip="192.0.2.9")).allowed is True
    assert decide([r], http(remote_ip="198.51.100.1", source_ip="192.0.2.9")).allowed is False
    # ip-valued conditions take CIDRs too
    c = ap("  rules:\n  - when: [{key: destination.ip, values: [10.244.2.0/24]}]\n")
    assert decide([c], tcp()).allowed is True
    assert decide([c], tcp(destination_ip="10.244.3.1")).allowed is False


def test_hosts_ignore_case_and_the_port() -> None:
    p = ap("  rules:\n  - to: [{operation: {hosts: [Web.Shop.svc.cluster.local, '*.example.com']}}]\n")
    assert decide([p], http(host="WEB.shop.svc.cluster.local:8080")).allowed is True
    assert decide([p], http(host="a.example.com")).allowed is True
    assert decide([p], http(host="web.ops.svc.cluster.local")).allowed is False


def test_claims_and_request_principals() -> None:
    p = ap("  rules:\n  - from: [{source: {requestPrincipals: ['https://iss/*']}}]\n"
           "    when: [{key: 'request.auth.claims[realm][roles]', values: [admin]}]\n")
    jwt = {"request_principal": "https://iss/alice", "claims": {"realm": {"roles": ["user", "admin"]}}}
    assert decide([p], http(**jwt)).allowed is True
    assert decide([p], http(**{**jwt, "claims": {"realm": {"roles": ["user"]}}})).allowed is False
    assert decide([p], http(**{**jwt, "request_principal": ""})).allowed is False  # no token


# -- HTTP-only fields on TCP connections (ztunnel's rule) --------------------------------------

@pytest.mark.parametrize("l7", [
    "to: [{operation: {paths: [/api/*]}}]",
    "to: [{operation: {methods: [GET]}}]",
    "to: [{operation: {hosts: ['*']}}]",
    "to: [{operation: {ports: ['5432'], notPaths: [/x]}}]",
    "from: [{source: {namespaces: [shop], requestPrincipals: ['*']}}]",
    "when: [{key: 'request.headers[x-a]', notValues: [x]}]",
    "when: [{key: request.auth.principal, notValues: [x]}]",
])
def test_allow_with_http_only_fields_never_matches_on_tcp(l7: str) -> None:
    p = ap(f"  rules:\n  - {l7}\n")
    assert decide([p], http(destination_port=5432, request_principal="i/s")).allowed is True  # on HTTP
    v = decide([p], tcp())  # (its L4 parts, if any, match this connection)
    assert (v.allowed, v.action) == (False, "ALLOW")
    # an L4-only ALLOW next to it still allows
    l4 = ap("  rules:\n  - from: [{source: {namespaces: [shop]}}]\n", "l4")
    assert decide([p, l4], tcp()).allowed is True


def test_deny_with_http_only_fields_denies_on_its_l4_fields_on_tcp() -> None:
    p = ap("  action: DENY\n  rules:\n  - from: [{source: {namespaces: [test]}}]\n"
           "    to: [{operation: {methods: [POST], ports: ['5432']}}]\n"
           "    when: [{key: 'request.headers[x-debug]', values: ['1']}]\n")
    # on TCP the methods and the header condition are left out: namespace and port decide
    assert decide([p], tcp(namespace="test")).allowed is False
    assert decide([p], tcp(namespace="test", destination_port=6379)).allowed is True
    assert decide([p], tcp()).allowed is True
    # on HTTP every field counts
    assert decide([p], http(namespace="test", destination_port=5432, method="GET")).allowed is True
    assert decide([p], http(namespace="test", destination_port=5432, method="POST",
                            headers={"x-debug": "1"})).allowed is False
    # a DENY whose only field is HTTP-only denies every TCP connection it applies to
    q = ap("  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin/*]}}]\n")
    assert decide([q], tcp()).allowed is False
    assert decide([q], http()).allowed is True
