"""One contract suite for every registry backend: embedded (a temp dir) and a real etcd."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control import apply as apply_mod
from agent.control.backend import Backend, Events, Reset
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import ConflictError, InputError, NotFound, StateCorruptError
from agent.control.etcd import EtcdBackend
from agent.control.model import PREFIX, Kind, resource_key
from agent.control.registry import Registry
from agent.control.snapshot import SnapshotBuilder, healthy_endpoints
from agent.control.validate import parse_vip_range, parse_yaml
from tests.integration.etcd_fixture import Etcd, running_etcd

NET = parse_vip_range("10.96.0.0/16")

DOCS = """
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, protocol: http}]
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {address: 10.244.1.2, node: node1, ports: {http: 8080}}
"""


@pytest.fixture(scope="module")
def etcd() -> Iterator[Etcd]:
    with running_etcd() as e:
        yield e


@pytest.fixture(params=["embedded", "etcd"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[type]:
    """Factory of backends that all talk to the same fresh, empty store."""
    made: list[Backend] = []
    if request.param == "embedded":
        d = tempfile.mkdtemp(prefix="nodemesh-contract-")

        def make() -> Backend:
            b = EmbeddedBackend(d)
            made.append(b)
            return b
    else:
        e: Etcd = request.getfixturevalue("etcd")

        def make() -> Backend:
            b = EtcdBackend(e.url)
            made.append(b)
            return b

        first = make()
        state = first.read()
        if state.items:
            first.commit({}, list(state.items))
    try:
        yield make  # type: ignore[misc]
    finally:
        for b in made:
            b.close()
        if request.param == "embedded":
            import shutil

            shutil.rmtree(d, ignore_errors=True)


def test_empty_store_reads_empty(make_backend: type) -> None:
    s = make_backend().read()
    assert isinstance(s, Reset) and s.items == {} and s.revision >= 0


def test_commit_is_read_back_by_another_instance(make_backend: type) -> None:
    a, b = make_backend(), make_backend()
    r0 = a.read().revision
    r1 = a.commit({PREFIX + "service/ns/a": '{"x":1}', PREFIX + "service/ns/b": '{"x":2}'})
    assert r1 > r0
    s = b.read()  # a second process (or an agent restart) sees the same state
    assert s.revision == r1
    assert s.items == {PREFIX + "service/ns/a": '{"x":1}', PREFIX + "service/ns/b": '{"x":2}'}


def test_commit_puts_and_deletes_atomically(make_backend: type) -> None:
    a = make_backend()
    a.commit({PREFIX + "workload/ns/a": "1", PREFIX + "workload/ns/b": "2"})
    a.commit({PREFIX + "workload/ns/c": "3"}, [PREFIX + "workload/ns/a"])
    assert a.read().items == {PREFIX + "workload/ns/b": "2", PREFIX + "workload/ns/c": "3"}


def test_guarded_commit_detects_a_concurrent_writer(make_backend: type) -> None:
    a, b = make_backend(), make_backend()
    rev = a.read().revision
    b.commit({PREFIX + "service/ns/b": "{}"}, expect_revision=rev)
    with pytest.raises(ConflictError):
        a.commit({PREFIX + "service/ns/a": "{}"}, expect_revision=rev)
    assert PREFIX + "service/ns/a" not in a.read().items
    # unguarded writes (health status) do not conflict with guarded ones
    rev2 = a.read().revision
    b.commit({PREFIX + "health/ns/w": "{}"})
    a.commit({PREFIX + "service/ns/a": "{}"}, expect_revision=rev2)


def _fold(builder: SnapshotBuilder, change: Reset | Events) -> None:
    if isinstance(change, Reset):
        builder.reset(change.items)
    else:
        builder.apply(change.puts, change.deletes)


def test_changes_deliver_every_write_after_a_revision(make_backend: type) -> None:
    writer, watcher = make_backend(), make_backend()
    start = watcher.read()
    builder = SnapshotBuilder()
    builder.reset(start.items)
    writer.commit({PREFIX + "service/ns/a": "A"})
    writer.commit({PREFIX + "service/ns/b": "B"}, [PREFIX + "service/ns/a"])
    rev = start.revision
    final = writer.read()
    deadline = time.monotonic() + 5
    while rev < final.revision and time.monotonic() < deadline:
        ch = watcher.changes(rev, 0.5)
        if ch is not None:
            _fold(builder, ch)
            rev = ch.revision
    assert rev == final.revision
    assert builder.raw == final.items


def test_changes_return_none_when_idle(make_backend: type) -> None:
    b = make_backend()
    rev = b.read().revision
    t0 = time.monotonic()
    seen = [b.changes(rev, 0.3) for _ in range(2)]  # the first may confirm the watch
    assert seen[-1] is None
    assert time.monotonic() - t0 < 3


def test_registry_apply_get_and_delete(make_backend: type) -> None:
    b = make_backend()
    p = apply_mod.apply(b, parse_yaml(DOCS, "docs.yaml", NET), NET)
    assert p.created == ("Service shop/web", "Workload shop/web-1")
    reg = Registry(make_backend())
    assert reg.step()
    snap = reg.snapshot
    svc = snap.service("shop", "web")
    assert svc is not None and svc.vip == "10.96.0.1"
    assert snap.service_by_vip("10.96.0.1") is svc
    (ep,) = healthy_endpoints(snap, svc, 80)
    assert (ep.address, ep.port, ep.workload) == ("10.244.1.2", 8080, "web-1")
    # re-apply keeps the VIP and changes nothing
    p2 = apply_mod.apply(b, parse_yaml(DOCS, "docs.yaml", NET), NET)
    assert p2.unchanged == ("Service shop/web", "Workload shop/web-1")
    assert not p2.puts and p2.revision == p.revision == b.read().revision  # nothing written
    # one changed document among unchanged ones writes only that one
    p3 = apply_mod.apply(b, parse_yaml(DOCS.replace("10.244.1.2", "10.244.1.3"), "docs.yaml", NET),
                         NET)
    assert (p3.configured, p3.unchanged) == (("Workload shop/web-1",), ("Service shop/web",))
    assert list(p3.puts) == [resource_key(Kind.WORKLOAD, "shop", "web-1")]
    apply_mod.apply(b, parse_yaml(DOCS, "docs.yaml", NET), NET)
    apply_mod.delete(b, Kind.WORKLOAD, "shop", "web-1")
    with pytest.raises(NotFound):
        apply_mod.delete(b, Kind.WORKLOAD, "shop", "web-1")
    deadline = time.monotonic() + 5
    while reg.snapshot.workloads and time.monotonic() < deadline:
        reg.step(0.3)
    assert not reg.snapshot.workloads
    assert healthy_endpoints(reg.snapshot, svc, 80) == ()


ISTIO = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /api/}}]
    route: [{destination: {host: web, subset: v1}}]
    timeout: 2s
"""


