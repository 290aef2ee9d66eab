"""Peer authentication: which inbound connections a pod accepts, and the tc filter enforcing it.

How this works: the loader pins the ``inbound_tc`` program (see
``bpf/inbound_tc.c``) next to the maps. For each enrolled pod the agent
writes a policy into ``nm_peer_auth`` (pod IPv4 → mode, node proxy address)
with :meth:`bpf.maps.Dataplane.set_peer_auth`, then attaches the pinned
program at ingress of the pod's interface inside the pod's netns
(:func:`attach_inbound_filter`: a ``clsact`` qdisc plus one direct-action
``bpf`` filter at :data:`FILTER_PRIO`). From then on the program judges each
connection-opening SYN to the pod: from the proxy → pass (``proxied``); from
elsewhere → pass in ``PERMISSIVE`` (``plaintext``), drop in ``STRICT``
(``refused``). Changing the mode is one map write: it applies to the next
SYN, never to connections already open, and needs no re-attach.

The filter carries the data path version in its name, so attaching again
with the same pinned program changes nothing, and after an upgrade it
replaces the old program in place. Input is validated before any netlink
or map operation (:class:`BpfConfigError` naming the field).

Mesh-wide and per-workload settings are resolved here too, as a pure
function (:func:`resolve_mode`), with Istio's precedence: workload over
namespace over mesh, ``UNSET`` inherits.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bpf.errors import BpfConfigError, BpfError
from bpf.layout import PEER_AUTH_MODES, PeerAuth, ip4_to_map

NETNS_RUN_DIR = "/run/netns"
INGRESS_PARENT = 0xFFFFFFF2  # clsact's ingress hook ("ffff:fff2")
EGRESS_PARENT = 0xFFFFFFF3
FILTER_PRIO = 0x4E4D  # our slot among the ingress filters ("NM")
FILTER_HANDLE = 1
FILTER_NAME = "nm_inbound_tc"
ETH_P_ALL = 0x0003

MODES: tuple[str, ...] = tuple(PEER_AUTH_MODES)  # DISABLE, PERMISSIVE, STRICT
_NETNS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}", re.ASCII)
_IFNAME = re.compile(r"[^\s/:]{1,15}", re.ASCII)


def _mode(value: object, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in PEER_AUTH_MODES:
        raise BpfConfigError(f"expected one of {', '.join(MODES)}, got {value!r}", where=where)
    return value.upper()


def _ip4(value: object, where: str) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise BpfConfigError(f"expected an IPv4 address string, got {value!r}", where=where)
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise BpfConfigError(f"expected an IPv4 address, got {value!r}", where=where) from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or \
            addr == ipaddress.IPv4Address("255.255.255.255"):
        raise BpfConfigError(f"{addr} cannot be a pod or proxy address", where=where)
    return addr


@dataclass(frozen=True, slots=True)
class PeerAuthPolicy:
    """The policy of one pod: ``mode`` for SYNs to ``pod_ip`` not from ``allowed_source``."""

    pod_ip: str
    mode: str  # DISABLE | PERMISSIVE | STRICT (case-insensitive on input)
    allowed_source: str  # the node proxy as the pod sees it: the pod's gateway

    def __post_init__(self) -> None:
        pod = _ip4(self.pod_ip, "pod_ip")
        mode = _mode(self.mode, "mode")
        allowed = _ip4(self.allowed_source, "allowed_source")
        if pod == allowed:
            raise BpfConfigError(f"{allowed} is the pod itself, not its node proxy",
                                 where="allowed_source")
        object.__setattr__(self, "pod_ip", str(pod))
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "allowed_source", str(allowed))

    def key(self) -> int:
        return ip4_to_map(self.pod_ip)

    def value(self) -> PeerAuth:
        return PeerAuth(PEER_AUTH_MODES[self.mode], ip4_to_map(self.allowed_source))


def pod_key(pod_ip: object) -> int:
    """The map key of ``pod_ip`` (validated)."""
    return ip4_to_map(str(_ip4(pod_ip, "pod_ip")))


def resolve_mode(mesh: str, namespace: str | None = None, workload: str | None = None) -> str:
    """The effective mode of a workload: the most specific setting that is not UNSET.

    ``mesh`` must be a mode; ``namespace`` and ``workload`` may be None or
    ``"UNSET"`` (inherit).
    """
    result = _mode(mesh, "mesh")
    for where, value in (("namespace", namespace), ("workload", workload)):
        if value is None or (isinstance(value, str) and value.upper() == "UNSET"):
            continue
        result = _mode(value, where)
    return result


# --- the tc filter ------------------------------------------------------------

def netns_path(netns: object) -> str:
    """``/run/netns/<name>`` for a name, else the absolute path given; it must exist."""
    if not isinstance(netns, str) or not netns:
        raise BpfConfigError(f"expected a netns name or path, got {netns!r}", where="netns")
    if "/" in netns:
        if not os.path.isabs(netns):
            raise BpfConfigError(f"expected an absolute path, got {netns!r}", where="netns")
        path = netns
    elif _NETNS_NAME.fullmatch(netns):
        path = os.path.join(NETNS_RUN_DIR, netns)
    else:
        raise BpfConfigError(f"{netns!r} is not a valid netns name", where="netns")
    if not os.path.exists(path) or os.path.isdir(path):
        raise BpfConfigError(f"network namespace {path} does not exist", where="netns",
                             hint="give a name under /run/netns or /proc/<pid>/ns/net")
    return path


def check_ifname(ifname: object) -> str:
    if not isinstance(ifname, str) or not _IFNAME.fullmatch(ifname):
        raise BpfConfigError(f"expected an interface name (1-15 characters), got {ifname!r}",
                             where="ifname")
    return ifname


@contextmanager
def _ipr(path: str) -> Iterator[Any]:
    # netns.kernel.ipr runs rtnetlink on a thread inside the netns (no fork: safe in the agent)
    from netns import kernel
    from netns.errors import NetnsError

    try:
        with kernel.ipr(path) as handle:
            yield handle
    except (NetnsError, OSError) as e:
        raise BpfError(f"tc in netns {path}: {e}", errno=getattr(e, "errno", 0) or 0) from e


def _index(ipr: Any, ifname: str, path: str) -> int:
    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise BpfConfigError(f"no interface {ifname!r} in network namespace {path}",
                             where="ifname")
    return int(links[0])


@dataclass(frozen=True, slots=True)
class TcFilter:
    parent: int
    prio: int
    kind: str
    name: str | None  # a bpf filter's program name


def _filters(ipr: Any, index: int, parent: int) -> list[TcFilter]:
    out: list[TcFilter] = []
    for msg in ipr.get_filters(index=index, parent=parent):
        if msg["index"] != index:
            continue
        kind = msg.get_attr("TCA_KIND")
        opts = msg.get_attr("TCA_OPTIONS")
        if kind is None or opts is None:  # the chain head of a priority, not a filter
            continue
        name = opts.get_attr("TCA_BPF_NAME") if kind == "bpf" else None
        out.append(TcFilter(parent, int(msg["info"]) >> 16, str(kind), name))
    return out


def _has_clsact(ipr: Any, index: int) -> bool:
    return any(q["index"] == index and q.get_attr("TCA_KIND") == "clsact"
               for q in ipr.get_qdiscs(index))


def filter_tag(version: str) -> str:
    """The filter's name: the program plus the data path version it came from."""
    return f"{FILTER_NAME}:{version}"


