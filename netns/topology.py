"""Testbed topology: what to build, as plain data, validated before anything exists.

How this works: a :class:`TopologySpec` says which nodes and pods a user wants
(from CLI flags or a YAML file). :func:`plan` checks every rule (names, interface
lengths, CIDRs, capacity) and returns a :class:`Topology` where every kernel
object already has its final name and address. The kernel side
(:mod:`netns.testbed`) only executes that plan, so bad input is refused before
anything is created.

Names (``P`` is the testbed prefix)::

    netns   P-fabric, P-<node>, P-<pod>
    links   fabric: bridge P-fbr, one port P-<node> per node
            node:   uplink P-up (fabric address), bridge P-br (pod gateway),
                    one port P-<pod> per pod
            pod:    P-eth0 (pod address, default route via the node bridge)
    cgroup  <cgroup2>/nodemesh-P/<node>/<pod>
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netns.errors import TopologyError

IFNAMSIZ_MAX = 15  # Linux IFNAMSIZ (16) less the terminating NUL
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,11}", re.ASCII)
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?", re.ASCII)
RESERVED_NAMES = frozenset({"fabric"})

DEFAULT_PREFIX = "nm"
DEFAULT_FABRIC_CIDR = "10.250.0.0/24"
DEFAULT_POD_SUPERNET = "10.244.0.0/16"
DEFAULT_VIP_CIDR = "10.96.0.0/16"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    pod_cidr: str
    pods: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TopologySpec:
    prefix: str
    nodes: tuple[NodeSpec, ...]
    fabric_cidr: str = DEFAULT_FABRIC_CIDR


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    node: str
    netns: str
    address: str  # "10.244.1.2"
    prefix_len: int
    gateway: str
    ifname: str  # inside the pod
    host_ifname: str  # the pod's port on the node bridge
    cgroup: str  # relative to the cgroup v2 mount


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    index: int
    netns: str
    pod_cidr: str
    gateway: str  # node bridge address, the pods' default gateway
    fabric_address: str
    fabric_prefix_len: int
    bridge: str
    uplink: str
    fabric_port: str  # the node's port on the fabric bridge (in the fabric netns)
    cgroup: str
    pods: tuple[Pod, ...]


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    fabric_netns: str
    fabric_bridge: str
    fabric_cidr: str
    cgroup: str  # the testbed's cgroup, relative to the cgroup v2 mount
    nodes: tuple[Node, ...]

    def pods(self) -> tuple[Pod, ...]:
        return tuple(p for n in self.nodes for p in n.pods)

    def pod(self, name: str) -> Pod | None:
        return next((p for p in self.pods() if p.name == name), None)

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def netns_names(self) -> tuple[str, ...]:
        return (
            self.fabric_netns,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "fabric_cidr": self.fabric_cidr,
            "nodes": [
                {"name": n.name, "pod_cidr": n.pod_cidr, "pods": [p.name for p in n.pods]} for n in self.nodes
            ],
        }


def testbed_cgroup(prefix: str) -> str:
    return f"nodemesh-{prefix}"


def default_spec(prefix: str = DEFAULT_PREFIX, nodes: int = 2, pods_per_node: int = 2) -> TopologySpec:
    """Nodes ``n1..nN`` with pod CIDR 10.244.i.0/24 and pods ``n<i>-p<j>``."""
    if not 1 <= nodes <= 250:
        raise TopologyError(f"--nodes must be between 1 and 250, got {nodes}", where="nodes")
    if pods_per_node < 0:
        raise TopologyError(f"--pods-per-node must be 0 or more, got {pods_per_node}", where="pods-per-node")
    return TopologySpec(
        prefix=prefix,
        nodes=tuple(
            NodeSpec(
                name=f"n{i}",
                pod_cidr=f"10.244.{i}.0/24",
                pods=tuple(f"n{i}-p{j}" for j in range(1, pods_per_node + 1)),
            )
            for i in range(1, nodes + 1)
        ),
    )


def spec_from_mapping(doc: Mapping[str, Any], *, source: str = "topology") -> TopologySpec:
    """Build a spec from a parsed YAML/JSON document, naming the field of any error.

    Format::

        prefix: nm                      # optional, default "nm"
        fabric_cidr: 10.250.0.0/24      # optional
        nodes:
          - name: n1
            pod_cidr: 10.244.1.0/24
            pods: [web-1, web-2]        # a list of names, or a count
    """
    if not isinstance(doc, Mapping):
        raise TopologyError("expected a mapping with a 'nodes' list", where=source)
    known = {"prefix", "fabric_cidr", "nodes"}
    for key in doc:
        if key not in known:
            raise TopologyError(
                f"unknown field {key!r} (expected one of {sorted(known)})", where=f"{source}.{key}"
            )
    nodes_doc = doc.get("nodes")
    if not isinstance(nodes_doc, Sequence) or isinstance(nodes_doc, str) or not nodes_doc:
        raise TopologyError("expected a non-empty list of nodes", where=f"{source}.nodes")
    nodes: list[NodeSpec] = []
    for i, nd in enumerate(nodes_doc):
        where = f"{source}.nodes[{i}]"
        if not isinstance(nd, Mapping):
            raise TopologyError("expected a mapping with name, pod_cidr, pods", where=where)
        for key in nd:
            if key not in {"name", "pod_cidr", "pods"}:
                raise TopologyError(f"unknown field {key!r}", where=f"{where}.{key}")
        name = nd.get("name")
        if not isinstance(name, str):
            raise TopologyError("required string field is missing", where=f"{where}.name")
        cidr = nd.get("pod_cidr", f"10.244.{i + 1}.0/24")
        if not isinstance(cidr, str):
            raise TopologyError("expected a CIDR string", where=f"{where}.pod_cidr")
        pods_doc = nd.get("pods", 0)
        if isinstance(pods_doc, bool):
            raise TopologyError("expected a list of pod names or a count", where=f"{where}.pods")
        if isinstance(pods_doc, int):
            if pods_doc < 0:
                raise TopologyError("pod count must be 0 or more", where=f"{where}.pods")
            pods = tuple(f"{name}-p{j}" for j in range(1, pods_doc + 1))
        elif isinstance(pods_doc, Sequence) and not isinstance(pods_doc, str):
            if not all(isinstance(p, str) for p in pods_doc):
                raise TopologyError("pod names must be strings", where=f"{where}.pods")
            pods = tuple(pods_doc)
        else:
            raise TopologyError("expected a list of pod names or a count", where=f"{where}.pods")
        nodes.append(NodeSpec(name=name, pod_cidr=cidr, pods=pods))
    prefix = doc.get("prefix", DEFAULT_PREFIX)
    fabric = doc.get("fabric_cidr", DEFAULT_FABRIC_CIDR)
    if not isinstance(prefix, str):
        raise TopologyError("expected a string", where=f"{source}.prefix")
    if not isinstance(fabric, str):
        raise TopologyError("expected a CIDR string", where=f"{source}.fabric_cidr")
    return TopologySpec(prefix=prefix, nodes=tuple(nodes), fabric_cidr=fabric)


def _network(cidr: str, where: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise TopologyError(
            f"{cidr!r} is not a network CIDR ({e})",
            where=where,
            hint="give the network address with its length, e.g. 10.244.1.0/24",
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise TopologyError(f"{cidr!r}: only IPv4 networks are supported", where=where)
    if net.prefixlen > 30:
        raise TopologyError(f"{cidr!r} is too small (at most /30)", where=where)
    return net


def _ifname(name: str, where: str) -> str:
    size = len(name.encode())
    if size > IFNAMSIZ_MAX:
        raise TopologyError(
            f"interface name {name!r} is {size} bytes; Linux allows at most {IFNAMSIZ_MAX}",
            where=where,
            hint="use a shorter --prefix or shorter node/pod names",
        )
    return name


def _check_name(name: str, where: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise TopologyError(
            f"{name!r} is not a valid name (lowercase letters, digits and '-', "
            "1-32 characters, starting and ending with a letter or digit)",
            where=where,
        )
    if name in RESERVED_NAMES:
        raise TopologyError(f"{name!r} is reserved", where=where)


def plan(spec: TopologySpec) -> Topology:
    """Validate ``spec`` and give every object its name and address."""
    p = spec.prefix
    if not PREFIX_RE.fullmatch(p):
        raise TopologyError(
            f"prefix {p!r} is invalid: 1-12 characters, a lowercase letter then lowercase letters or digits",
            where="prefix",
        )
    fabric = _network(spec.fabric_cidr, "fabric_cidr")
    if not spec.nodes:
        raise TopologyError("a testbed needs at least one node", where="nodes")
    if len(spec.nodes) > fabric.num_addresses - 2:
        raise TopologyError(f"{len(spec.nodes)} nodes do not fit in fabric {fabric}", where="fabric_cidr")

    seen: dict[str, str] = {}  # name -> where it was first used

    def claim(name: str, where: str) -> None:
        _check_name(name, where)
        if name in seen:
            raise TopologyError(
                f"duplicate name {name!r} (already used at {seen[name]}); node and pod "
                "names must be unique in a testbed",
                where=where,
            )
        seen[name] = where

    networks: list[tuple[ipaddress.IPv4Network, str]] = [(fabric, "fabric_cidr")]
    fabric_hosts = list(fabric.hosts())
    nodes: list[Node] = []
    for i, ns in enumerate(spec.nodes):
        where = f"nodes[{i}]"
        claim(ns.name, f"{where}.name")
        net = _network(ns.pod_cidr, f"{where}.pod_cidr")
        for other, other_where in networks:
            if net.overlaps(other):
                raise TopologyError(f"{net} overlaps {other} ({other_where})", where=f"{where}.pod_cidr")
        networks.append((net, f"{where}.pod_cidr"))
        hosts = list(net.hosts())
        gateway, pod_addrs = hosts[0], hosts[1:]
        if len(ns.pods) > len(pod_addrs):
            raise TopologyError(
                f"{len(ns.pods)} pods do not fit in {net}: it holds {len(pod_addrs)} besides the gateway",
                where=f"{where}.pods",
                hint="use a larger pod_cidr or fewer pods",
            )
        node_cg = f"{testbed_cgroup(p)}/{ns.name}"
        pods: list[Pod] = []
        for j, pod_name in enumerate(ns.pods):
            pw = f"{where}.pods[{j}]"
            claim(pod_name, pw)
            pods.append(
                Pod(
                    name=pod_name,
                    node=ns.name,
                    netns=f"{p}-{pod_name}",
                    address=str(pod_addrs[j]),
                    prefix_len=net.prefixlen,
                    gateway=str(gateway),
                    ifname=_ifname(f"{p}-eth0", pw),
                    host_ifname=_ifname(f"{p}-{pod_name}", pw),
                    cgroup=f"{node_cg}/{pod_name}",
                )
            )
        nodes.append(
            Node(
                name=ns.name,
                index=i + 1,
                netns=f"{p}-{ns.name}",
                pod_cidr=str(net),
                gateway=str(gateway),
                fabric_address=str(fabric_hosts[i]),
                fabric_prefix_len=fabric.prefixlen,
                bridge=_ifname(f"{p}-br", where),
                uplink=_ifname(f"{p}-up", where),
                fabric_port=_ifname(f"{p}-{ns.name}", where),
                cgroup=node_cg,
                pods=tuple(pods),
            )
        )
    return Topology(
        prefix=p,
        fabric_netns=f"{p}-fabric",
        fabric_bridge=_ifname(f"{p}-fbr", "prefix"),
        fabric_cidr=str(fabric),
        cgroup=testbed_cgroup(p),
        nodes=tuple(nodes),
    )