def test_istio_kinds_apply_snapshot_and_delete(make_backend: type) -> None:
    b = make_backend()
    apply_mod.apply(b, parse_yaml(DOCS, "docs.yaml", NET), NET)
    p = apply_mod.apply(b, parse_yaml(ISTIO, "istio.yaml", NET), NET)
    assert p.created == ("DestinationRule shop/web", "VirtualService shop/web")
    assert resource_key(Kind.VIRTUAL_SERVICE, "shop", "web") in b.read().items
    reg = Registry(make_backend())
    assert reg.step()
    vs = reg.snapshot.virtual_services[("shop", "web")]
    dr = reg.snapshot.destination_rules[("shop", "web")]
    assert vs.http[0].route[0].destination.subset == "v1" and vs.http[0].timeout_s == 2.0
    assert vs.source == "istio.yaml:9" and [s.name for s in dr.subsets] == ["v1"]
    # re-applied unchanged: nothing written
    p2 = apply_mod.apply(b, parse_yaml(ISTIO, "istio.yaml", NET), NET)
    assert not p2.puts and p2.unchanged == ("DestinationRule shop/web", "VirtualService shop/web")
    # a route to a subset no rule defines is refused and writes nothing
    rev = b.read().revision
    with pytest.raises(InputError, match="unknown subset 'v2'"):
        apply_mod.apply(b, parse_yaml(ISTIO.replace("subset: v1", "subset: v2"), "i.yaml", NET), NET)
    assert b.read().revision == rev
    apply_mod.delete(b, Kind.VIRTUAL_SERVICE, "shop", "web")
    apply_mod.delete(b, Kind.DESTINATION_RULE, "shop", "web")
    with pytest.raises(NotFound):
        apply_mod.delete(b, Kind.DESTINATION_RULE, "shop", "web")
    deadline = time.monotonic() + 5
    while (reg.snapshot.virtual_services or reg.snapshot.destination_rules) \
            and time.monotonic() < deadline:
        reg.step(0.3)
    assert not reg.snapshot.virtual_services and not reg.snapshot.destination_rules
    assert reg.snapshot.service("shop", "web") is not None


