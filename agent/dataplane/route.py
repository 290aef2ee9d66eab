"""Where does a captured connection go? Pure decisions over a registry snapshot.

How this works: :class:`Directory` indexes one snapshot by address once (the
snapshot is immutable, so the index is built when a new snapshot arrives, not
per connection). :func:`decide` takes the original destination the eBPF
programs recorded and returns a :class:`Route`: the service and its healthy
endpoints when the destination is a service VIP, the one workload when it is a
pod address, or a :class:`RouteError` naming why not. A route is computed once
per destination and snapshot (the directory keeps it; a new snapshot is a new
directory), not per connection. Endpoint choice is :mod:`agent.dataplane.lb`'s
job; connecting is the proxy's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.control.model import Protocol, Service, Workload, l7_protocol, selects
from agent.control.screening import Rejection, WorkloadGuard
from agent.control.serviceentry import EntryService
from agent.control.snapshot import Endpoint, NsName, Snapshot, healthy_endpoints
from agent.dataplane.lb import Policy


class RouteError(Exception):
    """No route; ``flag`` is the Istio-style response flag for metrics and logs."""

    def __init__(self, message: str, flag: str) -> None:
        super().__init__(message)
        self.flag = flag


class UnknownDestination(RouteError):
    """Neither a service, a ServiceEntry nor a workload: what REGISTRY_ONLY refuses."""


@dataclass(frozen=True, slots=True)
class Route:
    service: Service | None  # None when the app dialled a pod address directly
    port: int  # the port the app dialled
    endpoints: tuple[Endpoint, ...]  # healthy ones; empty: none (the caller answers UH)
    policy: Policy
    protocol: Protocol | None = None  # the service port's declared protocol; None: sniff

    @property
    def service_key(self) -> str:
        return f"{self.service.namespace}/{self.service.name}" if self.service else ""

    @property
    def service_host(self) -> str:
        """Istio's destination_service label: <name>.<namespace>.svc.cluster.local."""
        return self.service.fqdn if self.service else "unknown"


@dataclass(frozen=True, slots=True)
class Directory:
    """One snapshot, indexed by workload address."""

    snapshot: Snapshot
    by_address: Mapping[str, Workload]
    rejected: Mapping[NsName, Rejection] = field(default_factory=dict)  # left out by the guard: why
    # (address, port) -> its route in this snapshot; only found routes (an unknown address
    # is one a pod may vary at will); cleared past MAX_CACHED_ROUTES
    routes: dict[tuple[str, int], Route] = field(default_factory=dict, compare=False, repr=False)
    protocols: dict[tuple[str, int], Protocol | None] = field(default_factory=dict, compare=False, repr=False)
    # host workloads (services on a node itself, sharing its address): (address, port) -> workload
    hosts: Mapping[tuple[str, int], Workload] = field(default_factory=dict)

    @classmethod
    def build(cls, snapshot: Snapshot, guard: WorkloadGuard | None = None) -> Directory:
        """With a ``guard`` (the agent always has one), workloads at addresses the proxy must
        never dial (loopback, this node, peers, duplicates...) are left out of ``snapshot``
        itself, so neither a pod address nor a service's endpoints can reach them. Without
        one the snapshot is trusted as is (tests whose pods live on loopback)."""
        rejected: Mapping[NsName, Rejection] = MappingProxyType({})
        if guard is not None:
            snapshot, rejected = guard.screen(snapshot)
        idx: dict[str, Workload] = {}
        hosts: dict[tuple[str, int], Workload] = {}
        for w in snapshot.workloads.values():
            if guard is not None and guard.is_host(w):
                for port in w.ports.values():
                    hosts[(w.address, port)] = w
                idx.setdefault(w.address, w)  # (by address alone: one of them, for metrics)
            else:
                idx[w.address] = w
        return cls(snapshot, MappingProxyType(idx), rejected, hosts=MappingProxyType(hosts))

    def workload_at(self, address: str) -> Workload | None:
        return self.by_address.get(address)

    def local_workload_at(self, address: str, node: str, port: int = 0) -> Workload | None:
        w = self.workload_for(address, port) if port else self.by_address.get(address)
        return w if w is not None and w.node == node else None

    def workload_for(self, address: str, port: int) -> Workload | None:
        """The workload serving ``address:port``: a host workload on that port, else the
        workload at the address."""
        if self.hosts:
            w = self.hosts.get((address, port))
            if w is not None:
                return w
        return self.by_address.get(address)

    def host_workload(self, node: str, name: str) -> Workload | None:
        """The host workload ``name`` of ``node`` (any namespace; the first by namespace)."""
        found = [w for w in self.hosts.values() if w.node == node and w.name == name]
        return min(found, key=lambda w: w.namespace) if found else None

    def pod_port_protocol(self, w: Workload, port: int) -> Protocol | None:
        """The protocol a service selecting ``w`` declares for its target ``port`` (the
        first service port that declares one); None: undeclared (the proxy sniffs)."""
        key = (w.address, -port)
        if key in self.protocols:
            return self.protocols[key]
        found: Protocol | None = None
        for svc in self.snapshot.services.values():
            if not selects(svc.selector, w.labels):
                continue
            for sp in svc.ports:
                target = sp.target_port if isinstance(sp.target_port, int) else w.ports.get(sp.target_port)
                if target == port:
                    found = l7_protocol(sp)
                    if found is not None:
                        break
            if found is not None:
                break
        if len(self.protocols) >= MAX_CACHED_ROUTES:
            self.protocols.clear()
        self.protocols[key] = found
        return found


