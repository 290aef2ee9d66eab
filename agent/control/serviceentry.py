"""Istio's ServiceEntry as nodemesh holds it, and the services it adds to a snapshot. Pure.

How this works: ``validate_serviceentry.py`` turns the YAML users write for Istio
(``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``) into a frozen
:class:`ServiceEntry`; apply gives an entry without ``addresses`` one VIP per
host from the VIP range (``auto_addresses``, kept across re-applies, as
Istio's DNS proxy allocates them), and it is stored as JSON
(:func:`service_entry_doc` / :func:`service_entry_from_doc`).

Once per snapshot, :func:`compile_entries` turns the entries into one
:class:`EntryService` per host: a :class:`~agent.control.model.Service` whose
``name`` is the host (so VirtualServices, DestinationRules, load balancing,
connection pools, outlier detection and Istio's metrics apply to it as to any
service) with its endpoints already made, and an index from every address
that reaches it. Endpoints by resolution:

- ``STATIC``: the entry's endpoints (IP addresses);
- ``DNS`` / ``DNS_ROUND_ROBIN``: the entry's endpoints, or the host itself;
  their names are resolved when the proxy dials (:mod:`agent.dataplane.egress`);
- ``NONE``: the address the app dialled (one endpoint per entry address).

``MESH_EXTERNAL`` endpoints are dialled straight from the node (``external``:
no HBONE, there is no agent there); ``MESH_INTERNAL`` endpoints are mesh
workloads (found by address; reached like any workload, over HBONE when on
another node).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.control.model import (
    Health,
    Protocol,
    Service,
    ServicePort,
    Workload,
)

LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
# Istio's port protocols -> how the proxy treats the port (HTTPS, TLS and the databases are opaque)
PROTOCOLS: Mapping[str, Protocol] = MappingProxyType({
    "HTTP": Protocol.HTTP, "HTTP2": Protocol.HTTP2, "GRPC": Protocol.GRPC, "GRPC-WEB": Protocol.HTTP,
    "TCP": Protocol.TCP, "HTTPS": Protocol.TCP, "TLS": Protocol.TCP, "MONGO": Protocol.TCP,
    "MYSQL": Protocol.TCP, "REDIS": Protocol.TCP,
})
HOST_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+\Z", re.ASCII)


@dataclass(frozen=True, slots=True)
class EntryPort:
    number: int
    name: str
    protocol: str = ""  # Istio's name (HTTP, TCP, ...); "": from the port name's prefix
    target_port: int = 0  # 0: the endpoint's port of that name, else ``number``


@dataclass(frozen=True, slots=True)
class EntryEndpoint:
    address: str  # an IP address, or (resolution DNS) a host name
    ports: tuple[tuple[str, int], ...] = ()  # entry port name -> this endpoint's port
    labels: tuple[tuple[str, str], ...] = ()
    locality: str = ""
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    name: str
    namespace: str
    hosts: tuple[str, ...]
    ports: tuple[EntryPort, ...]
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    addresses: tuple[str, ...] = ()  # the user's addresses (IPs)
    endpoints: tuple[EntryEndpoint, ...] = ()
    auto_addresses: tuple[str, ...] = ()  # one VIP per host, allocated by apply when no addresses
    source: str = ""  # file:line it was applied from

    def __post_init__(self) -> None:
        if self.location not in LOCATIONS:
            raise ValueError(f"unknown location {self.location!r}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {self.resolution!r}")
        if not self.hosts or not self.ports:
            raise ValueError("a ServiceEntry needs hosts and ports")
        for h in self.hosts:  # (a stored value written around apply: refused when decoded)
            if not HOST_RE.match(h):
                raise ValueError(f"bad ServiceEntry host {h!r}")
        for p in self.ports:
            if not (1 <= p.number <= 65535 and 0 <= p.target_port <= 65535):
                raise ValueError(f"port {p.number} (targetPort {p.target_port}) out of range")
        for e in self.endpoints:
            if not (1 <= e.weight <= 10000 and all(0 < n <= 65535 for _, n in e.ports)):
                raise ValueError(f"endpoint {e.address}: weight {e.weight} or ports {e.ports} out of range")
        for a in (*self.addresses, *self.auto_addresses):
            ipaddress.ip_address(a)
        if self.auto_addresses and len(self.auto_addresses) != len(self.hosts):
            raise ValueError("auto_addresses: one per host")

    @property
    def ref(self) -> str:
        return f"ServiceEntry {self.namespace}/{self.name}"

    @property
    def needs_vips(self) -> bool:
        """Apply allocates one VIP per host when the entry gives no addresses."""
        return not self.addresses

    def addresses_of(self, i: int) -> tuple[str, ...]:
        """The addresses of host ``i``: the entry's own, else its allocated VIP."""
        if self.addresses:
            return self.addresses
        return (self.auto_addresses[i],) if i < len(self.auto_addresses) else ()


