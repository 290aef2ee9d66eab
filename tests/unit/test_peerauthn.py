"""Istio's PeerAuthentication: which mode a workload gets (Istio's precedence, UNSET inherits,
agent.yaml's setting as the default), parsed strictly (file, line and field for every refusal),
stored and read back unchanged, in snapshots, shown by the CLI (get/describe/delete, short name
pa), and what apply_peer_auth writes for a pod."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from agent import node
from agent.cli.main import cli
from agent.config import MeshConfig, PeerAuthConfig
from agent.control.apply import _dump, plan
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.model import Kind, Workload, resource_key
from agent.control.peerauthn import (
    PeerAuthentication,
    decide,
    peer_authentication_doc,
    peer_authentication_from_doc,
)
from agent.control.snapshot import Snapshot, SnapshotBuilder
from agent.control.validate import Located, parse_vip_range, parse_yaml
from agent.dataplane.route import Directory
from bpf import peerauth

NET = parse_vip_range("10.96.0.0/16")

PA = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-strict, namespace: shop}
spec:
  selector:
    matchLabels: {app: web}
  mtls:
    mode: STRICT
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def parse(text: str, file: str = "pa.yaml") -> list[Located]:
    return parse_yaml(text, file, NET)


def pa(text: str = PA) -> PeerAuthentication:
    (loc,) = parse(text)
    assert isinstance(loc.resource, PeerAuthentication)
    return loc.resource


# -- which mode -------------------------------------------------------------------------------

WEB = {"app": "web"}


def mode_for(resources: list[PeerAuthentication], namespace: str, labels: dict[str, str], default: str,
             root_namespace: str = "istio-system") -> str:
    """The workload's mode for ports without a portLevelMtls entry."""
    return decide(resources, namespace, labels, default, root_namespace).mode


def test_precedence_workload_over_namespace_over_mesh_over_default() -> None:
    mesh = PeerAuthentication("default", "istio-system", None, "STRICT")
    ns = PeerAuthentication("default", "shop", None, "PERMISSIVE")
    wl = PeerAuthentication("web", "shop", (("app", "web"),), "DISABLE")
    assert mode_for([], "shop", WEB, default="PERMISSIVE") == "PERMISSIVE"
    assert mode_for([mesh], "shop", WEB, default="PERMISSIVE") == "STRICT"
    assert mode_for([mesh, ns], "shop", WEB, default="DISABLE") == "PERMISSIVE"
    assert mode_for([wl, mesh, ns], "shop", WEB, default="PERMISSIVE") == "DISABLE"
    # the selector does not match, or the policy is of another namespace: the next level decides
    assert mode_for([wl, mesh, ns], "shop", {"app": "db"}, default="DISABLE") == "PERMISSIVE"
    assert mode_for([wl, ns], "other", WEB, default="DISABLE") == "DISABLE"
    assert mode_for([wl, mesh, ns], "other", WEB, default="DISABLE") == "STRICT"
    # another root namespace
    assert mode_for([mesh], "shop", WEB, default="DISABLE", root_namespace="mesh-root") == "DISABLE"


def test_unset_inherits_from_the_next_level() -> None:
    mesh = PeerAuthentication("default", "istio-system", None, "STRICT")
    ns = PeerAuthentication("default", "shop", None, "UNSET")
    wl = PeerAuthentication("web", "shop", (("app", "web"),), "UNSET")
    assert mode_for([wl, ns, mesh], "shop", WEB, default="PERMISSIVE") == "STRICT"
    assert mode_for([wl, ns], "shop", WEB, default="PERMISSIVE") == "PERMISSIVE"
    unset_mesh = PeerAuthentication("default", "istio-system", None, "UNSET")
    assert mode_for([unset_mesh], "shop", WEB, default="DISABLE") == "DISABLE"


