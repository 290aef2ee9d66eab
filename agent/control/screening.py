"""Which workload addresses the proxy may connect to: pure checks shared by apply and the agent.

How this works: :func:`address_problem` says why an address can never be a
workload's (loopback, unspecified, link-local, multicast, broadcast; IPv4-mapped
IPv6 is judged as the IPv4 address it maps). ``nodemesh apply`` and ``register``
refuse such workloads, and duplicate addresses, before writing anything
(:mod:`agent.control.validate`, :mod:`agent.control.apply`).

The registry does not know the nodes' own addresses, and a registry written
around apply (etcd by hand, an edited state file) was never validated, so every
agent screens each snapshot again with :meth:`WorkloadGuard.screen`: a workload
at a forbidden address, at one of this agent's addresses, a peer node's or a
control-plane address (etcd, the CA service), or sharing its address with another
workload, is left out of the snapshot the data path routes by (inbound and
outbound alike), with one :class:`Rejection` per workload naming why. One
exception: a *host workload*, a service running on a node itself (a Consul
definition without ``address``), has the host (HBONE) address of the node it
names; it is accepted, and host workloads of one node share that address, each
on its own ports (:meth:`WorkloadGuard.is_host`). Logging
the rejections (once, when they change) and counting them is the caller's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.control.model import Workload
from agent.control.snapshot import NsName, Snapshot

log = logging.getLogger(__name__)

# The label `nodemesh register` gives a host workload (a Consul definition without address);
# apply lets host workloads of one node share its address on distinct ports.
HOST_LABEL = "nodemesh.io/host"

# Bounded label values of nodemesh_registry_rejected_workloads{reason}.
REASONS = ("loopback", "unspecified", "link_local", "multicast", "broadcast",
           "node_address", "control_plane", "duplicate")

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}\Z", re.ASCII)  # canonical only

_DETAIL = {
    "loopback": "is a loopback address: the proxy would connect to the node itself",
    "unspecified": "is an unspecified address (0.0.0.0/8 or ::): it names no workload",
    "link_local": "is link-local (169.254.0.0/16, fe80::/10): it is not routable to a workload",
    "multicast": "is a multicast address: a workload needs a unicast address",
    "broadcast": "is the broadcast address: a workload needs a unicast address",
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a workload may not take traffic: a bounded ``reason`` and a sentence for people."""

    reason: str  # one of REASONS
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


def _v4_problem(first: int, second: int, address: str) -> str | None:
    if first == 127:
        return "loopback"
    if first == 0:
        return "unspecified"
    if first == 169 and second == 254:
        return "link_local"
    if 224 <= first <= 239:
        return "multicast"
    if address == "255.255.255.255":
        return "broadcast"
    return None


def address_key(address: str) -> str:
    """The form addresses are compared in: canonical text, IPv4-mapped IPv6 as IPv4.
    ValueError if ``address`` is not an IP address."""
    if _V4.match(address):
        return address
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def address_problem(address: str) -> Rejection | None:
    """Why ``address`` can never be a workload's, or None. ValueError if it is no address."""
    m = _V4.match(address)
    if m:  # the common case, without ipaddress (every agent checks every workload)
        reason = _v4_problem(int(m.group(1)), int(m.group(2)), address)
    else:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return address_problem(str(ip.ipv4_mapped))
        reason = ("loopback" if ip.is_loopback else "unspecified" if ip.is_unspecified
                  else "link_local" if ip.is_link_local else "multicast" if ip.is_multicast
                  else None)
    return None if reason is None else Rejection(reason, f"{address} {_DETAIL[reason]}")


