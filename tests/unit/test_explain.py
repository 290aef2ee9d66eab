"""`nodemesh explain` with outlier detection in force: the source node's agent's ejection state
per candidate endpoint, a pick that skips the ejected ones and follows locality as the proxy does,
and an unknown state said so (never shown as ok). Pure: the agent's answer is given."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from agent.cli.explain import AgentAnswer, _text, explain
from agent.control.istio import DestinationRule, OutlierDetection, TrafficPolicy
from agent.control.model import Kind, Service, ServicePort, Workload, resource_key
from agent.control.snapshot import Snapshot, SnapshotBuilder

RATINGS = Service("ratings", "default", "10.96.0.21", (ServicePort("http", 80, 9080),), {"app": "ratings"})
CLUSTER = "default/ratings/"  # the proxy's balancer key: namespace/service/subset


def wl(name: str, addr: str, node: str, locality: str, app: str = "ratings") -> Workload:
    return Workload(name=name, namespace="default", address=addr, node=node, service_account=app,
                    labels={"app": app}, locality=locality)


WORKLOADS = [
    wl("client", "10.244.1.2", "n1", "r1/za", app="client"),
    wl("r-a", "10.244.1.3", "n1", "r1/za"),
    wl("r-b1", "10.244.2.2", "n2", "r1/zb"),
    wl("r-b2", "10.244.2.3", "n2", "r1/zb"),
]


def snapshot(locality: bool = True) -> Snapshot:
    b = SnapshotBuilder()
    puts = {resource_key(Kind.SERVICE, "default", "ratings"): json.dumps(RATINGS.to_doc())}
    puts.update({resource_key(Kind.WORKLOAD, w.namespace, w.name): json.dumps(w.to_doc()) for w in WORKLOADS})
    b.apply(puts, [])
    od = OutlierDetection(consecutive_5xx=3, base_ejection_s=3.0, max_ejection_percent=100)
    dr = DestinationRule("ratings", "default", "ratings", TrafficPolicy(outlier=od))
    snap = dataclasses.replace(b.build(1), destination_rules={("default", "ratings"): dr})
    if not locality:
        snap = dataclasses.replace(snap, workloads={
            k: dataclasses.replace(w, locality="") for k, w in snap.workloads.items()})
    return snap


def answer(ejected: dict[str, int] | None = None, node: str = "n1") -> AgentAnswer:
    """An agent's /outliers answer: the named workloads ejected (value: their ejection count)."""
    addr = {w.name: w.address for w in WORKLOADS}
    return AgentAnswer("127.0.0.1:15000", {"node": node, "clusters": {CLUSTER: [
        {"endpoint": f"{addr[n]}:9080", "ejected": True, "ejected_for_s": 2.5,
         "ejected_until": "2030-01-01T00:00:02.500+00:00", "ejections": k, "consecutive_5xx": 0}
        for n, k in (ejected or {}).items()]}})


def by_name(walk: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["workload"]: e for e in walk["endpoints"]}


def test_an_ejected_endpoint_is_shown_and_never_picked() -> None:
    snap = snapshot(locality=False)
    for name in ("r-a", "r-b1", "r-b2"):
        walk = explain(snap, "client", "GET", "http://ratings/", {}, lambda: answer({name: 2}))  # noqa: B023
        eps = by_name(walk)
        assert eps[name]["ejection"] == {"state": "ejected", "until": "2030-01-01T00:00:02.500+00:00",
                                         "for_s": 2.5, "ejections": 2}
        assert eps[name]["candidate"] is False
        assert walk["outcome"]["to"] != name
        assert all(e["ejection"]["state"] == "ok" for n, e in eps.items() if n != name)
        assert "ejected (until 2030-01-01 00:00:02.500+00:00, 2nd ejection)" in _text(walk)


def test_locality_stays_in_zone_and_fails_over_when_the_zone_is_ejected() -> None:
    snap = snapshot()
    walk = explain(snap, "client", "GET", "http://ratings/", {}, answer)
    assert walk["outcome"]["to"] == "r-a" and walk["locality"] == {"source": "r1/za", "candidates": ["r1/za"]}
    assert [n for n, e in by_name(walk).items() if e["candidate"]] == ["r-a"]
    walk = explain(snap, "client", "GET", "http://ratings/", {}, lambda: answer({"r-a": 1}))
    assert walk["outcome"]["to"] in {"r-b1", "r-b2"}
    assert walk["locality"]["candidates"] == ["r1/zb"]
    all_out = {"r-a": 1, "r-b1": 1, "r-b2": 1}
    walk = explain(snap, "client", "GET", "http://ratings/", {}, lambda: answer(all_out))
    assert walk["outcome"] == {"answer": 503, "response_flags": "UH",
                               "why": "every endpoint is ejected by outlier detection"}


