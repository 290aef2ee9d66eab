"""PeerAuthentication portLevelMtls and the configurable root namespace (issue 13 point 5): which
mode a workload's port gets and which resource set it (Istio's ComposePeerAuthentication: the
workload-level policy's ports, UNSET taking the workload's mode), parsed and stored with the
ports, agent.yaml's ``mesh.root_namespace`` read and plumbed to every mesh-wide decision, and the
port modes apply_peer_auth hands the maps. No root."""

from __future__ import annotations

import datetime
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent import node
from agent.config import ConfigError, MeshConfig, PeerAuthConfig, from_mapping
from agent.control.apply import plan
from agent.control.authz import AuthorizationPolicy
from agent.control.model import Workload
from agent.control.peerauthn import (
    DEFAULT_SET_BY,
    PeerAuthDecision,
    PeerAuthentication,
    decide,
    peer_authentication_doc,
    peer_authentication_from_doc,
)
from agent.control.snapshot import Snapshot, SnapshotBuilder
from agent.control.validate import parse_vip_range, parse_yaml
from agent.dataplane.route import Directory
from agent.identity.ca import MeshCA
from bpf import peerauth

NET = parse_vip_range("10.96.0.0/16")
WEB = {"app": "web"}
MESH = PeerAuthentication("default", "istio-system", None, "STRICT")
NS = PeerAuthentication("default", "shop", None, "PERMISSIVE")

PORTS_YAML = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: web-ports, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: UNSET}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    "9090": {mode: DISABLE}
    9443: {}
