"""Istio's VirtualService and DestinationRule as users write them: parsed strictly, refused by
name where nodemesh does not implement a field, checked against the registry at apply time,
and applied all or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli.main import cli
from agent.control.apply import _dump, plan
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.istio import (
    Destination,
    DestinationRule,
    HeaderOps,
    StringMatch,
    VirtualService,
    destination_rule_doc,
    destination_rule_from_doc,
    virtual_service_doc,
    virtual_service_from_doc,
)
from agent.control.model import Kind, resource_key
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import Located, parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")

SERVICE = """\
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, protocol: http}]
"""

RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
"""

VS = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: canary
    match:
    - uri: {prefix: /api/}
      headers:
        X-User: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
      weight: 20
    - destination: {host: reviews.shop.svc.cluster.local, subset: v1, port: {number: 9080}}
      weight: 80
      headers:
        response: {set: {x-canary: "no"}}
    timeout: 1.5s
    headers:
      request:
        set: {x-route: canary}
        add: {x-trace: "1"}
        remove: [x-debug]
    rewrite: {uri: /v2/}
  - route:
    - destination: {host: reviews, subset: v1}
"""

ALL = f"{SERVICE}---\n{RULE}---\n{VS}"


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of ``text`` containing ``needle``."""
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def parse(text: str, file: str = "mesh.yaml") -> list[Located]:
    return parse_yaml(text, file, NET)


def test_virtual_service_and_destination_rule_parse() -> None:
    svc, dr_loc, vs_loc = parse(ALL)
    vs, dr = vs_loc.resource, dr_loc.resource
    assert isinstance(vs, VirtualService) and isinstance(dr, DestinationRule)
    assert (vs.name, vs.namespace, vs.hosts, vs.gateways) == ("reviews", "shop", ("reviews",), ())
    assert vs.source == f"mesh.yaml:{line_of(ALL, 'kind: VirtualService') - 1}" == \
        f"mesh.yaml:{vs_loc.line}"
    canary, fallback = vs.http
    (m,) = canary.matches
    assert m.uri == StringMatch("prefix", "/api/")
    assert m.headers == (("x-user", StringMatch("exact", "jason")),)  # names lower-cased
    d20, d80 = canary.route
    assert (d20.destination, d20.weight) == (Destination("reviews", "v2"), 20)
    assert (d80.destination, d80.weight) == (
        Destination("reviews.shop.svc.cluster.local", "v1", 9080), 80)
    assert d80.response_headers == HeaderOps(set=(("x-canary", "no"),))
    assert canary.timeout_s == 1.5
    assert canary.request_headers == HeaderOps((("x-route", "canary"),), (("x-trace", "1"),),
                                               ("x-debug",))
    assert (canary.rewrite_uri, canary.rewrite_authority) == ("/v2/", None)
    (only,) = fallback.route
    assert only.weight == 100  # a lone destination takes all traffic
    assert (dr.host, dr.load_balancer) == ("reviews", "LEAST_REQUEST")
    assert [(s.name, s.labels, s.load_balancer) for s in dr.subsets] == [
        ("v1", (("version", "v1"),), ""), ("v2", (("version", "v2"),), "")]
    assert dr.source == f"mesh.yaml:{dr_loc.line}"
    # the registry documents give back the same values, also through JSON
    assert virtual_service_from_doc(json.loads(json.dumps(virtual_service_doc(vs)))) == vs
    assert destination_rule_from_doc(json.loads(json.dumps(destination_rule_doc(dr)))) == dr
    # and plan accepts them against the co-applied Service and DestinationRule
    p = plan({}, [svc, dr_loc, vs_loc], NET)
    assert p.created == ("Service shop/reviews", "DestinationRule shop/reviews",
                         "VirtualService shop/reviews")
    assert json.loads(p.puts[resource_key(Kind.VIRTUAL_SERVICE, "shop", "reviews")]) == \
        virtual_service_doc(vs)
    assert resource_key(Kind.VIRTUAL_SERVICE, "shop", "reviews").endswith("/virtualservice/shop/reviews")