@dataclass(frozen=True, slots=True)
class WorkloadGuard:
    """Addresses no workload may have on this agent: ``address key -> (reason, what it is)``."""

    reserved: Mapping[str, tuple[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    # host address key -> the node it is the host address of (this agent's hbone, its peers')
    hosts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, own: Mapping[str, str], peers: Mapping[str, str],
           control_plane: Iterable[str] = (), *, node: str = "") -> WorkloadGuard:
        """``own``: this agent's addresses by role (proxy, hbone, metrics); ``peers``: node
        name -> address; ``control_plane``: etcd and CA hosts (names that are not IP
        addresses are skipped: a workload address is always one); ``node``: this agent's
        node name (with it, workloads of a node at its host address are host workloads)."""
        out: dict[str, tuple[str, str]] = {}
        hosts = {address_key(addr): name for name, addr in peers.items()}
        if node and "hbone" in own:
            hosts[address_key(own["hbone"])] = node
        for host in control_plane:
            try:
                out[address_key(host)] = ("control_plane", f"a control-plane address ({host})")
            except ValueError:
                continue
        for name, addr in peers.items():
            out[address_key(addr)] = ("node_address", f"the address of node {name}")
        roles: dict[str, list[str]] = {}
        for role, addr in own.items():
            roles.setdefault(address_key(addr), []).append(role)
        for key, names in roles.items():
            out[key] = ("node_address", f"this agent's {' and '.join(names)} address")
        # a control-plane address is never a host workload's
        hosts = {k: n for k, n in hosts.items() if out[k][0] != "control_plane"}
        return cls(MappingProxyType(out), MappingProxyType(hosts))

    def is_host(self, w: Workload) -> bool:
        """``w`` runs on its node's host itself: its address is the host address of its node
        (and it has ports: a host workload is reached on its ports only)."""
        if not self.hosts or not w.node or not w.ports:
            return False
        try:
            return self.hosts.get(address_key(w.address)) == w.node
        except ValueError:
            return False

    def check(self, w: Workload) -> Rejection | None:
        """The rejection of one workload on its own (duplicates need the whole snapshot)."""
        try:
            problem = address_problem(w.address)
            key = address_key(w.address)
        except ValueError:  # the model validates addresses; a guard does not trust that
            return Rejection("unspecified", f"{w.address!r} is not an IP address")
        hit = self.reserved.get(key)  # first: "this agent's hbone address" says more than "loopback"
        if hit is not None and hit[0] == "node_address" and self.is_host(w):
            return None  # a host workload
        if hit is not None:
            return Rejection(hit[0], f"{w.address} is {hit[1]}")
        return problem

    def screen(self, snapshot: Snapshot) -> tuple[Snapshot, Mapping[NsName, Rejection]]:
        """``snapshot`` without the workloads that may not take traffic, and why each left.
        The same snapshot object when nothing is rejected (the common case: no copies)."""
        rejected: dict[NsName, Rejection] = {}
        holders: dict[str, list[NsName]] = {}
        for key, w in snapshot.workloads.items():
            r = self.check(w)
            if r is not None:
                rejected[key] = r
            elif self.is_host(w):  # host workloads share their node's address, not a port
                for port in set(w.ports.values()):
                    holders.setdefault(f"{address_key(w.address)}:{port}", []).append(key)
            else:
                holders.setdefault(address_key(w.address), []).append(key)
        for addr, keys in holders.items():
            if len(keys) > 1:  # nobody can tell which one is real: none takes traffic
                names = ", ".join(f"{ns}/{n}" for ns, n in sorted(keys))
                for k in keys:
                    rejected[k] = Rejection("duplicate", f"{addr} is shared by workloads {names}")
        if not rejected:
            return snapshot, MappingProxyType({})
        workloads = {k: w for k, w in snapshot.workloads.items() if k not in rejected}
        members = {s: tuple(k for k in ks if k not in rejected)
                   for s, ks in snapshot.members.items()}
        screened = dataclasses.replace(snapshot, workloads=MappingProxyType(workloads),
                                       members=MappingProxyType(members))
        return screened, MappingProxyType(rejected)


MAX_LOG_LINES = 10


def report_changes(before: Mapping[NsName, Rejection], after: Mapping[NsName, Rejection]) -> None:
    """Log workloads newly rejected (at most MAX_LOG_LINES lines, then a count) and those
    that take traffic again; called when a snapshot is screened, never per connection."""
    new = sorted((k, r) for k, r in after.items() if before.get(k) != r)
    for (ns, name), r in new[:MAX_LOG_LINES]:
        log.warning("registry: workload %s/%s takes no traffic: %s", ns, name, r.detail)
    if len(new) > MAX_LOG_LINES:
        log.warning("registry: %d more workloads take no traffic (see nodemesh_registry_"
                    "rejected_workloads)", len(new) - MAX_LOG_LINES)
    cleared = [k for k in before if k not in after]
    if cleared:
        log.info("registry: %d previously rejected workloads are accepted again (or gone)",
                 len(cleared))


class RejectedWorkloadsCollector(Collector):
    """nodemesh_registry_rejected_workloads{reason}: workloads left out of routing, read at scrape."""

    def __init__(self, read: Callable[[], Mapping[NsName, Rejection]]) -> None:
        self.read = read

    def collect(self) -> list[Metric]:
        fam = GaugeMetricFamily("nodemesh_registry_rejected_workloads",
                                "Registry workloads this agent does not route to, by reason",
                                labels=("reason",))
        counts = dict.fromkeys(REASONS, 0)
        for r in self.read().values():
            counts[r.reason] += 1
        for reason, n in counts.items():
            fam.add_metric((reason,), n)
        return [fam]