"""


def test_port_level_overrides_the_workload_mode_and_unset_ports_inherit_it() -> None:
    (loc,) = parse_yaml(PORTS_YAML, "pa.yaml", NET)
    wl = loc.resource
    assert isinstance(wl, PeerAuthentication)
    assert wl.ports == ((8080, "PERMISSIVE"), (9090, "DISABLE"), (9443, "UNSET"))
    d = decide([MESH, NS, wl], "shop", WEB, "DISABLE")
    # the workload's mode is UNSET: the namespace's; port 9443 UNSET: the workload's effective mode
    assert d == PeerAuthDecision("PERMISSIVE", "PeerAuthentication shop/default",
                                 ((8080, "PERMISSIVE"), (9090, "DISABLE"), (9443, "PERMISSIVE")),
                                 "PeerAuthentication shop/web-ports")
    assert d.mode_of(9090) == ("DISABLE", "PeerAuthentication shop/web-ports portLevelMtls 9090")
    assert d.mode_of(80) == ("PERMISSIVE", "PeerAuthentication shop/default")
    # without the namespace's policy the mesh's STRICT is the workload's, and the UNSET port's
    d = decide([MESH, wl], "shop", WEB, "DISABLE")
    assert (d.mode, d.set_by) == ("STRICT", "PeerAuthentication istio-system/default")
    assert dict(d.ports) == {8080: "PERMISSIVE", 9090: "DISABLE", 9443: "STRICT"}
    # not selected: no port modes at all
    d = decide([MESH, NS, wl], "shop", {"app": "db"}, "DISABLE")
    assert (d.mode, d.ports) == ("PERMISSIVE", ())
    # only the winning workload-level policy's ports count (the first by name)
    other = PeerAuthentication("a-first", "shop", (("app", "web"),), "STRICT", ports=((7070, "DISABLE"),))
    d = decide([wl, other], "shop", WEB, "PERMISSIVE")
    assert (d.mode, d.ports, d.ports_set_by) == ("STRICT", ((7070, "DISABLE"),),
                                                 "PeerAuthentication shop/a-first")
    # none applies: the default and who set it
    assert decide([], "shop", WEB, "STRICT", default_set_by="x") == PeerAuthDecision("STRICT", "x")
    assert decide([], "shop", WEB, "STRICT").set_by == DEFAULT_SET_BY


def test_empty_selector_is_namespace_wide_and_the_root_namespace_is_configurable() -> None:
    empty = PeerAuthentication("e", "shop", (), "DISABLE")  # Istio: no labels = namespace level
    wl = PeerAuthentication("w", "shop", (("app", "web"),), "UNSET")
    assert decide([empty, wl], "shop", WEB, "STRICT").set_by == "PeerAuthentication shop/e"
    root = PeerAuthentication("default", "mesh-root", None, "STRICT")
    assert decide([MESH, root], "shop", WEB, "PERMISSIVE", root_namespace="mesh-root").set_by == \
        "PeerAuthentication mesh-root/default"
    # istio-system is then an ordinary namespace: its policy is not mesh-wide
    assert decide([MESH], "shop", WEB, "PERMISSIVE", root_namespace="mesh-root").mode == "PERMISSIVE"
    assert decide([MESH], "istio-system", WEB, "PERMISSIVE", root_namespace="mesh-root").mode == "STRICT"
    # a selector in the root namespace is ignored (Istio), also for the root namespace's workloads
    sel = PeerAuthentication("s", "mesh-root", (("app", "web"),), "STRICT")
    assert decide([sel], "shop", WEB, "DISABLE", root_namespace="mesh-root").mode == "DISABLE"
    assert decide([sel], "mesh-root", WEB, "DISABLE", root_namespace="mesh-root").mode == "DISABLE"


def test_ports_are_stored_and_read_back_through_apply_and_snapshots() -> None:
    (loc,) = parse_yaml(PORTS_YAML, "pa.yaml", NET)
    doc = peer_authentication_doc(loc.resource)  # type: ignore[arg-type]
    assert doc["portLevelMtls"] == {"8080": {"mode": "PERMISSIVE"}, "9090": {"mode": "DISABLE"},
                                    "9443": {"mode": "UNSET"}}
    assert peer_authentication_from_doc(json.loads(json.dumps(doc))) == loc.resource
    p = plan({}, [loc], NET)
    b = SnapshotBuilder()
    b.reset(p.puts)
    assert b.build(1).peer_authentications[("shop", "web-ports")] == loc.resource
    # a stored value written by someone else with ports and no selector, or more ports than the
    # filter holds, is skipped, not served
    bad = dict(doc, selector=None)
    many = dict(doc, name="many", portLevelMtls={str(p): {"mode": "STRICT"} for p in range(1, 34)})
    b.apply({"/nodemesh/registry/peerauthentication/shop/bad": json.dumps(bad),
             "/nodemesh/registry/peerauthentication/shop/many": json.dumps(many)}, ())
    assert list(b.build(2).peer_authentications) == [("shop", "web-ports")]


def test_agent_yaml_mesh_root_namespace() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.244.1.1"}}
    assert from_mapping(base).mesh == MeshConfig("istio-system")
    assert from_mapping({**base, "mesh": {"root_namespace": "mesh-root"}}).mesh.root_namespace == "mesh-root"
    for bad, where in (({"root_namespace": "Mesh_Root"}, "mesh.root_namespace"),
                       ({"root_namespace": ""}, "mesh.root_namespace"),
                       ({"rootNamespace": "x"}, "mesh.rootNamespace"), ("x", "mesh")):
        with pytest.raises(ConfigError) as e:
            from_mapping({**base, "mesh": bad})
        assert str(e.value).startswith(f"agent config: {where}: "), e.value


class RecordingDataplane:
    def __init__(self) -> None:
        self.policies: dict[str, tuple[str, tuple[tuple[int, str], ...]]] = {}

    def set_peer_auth(self, address: str, mode: str, *_: Any, ports: tuple[tuple[int, str], ...] = (),
                      **__: Any) -> None:
        self.policies[address] = (mode, ports)

    def remove_peer_auth(self, address: str) -> bool:
        return self.policies.pop(address, None) is not None

    def attach_pod_filters(self, *_: Any) -> None:
        pass


def test_apply_peer_auth_writes_port_modes_and_who_set_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    links = {"/run/netns/web": ("10.244.1.2", "10.244.1.12"), "/run/netns/db": ("10.244.1.3",)}
    monkeypatch.setattr(node, "pod_interfaces", lambda ns: [peerauth.PodLink("eth0", 7, links[ns], ())])
    monkeypatch.setattr(peerauth, "host_peer", lambda *a: "veth0")
    monkeypatch.setattr(peerauth, "remove_pod_side_filter", lambda *a: None)
    workloads = {("shop", "web"): Workload("web", "shop", "10.244.1.2", labels=WEB),
                 ("shop", "db"): Workload("db", "shop", "10.244.1.3", labels={"app": "db"})}
    wl = PeerAuthentication("web", "shop", (("app", "web"),), "STRICT",
                            ports=((8080, "PERMISSIVE"), (9, "UNSET")))
    root = PeerAuthentication("default", "mesh-root", None, "DISABLE")
    snap = Snapshot(1, workloads=workloads,
                    peer_authentications={("shop", "web"): wl, ("mesh-root", "default"): root})
    pa = PeerAuthConfig(mode="PERMISSIVE", namespaces={"shop": "STRICT"})
    cfg: Any = SimpleNamespace(peer_authentication=pa, interception=SimpleNamespace(enroll=list(links)),
                               addresses=SimpleNamespace(proxy="10.244.1.1"),
                               ports=SimpleNamespace(dns=15053), mesh=MeshConfig("mesh-root"))
    agent: Any = SimpleNamespace(dataplane=RecordingDataplane(), cfg=cfg,
                                 directory=SimpleNamespace(current=Directory.build(snap)),
                                 peer_auth_errors={}, peer_auth_addresses={}, peer_auth_lock=threading.Lock())
    node.apply_peer_auth(agent)
    assert agent.peer_auth_errors == {}
    web = ("STRICT", ((9, "STRICT"), (8080, "PERMISSIVE")))
    # every address of the pod gets the pod's modes; db: the mesh-wide policy of mesh-root
    assert agent.dataplane.policies == {"10.244.1.2": web, "10.244.1.12": web, "10.244.1.3": ("DISABLE", ())}
    # the decision alone (pure), with agent.yaml's default and the key that set it
    d = node.peer_auth_decision([], workloads[("shop", "db")], pa, "mesh-root")
    assert (d.mode, d.set_by) == ("STRICT", "agent.yaml peer_authentication.namespaces[shop]")
    d = node.peer_auth_decision([wl], None, pa, "mesh-root")
    assert (d.mode, d.ports) == ("PERMISSIVE", ())
    # the port modes go away with the policy
    agent.directory.current = Directory.build(Snapshot(2, workloads=workloads))
    node.apply_peer_auth(agent)
    assert agent.dataplane.policies["10.244.1.2"] == ("STRICT", ())


def test_the_agent_judges_mesh_wide_policies_by_its_root_namespace(tmp_path: Path) -> None:
    MeshCA.init(str(tmp_path / "ca"), "cluster.local", now=datetime.datetime.now(datetime.UTC))
    cfg = from_mapping({"node": "n1", "addresses": {"proxy": "127.0.0.30"},
                        "ca": {"dir": str(tmp_path / "ca")}, "registry": {"dir": str(tmp_path / "reg")},
                        "mesh": {"root_namespace": "mesh-root"}})
    agent = node.build(cfg, with_interception=False)
    try:
        authorizer = agent.inbound.authorizer
        assert authorizer is agent.outbound.authorizer
        assert authorizer.root_namespace == authorizer.jwt.root_namespace == "mesh-root"
        web = Workload("web", "shop", "10.244.1.2", labels=WEB)
        deny_all = AuthorizationPolicy("deny-all", "mesh-root", "ALLOW")
        other = AuthorizationPolicy("x", "istio-system", "ALLOW")
        snap = Snapshot(1, workloads={("shop", "web"): web},
                        authorization_policies={("mesh-root", "deny-all"): deny_all,
                                                ("istio-system", "x"): other})
        agent.directory.current = Directory.build(snap)
        assert authorizer.policies(web) == [deny_all]
    finally:
        agent.backend.close()
    assert os.path.isdir(tmp_path / "reg")


# -- nodemesh explain -------------------------------------------------------------------------


def _explain_snapshot(*pas: PeerAuthentication) -> Snapshot:
    from agent.control.model import Kind, Service, ServicePort, resource_key

    svc = Service("web", "shop", "10.96.0.40",
                  (ServicePort("http", 80, 8080), ServicePort("admin", 90, 9090)), {"app": "web"})
    client = Workload("client", "shop", "10.244.1.5", node="n1", service_account="client",
                      labels={"app": "client"})
    web = Workload("web", "shop", "10.244.2.5", node="n2", service_account="web", labels=WEB)
    puts = {resource_key(Kind.SERVICE, "shop", "web"): json.dumps(svc.to_doc())}
    puts.update({resource_key(Kind.WORKLOAD, w.namespace, w.name): json.dumps(w.to_doc())
                 for w in (client, web)})
    puts.update({resource_key(Kind.PEER_AUTHENTICATION, p.namespace, p.name):
                 json.dumps(peer_authentication_doc(p)) for p in pas})
    b = SnapshotBuilder()
    b.reset(puts)
    return b.build(1)


def test_explain_shows_the_mode_of_the_destination_port_and_who_set_it(tmp_path: Path) -> None:
    from agent.cli.explain import _text, explain

    wl = PeerAuthentication("web-ports", "shop", (("app", "web"),), "UNSET", "pa.yaml:1",
                            ((8080, "PERMISSIVE"),))
    root = PeerAuthentication("default", "mesh-root", None, "STRICT", "mesh.yaml:1")
    snap = _explain_snapshot(MESH, wl, root)
    walk = explain(snap, "shop/client", "GET", "http://10.96.0.40/", {})
    m = walk["peer_authentication"]
    assert (m["workload"], m["port"], m["mode"]) == ("shop/web", 8080, "PERMISSIVE")
    assert m["set_by"] == "PeerAuthentication shop/web-ports portLevelMtls 8080"
    assert m["plaintext"].startswith("delivered") and m["this_request"].startswith("passes")
    # the other port: the workload's mode, here the mesh-wide STRICT of istio-system (no agent.yaml given)
    m = explain(snap, "shop/client", "GET", "http://10.96.0.40:90/", {})["peer_authentication"]
    assert (m["port"], m["mode"], m["set_by"]) == (9090, "STRICT", "PeerAuthentication istio-system/default")
    assert m["plaintext"].startswith("refused") and "not given" in m["agent_yaml"]
    text = _text(explain(snap, "shop/client", "GET", "http://10.96.0.40:90/", {}))
    assert "mtls:       at shop/web port 9090: STRICT (set by PeerAuthentication istio-system/default; " \
           "agent.yaml not read" in text, text
    # the destination's agent.yaml: another root namespace, and its own default
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("node: n2\naddresses: {proxy: 10.244.2.1}\nmesh: {root_namespace: mesh-root}\n"
                   "peer_authentication: {mode: DISABLE, namespaces: {shop: PERMISSIVE}}\n")
    from agent.config import load

    m = explain(snap, "shop/client", "GET", "http://10.96.0.40:90/", {}, agent_config=load(str(cfg)))[
        "peer_authentication"]
    assert (m["mode"], m["set_by"], m["agent_yaml"]) == ("STRICT", "PeerAuthentication mesh-root/default",
                                                         "read")
    no_mesh = _explain_snapshot(wl)
    m = explain(no_mesh, "shop/client", "GET", "http://10.96.0.40:90/", {}, agent_config=load(str(cfg)))[
        "peer_authentication"]
    assert (m["mode"], m["set_by"]) == ("PERMISSIVE", "agent.yaml peer_authentication.namespaces[shop]")
    # a selector in the root namespace (stored by another root's apply) is said to be ignored
    ignored = PeerAuthentication("sel", "mesh-root", (("app", "web"),), "DISABLE")
    m = explain(_explain_snapshot(ignored), "shop/client", "GET", "http://10.96.0.40:90/", {},
                agent_config=load(str(cfg)))["peer_authentication"]
    assert m["mode"] == "PERMISSIVE" and m["warnings"] == [
        "PeerAuthentication mesh-root/sel: a selector in the root namespace (mesh-root) is ignored"]


def test_apply_refuses_a_selector_in_the_root_namespace_it_is_given(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agent.cli.main import cli

    f = tmp_path / "pa.yaml"
    f.write_text(PORTS_YAML.replace("namespace: shop", "namespace: mesh-root"))
    env = {"NODEMESH_REGISTRY_DIR": str(tmp_path / "reg")}
    r = CliRunner().invoke(cli, ["apply", "-f", str(f), "--root-namespace", "mesh-root"], env=env)
    assert r.exit_code == 2, r.output
    assert f"{f}:5 at spec.selector: a PeerAuthentication in the root namespace (mesh-root) is mesh-wide" \
        in r.output, r.output
    r = CliRunner().invoke(cli, ["apply", "-f", str(f)], env={**env, "NODEMESH_ROOT_NAMESPACE": "mesh-root"})
    assert r.exit_code == 2 and "(mesh-root)" in r.output, r.output
    # with istio-system the root (the default), mesh-root is an ordinary namespace
    r = CliRunner().invoke(cli, ["apply", "-f", str(f)], env=env)
    assert r.exit_code == 0 and "PeerAuthentication mesh-root/web-ports created" in r.output, r.output


def test_the_plan_of_each_pod_interface_is_pure() -> None:
    web = Workload("web", "shop", "10.244.1.12", labels=WEB)
    wl = PeerAuthentication("web", "shop", (("app", "web"),), "STRICT", ports=((8080, "PERMISSIVE"),))
    d = Directory.build(Snapshot(1, workloads={("shop", "web"): web},
                                 peer_authentications={("shop", "web"): wl}))
    links = {"/run/netns/web": [peerauth.PodLink("eth0", 7, ("10.244.1.2", "10.244.1.12"), ("fe80::1",)),
                                peerauth.PodLink("eth1", 8, (), ("fe80::2",))],  # nothing to bind
             "/run/netns/x": [peerauth.PodLink("eth0", 9, ("10.244.1.9",), ())]}
    plan = node.plan_peer_auth(links, d, PeerAuthConfig(mode="DISABLE"), "istio-system")
    [web_if] = plan["/run/netns/web"]
    # the filters key on the workload's address, not the interface's first
    assert (web_if.link.ifname, web_if.pod_ip) == ("eth0", "10.244.1.12")
    assert (web_if.decision.mode, web_if.decision.ports) == ("STRICT", ((8080, "PERMISSIVE"),))
    [x] = plan["/run/netns/x"]
    assert (x.pod_ip, x.decision.mode, x.decision.ports) == ("10.244.1.9", "DISABLE", ())
    assert node.plan_peer_auth({}, d, PeerAuthConfig(), "istio-system") == {}