@pytest.mark.parametrize("api", ["networking.istio.io/v1", "networking.istio.io/v1beta1",
                                 "networking.istio.io/v1alpha3"])
def test_every_istio_api_version_is_read(api: str) -> None:
    (loc,) = parse(RULE.replace("networking.istio.io/v1", api))
    assert isinstance(loc.resource, DestinationRule)


def test_direct_response_regex_and_other_match_fields() -> None:
    text = VS.replace("    - uri: {prefix: /api/}\n",
                      "    - uri: {regex: '/api/v[0-9]+/.*'}\n"
                      "      method: {exact: GET}\n"
                      "      queryParams: {Debug: {exact: '1'}}\n"
                      "      withoutHeaders: {x-internal: {prefix: ''}}\n"
                      "      ignoreUriCase: true\n"
                      "      port: 9080\n"
                      "      sourceLabels: {app: web}\n"
                      "      sourceNamespace: front\n") \
        + "  - directResponse: {status: 503, body: {string: down}}\n"
    (loc,) = parse(text)
    vs = loc.resource
    assert isinstance(vs, VirtualService)
    (m,) = vs.http[0].matches
    assert m.uri == StringMatch("regex", "/api/v[0-9]+/.*") and m.method == StringMatch("exact", "GET")
    assert m.query_params == (("Debug", StringMatch("exact", "1")),)  # parameters keep their case
    assert m.without_headers == (("x-internal", StringMatch("prefix", "")),)
    assert (m.ignore_uri_case, m.port, m.source_labels, m.source_namespace) == (
        True, 9080, (("app", "web"),), "front")
    direct = vs.http[2]
    assert (direct.direct_status, direct.direct_body, direct.route) == (503, "down", ())
    assert virtual_service_from_doc(json.loads(_dump(vs))) == vs


def _err(text: str, file: str = "mesh.yaml") -> InputError:
    with pytest.raises(InputError) as ei:
        parse(text, file)
    return ei.value


