"""Immutable, versioned snapshots of the registry, and endpoint selection.

How this works: a backend hands us stored key/value pairs (JSON text). A
:class:`SnapshotBuilder` decodes them as they arrive (a full reset, or puts and
deletes from a watch) and :meth:`SnapshotBuilder.build` freezes the current
state into a :class:`Snapshot` tagged with the backend revision. Membership
(which workloads a service selects) is kept through a label index and
recomputed only for the services a change touches; readers never scan.

Istio's VirtualServices, DestinationRules, AuthorizationPolicies,
RequestAuthentications and PeerAuthentications are kept
as decoded, by (namespace, name), in their own tables; which service or
workload each one applies to is the data path's business
(:mod:`agent.dataplane.http.routing`, :func:`agent.control.authz.applicable`).

The data path only ever reads a ``Snapshot``: :func:`healthy_endpoints` is the
pure function the proxy uses to get the endpoints of ``VIP:port`` that may take
traffic (passing or warning; critical ones leave load balancing).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.control.authz import ACTIONS, AuthorizationPolicy, Rule, policy_from_doc
from agent.control.gateway import Gateway, gateway_from_doc
from agent.control.istio import (
    DestinationRule,
    VirtualService,
    destination_rule_from_doc,
    virtual_service_from_doc,
)
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
from agent.control.peerauthn import PeerAuthentication, peer_authentication_from_doc
from agent.control.ratelimit import RateLimitPolicy, rate_limit_from_doc
from agent.control.reqauthn import RequestAuthentication, request_authentication_from_doc
from agent.control.serviceentry import EntryService, ServiceEntry, compile_entries, service_entry_from_doc

log = logging.getLogger(__name__)

NsName = tuple[str, str]  # (namespace, name)
# one stored value
_Decoded = (Service | Workload | HealthStatus | VirtualService | DestinationRule | AuthorizationPolicy
            | RequestAuthentication | PeerAuthentication | RateLimitPolicy | Gateway | ServiceEntry)

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
    external: bool = False  # a ServiceEntry's MESH_EXTERNAL endpoint: dialled from the node, no HBONE


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    revision: int
    services: Mapping[NsName, Service] = field(default_factory=lambda: MappingProxyType({}))
    workloads: Mapping[NsName, Workload] = field(default_factory=lambda: MappingProxyType({}))
    health: Mapping[NsName, HealthStatus] = field(default_factory=lambda: MappingProxyType({}))
    members: Mapping[NsName, tuple[NsName, ...]] = field(
        default_factory=lambda: MappingProxyType({}))
    by_vip: Mapping[str, NsName] = field(default_factory=lambda: MappingProxyType({}))
    virtual_services: Mapping[NsName, VirtualService] = field(
        default_factory=lambda: MappingProxyType({}))
    destination_rules: Mapping[NsName, DestinationRule] = field(
        default_factory=lambda: MappingProxyType({}))
    authorization_policies: Mapping[NsName, AuthorizationPolicy] = field(
        default_factory=lambda: MappingProxyType({}))
    request_authentications: Mapping[NsName, RequestAuthentication] = field(
        default_factory=lambda: MappingProxyType({}))
    peer_authentications: Mapping[NsName, PeerAuthentication] = field(
        default_factory=lambda: MappingProxyType({}))
    rate_limit_policies: Mapping[NsName, RateLimitPolicy] = field(
        default_factory=lambda: MappingProxyType({}))
    gateways: Mapping[NsName, Gateway] = field(default_factory=lambda: MappingProxyType({}))
    service_entries: Mapping[NsName, ServiceEntry] = field(default_factory=lambda: MappingProxyType({}))
    # compiled from service_entries (agent.control.serviceentry): host -> service, address -> service
    entry_services: Mapping[str, EntryService] = field(default_factory=lambda: MappingProxyType({}))
    entry_by_address: Mapping[str, EntryService] = field(default_factory=lambda: MappingProxyType({}))

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
    if isinstance(service, EntryService):  # made when the snapshot was built
        # a MESH_INTERNAL endpoint only while its workload is in this snapshot (the agent's
        # screened one leaves out workloads at addresses it must never dial)
        return tuple(e for e in service.by_port.get(port, ())
                     if e.external or (e.namespace, e.workload) in snapshot.workloads)
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
    """Mutable decoded state, fed by a backend; freezes into Snapshots.

    Incremental: a put whose stored text equals what we hold is skipped, others
    decode only their own key. The label index, each service's members and the
    VIP map persist between builds; ``build`` recomputes members only for the
    services a change may have affected (a workload whose labels did not change
    touches no membership), and copies a table into the new snapshot only when
    it changed; an unchanged table's read-only copy is shared with the previous
    snapshot.
    """

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.raw: dict[str, str] = {}
        self._services: dict[NsName, Service] = {}
        self._workloads: dict[NsName, Workload] = {}
        self._health: dict[NsName, HealthStatus] = {}
        self._virtual_services: dict[NsName, VirtualService] = {}
        self._destination_rules: dict[NsName, DestinationRule] = {}
        self._authorization_policies: dict[NsName, AuthorizationPolicy] = {}
        self._request_authentications: dict[NsName, RequestAuthentication] = {}
        self._peer_authentications: dict[NsName, PeerAuthentication] = {}
        self._rate_limit_policies: dict[NsName, RateLimitPolicy] = {}
        self._gateways: dict[NsName, Gateway] = {}
        self._service_entries: dict[NsName, ServiceEntry] = {}
        # (namespace, label key, label value) -> workloads / services (by selector) having it
        self._wl_index: dict[tuple[str, str, str], set[NsName]] = {}
        self._svc_index: dict[tuple[str, str, str], set[NsName]] = {}
        self._members: dict[NsName, tuple[NsName, ...]] = {}
        self._vip_owners: dict[str, set[NsName]] = {}
        self._dirty: set[NsName] = set()  # services whose members must be recomputed
        self._changed: set[str] = set()  # tables changed since the last build
        self._frozen: dict[str, Mapping[Any, Any]] = {}

    def reset(self, items: Mapping[str, str]) -> None:
        self._clear()
        self.apply(items, ())

    def apply(self, puts: Mapping[str, str], deletes: Iterable[str]) -> None:
        for key in deletes:
            if self.raw.pop(key, None) is None:
                continue
            parts = split_key(key)
            if parts is not None:
                self._drop(parts[0], (parts[1], parts[2]))
        for key, value in puts.items():
            if self.raw.get(key) == value:
                continue  # same text, same decoded object
            parts = split_key(key)
            if parts is None:
                continue
            self.raw[key] = value
            kind, ns, name = parts
            try:
                obj = _decode(kind, value)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                # Written by someone else, not through our validation: skip, keep serving.
                if kind == "authorizationpolicy":
                    # an authorization policy we cannot read fails closed: in its place, one that
                    # denies everything in its namespace (skipping an ALLOW policy would open it)
                    log.error("registry: invalid AuthorizationPolicy at %s (%s): denying every "
                              "request to %s until it is fixed", key, e, ns)
                    self._put((ns, name), AuthorizationPolicy(name, ns, "DENY", None, (Rule(),),
                                                              f"unreadable value at {key}"))
                    continue
                log.warning("registry: ignoring invalid stored value at %s: %s", key, e)
                self._drop(kind, (ns, name))
                continue
            self._put((ns, name), obj)

    # -- bookkeeping -------------------------------------------------------------------

    def _put(self, key: NsName, obj: _Decoded) -> None:
        if isinstance(obj, VirtualService):
            self._virtual_services[key] = obj
            self._changed.add("virtual_services")
        elif isinstance(obj, DestinationRule):
            self._destination_rules[key] = obj
            self._changed.add("destination_rules")
        elif isinstance(obj, AuthorizationPolicy):
            self._authorization_policies[key] = obj
            self._changed.add("authorization_policies")
        elif isinstance(obj, RequestAuthentication):
            self._request_authentications[key] = obj
            self._changed.add("request_authentications")
        elif isinstance(obj, PeerAuthentication):
            self._peer_authentications[key] = obj
            self._changed.add("peer_authentications")
        elif isinstance(obj, RateLimitPolicy):
            self._rate_limit_policies[key] = obj
            self._changed.add("rate_limit_policies")
        elif isinstance(obj, Gateway):
            self._gateways[key] = obj
            self._changed.add("gateways")
        elif isinstance(obj, ServiceEntry):
            self._service_entries[key] = obj
            self._changed.add("service_entries")
        elif isinstance(obj, Workload):
            old_w = self._workloads.get(key)
            self._workloads[key] = obj
            self._changed.add("workloads")
            if old_w is None or old_w.labels != obj.labels:
                if old_w is not None:
                    self._unindex_workload(key, old_w)
                self._index_workload(key, obj)
        elif isinstance(obj, Service):
            old_s = self._services.get(key)
            if old_s is not None:
                self._unindex_service(key, old_s)
            self._services[key] = obj
            self._index_service(key, obj)
            self._changed.add("services")
        else:
            self._health[key] = obj
            self._changed.add("health")

    def _drop(self, kind: str, key: NsName) -> None:
        if kind == "workload":
            w = self._workloads.pop(key, None)
            if w is not None:
                self._unindex_workload(key, w)
                self._changed.add("workloads")
        elif kind == "service":
            s = self._services.pop(key, None)
            if s is not None:
                self._unindex_service(key, s)
                self._changed.add("services")
        elif kind == "virtualservice":
            if self._virtual_services.pop(key, None) is not None:
                self._changed.add("virtual_services")
        elif kind == "destinationrule":
            if self._destination_rules.pop(key, None) is not None:
                self._changed.add("destination_rules")
        elif kind == "authorizationpolicy":
            if self._authorization_policies.pop(key, None) is not None:
                self._changed.add("authorization_policies")
        elif kind == "requestauthentication":
            if self._request_authentications.pop(key, None) is not None:
                self._changed.add("request_authentications")
        elif kind == "peerauthentication":
            if self._peer_authentications.pop(key, None) is not None:
                self._changed.add("peer_authentications")
        elif kind == "ratelimitpolicy":
            if self._rate_limit_policies.pop(key, None) is not None:
                self._changed.add("rate_limit_policies")
        elif kind == "gateway":
            if self._gateways.pop(key, None) is not None:
                self._changed.add("gateways")
        elif kind == "serviceentry":
            if self._service_entries.pop(key, None) is not None:
                self._changed.add("service_entries")
        elif self._health.pop(key, None) is not None:
            self._changed.add("health")

    def _index_workload(self, key: NsName, w: Workload) -> None:
        for lk, lv in w.labels.items():
            self._wl_index.setdefault((w.namespace, lk, lv), set()).add(key)
        self._touch_selecting(w)

    def _unindex_workload(self, key: NsName, w: Workload) -> None:
        for lk, lv in w.labels.items():
            ik = (w.namespace, lk, lv)
            keys = self._wl_index.get(ik)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._wl_index[ik]
        self._touch_selecting(w)

    def _touch_selecting(self, w: Workload) -> None:
        """Mark dirty every service whose selector shares a label with ``w``."""
        for lk, lv in w.labels.items():
            self._dirty.update(self._svc_index.get((w.namespace, lk, lv), ()))

    def _index_service(self, key: NsName, s: Service) -> None:
        for lk, lv in s.selector.items():
            self._svc_index.setdefault((s.namespace, lk, lv), set()).add(key)
        self._vip_owners.setdefault(s.vip, set()).add(key)
        self._dirty.add(key)
        self._changed.add("by_vip")

    def _unindex_service(self, key: NsName, s: Service) -> None:
        for lk, lv in s.selector.items():
            ik = (s.namespace, lk, lv)
            keys = self._svc_index.get(ik)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._svc_index[ik]
        owners = self._vip_owners.get(s.vip)
        if owners is not None:
            owners.discard(key)
            if not owners:
                del self._vip_owners[s.vip]
        self._dirty.add(key)
        self._changed.add("by_vip")

    def _select(self, s: Service) -> tuple[NsName, ...]:
        if not s.selector:
            return ()
        sets = sorted((self._wl_index.get((s.namespace, k, v), set())
                       for k, v in s.selector.items()), key=len)
        chosen = sets[0].intersection(*sets[1:])
        return tuple(sorted(k for k in chosen if selects(s.selector, self._workloads[k].labels)))

    # -- freezing ----------------------------------------------------------------------

    def _view(self, name: str, table: Mapping[Any, Any]) -> Mapping[Any, Any]:
        if name in self._changed or name not in self._frozen:
            self._frozen[name] = MappingProxyType(dict(table))
        return self._frozen[name]

    def _entries(self) -> tuple[Mapping[str, EntryService], Mapping[str, EntryService]]:
        """The ServiceEntries compiled (:func:`compile_entries`): again when they changed, or
        when workloads or health did and a MESH_INTERNAL entry names workloads."""
        old = self._frozen.get("entry_services")
        internal = any(e.location == "MESH_INTERNAL" for e in self._service_entries.values())
        if old is None or "service_entries" in self._changed or (
                internal and self._changed & {"workloads", "health"}):
            by_ip = {w.address: w for w in self._workloads.values()} if internal else {}
            self._frozen["entry_services"], self._frozen["entry_by_address"] = compile_entries(
                self._service_entries.values(), by_ip.get, self._health_of, Endpoint)
        return self._frozen["entry_services"], self._frozen["entry_by_address"]

    def _health_of(self, w: Workload) -> Health:  # as Snapshot.effective_health
        observed = self._health.get((w.namespace, w.name))
        if observed is not None:
            return observed.status
        return worst(c.initial_status for c in w.checks) if w.checks else w.health

    def build(self, revision: int) -> Snapshot:
        for skey in self._dirty:
            s = self._services.get(skey)
            if s is None:
                self._members.pop(skey, None)
                self._changed.add("members")
                continue
            members = self._select(s)
            if self._members.get(skey) != members:
                self._members[skey] = members
                self._changed.add("members")
        self._dirty.clear()
        entry_services, entry_by_address = self._entries()
        # Several services claiming one VIP (stored without our validation): the
        # smallest (namespace, name) wins, whatever order the changes came in.
        by_vip = ({vip: min(owners) for vip, owners in self._vip_owners.items()}
                  if "by_vip" in self._changed or "by_vip" not in self._frozen else {})
        snap = Snapshot(
            revision=revision,
            services=self._view("services", self._services),
            workloads=self._view("workloads", self._workloads),
            health=self._view("health", self._health),
            members=self._view("members", self._members),
            by_vip=self._view("by_vip", by_vip),
            virtual_services=self._view("virtual_services", self._virtual_services),
            destination_rules=self._view("destination_rules", self._destination_rules),
            authorization_policies=self._view("authorization_policies", self._authorization_policies),
            request_authentications=self._view("request_authentications", self._request_authentications),
            peer_authentications=self._view("peer_authentications", self._peer_authentications),
            rate_limit_policies=self._view("rate_limit_policies", self._rate_limit_policies),
            gateways=self._view("gateways", self._gateways),
            service_entries=self._view("service_entries", self._service_entries),
            entry_services=entry_services, entry_by_address=entry_by_address,
        )
        self._changed.clear()
        return snap


# The C scanner json.loads ends in, called directly: stored values are compact JSON
# objects written by us, and every agent decodes every one of them on every change.
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(value: str) -> Any:
    try:
        doc, end = _SCAN(value, 0)
        if end == len(value):
            return doc
    except (StopIteration, ValueError):
        pass
    return json.loads(value)  # whitespace around it, or not JSON: the full parser decides


def _decode(kind: str, value: str) -> _Decoded:
    doc = _loads(value)
    if kind == "service":
        return service_from_doc(doc)
    if kind == "workload":
        return workload_from_doc(doc)
    if kind == "virtualservice":
        return virtual_service_from_doc(doc)
    if kind == "destinationrule":
        return destination_rule_from_doc(doc)
    if kind == "authorizationpolicy":
        return _checked_policy(policy_from_doc(doc))
    if kind == "requestauthentication":
        return request_authentication_from_doc(doc)
    if kind == "peerauthentication":
        return peer_authentication_from_doc(doc)
    if kind == "ratelimitpolicy":
        return rate_limit_from_doc(doc)
    if kind == "gateway":
        return gateway_from_doc(doc)
    if kind == "serviceentry":
        return service_entry_from_doc(doc)
    return health_from_doc(doc)


def _checked_policy(p: AuthorizationPolicy) -> AuthorizationPolicy:
    """A stored policy the evaluation can run: a known action, CIDRs that parse (evaluating a
    block that does not would raise on the data path). ValueError otherwise: the value is
    skipped as any undecodable one."""
    if p.action not in ACTIONS:
        raise ValueError(f"unknown action {p.action!r}")
    for r in p.rules:
        blocks = [b for s in r.sources or () for b in (*s.ip_blocks, *s.not_ip_blocks,
                                                       *s.remote_ip_blocks, *s.not_remote_ip_blocks)]
        blocks += [v for c in r.when if c.key in ("source.ip", "remote.ip", "destination.ip")
                   for v in (*c.values, *c.not_values)]
        for b in blocks:
            ipaddress.ip_network(b, strict=False)
    return p