@dataclass(frozen=True, slots=True)
class EntryService(Service):
    """One host of a ServiceEntry, as the data path sees a service: ``name`` is the host,
    ``vip`` its first address."""

    resolution: str = "NONE"
    addresses: tuple[str, ...] = ()  # every address that reaches it (the DNS answer)
    by_port: Mapping[int, tuple[Any, ...]] = field(default_factory=dict)  # port -> Endpoints
    # an endpoint's labels (entry endpoints' own; a DestinationRule subset selects by them)
    labels_of: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:  # (a host, not a Service name)
        if not HOST_RE.match(self.name):
            raise ValueError(f"bad ServiceEntry host {self.name!r}")

    @property
    def fqdn(self) -> str:
        return self.name


def _service_port(p: EntryPort) -> ServicePort:
    return ServicePort(p.name, p.number, p.target_port or p.number,
                       PROTOCOLS.get(p.protocol.upper()) if p.protocol else None)


def compile_entries(
    entries: Iterable[ServiceEntry], workload_at: Callable[[str], Workload | None],
    health: Callable[[Workload], Health], endpoint: Callable[..., Any],
) -> tuple[Mapping[str, EntryService], Mapping[str, EntryService]]:
    """(host -> EntryService, address -> EntryService) of a snapshot's entries. Entries are
    taken by (namespace, name); a host or address an earlier entry has is left to it (apply
    refuses such input; this only guards what was written around it). ``endpoint`` builds
    the snapshot's Endpoint (passed in: the snapshot module owns that type)."""
    by_host: dict[str, EntryService] = {}
    by_address: dict[str, EntryService] = {}
    for se in sorted(entries, key=lambda e: (e.namespace, e.name)):
        for i, host in enumerate(se.hosts):
            if host in by_host:
                continue
            addrs = se.addresses_of(i)
            # Envoy's round robin follows endpoint weights
            lb = "WEIGHTED_ROUND_ROBIN" if any(e.weight != 1 for e in se.endpoints) else "ROUND_ROBIN"
            by_port: dict[int, tuple[Any, ...]] = {}
            for p in se.ports:
                by_port[p.number] = tuple(_endpoints(se, host, p, addrs, workload_at, health, endpoint))
            svc = EntryService(
                name=host, namespace=se.namespace, vip=addrs[0] if addrs else "",
                ports=tuple(_service_port(p) for p in se.ports), lb_policy=lb,
                resolution=se.resolution, addresses=addrs, by_port=MappingProxyType(by_port),
                labels_of=MappingProxyType({e.address: dict(e.labels) for e in se.endpoints if e.labels}),
            )
            by_host[host] = svc
            for a in addrs:
                by_address.setdefault(a, svc)
    return MappingProxyType(by_host), MappingProxyType(by_address)