# (text, the text on the failing line [or (that text, lines after it)], field path, reason);
# a field's line is where its value starts (the next line for a block value)
REFUSED: dict[str, tuple[str, str | tuple[str, int], str, str]] = {
    "broken regex": (VS.replace("uri: {prefix: /api/}", "uri: {regex: '/api/(v1'}"),
                     "regex: '/api/(v1'", "spec.http[0].match[0].uri.regex", "missing ): /api/(v1"),
    "weights": (VS.replace("weight: 20", "weight: 30"), ("route:", 1), "spec.http[0].route",
                "the weights of the destinations sum to 110, not 100"),
    "weight missing": (VS.replace("      weight: 20\n", ""), ("route:", 1), "spec.http[0].route",
                       "sum to 80, not 100"),
    "corsPolicy": (VS.replace("    timeout: 1.5s\n",
                              "    timeout: 1.5s\n    corsPolicy: {allowOrigins: []}\n"),
                   "corsPolicy:", "spec.http[0].corsPolicy.allowOrigins",
                   "expected a non-empty list of origin matches"),
    "cors allowOrigin": (VS.replace("    timeout: 1.5s\n",
                                    "    timeout: 1.5s\n    corsPolicy: {allowOrigin: ['*']}\n"),
                         "corsPolicy:", "spec.http[0].corsPolicy.allowOrigin",
                         "allowOrigin is deprecated in Istio"),
    "retry condition": (VS.replace("    timeout: 1.5s\n",
                                   "    timeout: 1.5s\n    retries: {attempts: 3, retryOn: '5xx,oops'}\n"),
                        "retries:", "spec.http[0].retries.retryOn", "unknown retry condition 'oops'"),
    "delegate": (VS.replace("    timeout: 1.5s\n", "    timeout: 1.5s\n    delegate: {name: x}\n"),
                 "delegate:", "spec.http[0].delegate", "delegate is not supported"),
    "fault": (VS.replace("    timeout: 1.5s\n", "    timeout: 1.5s\n    fault: {abort: {}}\n"),
              "fault:", "spec.http[0].fault.abort", "an abort needs 'httpStatus' or 'grpcStatus'"),
    "fault percentage": (
        VS.replace("    timeout: 1.5s\n",
                   "    timeout: 1.5s\n    fault: {abort: {httpStatus: 500, percentage: {value: 120}}}\n"),
        "fault:", "spec.http[0].fault.abort.percentage.value", "expected a percentage 0-100"),
    "tcp destination subnets": (
        VS + "  tcp:\n  - match: [{destinationSubnets: [10.0.0.0/8]}]\n"
             "    route: [{destination: {host: db}}]\n",
        "match: [{destinationSubnets", "spec.tcp[0].match[0].destinationSubnets",
        "destinationSubnets is not supported yet"),
    "tcp route headers": (
        VS + "  tcp:\n  - route:\n    - destination: {host: reviews}\n"
             "      headers: {request: {set: {a: b}}}\n",
        "headers: {request", "spec.tcp[0].route[0].headers", "a tcp route has no headers to change"),
    "tls": (VS + "  tls:\n  - match: [{sniHosts: [a.example.com]}]\n"
            "    route: [{destination: {host: reviews}}]\n",
            "- match: [{sniHosts", "spec.tls", "tls routes for mesh traffic are not supported yet"),
    "exportTo": (VS + "  exportTo: ['.']\n", "exportTo", "spec.exportTo",
                 "exportTo is not supported"),
    "gateway": (VS.replace("  hosts: [reviews]\n", "  hosts: [reviews]\n  gateways: [My_Gw]\n"),
                "gateways:", "spec.gateways[0]", "'My_Gw' is not a valid name"),
    "api version": (VS.replace("networking.istio.io/v1beta1", "networking.istio.io/v2"),
                    "apiVersion", "apiVersion", "unsupported apiVersion 'networking.istio.io/v2'"),
    "kind of the other api": (VS.replace("networking.istio.io/v1beta1", "nodemesh.io/v1"),
                              "kind:", "kind", "kind VirtualService does not exist in nodemesh.io/v1"),
    "stat prefix": (VS.replace("    - uri: {prefix: /api/}\n",
                               "    - uri: {prefix: /api/}\n      statPrefix: x\n"),
                    "statPrefix", "spec.http[0].match[0].statPrefix", "statPrefix is not supported yet"),
    "two match kinds": (VS.replace("{prefix: /api/}", "{prefix: /api/, exact: /api}"),
                        "prefix: /api/", "spec.http[0].match[0].uri",
                        "expected exactly one of exact, prefix, regex, got 2"),
    "uri regex rewrite": (VS.replace("rewrite: {uri: /v2/}", "rewrite: {uriRegexRewrite: {}}"),
                          "rewrite:", "spec.http[0].rewrite.uriRegexRewrite.match",
                          "missing required field 'match'"),
    "uri regex rewrite regex": (
        VS.replace("rewrite: {uri: /v2/}", "rewrite: {uriRegexRewrite: {match: '(', rewrite: x}}"),
        "rewrite:", "spec.http[0].rewrite.uriRegexRewrite.match.regex", "invalid regex '('"),
    "route and direct": (VS.replace("    timeout: 1.5s\n",
                                    "    timeout: 1.5s\n    directResponse: {status: 200}\n"),
                         "- name: canary", "spec.http[0]",
                         "exactly one of 'route', 'redirect' or 'directResponse', not several"),
    "timeout without unit": (VS.replace("timeout: 1.5s", "timeout: 2"), "timeout:",
                             "spec.http[0].timeout", "2 is not a duration"),
    "weight range": (VS.replace("weight: 20", "weight: 120"), "weight: 120",
                     "spec.http[0].route[0].weight", "120 is out of range 0-100"),
    "wildcard destination": (VS.replace("{host: reviews, subset: v2}", "{host: '*', subset: v2}"),
                             "host: '*'", "spec.http[0].route[0].destination.host",
                             "cannot be a wildcard host"),
    "no hosts": (VS.replace("hosts: [reviews]", "hosts: []"), "hosts:", "spec.hosts",
                 "non-empty list of hosts"),
    "header value": (VS.replace('x-canary: "no"', "x-canary: 1"), "x-canary",
                     "spec.http[0].route[1].headers.response.set.x-canary", "expected a string value"),
    "passthrough": (RULE.replace("LEAST_REQUEST", "PASSTHROUGH"), "PASSTHROUGH",
                    "spec.trafficPolicy.loadBalancer.simple",
                    "PASSTHROUGH is not supported: behind a service VIP there is no original destination"),
    "consistent hash without a key": (RULE.replace("{simple: LEAST_REQUEST}", "{consistentHash: {}}"),
                                      "consistentHash", "spec.trafficPolicy.loadBalancer.consistentHash",
                                      "consistentHash needs exactly one of"),
    "maglev table size": (
        RULE.replace("{simple: LEAST_REQUEST}",
                     "{consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}"),
        "consistentHash", "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
        "1000 is not a prime"),
    "outlier detection field": (
        RULE.replace("  subsets:\n",
                     "    outlierDetection: {consecutiveErrors: 2}\n  subsets:\n"),
        "outlierDetection", "spec.trafficPolicy.outlierDetection.consecutiveErrors",
        "consecutiveErrors is deprecated in Istio"),
    "outlier detection percent": (
        RULE.replace("  subsets:\n", "    outlierDetection: {maxEjectionPercent: 150}\n  subsets:\n"),
        "outlierDetection", "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "150"),
    "subset tls mode": (RULE + "    trafficPolicy: {tls: {mode: SIMPLE}}\n", "trafficPolicy: {tls",
                        "spec.subsets[1].trafficPolicy.tls.mode", "tls mode 'SIMPLE' is not supported yet"),
    "connection pool field": (
        RULE.replace("  subsets:\n",
                     "    connectionPool: {tcp: {tcpKeepalive: {time: 7200s}}}\n  subsets:\n"),
        "connectionPool", "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
        "tcpKeepalive is not supported yet"),
    "port level settings without a port": (
        RULE.replace("  subsets:\n",
                     "    portLevelSettings:\n    - loadBalancer: {simple: RANDOM}\n  subsets:\n"),
        "- loadBalancer: {simple: RANDOM}", "spec.trafficPolicy.portLevelSettings[0].port",
        "missing required field 'port'"),
    "use client protocol": (
        RULE.replace("  subsets:\n", "    connectionPool: {http: {useClientProtocol: false}}\n  subsets:\n"),
        "connectionPool", "spec.trafficPolicy.connectionPool.http.useClientProtocol",
        "only true is supported"),
    "workload selector": (RULE + "  workloadSelector: {}\n", "workloadSelector",
                          "spec.workloadSelector", "workloadSelector is not supported yet"),
    "subset twice": (RULE.replace("name: v2", "name: v1"), ("labels: {version: v2}", -1),
                     "spec.subsets[1].name", "subset 'v1' is defined twice"),
    "rule without host": (RULE.replace("  host: reviews\n", ""), "trafficPolicy:", "spec.host",
                          "missing required field 'host'"),
    "unknown field": (RULE.replace("  host: reviews\n", "  host: reviews\n  hostt: x\n"), "hostt",
                      "spec.hostt", "unknown field 'hostt'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_file_line_field_and_reason(case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    e = _err(text)
    needle, delta = on_line if isinstance(on_line, tuple) else (on_line, 0)
    expected = line_of(text, needle) + delta
    assert (e.file, e.line, e.path) == ("mesh.yaml", expected, path), str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"mesh.yaml:{expected} at {path}: "), str(e)


def test_gateways_mesh_and_gateway_names_are_taken() -> None:
    for gws in (("mesh",), ("my-gw", "mesh"), ("istio-system/my-gw",)):
        text = VS.replace("  hosts: [reviews]\n", f"  hosts: [reviews]\n  gateways: [{', '.join(gws)}]\n")
        (loc,) = parse(text)
        assert isinstance(loc.resource, VirtualService) and loc.resource.gateways == gws


def test_apply_time_refusals_name_file_line_and_field() -> None:
    text = ALL.replace("{host: reviews, subset: v2}", "{host: reviews, subset: v3}")
    with pytest.raises(InputError) as ei:
        plan({}, parse(text), NET)
    e = ei.value
    assert (e.file, e.line, e.path) == ("mesh.yaml", line_of(text, "subset: v3"),
                                        "spec.http[0].route[0].destination.subset")
    assert "unknown subset 'v3' of reviews.shop.svc.cluster.local" in e.reason
    assert e.hint is not None and "v1, v2" in e.hint

    text = ALL.replace("{host: reviews, subset: v2}", "{host: ratings, subset: v2}")
    with pytest.raises(InputError) as ei:
        plan({}, parse(text), NET)
    e = ei.value
    assert (e.file, e.line, e.path) == ("mesh.yaml", line_of(text, "host: ratings"),
                                        "spec.http[0].route[0].destination.host")
    assert "route to unknown host 'ratings'" in e.reason
    assert "ratings.shop.svc.cluster.local" in e.reason


def test_apply_time_checks_see_the_registry_and_the_input() -> None:
    svc, dr, vs = parse(ALL)
    stored = plan({}, [svc, dr], NET).puts  # Service and DestinationRule applied earlier
    assert plan(stored, [vs], NET).created == ("VirtualService shop/reviews",)
    # a Service in another namespace is not the short host's
    with pytest.raises(InputError, match="route to unknown host"):
        plan({}, parse(ALL.replace("{name: reviews, namespace: shop}\nspec:\n  selector",
                                   "{name: reviews, namespace: other}\nspec:\n  selector", 1)), NET)
    # a DestinationRule in this input replaces the stored one: its subsets count, not the old ones
    (dr_v1_only,) = parse(RULE.replace("  - name: v2\n    labels: {version: v2}\n", ""))
    with pytest.raises(InputError, match="unknown subset 'v2'"):
        plan(stored, [dr_v1_only, vs], NET)
    # without any DestinationRule for the host
    with pytest.raises(InputError, match="unknown subset 'v2'") as ei:
        plan({k: v for k, v in stored.items() if "destinationrule" not in k}, [vs], NET)
    assert ei.value.hint is not None and "host: reviews" in ei.value.hint


def test_a_second_virtual_service_or_rule_for_a_host_is_refused() -> None:
    svc, dr, vs = parse(ALL)
    stored = plan({}, [svc, dr, vs], NET).puts
    assert plan(stored, [vs], NET).unchanged  # the same one again: fine
    other = ALL.split("---\n")[2].replace("{name: reviews, namespace: shop}",
                                         "{name: other, namespace: shop}")
    text = other.replace("hosts: [reviews]", "hosts: [ratings, reviews.shop.svc.cluster.local]")
    with pytest.raises(InputError) as ei:
        plan(stored, parse(text), NET)
    e = ei.value
    assert e.path == "spec.hosts[1]" and "already has a VirtualService: shop/reviews" in e.reason
    # a second DestinationRule for the host, in the same input as the first
    second = RULE.replace("{name: reviews, namespace: shop}", "{name: reviews2, namespace: shop}")
    with pytest.raises(InputError) as ei:
        plan({}, parse(RULE + "---\n" + second), NET)
    assert ei.value.path == "spec.host" and "already has a DestinationRule: shop/reviews" in ei.value.reason


def test_snapshots_hold_virtual_services_and_destination_rules() -> None:
    puts = plan({}, parse(ALL), NET).puts
    b = SnapshotBuilder()
    b.reset(puts)
    s1 = b.build(1)
    vs = s1.virtual_services[("shop", "reviews")]
    dr = s1.destination_rules[("shop", "reviews")]
    assert vs == parse(ALL)[2].resource and dr == parse(ALL)[1].resource
    # a change to the rule leaves the other tables shared with the previous snapshot
    (dr2,) = parse(RULE.replace("LEAST_REQUEST", "RANDOM"))
    b.apply({resource_key(Kind.DESTINATION_RULE, "shop", "reviews"): _dump(dr2.resource)}, ())
    s2 = b.build(2)
    assert s2.destination_rules[("shop", "reviews")].load_balancer == "RANDOM"
    assert s2.virtual_services is s1.virtual_services and s2.services is s1.services
    assert s1.destination_rules[("shop", "reviews")].load_balancer == "LEAST_REQUEST"  # unchanged
    # deletes
    b.apply({}, [resource_key(Kind.VIRTUAL_SERVICE, "shop", "reviews"),
                 resource_key(Kind.DESTINATION_RULE, "shop", "reviews")])
    s3 = b.build(3)
    assert dict(s3.virtual_services) == {} and dict(s3.destination_rules) == {}
    assert s3.services is s1.services
    # a value not written through apply is skipped, the rest keeps serving
    b.apply({resource_key(Kind.VIRTUAL_SERVICE, "shop", "bad"): '{"name": "bad"}'}, ())
    assert dict(b.build(4).virtual_services) == {}


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(
        ["", "mesh", "reviews", "v1", "1s", "0s", "0.0001s", "(", "[a-", ".*", "*", "x-y", "GET"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["exact", "prefix", "regex", "host", "subset", "weight", "route", "match",
                         "number", "set", "remove", "uri", "simple", "name", "labels"]),
        inner, max_size=3),
    max_leaves=8)


def _paths(v: object, at: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    out = [at]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*at, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*at, i))
    return out


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from([VS, RULE]), pick=st.integers(0, 10_000), value=_VALUES)
def test_any_value_anywhere_parses_or_is_refused_with_an_input_error(which: str, pick: int,
                                                                     value: object) -> None:
    """Whatever a field holds, the parser and the apply-time checks either take the document
    or raise InputError naming a field: never another exception."""
    doc = yaml.safe_load(which)
    paths = _paths(doc["spec"], ("spec",))
    path = paths[pick % len(paths)]
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    text = f"{SERVICE}---\n{RULE}---\n" + json.dumps(doc) if which is VS else json.dumps(doc)
    try:
        locs = parse(text)
        plan({}, locs, NET)
    except InputError as e:
        assert e.file == "mesh.yaml" and e.line is not None and e.reason


