"""Peer authentication: which inbound traffic a pod accepts, and the tc filters enforcing it.

How this works: the loader pins two tc programs next to the maps. For each
enrolled pod the agent writes a policy into ``nm_peer_auth`` (pod IPv4 ->
mode, node proxy address, proxy mark, UDP choice) with
:meth:`bpf.maps.Dataplane.set_peer_auth`, then binds the pod's *host-side*
veth with :meth:`bpf.maps.Dataplane.attach_pod_filters`: ``nm_pod_if``
(host ifindex -> pod IPv4), ``nm_pod_src`` (the pod's own IPv4 and IPv6
addresses, link-local included) and, on a ``clsact`` qdisc of that veth in
the node's netns, one direct-action ``bpf`` filter at each hook:

- egress, ``inbound_tc`` (:data:`bpf.layout.INBOUND_TC`): judges what enters
  the pod, IPv4 and IPv6 alike. A connection-opening packet from the node
  proxy passes (``proxied``); from anyone else it passes in ``PERMISSIVE``
  (``plaintext``) and is dropped in ``STRICT`` (``refused``). UDP to a STRICT
  pod follows ``udp`` (``allow``, the default, or ``deny``).
- ingress, ``source_tc`` (:data:`bpf.layout.SOURCE_TC`): drops what the pod
  sends from an address that is not its own (IPv4, IPv6, ARP sender).

Why the host side: the proxy is proven by ``skb->mark``. The agent marks its
pod-facing sockets with ``SO_MARK`` (:mod:`agent.dataplane.podsock`; setting
it needs ``CAP_NET_ADMIN``), and the mark is visible only while the packet is
still in the node's netns: veth clears it when the packet crosses into the
pod (``skb_scrub_packet`` with ``xnet``). A filter inside the pod could only
trust the gateway's source address, which any process in the node's netns
can bind and any same-node pod can forge. Limits: a root process with
``CAP_NET_ADMIN`` in the node's netns can set the mark (and detach these
filters): it is trusted like the rest of the node's network configuration.
Pods without a host-side veth (macvlan, ipvlan) cannot be bound.

Per-port modes (PeerAuthentication ``portLevelMtls``) live in ``nm_peer_port``
((pod IPv4, port) -> mode); the pod's entry says it has some (``ports``) and
the strictest of all its modes, for a packet whose port cannot be read. A pod
without port modes is judged with one lookup, as before.

Changing the mode is one map write: it applies to the next opening packet,
never to connections already open, and needs no re-attach. A pod with port
modes is written port entries first, then its own entry, then stale port
entries are removed, so a port mode is in place before the pod entry points
to it. Filters carry the
data path version in their name, so attaching again changes nothing, and
after an upgrade they are replaced in place. Input is validated before any
netlink or map operation (:class:`BpfConfigError` naming the field). Which
mode a pod and port get is decided elsewhere (:mod:`agent.control.peerauthn`).
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bpf.errors import BpfConfigError, BpfError
from bpf.layout import (
    AF_INET,
    AF_INET6,
    PEER_AUTH_MODES,
    PEER_AUTH_UDP,
    PORTS_PER_POD,
    SRC_PER_POD,
    PeerAuth,
    PortKey,
    SrcKey,
    TcProgram,
    ip4_to_map,
    port_to_map,
)

NETNS_RUN_DIR = "/run/netns"
INGRESS_PARENT = 0xFFFFFFF2  # clsact's ingress hook ("ffff:fff2")
EGRESS_PARENT = 0xFFFFFFF3
FILTER_PRIO = 0x4E4D  # our slot among the filters of each hook ("NM")
FILTER_HANDLE = 1
FILTER_NAME = "nm_inbound_tc"  # the program of releases that filtered inside the pod
ETH_P_ALL = 0x0003
DEFAULT_PROXY_MARK = 0x4D  # low byte: clear of kube-proxy (0x4000, 0x8000), Cilium (0x0f00),
#                            Calico (0xffff0000)
DEFAULT_DNS_PORT = 15053

MODES: tuple[str, ...] = tuple(PEER_AUTH_MODES)  # DISABLE, PERMISSIVE, STRICT
UDP_CHOICES: tuple[str, ...] = tuple(PEER_AUTH_UDP)  # allow, deny
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


def check_mark(value: object, where: str = "proxy_mark") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFFFFFF:
        raise BpfConfigError(f"expected a mark between 1 and 0xffffffff, got {value!r}",
                             where=where)
    return value


def check_udp(value: object, where: str = "udp") -> str:
    if not isinstance(value, str) or value.lower() not in PEER_AUTH_UDP:
        raise BpfConfigError(f"expected one of {', '.join(UDP_CHOICES)}, got {value!r}",
                             where=where)
    return value.lower()


@dataclass(frozen=True, slots=True)
class PeerAuthPolicy:
    """The policy of one pod: ``mode`` for traffic to ``pod_ip`` not from the node proxy.

    The node proxy is ``allowed_source`` (the pod's gateway) with ``proxy_mark``
    on its packets; ``udp`` says what a STRICT pod does with UDP; UDP from
    ``allowed_source`` and ``dns_port`` (the node DNS proxy) always passes.
    ``ports``: (port, mode) pairs overriding ``mode`` for those destination ports.
    """

    pod_ip: str
    mode: str  # DISABLE | PERMISSIVE | STRICT (case-insensitive on input)
    allowed_source: str  # the node proxy as the pod sees it: the pod's gateway
    proxy_mark: int = DEFAULT_PROXY_MARK
    udp: str = "allow"  # allow | deny: UDP to a STRICT pod
    dns_port: int = DEFAULT_DNS_PORT  # 0: no node DNS proxy
    ports: tuple[tuple[int, str], ...] = ()  # sorted by port

    def __post_init__(self) -> None:
        pod = _ip4(self.pod_ip, "pod_ip")
        mode = _mode(self.mode, "mode")
        allowed = _ip4(self.allowed_source, "allowed_source")
        if pod == allowed:
            raise BpfConfigError(f"{allowed} is the pod itself, not its node proxy",
                                 where="allowed_source")
        check_mark(self.proxy_mark)
        udp = check_udp(self.udp)
        if isinstance(self.dns_port, bool) or not isinstance(self.dns_port, int) or \
                not 0 <= self.dns_port <= 65535:
            raise BpfConfigError(f"expected a port or 0, got {self.dns_port!r}", where="dns_port")
        object.__setattr__(self, "pod_ip", str(pod))
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "allowed_source", str(allowed))
        object.__setattr__(self, "udp", udp)
        object.__setattr__(self, "ports", _ports(self.ports))

    def key(self) -> int:
        return ip4_to_map(self.pod_ip)

    def value(self) -> PeerAuth:
        strictest = max(PEER_AUTH_MODES[m] for m in (self.mode, *(m for _, m in self.ports)))
        return PeerAuth(PEER_AUTH_MODES[self.mode], ip4_to_map(self.allowed_source),
                        self.proxy_mark, port_to_map(self.dns_port), PEER_AUTH_UDP[self.udp],
                        1 if self.ports else 0, strictest if self.ports else 0)

    def port_entries(self) -> list[tuple[PortKey, int]]:
        """The ``nm_peer_port`` entries of this pod: (key, mode)."""
        return [(port_key(self.key(), p), PEER_AUTH_MODES[m]) for p, m in self.ports]


def port_key(pod: int, port: int) -> PortKey:
    return PortKey(pod, port_to_map(port), 0)


def _ports(value: object) -> tuple[tuple[int, str], ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | dict):
        raise BpfConfigError(f"expected (port, mode) pairs, got {value!r}", where="ports")
    pairs = list(value.items()) if isinstance(value, dict) else list(value)
    if len(pairs) > PORTS_PER_POD:
        raise BpfConfigError(f"{len(pairs)} port modes exceed {PORTS_PER_POD} per pod", where="ports")
    out: dict[int, str] = {}
    for i, pair in enumerate(pairs):
        where = f"ports[{i}]"
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise BpfConfigError(f"expected a (port, mode) pair, got {pair!r}", where=where)
        port, mode = pair
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise BpfConfigError(f"expected a port 1-65535, got {port!r}", where=where)
        if port in out:
            raise BpfConfigError(f"port {port} is given twice", where=where)
        out[port] = _mode(mode, where)
    return tuple(sorted(out.items()))


def source_keys(ifindex: int, sources: Sequence[object]) -> list[SrcKey]:
    """The ``nm_pod_src`` keys letting the pod behind ``ifindex`` send from ``sources``.

    IPv4 and IPv6 (link-local included, with or without a ``%zone``);
    unspecified, loopback and multicast addresses are refused: the filter
    lets the unspecified source pass anyway, the others are never a source.
    """
    if isinstance(ifindex, bool) or not isinstance(ifindex, int) or not 0 < ifindex < 1 << 31:
        raise BpfConfigError(f"expected an interface index, got {ifindex!r}", where="ifindex")
    if isinstance(sources, str) or not 0 < len(sources) <= SRC_PER_POD:
        raise BpfConfigError(f"expected 1 to {SRC_PER_POD} addresses, got {sources!r}",
                             where="sources")
    keys: list[SrcKey] = []
    for i, raw in enumerate(sources):
        where = f"sources[{i}]"
        if not isinstance(raw, str):
            raise BpfConfigError(f"expected an address string, got {raw!r}", where=where)
        try:
            addr = ipaddress.ip_address(raw.split("%", 1)[0])
        except ValueError:
            raise BpfConfigError(f"expected an IPv4 or IPv6 address, got {raw!r}",
                                 where=where) from None
        if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
            raise BpfConfigError(f"{addr} cannot be a pod's source address", where=where)
        k = SrcKey()
        k.ifindex = ifindex
        k.family = AF_INET if addr.version == 4 else AF_INET6
        for j, b in enumerate(addr.packed):
            k.addr[j] = b
        keys.append(k)
    return keys


def pod_key(pod_ip: object) -> int:
    """The map key of ``pod_ip`` (validated)."""
    return ip4_to_map(str(_ip4(pod_ip, "pod_ip")))


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


def filter_tag(version: str, func: str = FILTER_NAME) -> str:
    """A filter's name: the program plus the data path version it came from."""
    return f"{func}:{version}"


def _ensure_clsact(ipr: Any, index: int) -> None:
    if not _has_clsact(ipr, index):
        try:
            ipr.tc("add", "clsact", index)
        except Exception as e:  # another agent won the race: fine
            if getattr(e, "code", None) != errno_mod.EEXIST:
                raise


def _attach(ipr: Any, index: int, parent: int, fd: int, tag: str) -> bool:
    ours = [f for f in _filters(ipr, index, parent) if f.prio == FILTER_PRIO]
    if len(ours) == 1 and ours[0].name == tag:
        return False
    ipr.tc("replace-filter", "bpf", index, FILTER_HANDLE, fd=fd, name=tag, parent=parent,
           classid=1, direct_action=True, prio=FILTER_PRIO, protocol=ETH_P_ALL)
    return True


def _detach(ipr: Any, index: int, parents: Sequence[int]) -> bool:
    """Remove our filter at each of ``parents``, then clsact if nothing else uses it."""
    if not _has_clsact(ipr, index):
        return False
    found = False
    for parent in parents:
        if any(f.prio == FILTER_PRIO for f in _filters(ipr, index, parent)):
            ipr.tc("del-filter", "bpf", index, FILTER_HANDLE, parent=parent, prio=FILTER_PRIO,
                   protocol=ETH_P_ALL)
            found = True
    if not _filters(ipr, index, INGRESS_PARENT) and not _filters(ipr, index, EGRESS_PARENT):
        ipr.tc("del", "clsact", index)
    return found


@dataclass(frozen=True, slots=True)
class HostFilter:
    """One program to run on a pod's host-side veth."""

    prog: TcProgram
    parent: int  # EGRESS_PARENT (towards the pod) or INGRESS_PARENT (from the pod)
    fd: int


def host_filters(netns: str, ifname: str) -> list[TcFilter]:
    """Every filter at clsact egress and ingress of ``ifname`` in ``netns`` (ours and others')."""
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        index = _index(ipr, name, path)
        if not _has_clsact(ipr, index):
            return []
        return _filters(ipr, index, EGRESS_PARENT) + _filters(ipr, index, INGRESS_PARENT)


def host_ifindex(netns: str, ifname: str) -> int:
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        return _index(ipr, name, path)


def attach_host_filters(netns: str, ifname: str, filters: Sequence[HostFilter],
                        version: str) -> bool:
    """Run ``filters`` on ``ifname`` (a pod's host-side veth) in ``netns``; False if they
    already were. Creates the clsact qdisc if missing; other filters on it are left alone."""
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        index = _index(ipr, name, path)
        _ensure_clsact(ipr, index)
        changed = False
        for f in filters:
            changed = _attach(ipr, index, f.parent, f.fd, filter_tag(version, f.prog.func)) or changed
        return changed


def detach_host_filters(netns: str, ifname: str) -> bool:
    """Remove our filters from a host-side veth (and clsact if nothing else uses it); False if
    absent. An interface that is gone counts as detached."""
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            return False
        return _detach(ipr, int(links[0]), (EGRESS_PARENT, INGRESS_PARENT))


def remove_pod_side_filter(netns: str, ifname: str) -> bool:
    """Remove the filter that earlier releases attached *inside* the pod (ingress of its
    interface); False if there is none. It trusted the gateway address alone."""
    path, name = netns_path(netns), check_ifname(ifname)
    with _ipr(path) as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            return False
        return _detach(ipr, int(links[0]), (INGRESS_PARENT,))


@dataclass(frozen=True, slots=True)
class PodLink:
    """A pod's interface as seen inside the pod, with its veth peer's index."""

    ifname: str
    peer_ifindex: int  # IFLA_LINK: the host-side veth's index in the peer netns; 0 if none
    ip4: tuple[str, ...]
    ip6: tuple[str, ...]  # link-local included


def pod_links(netns: str) -> list[PodLink]:
    """The pod's interfaces other than loopback, with their IPv4 and IPv6 addresses."""
    path = netns_path(netns)
    with _ipr(path) as ipr:
        links = {int(link["index"]): link for link in ipr.get_links()}
        addrs: dict[int, tuple[list[str], list[str]]] = {i: ([], []) for i in links}
        for a in ipr.get_addr():
            idx = int(a["index"])
            if idx in addrs:
                addrs[idx][0 if a["family"] == 2 else 1].append(str(a.get_attr("IFA_ADDRESS")))
    out: list[PodLink] = []
    for idx, link in sorted(links.items()):
        ifname = str(link.get_attr("IFLA_IFNAME"))
        if ifname == "lo":
            continue
        peer = link.get_attr("IFLA_LINK")
        out.append(PodLink(ifname, int(peer) if peer and int(peer) != idx else 0,
                           tuple(addrs[idx][0]), tuple(addrs[idx][1])))
    return out


def host_peer(host_netns: str, pod_netns: str, link: PodLink) -> str:
    """The name, in ``host_netns``, of the veth whose other end is ``link`` in ``pod_netns``.

    Checked both ways (the host link's IFLA_LINK is the pod link's index), so a
    pod whose interface is not a veth into ``host_netns`` is refused, naming it.
    """
    path = netns_path(host_netns)
    where = f"{pod_netns}:{link.ifname}"
    if link.peer_ifindex <= 0:
        raise BpfConfigError(f"{where} is not a veth (no peer interface)", where="ifname",
                             hint="peer authentication needs the pod's host-side veth")
    pod_index = None
    with _ipr(netns_path(pod_netns)) as ipr:
        found = ipr.link_lookup(ifname=link.ifname)
        if found:
            pod_index = int(found[0])
    with _ipr(path) as ipr:
        for msg in ipr.get_links(link.peer_ifindex):
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind == "veth" and msg.get_attr("IFLA_LINK") == pod_index:
                return str(msg.get_attr("IFLA_IFNAME"))
    raise BpfConfigError(f"the veth peer of {where} is not in {path}", where="ifname",
                         hint="the agent must run in the netns holding the pods' host-side veths")