def test_an_unreachable_or_foreign_agent_leaves_the_state_unknown() -> None:
    snap = snapshot()
    cases = [AgentAnswer("127.0.0.1:15000", error="no answer from an agent at 127.0.0.1:15000: refused"),
             answer({"r-a": 1}, node="n2")]
    for a in cases:
        walk = explain(snap, "client", "GET", "http://ratings/", {}, lambda: a)  # noqa: B023
        od = walk["outlier_detection"]
        assert od["state_known"] is False and od["state_from"] is None
        assert all(e["ejection"] == {"state": "unknown"} for e in by_name(walk).values())
        text = _text(walk)
        assert "state UNKNOWN" in text and " ok" not in text
        assert "this pick assumes no endpoint is ejected" in walk["balancer"]["note"]
    assert "is node 'n2''s, not the source's node 'n1'" in explain(
        snap, "client", "GET", "http://ratings/", {}, lambda: cases[1])["outlier_detection"]["error"]


def test_without_outlier_detection_the_agent_is_not_asked() -> None:
    snap = dataclasses.replace(snapshot(), destination_rules={})

    def ask() -> AgentAnswer:
        raise AssertionError("asked")

    walk = explain(snap, "client", "GET", "http://ratings/", {}, ask)
    assert "outlier_detection" not in walk and all(e["ejection"] is None for e in by_name(walk).values())


def test_explain_shows_the_destinations_authorization_decision_as_its_node_makes_it() -> None:
    from agent.control.authz import AuthorizationPolicy, Operation, Rule, Source

    only_gets = AuthorizationPolicy("gets", "default", "ALLOW", (("app", "ratings"),), (Rule(
        sources=(Source(principals=("cluster.local/ns/default/sa/client",)),),
        operations=(Operation(methods=("GET",), paths=("/public/*",)),)),))
    snap = dataclasses.replace(snapshot(locality=False),
                               authorization_policies={("default", "gets"): only_gets})
    walk = explain(snap, "client", "GET", "http://ratings/public/x", {}, answer)
    assert walk["outcome"]["answer"] == "forwarded"
    assert walk["authorization"]["decision"] == "allowed: allowed by default/gets"
    # the path is normalised before it is matched, as the destination does: no way around it
    walk = explain(snap, "client", "GET", "http://ratings/public/../admin", {}, answer)
    assert walk["outcome"] == {"answer": 403, "response_flags": "RBAC",
                               "why": "RBAC: access denied (no ALLOW policy matched (default/gets))"}
    assert walk["authorization"]["path_matched"] == "/admin"
    assert "authz:      at default/r-" in _text(walk)
    walk = explain(snap, "client", "GET", "http://ratings/a%00", {}, answer)
    assert walk["outcome"]["answer"] == 400
    # another caller identity: denied
    walk = explain(snap, "default/r-a", "GET", "http://ratings/public/x", {}, answer)
    assert walk["outcome"]["answer"] == 403 and walk["authorization"]["decision"].startswith("denied")


def test_explain_shows_the_request_authentication_and_whether_a_token_is_required() -> None:
    from agent.control.authz import AuthorizationPolicy, Condition, Rule, Source
    from agent.control.reqauthn import JwtRule, RequestAuthentication

    ra = RequestAuthentication("ratings-jwt", "default", (("app", "ratings"),),
                               (JwtRule("https://a.example", jwks_uri="https://a.example/jwks"),
                                JwtRule("https://b.example", jwks_uri="https://b.example/jwks")))
    other = RequestAuthentication("client-jwt", "default", (("app", "client"),),
                                  (JwtRule("https://c.example", jwks_uri="https://c.example/jwks"),))
    base = dataclasses.replace(snapshot(locality=False), request_authentications={
        ("default", "ratings-jwt"): ra, ("default", "client-jwt"): other})
    walk = explain(base, "client", "GET", "http://ratings/x", {}, answer)
    assert walk["jwt"] == {"workload": f"default/{walk['balancer']['pick'].split()[0]}",
                           "request_authentications": ["default/ratings-jwt"],
                           "issuers": ["https://a.example", "https://b.example"], "token": "optional",
                           "required_by": []}
    assert walk["outcome"]["answer"] == "forwarded"
    assert "a token is optional" in _text(walk) and "RequestAuthentication default/ratings-jwt" in _text(walk)
    # a policy reading the request principal (or a request.auth condition) makes it required
    need = AuthorizationPolicy("need", "default", "ALLOW", (("app", "ratings"),),
                               (Rule(sources=(Source(request_principals=("*",)),)),))
    deny = AuthorizationPolicy("deny-anon", "default", "DENY", None,
                               (Rule(when=(Condition("request.auth.claims[groups]", not_values=("x",)),)),))
    for policies, by in (({("default", "need"): need}, ["default/need"]),
                         ({("default", "deny-anon"): deny}, ["default/deny-anon"])):
        walk = explain(dataclasses.replace(base, authorization_policies=policies), "client", "GET",
                       "http://ratings/x", {}, answer)
        assert (walk["jwt"]["token"], walk["jwt"]["required_by"]) == ("required", by)
        assert f"a token is required (AuthorizationPolicy {by[0]} reads the request principal)" in _text(walk)
    # a workload no RequestAuthentication applies to: no jwt step shown
    assert "jwt" not in explain(snapshot(locality=False), "client", "GET", "http://ratings/x", {}, answer)