def _endpoints(se: ServiceEntry, host: str, p: EntryPort, addrs: tuple[str, ...],
               workload_at: Callable[[str], Workload | None], health: Callable[[Workload], Health],
               endpoint: Callable[..., Any]) -> Iterable[Any]:
    target = p.target_port or p.number
    external = se.location == "MESH_EXTERNAL"
    if se.resolution == "NONE":  # the original destination: one per address
        for a in addrs:
            yield endpoint(se.namespace, a, a, target, 1, "", "", "default", Health.PASSING, external=True)
        return
    eps = se.endpoints or ((EntryEndpoint(host),) if se.resolution != "STATIC" else ())
    for e in eps:
        port = dict(e.ports).get(p.name, target)
        w = None if external else workload_at(e.address)
        if w is not None:  # MESH_INTERNAL: the workload at that address, reached as any
            yield endpoint(w.namespace, w.name, w.address, port, e.weight, e.locality or w.locality,
                           w.node, w.service_account, health(w))
        else:
            yield endpoint(se.namespace, e.address, e.address, port, e.weight, e.locality, "",
                           "default", Health.PASSING, external=external)


# -- stored form ------------------------------------------------------------------------------

def service_entry_doc(se: ServiceEntry) -> dict[str, Any]:
    return {
        "name": se.name, "namespace": se.namespace, "hosts": list(se.hosts),
        "ports": [{"number": p.number, "name": p.name, "protocol": p.protocol,
                   "targetPort": p.target_port} for p in se.ports],
        "location": se.location, "resolution": se.resolution, "addresses": list(se.addresses),
        "endpoints": [{"address": e.address, "ports": dict(e.ports), "labels": dict(e.labels),
                       "locality": e.locality, "weight": e.weight} for e in se.endpoints],
        "autoAddresses": list(se.auto_addresses), "source": se.source,
    }


def service_entry_from_doc(d: Mapping[str, Any]) -> ServiceEntry:
    return ServiceEntry(
        name=d["name"], namespace=d["namespace"], hosts=tuple(str(h) for h in d["hosts"]),
        ports=tuple(EntryPort(int(p["number"]), str(p["name"]), str(p.get("protocol", "")),
                              int(p.get("targetPort", 0))) for p in d["ports"]),
        location=d.get("location", "MESH_EXTERNAL"), resolution=d.get("resolution", "NONE"),
        addresses=tuple(d.get("addresses", ())),
        endpoints=tuple(EntryEndpoint(str(e["address"]),
                                      tuple(sorted((str(k), int(v)) for k, v in e.get("ports", {}).items())),
                                      tuple(sorted((str(k), str(v)) for k, v in e.get("labels", {}).items())),
                                      str(e.get("locality", "")), int(e.get("weight", 1)))
                        for e in d.get("endpoints", ())),
        auto_addresses=tuple(d.get("autoAddresses", ())), source=str(d.get("source", "")),
    )


def with_vips(se: ServiceEntry, old: ServiceEntry | None, next_free: Callable[[], str | None],
              ) -> ServiceEntry:
    """``se`` with one VIP per host (an entry without ``addresses``): a host the stored entry
    ``old`` had keeps its VIP, a new one takes ``next_free()``. ValueError when none is left."""
    if not se.needs_vips:
        return se
    kept = {}
    if old is not None and not old.addresses:
        kept = dict(zip(old.hosts, old.auto_addresses, strict=False))
    vips: list[str] = []
    for h in se.hosts:
        vip = kept.get(h) or next_free()
        if vip is None:
            raise ValueError("no free VIP left")
        vips.append(vip)
    return ServiceEntry(se.name, se.namespace, se.hosts, se.ports, se.location, se.resolution, se.addresses,
                        se.endpoints, tuple(vips), se.source)


def route_names(host: str) -> tuple[str, ...]:
    """The names a VirtualService or DestinationRule host resolves to for this entry host
    (:func:`agent.control.istio.host_fqdn` reads a two-label host as ``<svc>.<ns>``, so
    ``example.com`` is also found as ``example.com.svc.cluster.local``)."""
    return (host, f"{host}.svc.cluster.local") if host.count(".") == 1 else (host,)