def test_several_at_one_level_the_first_by_name_and_root_selectors_ignored() -> None:
    a = PeerAuthentication("a", "shop", (("app", "web"),), "STRICT")
    b = PeerAuthentication("b", "shop", (("tier", "front"),), "DISABLE")
    labels = {"app": "web", "tier": "front"}
    assert mode_for([b, a], "shop", labels, default="PERMISSIVE") == "STRICT"
    # a matching selector wins over the namespace-wide one whatever its name
    z = PeerAuthentication("z", "shop", (("app", "web"),), "DISABLE")
    ns = PeerAuthentication("a", "shop", None, "STRICT")
    assert mode_for([ns, z], "shop", labels, default="PERMISSIVE") == "DISABLE"
    # a selector in the root namespace is ignored (Istio); validation refuses it
    root_sel = PeerAuthentication("x", "istio-system", (("app", "web"),), "STRICT")
    assert mode_for([root_sel], "shop", WEB, default="PERMISSIVE") == "PERMISSIVE"


# -- parsing ----------------------------------------------------------------------------------


def test_full_resource_parses_and_round_trips() -> None:
    r = pa()
    assert r == PeerAuthentication("web-strict", "shop", (("app", "web"),), "STRICT", "pa.yaml:1")
    assert peer_authentication_from_doc(json.loads(_dump(r))) == r
    assert peer_authentication_from_doc(peer_authentication_doc(r)) == r
    assert pa(PA.replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n")) == r
    # no selector: the whole namespace; no mtls: UNSET (inherits)
    head = PA.split("  selector:")[0]
    bare = pa(head.replace("spec:\n", "spec: {}\n"))
    assert (bare.selector, bare.mode) == (None, "UNSET")
    assert peer_authentication_from_doc(peer_authentication_doc(bare)) == bare
    mesh = pa(head.replace("namespace: shop", "namespace: istio-system") + "  mtls: {mode: PERMISSIVE}\n")
    assert (mesh.namespace, mesh.selector, mesh.mode) == ("istio-system", None, "PERMISSIVE")


REFUSED: dict[str, tuple[str, str, str, str]] = {
    # case: (text, text on the line the error names (a block value's first line), field path,
    # part of the reason)
    "portLevelMtls without selector": (
        PA.replace("  selector:\n    matchLabels: {app: web}\n", "")
        + "  portLevelMtls:\n    8080: {mode: DISABLE}\n",
        "8080:", "spec.portLevelMtls", "portLevelMtls requires a workload selector"),
    "portLevelMtls empty selector": (
        PA.replace("{app: web}", "{}") + "  portLevelMtls:\n    8080: {mode: DISABLE}\n",
        "8080:", "spec.portLevelMtls", "portLevelMtls requires a workload selector"),
    "portLevelMtls port 0": (PA + "  portLevelMtls:\n    0: {mode: DISABLE}\n", "0: {mode",
                             "spec.portLevelMtls.0", "expected a port number 1-65535"),
    "portLevelMtls port name": (PA + "  portLevelMtls:\n    http: {mode: DISABLE}\n", "http: {mode",
                                "spec.portLevelMtls.http", "expected a port number 1-65535"),
    "portLevelMtls port too big": (PA + "  portLevelMtls:\n    65536: {mode: DISABLE}\n", "65536:",
                                   "spec.portLevelMtls.65536", "expected a port number 1-65535"),
    "portLevelMtls null": (PA + "  portLevelMtls:\n    8080:\n", "8080:", "spec.portLevelMtls.8080",
                           "must not be null"),
    "portLevelMtls bad mode": (PA + "  portLevelMtls:\n    8080: {mode: OFF}\n", "8080:",
                               "spec.portLevelMtls.8080.mode", "unknown mode"),
    "portLevelMtls unknown field": (PA + "  portLevelMtls:\n    8080: {mode: STRICT, tls: 1}\n", "8080:",
                                    "spec.portLevelMtls.8080.tls", "unknown field 'tls'"),
    "portLevelMtls too many": (PA + "  portLevelMtls:\n" + "".join(f"    {p}: {{mode: STRICT}}\n"
                                                                   for p in range(1000, 1033)),
                               "1000:", "spec.portLevelMtls", "at most 32"),
    "bad mode": (PA.replace("mode: STRICT", "mode: strict"), "mode: strict", "spec.mtls.mode",
                 "unknown mode"),
    "mode not a string": (PA.replace("mode: STRICT", "mode: 1"), "mode: 1", "spec.mtls.mode", "unknown mode"),
    "targetRef": (PA + "  targetRef: {kind: Service, name: web}\n", "targetRef", "spec.targetRef",
                  "targetRef is not supported"),
    "targetRefs": (PA + "  targetRefs:\n  - {kind: Service, name: web}\n", "- {kind", "spec.targetRefs",
                   "targetRefs is not supported"),
    "unknown mtls field": (PA.replace("    mode: STRICT", "    mode: STRICT\n    level: 3"), "level: 3",
                           "spec.mtls.level", "unknown field 'level'"),
    "selector without matchLabels": (PA.replace("    matchLabels: {app: web}", "    app: web"), "app: web",
                                     "spec.selector.app", "unknown field 'app'"),
    "bad label": (PA.replace("{app: web}", "{app: [web]}"), "matchLabels", "spec.selector.matchLabels.app",
                  "label value"),
    "root selector": (PA.replace("namespace: shop", "namespace: istio-system"), "matchLabels",
                      "spec.selector", "Istio ignores one with a selector"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_file_line_field_and_reason(case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    with pytest.raises(InputError) as ei:
        parse(text)
    e = ei.value
    assert (e.file, e.path) == ("pa.yaml", path), str(e)
    assert e.line == line_of(text, on_line), str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"pa.yaml:{e.line} at {path}: "), str(e)


def test_apply_atomic_unchanged_and_snapshot() -> None:
    (loc,) = parse(PA)
    p = plan({}, [loc], NET)
    assert p.created == ("PeerAuthentication shop/web-strict",)
    key = resource_key(Kind.PEER_AUTHENTICATION, "shop", "web-strict")
    assert key == "/nodemesh/registry/peerauthentication/shop/web-strict" and key in p.puts
    assert plan(p.puts, [loc], NET).unchanged == ("PeerAuthentication shop/web-strict",)
    b = SnapshotBuilder()
    b.reset(p.puts)
    assert b.build(1).peer_authentications[("shop", "web-strict")] == loc.resource
    b.apply({}, (key,))
    assert b.build(2).peer_authentications == {}
    # a stored value that does not decode (an unknown mode) is skipped; the rest keeps serving
    bad = json.dumps({"name": "bad", "namespace": "shop", "mtls": {"mode": "OFF"}})
    b.apply({key: p.puts[key], resource_key(Kind.PEER_AUTHENTICATION, "shop", "bad"): bad}, ())
    assert list(b.build(3).peer_authentications) == [("shop", "web-strict")]


# -- CLI --------------------------------------------------------------------------------------


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


def test_bad_input_applies_nothing(tmp_path: Path) -> None:
    text, on_line, path, reason = REFUSED["portLevelMtls without selector"]
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    good = PA.replace("web-strict", "good")
    f.write_text(good + "---\n" + text)
    code, out = run(["apply", "-f", str(f)], reg)
    expected = len(good.splitlines()) + 1 + line_of(text, on_line)
    assert code == 2 and f"error: {f}:{expected} at {path}: " in out, out
    assert reason in out, out
    assert EmbeddedBackend(reg).read().items == {}


def test_cli_get_describe_delete(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "pa.yaml"
    f.write_text(PA)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "PeerAuthentication shop/web-strict created" in out, out
    code, out = run(["get", "pa", "-n", "shop"], reg)
    assert code == 0, out
    header, row = out.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "SELECTOR", "MODE", "SOURCE"]
    assert row.split() == ["shop", "web-strict", "app=web", "STRICT", f"{f}:1"], out
    code, out = run(["get", "peerauthentications", "-A", "-o", "json"], reg)
    assert code == 0 and [d["name"] for d in json.loads(out)] == ["web-strict"], out
    code, out = run(["describe", "peerauthentication", "web-strict", "-n", "shop", "-o", "json"], reg)
    doc = json.loads(out)
    assert code == 0 and doc["source"] == f"{f}:1" and doc["mtls"] == {"mode": "STRICT"}, out
    code, out = run(["describe", "pa", "nope", "-n", "shop"], reg)
    assert code == 3 and "PeerAuthentication shop/nope not found" in out, out
    assert "nodemesh get peerauthentications -A" in out, out
    code, out = run(["delete", "pa", "web-strict", "-n", "shop"], reg)
    assert code == 0 and "PeerAuthentication shop/web-strict deleted" in out, out
    code, out = run(["get", "pa", "-A", "-o", "json"], reg)
    assert code == 0 and json.loads(out) == [], out


# -- what the node writes ---------------------------------------------------------------------


class FakeDataplane:
    def __init__(self) -> None:
        self.policies: dict[str, str] = {}

    def set_peer_auth(self, address: str, mode: str, *_: Any, **__: Any) -> None:
        self.policies[address] = mode

    def remove_peer_auth(self, address: str) -> bool:
        return self.policies.pop(address, None) is not None

    def attach_pod_filters(self, *_: Any) -> None:
        pass


def test_apply_peer_auth_takes_the_registry_policies_over_agent_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    links = {"/run/netns/web": ("10.244.1.2",), "/run/netns/db": ("10.244.1.3",),
             "/run/netns/x": ("10.244.1.9",)}  # x: no workload in the registry
    monkeypatch.setattr(node, "pod_interfaces", lambda ns: [peerauth.PodLink("eth0", 7, links[ns], ())])
    monkeypatch.setattr(peerauth, "host_peer", lambda *a: "veth0")
    monkeypatch.setattr(peerauth, "remove_pod_side_filter", lambda *a: None)
    workloads = {("shop", "web"): Workload("web", "shop", "10.244.1.2", labels={"app": "web"}),
                 ("shop", "db"): Workload("db", "shop", "10.244.1.3", labels={"app": "db"})}

    def agent_with(*policies: PeerAuthentication) -> Any:
        snap = Snapshot(1, workloads=workloads,
                        peer_authentications={(p.namespace, p.name): p for p in policies})
        cfg = SimpleNamespace(
            peer_authentication=PeerAuthConfig(mode="PERMISSIVE", workloads={"shop/db": "STRICT"}),
            interception=SimpleNamespace(enroll=list(links)),
            addresses=SimpleNamespace(proxy="10.244.1.1"), ports=SimpleNamespace(dns=15053),
            mesh=MeshConfig())
        return SimpleNamespace(dataplane=FakeDataplane(), cfg=cfg,
                               directory=SimpleNamespace(current=Directory.build(snap)),
                               peer_auth_errors={}, peer_auth_addresses={}, peer_auth_lock=threading.Lock())

    def modes(*policies: PeerAuthentication) -> tuple[str, str, str]:
        a = agent_with(*policies)
        node.apply_peer_auth(a)
        assert a.peer_auth_errors == {} and len(a.dataplane.policies) == 3
        return a.dataplane.policies["10.244.1.2"], a.dataplane.policies["10.244.1.3"], a.dataplane.policies[
            "10.244.1.9"]

    # web, db, x: none applies: agent.yaml's modes
    assert modes() == ("PERMISSIVE", "STRICT", "PERMISSIVE")
    # web's own; shop's UNSET: db keeps agent.yaml's
    assert modes(PeerAuthentication("web", "shop", (("app", "web"),), "DISABLE"),
                 PeerAuthentication("default", "shop", None, "UNSET")) == ("DISABLE", "STRICT", "PERMISSIVE")
    # mesh-wide over agent.yaml's; x (not in the registry) keeps agent.yaml's
    assert modes(PeerAuthentication("default", "istio-system", None, "PERMISSIVE"),
                 PeerAuthentication("web", "shop", (("app", "web"),), "STRICT")) == ("STRICT", "PERMISSIVE",
                                                                                      "PERMISSIVE")
