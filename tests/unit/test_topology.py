"""The testbed plan: names, addresses and every validation rule, without root."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netns.errors import TopologyError
from netns.topology import (
    NodeSpec,
    TopologySpec,
    default_spec,
    plan,
    spec_from_mapping,
)


def test_default_plan_names_and_addresses() -> None:
    topo = plan(default_spec("nm", nodes=2, pods_per_node=3))
    assert [n.name for n in topo.nodes] == ["n1", "n2"]
    n1, n2 = topo.nodes
    assert n1.pod_cidr == "10.244.1.0/24" and n1.gateway == "10.244.1.1"
    assert n2.fabric_address == "10.250.0.2"
    assert [p.address for p in n1.pods] == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    pod = topo.pod("n2-p3")
    assert pod is not None
    assert pod.netns == "nm-n2-p3" and pod.gateway == "10.244.2.1"
    assert pod.cgroup == "nodemesh-nm/n2/n2-p3"
    # every kernel object carries the prefix
    assert all(name.startswith("nm-") for name in topo.netns_names())
    for p in topo.pods():
        assert p.ifname.startswith("nm-") and p.host_ifname.startswith("nm-")
    assert n1.bridge.startswith("nm-") and n1.uplink.startswith("nm-")
    assert topo.fabric_bridge.startswith("nm-")


def test_plan_round_trips_through_state_dict() -> None:
    topo = plan(default_spec("ab1", 3, 2))
    assert plan(spec_from_mapping(topo.to_dict())) == topo


def _spec(nodes: list[tuple[str, str, list[str]]], prefix: str = "nm") -> TopologySpec:
    return TopologySpec(prefix=prefix, nodes=tuple(NodeSpec(n, c, tuple(p)) for n, c, p in nodes))


def test_duplicate_pod_name_is_refused_with_both_places() -> None:
    spec = _spec([("a", "10.244.1.0/24", ["web"]), ("b", "10.244.2.0/24", ["web"])])
    with pytest.raises(TopologyError) as e:
        plan(spec)
    assert "duplicate name 'web'" in e.value.message
    assert "nodes[1].pods[0]" in e.value.message and "nodes[0].pods[0]" in e.value.message


def test_pod_named_like_a_node_is_refused() -> None:
    with pytest.raises(TopologyError, match="duplicate name 'a'"):
        plan(_spec([("a", "10.244.1.0/24", []), ("b", "10.244.2.0/24", ["a"])]))


def test_overlapping_pod_cidrs_are_refused() -> None:
    spec = _spec([("a", "10.244.0.0/16", ["x"]), ("b", "10.244.2.0/24", ["y"])])
    with pytest.raises(TopologyError) as e:
        plan(spec)
    assert "nodes[1].pod_cidr" in e.value.message
    assert "10.244.2.0/24 overlaps 10.244.0.0/16" in e.value.message


def test_pod_cidr_overlapping_the_fabric_is_refused() -> None:
    with pytest.raises(TopologyError, match=r"overlaps 10\.250\.0\.0/24 \(fabric_cidr\)"):
        plan(_spec([("a", "10.250.0.0/25", [])]))


def test_interface_name_over_15_bytes_is_refused() -> None:
    spec = _spec([("a", "10.244.1.0/24", ["a-very-long-pod"])], prefix="prefix")
    with pytest.raises(TopologyError) as e:
        plan(spec)
    assert "'prefix-a-very-long-pod' is 22 bytes" in e.value.message
    assert "at most 15" in e.value.message
    assert e.value.hint and "shorter" in e.value.hint


def test_more_pods_than_the_cidr_holds() -> None:
    spec = _spec([("a", "10.244.1.0/29", [f"p{i}" for i in range(6)])])
    with pytest.raises(TopologyError, match=r"6 pods do not fit in 10\.244\.1\.0/29: it holds 5"):
        plan(spec)
    # 5 fit exactly (8 addresses - network - broadcast - gateway)
    plan(_spec([("a", "10.244.1.0/29", [f"p{i}" for i in range(5)])]))


@pytest.mark.parametrize(
    ("cidr", "why"),
    [
        ("10.244.1.5/24", "not a network CIDR"),
        ("10.244.1.0/33", "not a network CIDR"),
        ("banana", "not a network CIDR"),
        ("fd00::/64", "only IPv4"),
        ("10.244.1.0/31", "too small"),
    ],
)
def test_bad_cidrs(cidr: str, why: str) -> None:
    with pytest.raises(TopologyError, match=why) as e:
        plan(_spec([("a", cidr, [])]))
    assert e.value.where == "nodes[0].pod_cidr"


@pytest.mark.parametrize("prefix", ["", "Nm", "1nm", "nm-x", "a" * 13, "nm x"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(TopologyError, match="prefix"):
        plan(default_spec(prefix, 1, 1))


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "fabric", "a" * 33])
def test_bad_names(name: str) -> None:
    with pytest.raises(TopologyError):
        plan(_spec([("n1", "10.244.1.0/24", [name])]))


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"nodes": []}, "topology.nodes"),
        ({"nodes": [{"pod_cidr": "10.244.1.0/24"}]}, "topology.nodes[0].name"),
        ({"nodes": [{"name": "a", "pods": "x"}]}, "topology.nodes[0].pods"),
        ({"nodes": [{"name": "a", "pods": -1}]}, "topology.nodes[0].pods"),
        ({"nodes": [{"name": "a", "colour": 1}]}, "topology.nodes[0].colour"),
        ({"nodes": [{"name": "a"}], "extra": 1}, "topology.extra"),
        ([1, 2], "topology"),
    ],
)
def test_spec_document_errors_name_the_field(doc: Any, where: str) -> None:
    with pytest.raises(TopologyError) as e:
        spec_from_mapping(doc)
    assert e.value.where == where


def test_pod_count_or_names() -> None:
    spec = spec_from_mapping(
        {"prefix": "x", "nodes": [{"name": "a", "pods": 2}, {"name": "b", "pods": ["db"]}]}
    )
    topo = plan(spec)
    assert [p.name for p in topo.pods()] == ["a-p1", "a-p2", "db"]
    assert topo.nodes[1].pod_cidr == "10.244.2.0/24"


def test_default_spec_bounds() -> None:
    with pytest.raises(TopologyError, match="--nodes"):
        default_spec("nm", 0, 1)
    with pytest.raises(TopologyError, match="--pods-per-node"):
        default_spec("nm", 1, -1)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_node = st.fixed_dictionaries(
    {"name": st.text(max_size=8)},
    optional={
        "pod_cidr": st.sampled_from(["10.244.1.0/24", "10.244.1.0/30", "10.0.0.0/8", "x", "10.244.1.1/24"]),
        "pods": st.integers(-1, 5) | st.lists(st.text(max_size=6), max_size=4),
    },
)


@given(st.one_of(_json, st.fixed_dictionaries({"nodes": st.lists(_node, max_size=4)})))
def test_any_document_plans_or_raises_topology_error(doc: Any) -> None:
    """Parses and plans, or raises TopologyError — never anything else."""
    with contextlib.suppress(TopologyError):
        plan(spec_from_mapping(doc))