def inbound_filters(netns: str, ifname: str) -> list[TcFilter]:
    """Every filter at clsact ingress of ``ifname`` in ``netns`` (ours and others')."""
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        index = _index(ipr, name, path)
        if not _has_clsact(ipr, index):
            return []
        return _filters(ipr, index, INGRESS_PARENT)


def attach_inbound_filter(netns: str, ifname: str, prog_fd: int, version: str) -> bool:
    """Run the program at ingress of ``ifname`` in ``netns``; False if it already was.

    Creates the clsact qdisc if missing; other filters on it are left alone.
    """
    path, name = netns_path(netns), check_ifname(ifname)
    tag = filter_tag(version)
    with _ipr(path) as ipr:
        index = _index(ipr, name, path)
        if not _has_clsact(ipr, index):
            try:
                ipr.tc("add", "clsact", index)
            except Exception as e:  # another agent won the race: fine
                if getattr(e, "code", None) != errno_mod.EEXIST:
                    raise
        ours = [f for f in _filters(ipr, index, INGRESS_PARENT) if f.prio == FILTER_PRIO]
        if len(ours) == 1 and ours[0].name == tag:
            return False
        ipr.tc("replace-filter", "bpf", index, FILTER_HANDLE, fd=prog_fd, name=tag,
               parent=INGRESS_PARENT, classid=1, direct_action=True, prio=FILTER_PRIO,
               protocol=ETH_P_ALL)
        return True


def detach_inbound_filter(netns: str, ifname: str) -> bool:
    """Remove our filter (and the clsact qdisc if nothing else uses it); False if absent.

    An interface that is gone counts as detached; a missing netns is refused
    like everywhere else (its filters went with it).
    """
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            return False
        index = int(links[0])
        if not _has_clsact(ipr, index):
            return False
        ours = [f for f in _filters(ipr, index, INGRESS_PARENT) if f.prio == FILTER_PRIO]
        if ours:
            ipr.tc("del-filter", "bpf", index, FILTER_HANDLE, parent=INGRESS_PARENT,
                   prio=FILTER_PRIO, protocol=ETH_P_ALL)
        if not _filters(ipr, index, INGRESS_PARENT) and not _filters(ipr, index, EGRESS_PARENT):
            ipr.tc("del", "clsact", index)
        return bool(ours)