def policy_of(service: Service) -> Policy:
    return Policy.parse(service.lb_policy)


MAX_CACHED_ROUTES = 4096


def decide(directory: Directory, dst_address: str, dst_port: int) -> Route:
    key = (dst_address, dst_port)
    route = directory.routes.get(key)
    if route is None:
        route = _decide(directory, dst_address, dst_port)
        if len(directory.routes) >= MAX_CACHED_ROUTES:
            directory.routes.clear()
        directory.routes[key] = route
    return route


def _decide(directory: Directory, dst_address: str, dst_port: int) -> Route:
    snap = directory.snapshot
    svc = snap.service_by_vip(dst_address)
    if svc is not None:
        if not any(p.port == dst_port for p in svc.ports):
            raise RouteError(
                f"service {svc.namespace}/{svc.name} ({dst_address}) has no port {dst_port}", flag="NR"
            )
        eps = healthy_endpoints(snap, svc, dst_port)
        sp = next(p for p in svc.ports if p.port == dst_port)
        return Route(svc, dst_port, eps, policy_of(svc), l7_protocol(sp))
    es = snap.entry_by_address.get(dst_address)
    if es is not None:  # a ServiceEntry's address (its own, or the VIP apply gave its host)
        return _entry_route(snap, es, dst_address, dst_port)
    w = directory.workload_at(dst_address)
    if w is not None:
        health = snap.effective_health(w.namespace, w.name)
        ep = Endpoint(
            w.namespace, w.name, w.address, dst_port, w.weight, w.locality, w.node, w.service_account, health
        )
        return Route(None, dst_port, (ep,), Policy.ROUND_ROBIN)
    raise UnknownDestination(f"{dst_address}:{dst_port} is neither a service VIP nor a known workload "
                             "(nor a ServiceEntry address)", flag="NR")


def _entry_route(snap: Snapshot, es: EntryService, dst_address: str, dst_port: int) -> Route:
    sp = next((p for p in es.ports if p.port == dst_port), None)
    if sp is None:
        raise RouteError(f"ServiceEntry host {es.name} ({dst_address}) has no port {dst_port}", flag="NR")
    eps = healthy_endpoints(snap, es, dst_port)
    if es.resolution == "NONE":  # the address the app dialled, and no other
        eps = tuple(e for e in eps if e.address == dst_address)
    return Route(es, dst_port, eps, policy_of(es), l7_protocol(sp))


def identity_nodes(snapshot: Snapshot) -> Mapping[tuple[str, str], frozenset[str]]:
    """(namespace, service account) -> the nodes the registry places its workloads on."""
    places: dict[tuple[str, str], set[str]] = {}
    for w in snapshot.workloads.values():
        if w.node:
            places.setdefault((w.namespace, w.service_account), set()).add(w.node)
    return MappingProxyType({k: frozenset(v) for k, v in places.items()})
