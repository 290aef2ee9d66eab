"""The registry cannot aim the proxy at the node itself (issue 10, finding 6).

apply/register refuse workloads at addresses no pod has and duplicate addresses, with
file:line:field errors and nothing written; an agent screens what got into the registry
anyway (written around apply) out of routing; a corrupt embedded state file keeps the
agent stale, on its last snapshot, until the file is fixed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from agent.cli.main import cli
from agent.control.apply import _dump, plan
from agent.control.consul import parse_consul
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.model import Service, ServicePort, Workload
from agent.control.registry import Registry
from agent.control.screening import RejectedWorkloadsCollector, WorkloadGuard, report_changes
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import parse_vip_range, parse_yaml
from agent.dataplane.inbound import RESERVED_PORTS, dial_refusal
from agent.dataplane.route import Directory, RouteError, decide
from agent.proto.hbone import Target

NET = parse_vip_range("10.96.0.0/16")


def workload_doc(name: str, address: str, extra: str = "") -> str:
    return f"""\
apiVersion: nodemesh.io/v1
kind: Workload
metadata:
  name: {name}
  labels: {{app: web}}
spec:
  node: n1
  address: "{address}"
  ports: {{http: 8080}}{extra}
"""


REFUSED = [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_apply_refuses_addresses_no_workload_can_have(address: str, why: str) -> None:
    text = workload_doc("ok", "10.244.1.2") + "---\n" + workload_doc("bad", address)
    with pytest.raises(InputError) as ei:
        parse_yaml(text, "pods.yaml", NET)
    e = ei.value
    assert (e.file, e.line, e.path) == ("pods.yaml", 18, "spec.address")  # the address line
    assert str(e).startswith("pods.yaml:18 at spec.address: workload address ")
    assert why in e.reason


@pytest.mark.parametrize("address", ["10.244.1.2", "192.168.7.9", "2001:db8::5", "fd00::7"])
def test_apply_takes_ordinary_unicast_addresses(address: str) -> None:
    (loc,) = parse_yaml(workload_doc("ok", address), "pods.yaml", NET)
    assert isinstance(loc.resource, Workload)


def test_duplicate_address_in_one_input_names_both_places() -> None:
    text = workload_doc("a", "10.244.1.2") + "---\n" + workload_doc("b", "10.244.1.2")
    with pytest.raises(InputError) as ei:
        plan({}, parse_yaml(text, "pods.yaml", NET), NET)
    e = ei.value
    assert (e.file, e.line, e.path) == ("pods.yaml", 18, "spec.address")
    assert "address 10.244.1.2 of Workload default/b is already used by Workload default/a" in e.reason
    assert "defined at pods.yaml:8" in e.reason


def _stored(*ws: Workload) -> dict[str, str]:
    return {w.key: _dump(w) for w in ws}


def test_duplicate_address_against_the_registry_and_reapply() -> None:
    stored = _stored(Workload("a", "default", "10.244.1.2", node="n1"),
                     Workload("c", "default", "10.244.1.4", node="n1"))
    with pytest.raises(InputError) as ei:
        plan(stored, parse_yaml(workload_doc("b", "10.244.1.2"), "b.yaml", NET), NET)
    assert "already used by Workload default/a (already in the registry)" in ei.value.reason
    assert (ei.value.file, ei.value.line) == ("b.yaml", 8)
    # the same workload again (or changed) is fine
    p = plan(stored, parse_yaml(workload_doc("a", "10.244.1.2"), "a.yaml", NET), NET)
    assert p.configured == ("Workload default/a",)
    # two workloads swapping addresses in one input: neither collides with the other's old one
    swap = workload_doc("a", "10.244.1.4") + "---\n" + workload_doc("c", "10.244.1.2")
    assert len(plan(stored, parse_yaml(swap, "swap.yaml", NET), NET).puts) == 2
    # an IPv4-mapped IPv6 spelling is the same address
    with pytest.raises(InputError):
        plan(stored, parse_yaml(workload_doc("d", "::ffff:10.244.1.4"), "d.yaml", NET), NET)


def test_consul_register_refuses_loopback_with_file_line_field() -> None:
    text = 'service {\n  name = "web"\n  id = "web-1"\n  address = "127.0.0.1"\n  port = 8080\n}\n'
    with pytest.raises(InputError) as ei:
        parse_consul(text, "web.hcl", existing_services={}, node="n1", vip_range=NET)
    assert (ei.value.file, ei.value.line, ei.value.path) == ("web.hcl", 4, "service.address")
    assert "loopback" in ei.value.reason


def test_cli_apply_and_register_write_nothing_when_one_workload_is_refused(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "pods.yaml"
    f.write_text(workload_doc("ok", "10.244.1.2") + "---\n" + workload_doc("bad", "169.254.169.254"))
    r = CliRunner().invoke(cli, ["apply", "-f", str(f), "--registry-dir", str(reg)])
    assert r.exit_code == 2, r.output
    assert f"{f}:18 at spec.address" in r.output and "link-local" in r.output
    assert EmbeddedBackend(reg).read().items == {}  # whole input refused
    (tmp_path / "a.yaml").write_text(workload_doc("a", "10.244.1.2"))
    assert CliRunner().invoke(cli, ["apply", "-f", str(tmp_path / "a.yaml"),
                                    "--registry-dir", str(reg)]).exit_code == 0
    consul = tmp_path / "svc.json"
    consul.write_text(json.dumps({"services": [
        {"name": "db", "id": "db-1", "address": "10.244.1.9", "port": 5432},
        {"name": "db", "id": "db-2", "address": "10.244.1.2", "port": 5432}]}))
    r = CliRunner().invoke(cli, ["register", str(consul), "--node", "n1", "--registry-dir", str(reg)])
    assert r.exit_code == 2, r.output
    assert "services[1].address" in r.output and "already used by Workload default/a" in r.output
    assert len(EmbeddedBackend(reg).read().items) == 1  # db-1 was not written either


# -- the agent's own screening of what got into the registry ------------------------------

GUARD = WorkloadGuard.of({"proxy": "10.244.1.1", "hbone": "10.250.0.1", "metrics": "10.250.0.1"},
                         {"n2": "10.250.0.2"}, ["10.250.0.9", "etcd.example"])


def _snapshot(*ws: Workload) -> Directory:
    b = SnapshotBuilder()
    svc = Service("web", "default", "10.96.0.10", (ServicePort("http", 80, "http"),),
                  selector={"app": "web"})
    b.reset({svc.key: _dump(svc), **_stored(*ws)})
    return Directory.build(b.build(7), GUARD)


def _w(name: str, address: str) -> Workload:
    return Workload(name, "default", address, node="n1", labels={"app": "web"},
                    ports={"http": 8080})


def test_agent_routes_to_no_workload_at_its_own_peer_or_special_address() -> None:
    d = _snapshot(_w("good", "10.244.1.5"), _w("self", "10.250.0.1"), _w("proxy", "10.244.1.1"),
                  _w("peer", "10.250.0.2"), _w("etcd", "10.250.0.9"), _w("lo", "127.0.0.1"),
                  _w("mapped", "::ffff:127.0.0.1"), _w("dup-a", "10.244.1.7"),
                  _w("dup-b", "10.244.1.7"))
    assert {k[1]: r.reason for k, r in d.rejected.items()} == {
        "self": "node_address", "proxy": "node_address", "peer": "node_address",
        "etcd": "control_plane", "lo": "loopback", "mapped": "loopback",
        "dup-a": "duplicate", "dup-b": "duplicate"}
    assert "this agent's hbone and metrics address" in d.rejected[("default", "self")].detail
    assert "node n2" in d.rejected[("default", "peer")].detail
    # a service's endpoints: only the good one
    route = decide(d, "10.96.0.10", 80)
    assert [e.workload for e in route.endpoints] == ["good"]
    # dialled directly, or asked for by a peer through the tunnel (inbound): no such workload
    for addr in ("10.250.0.1", "10.244.1.1", "10.250.0.2", "127.0.0.1", "10.244.1.7"):
        with pytest.raises(RouteError):
            decide(d, addr, 15000)
        assert d.local_workload_at(addr, "n1") is None
    assert d.local_workload_at("10.244.1.5", "n1") is not None
    # ... and it gets no certificate or status entry either (the agent reads this snapshot)
    assert set(n for _, n in d.snapshot.workloads) == {"good"}


def test_screening_copies_nothing_when_all_is_well() -> None:
    b = SnapshotBuilder()
    b.reset(_stored(_w("good", "10.244.1.5")))
    snap = b.build(1)
    d = Directory.build(snap, GUARD)
    assert d.snapshot is snap and not d.rejected


def test_rejections_are_counted_by_reason_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    d = _snapshot(_w("lo", "127.0.0.1"), _w("self", "10.250.0.1"), _w("lo2", "127.0.0.2"))
    prom = CollectorRegistry()
    prom.register(RejectedWorkloadsCollector(lambda: d.rejected))
    text = generate_latest(prom).decode()
    assert 'nodemesh_registry_rejected_workloads{reason="loopback"} 2.0' in text
    assert 'nodemesh_registry_rejected_workloads{reason="node_address"} 1.0' in text
    assert 'nodemesh_registry_rejected_workloads{reason="duplicate"} 0.0' in text
    with caplog.at_level(logging.WARNING, logger="agent.control.screening"):
        report_changes({}, d.rejected)
        first = len(caplog.records)
        again = _snapshot(_w("lo", "127.0.0.1"), _w("self", "10.250.0.1"), _w("lo2", "127.0.0.2"))
        report_changes(d.rejected, again.rejected)  # a new snapshot, same rejections: silent
    assert first == 3 and len(caplog.records) == 3
    assert "default/lo takes no traffic: 127.0.0.1 is a loopback address" in caplog.text


# -- a corrupt embedded state file --------------------------------------------------------

def test_corrupt_state_file_keeps_the_registry_stale_until_fixed(tmp_path: Path) -> None:
    backend = EmbeddedBackend(tmp_path)
    backend.commit(_stored(_w("good", "10.244.1.5")))
    good = backend.path.read_bytes()
    reg = Registry(EmbeddedBackend(tmp_path), poll_timeout_s=0.01)
    assert reg.step() and not reg.stale  # the first full read
    assert reg.step(timeout_s=0.01) and not reg.stale  # then watching, as a running agent does
    backend.path.write_bytes(b'{"format": 1, "revision": 2, "items": {')
    for _ in range(10):  # every poll, not only the first after the change
        assert not reg.step(timeout_s=0.01)
        st = reg.status()
        assert st.stale and st.stale_since_s is not None
        assert str(backend.path) in st.last_error and "corrupted" in st.last_error
    assert ("default", "good") in reg.snapshot.workloads  # the last good snapshot serves
    backend.path.write_bytes(good)
    assert reg.step(timeout_s=0.01) and not reg.stale and reg.status().last_error == ""


@pytest.mark.parametrize(
    ("address", "port", "says"),
    [
        ("127.0.0.1", 8080, "loopback"),
        ("::ffff:127.0.0.1", 8080, "loopback"),  # IPv4-mapped: the registry's rules see through it
        ("169.254.1.1", 8080, "link-local"),
        ("0.0.0.0", 8080, "unspecified"),
        ("224.0.0.1", 8080, "multicast"),
        ("fe80::1", 8080, "link-local"),
        ("10.250.0.2", 8080, "a node address"),
        ("10.244.2.2", 15000, "reserved for the mesh agent"),
        ("web.local", 8080, "not an IP address"),
    ],
)
def test_the_inbound_never_dials_what_no_pod_can_be(address: str, port: int, says: str) -> None:
    why = dial_refusal(Target(address, port), frozenset({"10.250.0.2"}), RESERVED_PORTS)
    assert why is not None and says in why, why


def test_the_inbound_dials_a_pod_and_loopback_pods_only_when_told() -> None:
    assert dial_refusal(Target("10.244.2.2", 8080), frozenset({"10.250.0.2"}), RESERVED_PORTS) is None
    assert dial_refusal(Target("127.0.0.5", 9000), frozenset(), RESERVED_PORTS, loopback_pods=True) is None
