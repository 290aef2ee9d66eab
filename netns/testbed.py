"""The single-host testbed: nodes and pods as network namespaces, built from a plan.

How this works: :func:`netns.topology.plan` has already validated the topology
and named everything. :func:`up` records the plan in a state file *first*, then
creates, in order: cgroups, the fabric netns and bridge, each node (netns,
uplink veth into the fabric, pod bridge), each pod (netns, veth to the node
bridge, address, default route via the bridge), and the routes between nodes.
Any failure tears down what exists and re-raises. :func:`down` is idempotent
and works from the state file and from a scan by prefix, so it also removes
leftovers of a crashed run. Nothing is done in the root network namespace
except bind mounts under /run/netns; no testbed namespace has a link or route
out of the testbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from netns import cgroup, kernel
from netns.errors import KernelError, NetnsError, NotFoundError, TopologyError
from netns.topology import Node, Pod, Topology, plan, spec_from_mapping, testbed_cgroup

STATE_DIR = "/run/nodemesh/testbeds"


def _state_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}.json")


def _write_state(topo: Topology) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = _state_path(topo.prefix) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(topo.to_dict(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _state_path(topo.prefix))


def load(prefix: str) -> Topology:
    """The topology of a running testbed, from its state file."""
    try:
        with open(_state_path(prefix)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise NotFoundError(
            f"no testbed with prefix {prefix!r} is up", hint="start one: nodemesh testbed up"
        ) from None
    except json.JSONDecodeError as e:
        raise NetnsError(f"state file {_state_path(prefix)} is corrupt: {e}") from None
    return plan(spec_from_mapping(doc, source=_state_path(prefix)))


def list_testbeds() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(STATE_DIR) if f.endswith(".json"))
    except FileNotFoundError:
        return []


def _link_index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelError(f"link {ifname!r} did not appear")
    return int(found[0])


def _veth(in_netns: str, ifname: str, peer_netns: str, peer_ifname: str) -> None:
    """A veth pair created directly across two namespaces (never in the root one)."""
    fd = kernel.open_netns(peer_netns)
    try:
        with kernel.ipr(in_netns) as ipr:
            ipr.link(
                "add",
                ifname=ifname,
                kind="veth",
                peer={"ifname": peer_ifname, "net_ns_fd": fd},
            )
    finally:
        os.close(fd)


def _build_fabric(topo: Topology) -> None:
    kernel.create_netns(topo.fabric_netns)
    with kernel.ipr(topo.fabric_netns) as ipr:
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")
        ipr.link("add", ifname=topo.fabric_bridge, kind="bridge")
        ipr.link("set", index=_link_index(ipr, topo.fabric_bridge), state="up")


def _build_node(topo: Topology, node: Node) -> None:
    kernel.create_netns(node.netns)
    kernel.write_sysctl(node.netns, "net.ipv4.ip_forward", "1")
    _veth(node.netns, node.uplink, topo.fabric_netns, node.fabric_port)
    with kernel.ipr(topo.fabric_netns) as ipr:
        port = _link_index(ipr, node.fabric_port)
        ipr.link("set", index=port, master=_link_index(ipr, topo.fabric_bridge), state="up")
    with kernel.ipr(node.netns) as ipr:
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")
        up = _link_index(ipr, node.uplink)
        ipr.addr("add", index=up, address=node.fabric_address, prefixlen=node.fabric_prefix_len)
        ipr.link("set", index=up, state="up")
        ipr.link("add", ifname=node.bridge, kind="bridge")
        br = _link_index(ipr, node.bridge)
        gw_len = node.pods[0].prefix_len if node.pods else int(node.pod_cidr.split("/")[1])
        ipr.addr("add", index=br, address=node.gateway, prefixlen=gw_len)
        ipr.link("set", index=br, state="up")


def _build_pod(node: Node, pod: Pod) -> None:
    kernel.create_netns(pod.netns)
    _veth(node.netns, pod.host_ifname, pod.netns, pod.ifname)
    with kernel.ipr(node.netns) as ipr:
        port = _link_index(ipr, pod.host_ifname)
        ipr.link("set", index=port, master=_link_index(ipr, node.bridge), state="up")
    with kernel.ipr(pod.netns) as ipr:
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")
        eth = _link_index(ipr, pod.ifname)
        ipr.addr("add", index=eth, address=pod.address, prefixlen=pod.prefix_len)
        ipr.link("set", index=eth, state="up")
        # Default route to the node: the node itself has no route out of the testbed.
        ipr.route("add", dst="0.0.0.0/0", gateway=pod.gateway)


def _build_routes(topo: Topology) -> None:
    for node in topo.nodes:
        with kernel.ipr(node.netns) as ipr:
            for other in topo.nodes:
                if other is not node:
                    ipr.route("add", dst=other.pod_cidr, gateway=other.fabric_address)


def up(topo: Topology) -> Topology:
    """Create the testbed; on any failure remove everything it made and re-raise."""
    if os.path.exists(_state_path(topo.prefix)):
        raise TopologyError(
            f"a testbed with prefix {topo.prefix!r} is already up",
            where="prefix",
            hint=f"take it down first (nodemesh testbed down --prefix {topo.prefix}) "
            "or choose another --prefix",
        )
    clash = [n for n in topo.netns_names() if kernel.netns_exists(n)]
    if clash:
        raise TopologyError(
            f"network namespaces already exist: {', '.join(clash)}",
            where="prefix",
            hint=f"remove leftovers with: nodemesh testbed down --prefix {topo.prefix}",
        )
    _write_state(topo)
    try:
        for pod in topo.pods():
            cgroup.create(pod.cgroup)
        for node in topo.nodes:
            cgroup.create(node.cgroup)
        _build_fabric(topo)
        for node in topo.nodes:
            _build_node(topo, node)
            for pod in node.pods:
                _build_pod(node, pod)
        _build_routes(topo)
    except BaseException:
        down(topo.prefix)
        raise
    return topo


@dataclass(frozen=True, slots=True)
class DownReport:
    netns_removed: tuple[str, ...]
    cgroup_removed: bool
    state_removed: bool


def down(prefix: str) -> DownReport:
    """Remove everything of testbed ``prefix``: processes, netns, cgroups, state.

    Works without a state file (crashed run): every netns named ``<prefix>-*``
    and the cgroup ``nodemesh-<prefix>`` are removed.
    """
    cg_path = cgroup.cgroup_path(testbed_cgroup(prefix))
    # Processes first (they hold namespaces alive), then namespaces, then cgroups.
    cgroup.kill_all(cg_path)
    removed = tuple(n for n in kernel.list_netns() if n.startswith(prefix + "-") and kernel.remove_netns(n))
    cg_removed = cgroup.remove_tree(cg_path)
    state = _state_path(prefix)
    state_removed = os.path.exists(state)
    if state_removed:
        os.unlink(state)
    return DownReport(netns_removed=removed, cgroup_removed=cg_removed, state_removed=state_removed)


def pod_of(prefix: str, name: str) -> Pod:
    topo = load(prefix)
    pod = topo.pod(name)
    if pod is None:
        known = ", ".join(p.name for p in topo.pods()) or "none"
        raise NotFoundError(
            f"no pod named {name!r} in testbed {prefix!r} (pods: {known})",
            hint="list them with: nodemesh testbed status",
        )
    return pod


def popen_in(
    netns: str,
    cgroup_rel: str | None,
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``netns`` and (if given) cgroup ``cgroup_rel``.

    The child joins the cgroup and the netns between fork and exec, so it never
    runs a single instruction of ``argv`` outside them.
    """
    if not argv:
        raise ValueError("no command given")
    fd = kernel.open_netns(netns)
    procs_file = os.path.join(cgroup.cgroup_path(cgroup_rel), "cgroup.procs") if cgroup_rel else None
    try:
        return subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            pass_fds=(fd,),
            preexec_fn=lambda: kernel.enter_in_child(fd, procs_file),
        )
    except FileNotFoundError:
        raise NetnsError(f"command not found: {argv[0]!r}") from None
    finally:
        os.close(fd)


