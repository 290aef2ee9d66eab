"""The incremental SnapshotBuilder: same content as a full rebuild, snapshots never change."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control.model import (
    PREFIX,
    Health,
    HealthStatus,
    Service,
    ServicePort,
    Workload,
    health_key,
    resource_key,
    selects,
)
from agent.control.snapshot import Snapshot, SnapshotBuilder, healthy_endpoints

NAMESPACES = ("a", "b")
NAMES = ("x0", "x1", "x2", "x3")
LABELS = st.dictionaries(st.sampled_from(("app", "tier")), st.sampled_from(("p", "q")), max_size=2)


def _service_value(ns: str, name: str, selector: dict[str, str], vip: int) -> str:
    s = Service(name, ns, f"10.96.0.{vip}", (ServicePort("http", 80, 8080),), selector)
    return json.dumps(s.to_doc())


def _workload_value(ns: str, name: str, labels: dict[str, str], host: int) -> str:
    return json.dumps(Workload(name, ns, f"10.0.0.{host}", labels=labels).to_doc())


@st.composite
def writes(draw: st.DrawFn) -> tuple[str, str | None]:
    """One put (key, value) or delete (key, None), including values we must ignore."""
    kind = draw(st.sampled_from(("service", "workload", "workload", "health", "bad", "foreign")))
    ns, name = draw(st.sampled_from(NAMESPACES)), draw(st.sampled_from(NAMES))
    if kind == "foreign":
        return PREFIX + draw(st.sampled_from(("meta/guard", "other/x", "workload/a"))), "{}"
    if kind == "bad":
        key = resource_key(draw(st.sampled_from(("Service", "Workload"))), ns, name)
        return key, draw(st.sampled_from(("{", "[]", "{}", '{"name": 1}', "null")))
    key = (health_key(ns, name) if kind == "health"
           else resource_key(kind.capitalize(), ns, name))
    if draw(st.integers(0, 3)) == 0:
        return key, None
    if kind == "service":
        return key, _service_value(ns, name, draw(LABELS), draw(st.integers(1, 3)))
    if kind == "workload":
        return key, _workload_value(ns, name, draw(LABELS), draw(st.integers(1, 3)))
    return key, json.dumps(HealthStatus(draw(st.sampled_from(list(Health)))).to_doc())


def content(s: Snapshot) -> tuple[Any, ...]:
    return (dict(s.services), dict(s.workloads), dict(s.health), dict(s.members),
            dict(s.by_vip))


def reference_members(s: Snapshot) -> dict[tuple[str, str], tuple[tuple[str, str], ...]]:
    """Membership by brute force: every workload of the namespace, by selector."""
    return {k: tuple(sorted(wk for wk, w in s.workloads.items()
                            if w.namespace == svc.namespace and selects(svc.selector, w.labels)))
            for k, svc in s.services.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(writes(), max_size=6), max_size=8))
def test_incremental_equals_full_rebuild(batches: list[list[tuple[str, str | None]]]) -> None:
    inc = SnapshotBuilder()
    inc.reset({})
    state: dict[str, str] = {}
    kept: list[tuple[Snapshot, tuple[Any, ...]]] = []
    for rev, batch in enumerate(batches, start=1):
        puts: dict[str, str] = {}
        deletes: list[str] = []
        for key, value in batch:  # last write of a key wins, as in one etcd revision
            if value is None:
                puts.pop(key, None)
                deletes.append(key)
                state.pop(key, None)
            else:
                if key in deletes:
                    deletes.remove(key)
                puts[key] = value
                state[key] = value
        inc.apply(puts, deletes)
        snap = inc.build(rev)
        kept.append((snap, content(snap)))
    full = SnapshotBuilder()
    full.reset(state)
    want = full.build(len(batches))
    got = inc.build(len(batches))
    assert content(got) == content(want)
    assert dict(got.members) == reference_members(got)
    assert inc.raw == full.raw
    for vip, skey in got.by_vip.items():
        assert got.services[skey].vip == vip
    # earlier snapshots are immutable: later changes never show through
    for snap, frozen in kept:
        assert content(snap) == frozen


def test_unchanged_tables_are_shared_and_members_follow_labels() -> None:
    b = SnapshotBuilder()
    b.reset({resource_key("Service", "a", "web"): _service_value("a", "web", {"app": "p"}, 1),
             resource_key("Workload", "a", "w1"): _workload_value("a", "w1", {"app": "p"}, 1)})
    s1 = b.build(1)
    assert s1.members[("a", "web")] == (("a", "w1"),)
    # a health change copies only the health table
    b.apply({health_key("a", "w1"): json.dumps(HealthStatus(Health.CRITICAL).to_doc())}, ())
    s2 = b.build(2)
    assert s2.workloads is s1.workloads and s2.members is s1.members
    assert s2.services is s1.services and s2.by_vip is s1.by_vip
    svc = s2.service("a", "web")
    assert svc is not None and healthy_endpoints(s2, svc, 80) == ()
    assert len(healthy_endpoints(s1, svc, 80)) == 1  # the old snapshot did not change
    # the same text again decodes nothing: the very same objects
    b.apply({resource_key("Workload", "a", "w1"): _workload_value("a", "w1", {"app": "p"}, 1)}, ())
    s3 = b.build(3)
    assert s3.workloads[("a", "w1")] is s1.workloads[("a", "w1")]
    # a relabelled workload leaves the service
    b.apply({resource_key("Workload", "a", "w1"): _workload_value("a", "w1", {"app": "q"}, 1)}, ())
    s4 = b.build(4)
    assert s4.members[("a", "web")] == ()
    assert s3.members[("a", "web")] == (("a", "w1"),)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@given(json_values, st.sampled_from([(",", ":"), (", ", ": ")]))
def test_fast_stored_value_decoder_equals_json_loads(value: object, seps: tuple[str, str]) -> None:
    from agent.control.snapshot import _loads
    text = json.dumps(value, separators=seps)
    assert _loads(text) == json.loads(text)


@given(st.text(alphabet='{}[]",:01 \nabtrue', max_size=20))
def test_fast_stored_value_decoder_fails_exactly_where_json_loads_does(text: str) -> None:
    from agent.control.snapshot import _loads
    try:
        want = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            _loads(text)
        return
    assert _loads(text) == want
