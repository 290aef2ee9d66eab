"""Istio's AuthorizationPolicy as users write it: parsed strictly (file, line and field for every
refusal), stored and read back unchanged, applied all or nothing, and shown by the CLI with the
fields TCP ports cannot judge."""

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
from agent.control.authz import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
    policy_doc,
    policy_from_doc,
)
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.model import Kind, resource_key
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import Located, parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")

SERVICE = """\
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, protocol: http}]
"""

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  selector:
    matchLabels: {app: web, version: v1}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/ops/*"]
        notPrincipals: ["*/sa/evil"]
        requestPrincipals: ["https://issuer.example/*"]
        notRequestPrincipals: ["*@spam"]
        namespaces: [shop]
        notNamespaces: [test]
        ipBlocks:
        - 10.244.1.0/24
        - 10.244.2.7
        notIpBlocks: [10.244.1.66/32]
        remoteIpBlocks: ["fd00::/64"]
        notRemoteIpBlocks: [192.168.0.0/16]
    - source: {namespaces: [ops]}
    to:
    - operation:
        hosts: [Web.Shop.svc.cluster.local, "*.example.com"]
        notHosts: [admin.example.com]
        ports: ["8080", 9090]
        notPorts: ["9091"]
        methods: [GET, "POST"]
        notMethods: [DELETE]
        paths: [/api/*, "*.png", /healthz]
        notPaths: [/api/admin/*]
    when:
    - key: request.headers[X-Token]
      values: ["*"]
    - key: source.ip
      notValues: [10.244.1.9]
    - key: destination.port
      values: [8080, "9090"]
    - key: request.auth.claims[groups]
      values: [admins]
    - key: request.auth.claims[realm][role]
      notValues: [guest]
    - key: connection.sni
      values: ["*.shop.svc.cluster.local"]
  - {}
"""


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of ``text`` containing ``needle``."""
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def parse(text: str, file: str = "authz.yaml") -> list[Located]:
    return parse_yaml(text, file, NET)


def policy(text: str = POLICY) -> AuthorizationPolicy:
    (loc,) = parse(text)
    assert isinstance(loc.resource, AuthorizationPolicy)
    return loc.resource


def test_full_policy_parses_and_round_trips() -> None:
    p = policy()
    assert (p.name, p.namespace, p.action, p.source) == ("web-allow", "shop", "ALLOW", "authz.yaml:1")
    assert p.selector == (("app", "web"), ("version", "v1"))
    first, allow_all = p.rules
    assert allow_all == Rule(None, None, ())
    assert first.sources == (
        Source(principals=("cluster.local/ns/shop/sa/frontend", "cluster.local/ns/ops/*"),
               not_principals=("*/sa/evil",), request_principals=("https://issuer.example/*",),
               not_request_principals=("*@spam",), namespaces=("shop",), not_namespaces=("test",),
               ip_blocks=("10.244.1.0/24", "10.244.2.7"), not_ip_blocks=("10.244.1.66/32",),
               remote_ip_blocks=("fd00::/64",), not_remote_ip_blocks=("192.168.0.0/16",)),
        Source(namespaces=("ops",)),
    )
    assert first.operations == (Operation(
        hosts=("web.shop.svc.cluster.local", "*.example.com"),  # lower-cased
        not_hosts=("admin.example.com",), ports=(8080, 9090), not_ports=(9091,),
        methods=("GET", "POST"), not_methods=("DELETE",), paths=("/api/*", "*.png", "/healthz"),
        not_paths=("/api/admin/*",)),)
    assert first.when == (
        Condition("request.headers[X-Token]", ("*",)),
        Condition("source.ip", (), ("10.244.1.9",)),
        Condition("destination.port", ("8080", "9090")),  # ports as Istio writes them: strings
        Condition("request.auth.claims[groups]", ("admins",)),
        Condition("request.auth.claims[realm][role]", (), ("guest",)),
        Condition("connection.sni", ("*.shop.svc.cluster.local",)),
    )
    # the stored form reads back as the same value
    assert policy_from_doc(json.loads(_dump(p))) == p
    assert policy_from_doc(policy_doc(p)) == p


