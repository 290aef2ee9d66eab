"""Host services (issue 14): Consul definitions without address, host workloads in the
registry's screening and routing, and the refusal of the agent's own cgroup. Pure, no root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agent.cli.main import cli
from agent.config import ConfigError, from_mapping, host_workload_name
from agent.control.consul import parse_consul
from agent.control.errors import InputError
from agent.control.model import CheckSpec, Workload
from agent.control.screening import WorkloadGuard
from agent.control.snapshot import Snapshot, SnapshotBuilder
from agent.control.validate import parse_vip_range
from agent.dataplane.inbound import dial_refusal
from agent.dataplane.route import Directory
from agent.hostsvc import HostSources
from agent.proto.hbone import Target
from bpf.hostcg import refusal
from bpf.maps import OriginalDst

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "seed" / "my-service.hcl"
NET = parse_vip_range("10.96.0.0/16")


def test_seed_definition_without_address_gets_the_node_address() -> None:
    out = parse_consul(SEED.read_text(), str(SEED), existing_services={}, node="n1",
                       vip_range=NET, node_address="10.250.0.1")
    wl, svc = (x.resource for x in out)
    assert isinstance(wl, Workload)
    assert wl.labels["nodemesh.io/host"] == "true"
    assert (wl.name, wl.address, wl.node, dict(wl.ports)) == ("my-service", "10.250.0.1", "n1",
                                                              {"port": 8080})
    (check,) = wl.checks
    # the check runs from the node itself: 127.0.0.1 is the host's loopback, kept as written
    assert (check.kind, check.target, check.interval_s, check.timeout_s) == (
        "http", "http://127.0.0.1:8080/health", 10.0, 1.0)
    assert svc.name == "my-service" and svc.ports[0].port == 8080  # type: ignore[union-attr]


def test_definition_without_address_and_unknown_node_address_is_refused() -> None:
    with pytest.raises(InputError) as ei:
        parse_consul(SEED.read_text(), str(SEED), existing_services={}, node="n9", vip_range=NET)
    e = ei.value
    assert e.file == str(SEED) and e.path == "service.address"
    assert "address of node 'n9' is unknown" in e.reason and e.hint and "--node-address" in e.hint


def test_the_node_address_written_out_is_a_host_service_too() -> None:
    text = SEED.read_text().replace("port = 8080", 'port = 8080\n  address = "10.250.0.1"')
    (wl, _) = (x.resource for x in parse_consul(text, "f.hcl", existing_services={}, node="n1",
                                                vip_range=NET, node_address="10.250.0.1"))
    assert wl.labels.get("nodemesh.io/host") == "true"  # type: ignore[union-attr]


def test_an_explicit_address_still_wins() -> None:
    text = SEED.read_text().replace("port = 8080", 'port = 8080\n  address = "10.244.1.5"')
    (wl, _) = (x.resource for x in parse_consul(text, "f.hcl", existing_services={}, node="n1",
                                                vip_range=NET, node_address="10.250.0.1"))
    assert wl.address == "10.244.1.5" and "nodemesh.io/host" not in wl.labels  # type: ignore[union-attr]


def _cli(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


def test_cli_register_takes_the_node_address_from_the_agent_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"node": "n1", "addresses": {"proxy": "10.244.1.1",
                                                               "hbone": "10.250.0.1"},
                                   "peers": {"n2": "10.250.0.2"}}))
    reg = tmp_path / "reg"
    code, out = _cli(["register", str(SEED), "--config", str(cfg), "--node", "n2"], reg)
    assert code == 0 and "Workload default/my-service created" in out, out
    code, out = _cli(["describe", "workload", "my-service", "-o", "json"], reg)
    doc = json.loads(out)
    assert (doc["address"], doc["node"]) == ("10.250.0.2", "n2")
    code, out = _cli(["register", str(SEED), "--config", str(cfg)], reg)  # its own node
    assert code == 0 and "configured" in out, out
    doc = json.loads(_cli(["describe", "workload", "my-service", "-o", "json"], reg)[1])
    assert (doc["address"], doc["node"]) == ("10.250.0.1", "n1")
    code, out = _cli(["register", str(SEED), "--config", str(cfg), "--node", "n7"], reg)
    assert code == 2 and "address of node 'n7' is unknown" in out, out
    code, out = _cli(["register", str(SEED), "--node", "n7", "--node-address", "10.250.0.7",
                      "--config", str(tmp_path / "none.yaml")], reg)
    assert code == 0, out
    code, out = _cli(["register", str(SEED), "--node", "n7", "--node-address", "nope"], reg)
    assert code != 0 and "expected an IP address" in out


def test_host_services_of_one_node_share_its_address_on_distinct_ports(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    args = ["--node", "n1", "--node-address", "10.250.0.1"]
    assert _cli(["register", str(SEED), *args], reg)[0] == 0
    db = tmp_path / "db.hcl"
    db.write_text('service {\n  name = "db"\n  port = 5432\n}\n')
    code, out = _cli(["register", str(db), *args], reg)
    assert code == 0 and "Workload default/db created" in out, out
    db.write_text('service {\n  name = "other"\n  port = 8080\n}\n')
    code, out = _cli(["register", str(db), *args], reg)
    assert code == 2 and "address 10.250.0.1:8080 of Workload default/other is already used by " \
        "Workload default/my-service" in out, out
    code, out = _cli(["register", str(db), "--node", "n2", "--node-address", "10.250.0.2"], reg)
    assert code == 0, out  # another node's host


# -- the agent's own cgroup is never enrolled ------------------------------------------

@pytest.mark.parametrize(("cgroup", "agent", "why"), [
    ("/sys/fs/cgroup/system.slice/nodemesh.service", "/sys/fs/cgroup/system.slice/nodemesh.service",
     "the agent's own cgroup"),
    ("/sys/fs/cgroup/system.slice", "/sys/fs/cgroup/system.slice/nodemesh.service", "an ancestor"),
    ("/sys/fs/cgroup", "/sys/fs/cgroup/system.slice/nodemesh.service", "an ancestor"),
    ("/sys/fs/cgroup", "/sys/fs/cgroup", "the agent's own cgroup"),
    ("/sys/fs/cgroup/system.slice/my-service.service", "/sys/fs/cgroup/system.slice/nodemesh.service",
     None),
    ("/sys/fs/cgroup/system.slice/nodemesh.service/child", "/sys/fs/cgroup/system.slice/nodemesh.service",
     None),  # below the agent: the agent never runs there
    ("/sys/fs/cgroup/system.slice/nodemesh.serviceX", "/sys/fs/cgroup/system.slice/nodemesh.service",
     None),  # a name prefix is no ancestor
])
def test_refusal_of_the_agent_cgroup_and_its_ancestors(cgroup: str, agent: str, why: str | None) -> None:
    got = refusal(cgroup, agent)
    assert (got is None) if why is None else (got is not None and why in got), got


def test_config_host_cgroups() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.244.1.1"}}
    cfg = from_mapping({**base, "interception": {"host_cgroups": ["system.slice/my-service.service"]}})
    assert cfg.interception.host_cgroups == ("system.slice/my-service.service",)
    assert host_workload_name("system.slice/my-service.service") == "my-service"
    assert host_workload_name("/sys/fs/cgroup/app.scope") == "app"
    assert host_workload_name("nodemesh-x/hosts-n1/web") == "web"
    for bad, where in ((["a/../b"], "host_cgroups[0]"), (["/"], "host_cgroups[0]"),
                       ("one", "host_cgroups"), (["a", "a"], "host_cgroups")):
        with pytest.raises(ConfigError) as ei:
            from_mapping({**base, "interception": {"host_cgroups": bad}})
        assert f"interception.{where}" in str(ei.value)


# -- host workloads in screening and routing -------------------------------------------

def _wl(name: str, address: str, node: str, port: int) -> Workload:
    return Workload(name, "default", address, node, ports={"port": port},
                    checks=(CheckSpec("c", "http", f"http://127.0.0.1:{port}/health"),))


def _guard() -> WorkloadGuard:
    return WorkloadGuard.of({"proxy": "10.244.1.1", "hbone": "10.250.0.1", "metrics": "10.250.0.1"},
                            {"n2": "10.250.0.2"}, ["10.250.0.9"], node="n1")


def _snap(*ws: Workload) -> Snapshot:
    b = SnapshotBuilder()
    b.apply({w.key: json.dumps(w.to_stored()) for w in ws}, [])
    return b.build(1)


def test_host_workloads_are_accepted_only_on_their_own_node_address() -> None:
    snap = _snap(_wl("my-service", "10.250.0.1", "n1", 8080), _wl("db", "10.250.0.1", "n1", 5432),
                 _wl("remote", "10.250.0.2", "n2", 8080), _wl("liar", "10.250.0.2", "n1", 9000),
                 _wl("on-proxy", "10.244.1.1", "n1", 9001), _wl("etcd", "10.250.0.9", "n1", 2379))
    screened, rejected = _guard().screen(snap)
    assert sorted(n for _, n in screened.workloads) == ["db", "my-service", "remote"]
    assert {n: r.reason for (_, n), r in rejected.items()} == {
        "liar": "node_address", "on-proxy": "node_address", "etcd": "control_plane"}


def test_host_workloads_on_one_port_are_duplicates() -> None:
    snap = _snap(_wl("a", "10.250.0.1", "n1", 8080), _wl("b", "10.250.0.1", "n1", 8080))
    _, rejected = _guard().screen(snap)
    assert {r.reason for r in rejected.values()} == {"duplicate"} and len(rejected) == 2


def test_directory_finds_host_workloads_by_port_and_name() -> None:
    d = Directory.build(_snap(_wl("my-service", "10.250.0.1", "n1", 8080),
                              _wl("db", "10.250.0.1", "n1", 5432)), _guard())
    assert d.workload_for("10.250.0.1", 8080).name == "my-service"  # type: ignore[union-attr]
    assert d.workload_for("10.250.0.1", 5432).name == "db"  # type: ignore[union-attr]
    assert d.local_workload_at("10.250.0.1", "n1", 5432).name == "db"  # type: ignore[union-attr]
    assert d.local_workload_at("10.250.0.1", "n2", 5432) is None
    assert d.host_workload("n1", "db").name == "db"  # type: ignore[union-attr]
    assert d.host_workload("n2", "db") is None


def test_inbound_dials_a_host_address_only_for_a_host_workload_and_never_an_agent_port() -> None:
    reserved = frozenset({"10.250.0.1", "10.244.1.1"})
    ports = frozenset({15008, 15001})
    assert "a node address" in (dial_refusal(Target("10.250.0.1", 8080), reserved, ports) or "")
    assert dial_refusal(Target("10.250.0.1", 8080), reserved, ports, host_service=True) is None
    assert "reserved for the mesh agent" in (
        dial_refusal(Target("10.250.0.1", 15008), reserved, ports, host_service=True) or "")


def test_host_sources_name_the_workload_of_the_recorded_cgroup() -> None:
    d = Directory.build(_snap(_wl("my-service", "10.250.0.1", "n1", 8080)), _guard())
    records = {("10.244.1.1", 40000): OriginalDst("10.96.0.5", 80, 777, True),
               ("10.244.1.1", 40001): OriginalDst("10.96.0.5", 80, 778, True),
               ("10.244.1.1", 40002): OriginalDst("10.96.0.5", 80, 777, False)}
    calls: list[tuple[str, int]] = []

    def lookup(peer: tuple[str, int], local: tuple[str, int]) -> OriginalDst | None:
        calls.append(peer)
        return records.get(peer)

    hs = HostSources("n1", frozenset({"10.244.1.1", "10.250.0.1"}), {777: "my-service"}, lookup,
                     lambda: d)
    assert hs(("10.244.1.1", 40000), ("10.244.1.1", 15001)).name == "my-service"  # type: ignore[union-attr]
    assert hs(("10.244.1.1", 40001), ("10.244.1.1", 15001)) is None  # cgroup not ours
    assert hs(("10.244.1.1", 40002), ("10.244.1.1", 15001)) is None  # a pod's record
    calls.clear()
    assert hs(("10.244.1.7", 40000), ("10.244.1.1", 15001)) is None and calls == []  # a pod: no lookup


def test_host_cgroups_configure_refuses_before_touching_anything() -> None:
    from agent.hostsvc import HostCgroups
    from bpf.errors import BpfConfigError
    from bpf.pins import cgroup2_mount

    mount = cgroup2_mount()
    agent = f"{mount}/system.slice/nodemesh.service"
    hc = HostCgroups(None, None, f"{mount}/nodemesh", agent)  # type: ignore[arg-type]
    for bad, why in (("system.slice", "an ancestor"), ("system.slice/nodemesh.service", "own cgroup"),
                     ("/somewhere/else", "not inside the cgroup v2 mount")):
        with pytest.raises(BpfConfigError) as ei:
            hc.configure(("system.slice/my-service.service", bad))
        assert why in ei.value.message and "interception.host_cgroups" in ei.value.message
        assert hc.hosts == []  # the whole list refused, nothing taken
    hc.configure(("system.slice/my-service.service", "x.slice/web.scope"))
    assert [(h.name, h.path, h.cg_id) for h in hc.hosts] == [
        ("my-service", f"{mount}/system.slice/my-service.service", 0),
        ("web", f"{mount}/x.slice/web.scope", 0)]
    assert dict(hc) == {} and not hc  # nothing enrolled before a sync finds the cgroups