# -- the CLI, end to end on an embedded registry in a temp dir --------------------------


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


@pytest.mark.parametrize(("bad", "reason"), [
    (VS.replace("subset: v2", "subset: v9"), "unknown subset 'v9'"),  # found by plan
    (VS.replace("weight: 20", "weight: 21"), "sum to 101, not 100"),  # found by the parser
])
def test_nothing_is_applied_when_the_last_document_is_bad(tmp_path: Path, bad: str,
                                                          reason: str) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    f.write_text(f"{SERVICE}---\n{RULE}---\n{bad}")
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 2 and f"error: {f}:" in out and reason in out, out
    assert EmbeddedBackend(reg).read().items == {}  # not the Service, not the DestinationRule


def test_cli_get_describe_delete(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    f.write_text(ALL)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "VirtualService shop/reviews created" in out, out
    assert "DestinationRule shop/reviews created" in out
    code, out = run(["get", "vs", "-n", "shop"], reg)
    assert code == 0, out
    header, row = out.splitlines()
    assert header.split()[:3] == ["NAMESPACE", "NAME", "HOSTS"]
    assert row.split()[:3] == ["shop", "reviews", "reviews"] and "reviews/v2" in row, out
    code, out = run(["get", "destinationrules", "-A", "-o", "json"], reg)
    assert code == 0 and [d["host"] for d in json.loads(out)] == ["reviews"], out
    code, out = run(["describe", "virtualservice", "reviews", "-n", "shop", "-o", "json"], reg)
    doc = json.loads(out)
    assert code == 0 and doc["source"] == f"{f}:{line_of(ALL, 'kind: VirtualService') - 1}"
    assert doc["http"][0]["timeout"] == "1.5s" and doc["revision"] >= 1
    code, out = run(["describe", "dr", "reviews", "-n", "shop"], reg)
    assert code == 0 and "LEAST_REQUEST" in out and f"source: {f}:" in out, out
    code, out = run(["describe", "vs", "nope", "-n", "shop"], reg)
    assert code == 3 and "VirtualService shop/nope not found" in out, out
    code, out = run(["delete", "virtualservice", "reviews", "-n", "shop"], reg)
    assert code == 0 and "VirtualService shop/reviews deleted" in out, out
    code, out = run(["delete", "destinationrule", "reviews", "-n", "shop"], reg)
    assert code == 0, out
    items = EmbeddedBackend(reg).read().items
    assert list(items) == [resource_key(Kind.SERVICE, "shop", "reviews")]
    code, out = run(["delete", "vs", "reviews", "-n", "shop"], reg)
    assert code == 3 and "not found" in out


def test_destination_rule_policies_parse_and_round_trip() -> None:
    from agent.control.istio import (
        ConsistentHash,
        OutlierDetection,
        destination_rule_doc,
        destination_rule_from_doc,
    )

    text = RULE.replace(
        "{simple: LEAST_REQUEST}",
        "{consistentHash: {httpCookie: {name: user, ttl: 60s, path: /}, ringHash: {minimumRingSize: 2048}}}\n"
        "    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 10s,\n"
        "                       maxEjectionPercent: 50}\n"
        "    connectionPool: {http: {http2MaxRequests: 100}}",
    )
    dr = parse(text)[0].resource
    assert isinstance(dr, DestinationRule)
    assert dr.consistent_hash == ConsistentHash("cookie", "user", "/", 60.0, "ring", 2048)
    assert dr.outlier == OutlierDetection(3, 0, 5.0, 10.0, 50, 0)
    assert dr.max_requests == 100 and dr.load_balancer == ""
    assert destination_rule_from_doc(destination_rule_doc(dr)) == dr


def test_tcp_routes_parse_and_round_trip() -> None:
    from agent.control.istio import TcpMatch

    text = VS + ("  tcp:\n  - match: [{port: 3306, sourceLabels: {app: web}, sourceNamespace: shop}]\n"
                 "    route:\n    - {destination: {host: reviews, subset: v1}, weight: 70}\n"
                 "    - {destination: {host: reviews, subset: v2, port: {number: 3307}}, weight: 30}\n"
                 "  - route: [{destination: {host: reviews}}]\n")
    vs = parse(SERVICE + "---\n" + RULE + "---\n" + text)[2].resource
    assert isinstance(vs, VirtualService)
    assert vs.tcp[0].matches == (TcpMatch(3306, (("app", "web"),), "shop"),)
    assert [(d.destination.subset, d.destination.port, d.weight) for d in vs.tcp[0].route] == [
        ("v1", 0, 70), ("v2", 3307, 30)]
    assert vs.tcp[1].matches == () and vs.tcp[1].route[0].weight == 100
    assert virtual_service_from_doc(virtual_service_doc(vs)) == vs
    bad = text.replace("weight: 30", "weight: 20")
    e = _err(SERVICE + "---\n" + RULE + "---\n" + bad)
    assert e.path == "spec.tcp[0].route" and "sum to 90" in e.reason


def test_subset_and_port_level_policies_merge_as_istio_does() -> None:
    """Subset and port-level settings replace the inherited loadBalancer, connectionPool or
    outlierDetection as a whole; precedence: subset's port > subset > rule's port > rule."""
    from agent.control.istio import ConnectionPool, destination_rule_doc, destination_rule_from_doc

    text = RULE.replace(
        "  subsets:\n",
        "    connectionPool:\n"
        "      tcp: {maxConnections: 10, connectTimeout: 250ms}\n"
        "      http: {http1MaxPendingRequests: 5, http2MaxRequests: 50, maxRequestsPerConnection: 7,\n"
        "             maxRetries: 2, idleTimeout: 30s, useClientProtocol: true}\n"
        "    outlierDetection: {consecutive5xxErrors: 3, splitExternalLocalOriginErrors: true,\n"
        "                       consecutiveLocalOriginFailures: 2}\n"
        "    tls: {mode: ISTIO_MUTUAL}\n"
        "    portLevelSettings:\n"
        "    - port: {number: 8080}\n"
        "      loadBalancer: {simple: RANDOM}\n"
        "  subsets:\n",
    ) + "    trafficPolicy:\n      connectionPool: {http: {http2MaxRequests: 1}}\n" \
        "      portLevelSettings:\n      - port: {number: 9090}\n" \
        "        loadBalancer: {simple: ROUND_ROBIN}\n"
    dr = parse(text)[0].resource
    assert isinstance(dr, DestinationRule)
    pool = ConnectionPool(10, 0.25, 5, 50, 7, 2, 30.0)
    top = dr.resolve(80, "")
    assert top.pool == pool and top.load_balancer is not None and top.load_balancer.simple == "LEAST_REQUEST"
    assert top.outlier is not None and top.outlier.split_local_origin
    assert top.outlier.consecutive_local_origin == 2
    port = dr.resolve(8080, "")
    assert port.load_balancer is not None and port.load_balancer.simple == "RANDOM" and port.pool == pool
    v1 = dr.resolve(8080, "v1")  # v1 has no policy of its own: the rule's port-level settings
    assert v1.load_balancer is not None and v1.load_balancer.simple == "RANDOM"
    v2 = dr.resolve(8080, "v2")  # v2's connectionPool replaces the rule's as a whole
    assert v2.pool == ConnectionPool(max_requests=1) and v2.load_balancer is not None
    assert v2.load_balancer.simple == "RANDOM" and v2.outlier == top.outlier
    v2p = dr.resolve(9090, "v2")  # the subset's own port-level settings win
    assert v2p.load_balancer is not None and v2p.load_balancer.simple == "ROUND_ROBIN"
    assert destination_rule_from_doc(destination_rule_doc(dr)) == dr


def test_redirect_parses_and_its_unsupported_parts_are_refused() -> None:
    text = VS.replace("  http:\n",
                      "  http:\n  - redirect: {uri: /new, authority: new.example, redirectCode: 308}\n"
                      "    match: [{uri: {prefix: /old}}]\n", 1)
    vs = parse(SERVICE + "---\n" + text)[1].resource
    assert isinstance(vs, VirtualService)
    r = vs.http[0].redirect
    assert r is not None and (r.uri, r.authority, r.code) == ("/new", "new.example", 308)
    assert virtual_service_from_doc(virtual_service_doc(vs)) == vs
    bad = VS.replace("  http:\n",
                     "  http:\n  - redirect: {uri: /new, port: 8443, derivePort: FROM_PROTOCOL_DEFAULT}\n", 1)
    e = _err(SERVICE + "---\n" + bad)
    assert e.path == "spec.http[0].redirect.derivePort" and "alternatives" in e.reason
    good = VS.replace("  http:\n",
                      "  http:\n  - redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}\n"
                      "  - name: cors\n    route: [{destination: {host: reviews}}]\n"
                      "    rewrite: {uriRegexRewrite: {match: '^/a/(.*)', rewrite: '/b/\\1'}}\n"
                      "    corsPolicy: {allowOrigins: [{exact: 'https://x'}], allowMethods: [GET],\n"
                      "                 maxAge: 1h, allowCredentials: true}\n", 1)
    vs = parse(SERVICE + "---\n" + good)[1].resource
    assert isinstance(vs, VirtualService)
    assert vs.http[0].redirect is not None and vs.http[0].redirect.derive_port == "FROM_PROTOCOL_DEFAULT"
    cors = vs.http[1].cors
    assert cors is not None and cors.max_age_s == 3600 and cors.allow_credentials
    assert vs.http[1].rewrite_regex == ("^/a/(.*)", "/b/\\1")
    assert virtual_service_from_doc(virtual_service_doc(vs)) == vs