def popen_in_pod(pod: Pod, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    return popen_in(pod.netns, pod.cgroup, argv, **kw)


def status(topo: Topology) -> dict[str, Any]:
    """What exists in the kernel for each node and pod (checked, not assumed)."""
    nodes = []
    for node in topo.nodes:
        pods = []
        for pod in node.pods:
            pods.append(
                {
                    "name": pod.name,
                    "address": pod.address,
                    "netns": pod.netns,
                    "netns_present": kernel.netns_exists(pod.netns),
                    "cgroup": pod.cgroup,
                    "processes": len(cgroup.procs(cgroup.cgroup_path(pod.cgroup))),
                }
            )
        nodes.append(
            {
                "name": node.name,
                "netns": node.netns,
                "netns_present": kernel.netns_exists(node.netns),
                "fabric_address": node.fabric_address,
                "pod_cidr": node.pod_cidr,
                "gateway": node.gateway,
                "pods": pods,
            }
        )
    return {"prefix": topo.prefix, "fabric_cidr": topo.fabric_cidr, "nodes": nodes}


@contextlib.contextmanager
def external_host(topo: Topology, address: str, name: str = "ext") -> Iterator[str]:
    """A host outside the mesh: a netns ``<prefix>-<name>`` on the fabric bridge at ``address``
    (in the fabric CIDR), with routes back to every node's pod CIDR via that node (so pods reach
    it directly where they are not captured). No agent, no cgroup. Yields the netns name; removed
    on exit (and by :func:`down`, as every ``<prefix>-*`` netns)."""
    ns, port, inner = f"{topo.prefix}-{name}", f"{topo.prefix}-{name}", f"{topo.prefix}-{name}0"
    if len(inner) > 15:
        raise TopologyError(f"interface name {inner!r} is longer than 15 bytes")
    kernel.create_netns(ns)
    try:
        _veth(topo.fabric_netns, port, ns, inner)
        with kernel.ipr(topo.fabric_netns) as ipr:
            bridge = _link_index(ipr, topo.fabric_bridge)
            ipr.link("set", index=_link_index(ipr, port), master=bridge, state="up")
        with kernel.ipr(ns) as ipr:
            ipr.link("set", index=_link_index(ipr, "lo"), state="up")
            idx = _link_index(ipr, inner)
            ipr.addr("add", index=idx, address=address, prefixlen=int(topo.fabric_cidr.split("/")[1]))
            ipr.link("set", index=idx, state="up")
            for node in topo.nodes:
                ipr.route("add", dst=node.pod_cidr, gateway=node.fabric_address)
        yield ns
    finally:
        kernel.remove_netns(ns)  # (the fabric end of the veth goes with it)
