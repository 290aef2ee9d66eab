"""Immutable, versioned snapshots of the registry, and endpoint selection.

How this works: a backend hands us stored key/value pairs (JSON text). A
:class:`SnapshotBuilder` decodes them as they arrive (a full reset, or puts and
deletes from a watch) and :meth:`SnapshotBuilder.build` freezes the current
state into a :class:`Snapshot` tagged with the backend revision. Membership
(which workloads a service selects) is computed once per snapshot through a
label index, so readers never scan.

The data path only ever reads a ``Snapshot``: :func:`healthy_endpoints` is the
pure function the proxy uses to get the endpoints of ``VIP:port`` that may take
traffic (passing or warning; critical ones leave load balancing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.control.model import (
    Health,
    HealthStatus,
    Service,
    Workload,
    health_from_doc,
    selects,
    service_from_doc,
    split_key,
    workload_from_doc,
)

log = logging.getLogger(__name__)

NsName = tuple[str, str]  # (namespace, name)

_EMPTY: Mapping[NsName, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload behind one service port: where the proxy connects."""

    namespace: str
    workload: str
    address: str
    port: int
    weight: int
    locality: str
    node: str
    service_account: str
    health: Health


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    revision: int
    services: Mapping[NsName, Service] = field(default_factory=lambda: MappingProxyType({}))
    workloads: Mapping[NsName, Workload] = field(default_factory=lambda: MappingProxyType({}))
    health: Mapping[NsName, HealthStatus] = field(default_factory=lambda: MappingProxyType({}))
    members: Mapping[NsName, tuple[NsName, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    by_vip: Mapping[str, NsName] = field(default_factory=lambda: MappingProxyType({}))

    def service(self, namespace: str, name: str) -> Service | None:
        return self.services.get((namespace, name))

    def service_by_vip(self, vip: str) -> Service | None:
        k = self.by_vip.get(vip)
        return None if k is None else self.services.get(k)

    def effective_health(self, namespace: str, name: str) -> Health:
        """Observed status if an agent reported one, else the checks' initial status,
        else the declared health."""
        observed = self.health.get((namespace, name))
        if observed is not None:
            return observed.status
        w = self.workloads.get((namespace, name))
        if w is None:
            return Health.CRITICAL
        if w.checks:
            return worst(c.initial_status for c in w.checks)
        return w.health


_RANK = {Health.PASSING: 0, Health.WARNING: 1, Health.CRITICAL: 2}


def worst(states: Iterable[Health]) -> Health:
    return max(states, key=_RANK.__getitem__, default=Health.PASSING)


def endpoints(snapshot: Snapshot, service: Service, port: int) -> tuple[Endpoint, ...]:
    """All endpoints of ``service`` on service port ``port``, whatever their health."""
    sp = next((p for p in service.ports if p.port == port), None)
    if sp is None:
        return ()
    out = []
    for key in snapshot.members.get((service.namespace, service.name), ()):
        w = snapshot.workloads[key]
        if isinstance(sp.target_port, int):
            target = sp.target_port
        elif sp.target_port in w.ports:
            target = w.ports[sp.target_port]
        else:
            continue  # the workload does not expose the named port
        out.append(Endpoint(w.namespace, w.name, w.address, target, w.weight, w.locality,
                            w.node, w.service_account, snapshot.effective_health(*key)))
    return tuple(out)


def healthy_endpoints(snapshot: Snapshot, service: Service, port: int) -> tuple[Endpoint, ...]:
    """Endpoints that may take traffic: passing or warning (Consul's default)."""
    return tuple(e for e in endpoints(snapshot, service, port) if e.health != Health.CRITICAL)


class SnapshotBuilder:
    """Mutable decoded state, fed by a backend; freezes into Snapshots."""

    def __init__(self) -> None:
        self._services: dict[NsName, Service] = {}
        self._workloads: dict[NsName, Workload] = {}
        self._health: dict[NsName, HealthStatus] = {}
        self.raw: dict[str, str] = {}

    def reset(self, items: Mapping[str, str]) -> None:
        self._services.clear()
        self._workloads.clear()
        self._health.clear()
        self.raw.clear()
        self.apply(items, ())

    def apply(self, puts: Mapping[str, str], deletes: Iterable[str]) -> None:
        for key in deletes:
            self.raw.pop(key, None)
            parts = split_key(key)
            if parts is not None:
                self._table(parts[0]).pop((parts[1], parts[2]), None)
        for key, value in puts.items():
            parts = split_key(key)
            if parts is None:
                continue
            self.raw[key] = value
            kind, ns, name = parts
            try:
                doc = json.loads(value)
                obj: Service | Workload | HealthStatus
                if kind == "service":
                    obj = service_from_doc(doc)
                elif kind == "workload":
                    obj = workload_from_doc(doc)
                else:
                    obj = health_from_doc(doc)
            except (ValueError, KeyError, TypeError) as e:
                # Written by someone else, not through our validation: skip, keep serving.
                log.warning("registry: ignoring invalid stored value at %s: %s", key, e)
                self._table(kind).pop((ns, name), None)
                continue
            self._table(kind)[(ns, name)] = obj

    def _table(self, kind: str) -> dict[NsName, object]:
        if kind == "service":
            return self._services  # type: ignore[return-value]
        if kind == "workload":
            return self._workloads  # type: ignore[return-value]
        return self._health  # type: ignore[return-value]

    def build(self, revision: int) -> Snapshot:
        index: dict[tuple[str, str, str], set[NsName]] = {}
        for key, w in self._workloads.items():
            for lk, lv in w.labels.items():
                index.setdefault((w.namespace, lk, lv), set()).add(key)
        members: dict[NsName, tuple[NsName, ...]] = {}
        by_vip: dict[str, NsName] = {}
        for skey, s in self._services.items():
            by_vip[s.vip] = skey
            if not s.selector:
                members[skey] = ()
                continue
            sets = [index.get((s.namespace, k, v), set()) for k, v in s.selector.items()]
            chosen = set.intersection(*sets) if sets else set()
            members[skey] = tuple(sorted(
                k for k in chosen if selects(s.selector, self._workloads[k].labels)))
        return Snapshot(
            revision=revision,
            services=MappingProxyType(dict(self._services)),
            workloads=MappingProxyType(dict(self._workloads)),
            health=MappingProxyType(dict(self._health)),
            members=MappingProxyType(members),
            by_vip=MappingProxyType(by_vip),
        )