def test_v1beta1_and_the_edges_istio_accepts() -> None:
    p = policy(POLICY.replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n"))
    assert p.action == "ALLOW" and len(p.rules) == 2
    head = POLICY.split("  selector:")[0]
    # spec: {} is ALLOW without rules: the namespace's deny-all
    deny_all = policy(head.replace("spec:\n", "spec: {}\n"))
    assert (deny_all.action, deny_all.selector, deny_all.rules) == ("ALLOW", None, ())
    assert policy(head + "  rules: []\n").rules == ()
    # rules: [{}] allows all; a rule with only `when`; DENY and AUDIT; action left out
    assert policy(head + "  rules: [{}]\n").rules == (Rule(),)
    only_when = policy(head + "  action: DENY\n  rules:\n  - when: [{key: source.namespace, values: [x]}]\n")
    assert only_when.action == "DENY"
    assert only_when.rules == (Rule(when=(Condition("source.namespace", ("x",)),)),)
    assert policy(head + "  action: AUDIT\n").action == "AUDIT"
    assert policy(head + "  selector: {}\n").selector == ()  # selects every workload, as None does
    assert policy(head + "  selector: {matchLabels: {app: a}}\n").selector == (("app", "a"),)


def _err(text: str, file: str = "authz.yaml") -> InputError:
    with pytest.raises(InputError) as ei:
        parse(text, file)
    return ei.value


def _set(old: str, new: str) -> str:
    assert old in POLICY, old
    return POLICY.replace(old, new, 1)


# (text, the text on the failing line, field path, reason)
REFUSED: dict[str, tuple[str, str, str, str]] = {
    "unknown action": (_set("action: ALLOW", "action: REJECT"), "action: REJECT", "spec.action",
                       "unknown action 'REJECT'"),
    "lower-case action": (_set("action: ALLOW", "action: allow"), "action: allow", "spec.action",
                          "unknown action 'allow'"),
    "CUSTOM": (_set("action: ALLOW", "action: CUSTOM\n  provider: {name: ext-authz}"), "action: CUSTOM",
               "spec.action", "CUSTOM is not supported: nodemesh has no external authorizer"),
    "provider": (_set("action: ALLOW", "action: ALLOW\n  provider: {name: ext-authz}"), "provider:",
                 "spec.provider", "provider is not supported: nodemesh has no external authorizer"),
    "targetRef": (_set("action: ALLOW", "action: ALLOW\n  targetRef: {kind: Gateway, name: gw}"),
                  "targetRef:", "spec.targetRef", "targetRef is not supported"),
    "targetRefs": (_set("action: ALLOW", "action: ALLOW\n  targetRefs: [{kind: Service, name: web}]"),
                   "targetRefs:", "spec.targetRefs", "targetRefs is not supported"),
    "malformed CIDR": (_set("- 10.244.2.7", "- 10.244.2.0/33"), "10.244.2.0/33",
                       "spec.rules[0].from[0].source.ipBlocks[1]",
                       "'10.244.2.0/33' is not an IP address or CIDR block"),
    "CIDR with a netmask": (_set("[10.244.1.66/32]", "[10.244.1.0/255.255.255.0]"), "notIpBlocks:",
                            "spec.rules[0].from[0].source.notIpBlocks[0]",
                            "is not an IP address or CIDR block"),
    "malformed remote CIDR": (_set("[192.168.0.0/16]", "[192.168.0/16]"), "notRemoteIpBlocks:",
                              "spec.rules[0].from[0].source.notRemoteIpBlocks[0]",
                              "'192.168.0/16' is not an IP address or CIDR block"),
    "malformed ip condition": (_set("notValues: [10.244.1.9]", "notValues: [10.244.1.999]"), "10.244.1.999",
                               "spec.rules[0].when[1].notValues[0]", "is not an IP address or CIDR block"),
    "unknown condition key": (_set("key: connection.sni", "key: request.path"), "key: request.path",
                              "spec.rules[0].when[5].key", "unknown condition key 'request.path'"),
    "header key without a name": (_set("key: request.headers[X-Token]", "key: request.headers"),
                                  "key: request.headers", "spec.rules[0].when[0].key",
                                  "request.headers needs a header name: request.headers[NAME]"),
    "claims key without a name": (_set("key: request.auth.claims[groups]", "key: request.auth.claims[]"),
                                  "key: request.auth.claims[]", "spec.rules[0].when[3].key",
                                  "request.auth.claims needs a claim name"),
    "a name where none is taken": (_set("key: source.ip", "key: source.ip[x]"), "key: source.ip[x]",
                                   "spec.rules[0].when[1].key", "source.ip takes no name in brackets"),
    "condition without values": (_set("      values: [admins]\n", ""), "key: request.auth.claims[groups]",
                                 "spec.rules[0].when[3]", "needs values or notValues"),
    "path pattern Istio refuses": (_set("/healthz]", "/a*b]"), "paths:",
                                   "spec.rules[0].to[0].operation.paths[2]",
                                   "'/a*b': Istio supports only prefix, suffix and presence matching"),
    "two stars": (_set('"*.png"', '"*.png*"'), "paths:", "spec.rules[0].to[0].operation.paths[1]",
                  "Istio supports only prefix, suffix and presence matching"),
    "path template": (_set("/api/admin/*]", "\"/api/{*}/admin\"]"), "notPaths:",
                      "spec.rules[0].to[0].operation.notPaths[0]",
                      "path templates ({*}, {**}) are not supported yet"),
    "path template **": (_set("/healthz]", "\"/static/{**}\"]"), "paths:",
                         "spec.rules[0].to[0].operation.paths[2]",
                         "path templates ({*}, {**}) are not supported yet"),
    "value pattern": (_set('values: ["*.shop.svc.cluster.local"]', 'values: ["a*b"]'), 'values: ["a*b"]',
                      "spec.rules[0].when[5].values[0]", "Istio supports only prefix, suffix and presence"),
    "lower-case method": (_set('methods: [GET, "POST"]', 'methods: [GET, "post"]'), "methods:",
                          "spec.rules[0].to[0].operation.methods[1]", "HTTP methods are upper case"),
    "port out of range": (_set('ports: ["8080", 9090]', 'ports: ["8080", "70000"]'), "ports: [",
                          "spec.rules[0].to[0].operation.ports[1]", "port '70000' is out of range 1-65535"),
    "port by name": (_set('notPorts: ["9091"]', "notPorts: [http]"), "notPorts:",
                     "spec.rules[0].to[0].operation.notPorts[0]", "expected a port"),
    "condition port": (_set('values: [8080, "9090"]', "values: [0]"), "values: [0]",
                       "spec.rules[0].when[2].values[0]", "port 0 is out of range"),
    "empty from": (_set("  - {}\n", "  - from: []\n"), "- from: []", "spec.rules[1].from",
                   "from must not be empty"),
    "empty source": (_set("{namespaces: [ops]}", "{}"), "- source: {}", "spec.rules[0].from[1].source",
                     "a source needs at least one field"),
    "empty operation": (_set("  - {}\n", "  - to: [{operation: {paths: []}}]\n"), "- to: [{operation",
                        "spec.rules[1].to[0].operation", "an operation needs at least one field"),
    "serviceAccounts": (_set("namespaces: [shop]", "serviceAccounts: [frontend]"), "serviceAccounts:",
                        "spec.rules[0].from[0].source.serviceAccounts",
                        "serviceAccounts is not supported yet"),
    "unknown source field": (_set("namespaces: [shop]", "namespace: [shop]"), "namespace: [shop]",
                             "spec.rules[0].from[0].source.namespace", "unknown field 'namespace'"),
    "spiffe principal": (_set('"cluster.local/ns/ops/*"', '"spiffe://cluster.local/ns/ops/*"'), "principals:",
                         "spec.rules[0].from[0].source.principals[1]", "written without 'spiffe://'"),
    "selector field": (_set("matchLabels:", "labels:"), "labels:", "spec.selector.labels",
                       "unknown field 'labels'"),
    "empty string": (_set("notNamespaces: [test]", 'notNamespaces: [""]'), "notNamespaces:",
                     "spec.rules[0].from[0].source.notNamespaces[0]", "expected a non-empty string"),
    "networking api": (_set("security.istio.io/v1", "networking.istio.io/v1"), "kind:", "kind",
                       "kind AuthorizationPolicy does not exist in networking.istio.io/v1"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_file_line_field_and_reason(case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    e = _err(text)
    expected = line_of(text, on_line)
    assert (e.file, e.line, e.path) == ("authz.yaml", expected, path), str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"authz.yaml:{expected} at {path}: "), str(e)


def test_refusal_hints() -> None:
    e = _err(REFUSED["networking api"][0])
    assert e.hint is not None and "security.istio.io/v1" in e.hint
    e = _err(REFUSED["unknown condition key"][0])
    assert e.hint is not None and "request.headers[NAME]" in e.hint and "connection.sni" in e.hint
    e = _err(REFUSED["unknown action"][0])
    assert e.hint == "one of: ALLOW, DENY, AUDIT"


def test_apply_is_atomic_and_detects_unchanged() -> None:
    svc, ap = parse(SERVICE + "---\n" + POLICY)
    p = plan({}, [svc, ap], NET)
    assert p.created == ("Service shop/web", "AuthorizationPolicy shop/web-allow")
    key = resource_key(Kind.AUTHORIZATION_POLICY, "shop", "web-allow")
    assert key == "/nodemesh/registry/authorizationpolicy/shop/web-allow" and key in p.puts
    again = plan(p.puts, [ap], NET)
    assert not again.puts and again.unchanged == ("AuthorizationPolicy shop/web-allow",)
    (changed,) = parse(POLICY.replace("action: ALLOW", "action: DENY"))
    assert plan(p.puts, [changed], NET).configured == ("AuthorizationPolicy shop/web-allow",)
    dup = POLICY + "---\n" + POLICY
    with pytest.raises(InputError, match="AuthorizationPolicy shop/web-allow is defined twice"):
        plan({}, parse(dup), NET)


def test_snapshots_hold_policies_and_deny_all_in_place_of_what_they_cannot_read() -> None:
    svc, ap = parse(SERVICE + "---\n" + POLICY)
    puts = plan({}, [svc, ap], NET).puts
    b = SnapshotBuilder()
    b.reset(puts)
    s1 = b.build(1)
    assert s1.authorization_policies[("shop", "web-allow")] == ap.resource
    key = resource_key(Kind.AUTHORIZATION_POLICY, "shop", "web-allow")
    doc = json.loads(puts[key])
    # values not written through apply: each replaced by a deny-all of its namespace (an
    # unreadable ALLOW policy skipped would open what it guarded), the rest keeps serving
    bad_action = {**doc, "action": "CUSTOM"}
    bad_cidr = json.loads(puts[key].replace("10.244.2.7", "10.244.2.0/33"))
    bad_field = {**doc, "rules": [{"from": [{"oops": []}]}]}
    for i, bad in enumerate([bad_action, bad_cidr, {"name": "x"}, bad_field]):
        b.apply({resource_key(Kind.AUTHORIZATION_POLICY, "shop", f"bad{i}"): json.dumps(bad)}, ())
    s2 = b.build(2)
    assert sorted(s2.authorization_policies) == [
        *(("shop", f"bad{i}") for i in range(4)), ("shop", "web-allow")]
    for i in range(4):
        p = s2.authorization_policies[("shop", f"bad{i}")]
        assert (p.action, p.selector, len(p.rules)) == ("DENY", None, 1)
    assert s2.services is s1.services
    b.apply({}, [key] + [resource_key(Kind.AUTHORIZATION_POLICY, "shop", f"bad{i}") for i in range(4)])
    s3 = b.build(3)
    assert dict(s3.authorization_policies) == {} and s3.services is s1.services


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(
        ["", "*", "**", "a*b", "/a/*", "{*}", "GET", "get", "10.0.0.0/8", "10.0.0.0/40", "::1",
         "source.ip", "request.headers", "request.headers[x]", "request.auth.claims[a][b]", "CUSTOM",
         "DENY", "80", "0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["source", "operation", "from", "to", "when", "key", "values", "notValues",
                         "paths", "ports", "ipBlocks", "principals", "matchLabels", "action"]),
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
@given(pick=st.integers(0, 10_000), value=_VALUES)
def test_any_value_anywhere_parses_or_is_refused_with_an_input_error(pick: int, value: object) -> None:
    """Whatever a field holds, the parser either takes the policy (and it round-trips) or raises
    InputError naming a line: never another exception."""
    doc = yaml.safe_load(POLICY)
    paths = _paths(doc["spec"], ("spec",))
    path = paths[pick % len(paths)]
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    try:
        (loc,) = parse(json.dumps(doc))
    except InputError as e:
        assert e.file == "authz.yaml" and e.line is not None and e.reason
        return
    assert isinstance(loc.resource, AuthorizationPolicy)
    assert policy_from_doc(json.loads(_dump(loc.resource))) == loc.resource


# -- the CLI, end to end on an embedded registry in a temp dir --------------------------


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


@pytest.mark.parametrize("case", ["unknown action", "CUSTOM", "malformed CIDR", "unknown condition key",
                                  "path pattern Istio refuses", "path template"])
def test_bad_input_applies_nothing(tmp_path: Path, case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    full = SERVICE + "---\n" + text  # a good Service first: it is not applied either
    f.write_text(full)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 2 and f"error: {f}:{line_of(full, on_line)} at {path}: " in out, out
    assert reason in out, out
    assert EmbeddedBackend(reg).read().items == {}


L7_WARNING = ("cannot be judged on TCP ports: an ALLOW rule with them never matches there; "
              "a DENY rule denies on its other fields")


def test_cli_get_describe_delete(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    root = POLICY.split("  selector:")[0].replace("{name: web-allow, namespace: shop}",
                                                  "{name: deny-all, namespace: istio-system}")
    text = SERVICE + "---\n" + POLICY + "---\n" + root + "  rules: []\n"
    f.write_text(text)
    source = f"{f}:{line_of(text, 'apiVersion: security')}"
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "AuthorizationPolicy shop/web-allow created" in out, out
    assert "AuthorizationPolicy istio-system/deny-all created" in out
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "AuthorizationPolicy shop/web-allow unchanged" in out, out

    code, out = run(["get", "ap", "-n", "shop"], reg)
    assert code == 0, out
    header, row = out.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "ACTION", "SELECTOR", "RULES", "SOURCE"]
    assert row.split() == ["shop", "web-allow", "ALLOW", "app=web,version=v1", "2", source], out
    code, out = run(["get", "authorizationpolicies", "-A", "-o", "json"], reg)
    assert code == 0 and [(d["namespace"], d["name"]) for d in json.loads(out)] == [
        ("istio-system", "deny-all"), ("shop", "web-allow")], out

    code, out = run(["describe", "authorizationpolicy", "web-allow", "-n", "shop"], reg)
    assert code == 0 and f"source: {source}" in out and "action: ALLOW" in out, out
    warnings = [ln for ln in out.splitlines() if ln.startswith("WARNING: ")]
    fields = [w.split()[1] for w in warnings]
    assert fields == ["rules[0].from[0].source.requestPrincipals",
                      "rules[0].from[0].source.notRequestPrincipals",
                      "rules[0].to[0].operation.hosts", "rules[0].to[0].operation.notHosts",
                      "rules[0].to[0].operation.methods", "rules[0].to[0].operation.notMethods",
                      "rules[0].to[0].operation.paths", "rules[0].to[0].operation.notPaths",
                      "rules[0].when[0]", "rules[0].when[3]", "rules[0].when[4]"], out
    assert all(L7_WARNING in w for w in warnings), out
    code, out = run(["describe", "ap", "web-allow", "-n", "shop", "-o", "json"], reg)
    doc = json.loads(out)
    assert code == 0 and doc["source"] == source and len(doc["warnings"]) == 11 and doc["revision"] >= 1
    code, out = run(["describe", "ap", "deny-all", "-n", "istio-system"], reg)
    assert code == 0 and "rules: []" in out and "WARNING" not in out, out
    code, out = run(["describe", "ap", "nope", "-n", "shop"], reg)
    assert code == 3 and "AuthorizationPolicy shop/nope not found" in out, out
    assert "nodemesh get authorizationpolicies -A" in out

    code, out = run(["delete", "authorizationpolicy", "web-allow", "-n", "shop"], reg)
    assert code == 0 and "AuthorizationPolicy shop/web-allow deleted" in out, out
    items = EmbeddedBackend(reg).read().items
    assert sorted(items) == [resource_key(Kind.AUTHORIZATION_POLICY, "istio-system", "deny-all"),
                             resource_key(Kind.SERVICE, "shop", "web")]
    code, out = run(["delete", "ap", "web-allow", "-n", "shop"], reg)
    assert code == 3 and "not found" in out