AUTHZ = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {ports: ["80"], paths: [/api/*]}}]
"""


def test_authorization_policies_apply_snapshot_and_delete(make_backend: type) -> None:
    b = make_backend()
    reg = Registry(make_backend())
    text = DOCS + "---\n" + AUTHZ
    p = apply_mod.apply(b, parse_yaml(text, "authz.yaml", NET), NET)
    assert p.created == ("Service shop/web", "Workload shop/web-1",
                         "AuthorizationPolicy istio-system/deny-all", "AuthorizationPolicy shop/web")
    deadline = time.monotonic() + 5
    while len(reg.snapshot.authorization_policies) < 2 and time.monotonic() < deadline:
        reg.step(0.3)
    web = reg.snapshot.authorization_policies[("shop", "web")]
    assert web.selector == (("app", "web"),) and web.rules[0].operations is not None
    assert web.rules[0].operations[0].ports == (80,) and \
        web.source == f"authz.yaml:{text.splitlines().index('apiVersion: security.istio.io/v1beta1') + 1}"
    assert reg.snapshot.authorization_policies[("istio-system", "deny-all")].rules == ()
    # unchanged on re-apply; a bad policy next to a good change writes nothing
    assert not apply_mod.apply(b, parse_yaml(text, "authz.yaml", NET), NET).puts
    rev = b.read().revision
    bad = AUTHZ.replace("principals: [cluster.local/ns/shop/sa/frontend]", "ipBlocks: [10.0.0.0/40]")
    with pytest.raises(InputError, match="not an IP address or CIDR block"):
        apply_mod.apply(b, parse_yaml(DOCS.replace("8080", "8081") + "---\n" + bad, "i.yaml", NET), NET)
    assert b.read().revision == rev
    apply_mod.delete(b, Kind.AUTHORIZATION_POLICY, "shop", "web")
    with pytest.raises(NotFound):
        apply_mod.delete(b, Kind.AUTHORIZATION_POLICY, "shop", "web")
    deadline = time.monotonic() + 5
    while len(reg.snapshot.authorization_policies) != 1 and time.monotonic() < deadline:
        reg.step(0.3)
    assert list(reg.snapshot.authorization_policies) == [("istio-system", "deny-all")]


# -- backend-specific ---------------------------------------------------------------


def test_embedded_corrupted_state_names_the_file_and_agent_keeps_serving(
    tmp_path: Path,
) -> None:
    b = EmbeddedBackend(tmp_path / "reg")
    apply_mod.apply(b, parse_yaml(DOCS, "docs.yaml", NET), NET)
    reg = Registry(b)
    assert reg.step()
    good = reg.snapshot
    (tmp_path / "reg" / "state.json").write_text('{"format": 1, "revision": 3, "items": {')
    with pytest.raises(StateCorruptError) as ei:
        b.read()
    assert str(tmp_path / "reg" / "state.json") in ei.value.message
    assert "corrupted" in ei.value.message
    assert not reg.step(0.2)
    assert reg.stale and "corrupted" in reg.status().last_error
    assert reg.snapshot is good  # still serving the last good snapshot
    with pytest.raises(StateCorruptError):  # and nothing overwrites the broken file
        apply_mod.apply(b, parse_yaml(DOCS, "docs.yaml", NET), NET)


def test_embedded_write_is_atomic_leftover_temp_is_ignored(tmp_path: Path) -> None:
    b = EmbeddedBackend(tmp_path)
    b.commit({PREFIX + "service/ns/a": "A"})
    # a crash mid-write leaves only a temp file: the state is the old one
    (tmp_path / f".state.json.{os.getpid() + 1}.tmp").write_text('{"torn')
    assert EmbeddedBackend(tmp_path).read().items == {PREFIX + "service/ns/a": "A"}
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["revision"] == 1


def test_etcd_compaction_forces_a_full_reread(etcd: Etcd) -> None:
    w, r = EtcdBackend(etcd.url), EtcdBackend(etcd.url)
    try:
        start = r.read().revision
        w.commit({PREFIX + "service/ns/compacted": "C"})
        rev = w.commit({PREFIX + "service/ns/compacted2": "D"})
        w.compact(rev)
        ch = r.changes(start, 2.0)
        assert isinstance(ch, Reset)  # history is gone: a full read, nothing lost
        assert ch.items[PREFIX + "service/ns/compacted2"] == "D"
        assert ch.revision >= rev
    finally:
        w.close()
        r.close()
