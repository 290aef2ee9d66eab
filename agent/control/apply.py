"""Apply, register and delete: validated resources into one atomic commit.

How this works: :func:`plan` is pure. Given the current stored items and the
validated resources of one input, it allocates VIPs (keeping a service's VIP
across re-applies; otherwise the lowest free address of the range), rejects
duplicates, VIPs already taken, workload addresses another workload has (in
this input or stored) and VirtualService routes to a host no Service has or to
a subset no DestinationRule of that host defines (stored or in this input), and
returns the puts for a single commit.
Any error rejects the whole input: nothing is written. :func:`apply` reads the
backend, plans, and commits guarded on the revision it read, retrying a few
times if another writer got in between (so two applies never share a VIP).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from agent.control.authz import AuthorizationPolicy, policy_doc
from agent.control.backend import Backend
from agent.control.errors import ConflictError, InputError, NotFound, RegistryError
from agent.control.gateway import Gateway, gateway_doc, gateway_ref
from agent.control.istio import (
    Destination,
    DestinationRule,
    VirtualService,
    destination_rule_doc,
    destination_rule_from_doc,
    host_fqdn,
    host_matches,
    virtual_service_doc,
    virtual_service_from_doc,
)
from agent.control.model import (
    PREFIX,
    Kind,
    Service,
    Workload,
    health_key,
    resource_key,
    service_from_doc,
    split_key,
)
from agent.control.peerauthn import PeerAuthentication, peer_authentication_doc
from agent.control.ratelimit import RateLimitPolicy, rate_limit_doc
from agent.control.reqauthn import RequestAuthentication, request_authentication_doc
from agent.control.screening import HOST_LABEL, address_key
from agent.control.serviceentry import (
    ServiceEntry,
    route_names,
    service_entry_doc,
    service_entry_from_doc,
    with_vips,
)
from agent.control.validate import IpNetwork, Located, Resource

COMMIT_ATTEMPTS = 5
_WORKLOAD_PREFIX = f"{PREFIX}{Kind.WORKLOAD.value.lower()}/"


@dataclass(frozen=True, slots=True)
class Plan:
    puts: Mapping[str, str]  # only what is created or changed
    created: tuple[str, ...]  # "Kind ns/name" lines for the user
    configured: tuple[str, ...]
    unchanged: tuple[str, ...]
    revision: int = 0  # the backend revision of the commit (0 before it is committed)


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per value


def _dump(r: Resource) -> str:
    """Canonical stored text: a fixed field order (labels and ports sorted), no spaces."""
    if isinstance(r, Workload):
        return _ENCODE(r.to_stored())
    if isinstance(r, VirtualService):
        return _ENCODE(virtual_service_doc(r))
    if isinstance(r, DestinationRule):
        return _ENCODE(destination_rule_doc(r))
    if isinstance(r, AuthorizationPolicy):
        return _ENCODE(policy_doc(r))
    if isinstance(r, RequestAuthentication):
        return _ENCODE(request_authentication_doc(r))
    if isinstance(r, PeerAuthentication):
        return _ENCODE(peer_authentication_doc(r))
    if isinstance(r, RateLimitPolicy):
        return _ENCODE(rate_limit_doc(r))
    if isinstance(r, Gateway):
        return _ENCODE(gateway_doc(r))
    if isinstance(r, ServiceEntry):
        return _ENCODE(service_entry_doc(r))
    return _ENCODE(r.to_doc())


def _kind(r: Resource) -> Kind:
    if isinstance(r, Service):
        return Kind.SERVICE
    if isinstance(r, Workload):
        return Kind.WORKLOAD
    if isinstance(r, AuthorizationPolicy):
        return Kind.AUTHORIZATION_POLICY
    if isinstance(r, RequestAuthentication):
        return Kind.REQUEST_AUTHENTICATION
    if isinstance(r, PeerAuthentication):
        return Kind.PEER_AUTHENTICATION
    if isinstance(r, RateLimitPolicy):
        return Kind.RATE_LIMIT_POLICY
    if isinstance(r, Gateway):
        return Kind.GATEWAY
    if isinstance(r, ServiceEntry):
        return Kind.SERVICE_ENTRY
    return Kind.VIRTUAL_SERVICE if isinstance(r, VirtualService) else Kind.DESTINATION_RULE


def _key(r: Resource) -> str:
    return resource_key(_kind(r), r.namespace, r.name)


def _label(r: Resource) -> str:
    return f"{_kind(r).value} {r.namespace}/{r.name}"


def service_fqdn(namespace: str, name: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


def _hosts(net: IpNetwork) -> Iterator[str]:
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    for i in range(first, last + 1):
        yield str(ipaddress.ip_address(i))


# address key -> (resource key, where it was given in this input, or None when stored)
_AddressOwners = dict[str, tuple[str, Located | None]]


def _workload_addresses(items: Mapping[str, str], resources: Sequence[Located]) -> _AddressOwners:
    """Addresses of the stored workloads this input does not redefine (a workload
    applied again may keep or change its address)."""
    redefined = {_key(loc.resource) for loc in resources if isinstance(loc.resource, Workload)}
    out: _AddressOwners = {}
    for key, value in items.items():
        if key in redefined or not key.startswith(_WORKLOAD_PREFIX):
            continue
        try:
            d = json.loads(value)
            for claim in _claims(d["address"], d.get("node", ""), d.get("labels", {}), d.get("ports", {})):
                out.setdefault(claim, (key, None))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not ours to judge here; the agents skip what they cannot decode
    return out


def _claims(address: str, node: str, labels: Mapping[str, str], ports: Mapping[str, int]) -> list[str]:
    """What a workload's address claims: the address, or for a host service (a Consul
    definition without address, on its node's address) that address on each of its ports."""
    addr = address_key(address)
    if labels.get(HOST_LABEL) == "true":
        return [f"{addr}:{p}@{node}" for p in sorted(set(ports.values()))]
    return [addr]


def _claim_address(owners: _AddressOwners, key: str, r: Workload, loc: Located) -> None:
    for claim in _claims(r.address, r.node, r.labels, r.ports):
        _claim(owners, claim, key, r, loc)


def _claim(owners: _AddressOwners, addr: str, key: str, r: Workload, loc: Located) -> None:
    owner = owners.get(addr)
    if owner is not None and owner[0] != key:
        o = split_key(owner[0])
        who = f"Workload {o[1]}/{o[2]}" if o else owner[0]
        first = owner[1]
        where = ("already in the registry" if first is None
                 else f"defined at {first.file}:{first.line_of(first.address_path)}")
        raise loc.fail(loc.address_path,
                       f"address {addr.split('@')[0] if '@' in addr else r.address} of {_label(r)} "
                       f"is already used by {who} ({where})",
                       hint="two workloads cannot share an address; delete the old one first "
                            "if the address moved")
    owners[addr] = (key, loc)


def plan(items: Mapping[str, str], resources: Sequence[Located], vip_range: IpNetwork) -> Plan:
    existing: dict[str, Service] = {}
    for key, value in items.items():
        parts = split_key(key)
        if parts is not None and parts[0] == "service":
            try:
                existing[key] = service_from_doc(json.loads(value))
            except (ValueError, KeyError, TypeError):
                continue
    vip_owner = {s.vip: k for k, s in existing.items()}
    entries = _stored_entries(items)
    for k, se in entries.items():  # a ServiceEntry's addresses are VIPs too
        for a in (*se.addresses, *se.auto_addresses):
            vip_owner.setdefault(a, k)
    addr_owner = _workload_addresses(items, resources)
    seen: dict[str, Located] = {}
    final: list[tuple[str, Resource]] = []
    for loc in resources:
        r = loc.resource
        key = _key(r)
        if key in seen:
            first = seen[key]
            raise InputError(f"{_label(r)} is defined twice (first at {first.file}:{first.line})",
                             file=loc.file, line=loc.line, path="metadata.name")
        seen[key] = loc
        if isinstance(r, Service) and r.vip:
            owner = vip_owner.get(r.vip)
            if owner is not None and owner != key:
                o = split_key(owner)
                kind = "ServiceEntry" if o and o[0] == "serviceentry" else "Service"
                who = f"{kind} {o[1]}/{o[2]}" if o else owner
                raise InputError(f"VIP {r.vip} is already taken by {who}",
                                 file=loc.file, line=loc.line, path="spec.vip",
                                 hint="leave spec.vip out to get a free one allocated")
            vip_owner[r.vip] = key
        if isinstance(r, Workload):
            _claim_address(addr_owner, key, r, loc)
        if isinstance(r, ServiceEntry):
            _claim_entry_addresses(vip_owner, key, r, loc)
        final.append((key, r))
    _check_routes(items, resources, entries)
    _check_one_per_host(items, resources)
    _check_rate_limit_targets(items, resources)
    _check_gateway_refs(items, resources)
    _check_entry_hosts(entries, resources)
    _check_entry_workloads(entries, addr_owner, resources)
    # Second pass: allocate after every explicit VIP of this input is known.
    free = (a for a in _hosts(vip_range) if a not in vip_owner)
    puts: dict[str, str] = {}
    created: list[str] = []
    configured: list[str] = []
    unchanged: list[str] = []
    for i, (key, r) in enumerate(final):
        if isinstance(r, Service) and not r.vip:
            old = existing.get(key)
            if old is not None and ipaddress.ip_address(old.vip) in vip_range:
                r = replace(r, vip=old.vip)
            else:
                vip = next(free, None)
                if vip is None:
                    loc = resources[i]
                    raise InputError(f"no free VIP left in {vip_range}", file=loc.file,
                                     line=loc.line, path="spec.vip",
                                     hint="delete unused services or widen --vip-range")
                r = replace(r, vip=vip)
            vip_owner[r.vip] = key
        if isinstance(r, ServiceEntry) and r.needs_vips:
            try:
                r = with_vips(r, entries.get(key), lambda: next(free, None))
            except ValueError:
                raise resources[i].fail("spec.addresses", f"no free VIP left in {vip_range}",
                                        hint="give spec.addresses, or widen --vip-range") from None
            vip_owner.update((a, key) for a in r.auto_addresses)
        value = _dump(r)
        before = items.get(key)
        if before == value:
            unchanged.append(_label(r))  # nothing to write: agents would skip it anyway
            continue
        (created if before is None else configured).append(_label(r))
        puts[key] = value
    return Plan(puts, tuple(created), tuple(configured), tuple(unchanged))


def _stored_entries(items: Mapping[str, str]) -> dict[str, ServiceEntry]:
    out: dict[str, ServiceEntry] = {}
    for key, value in items.items():
        parts = split_key(key)
        if parts is not None and parts[0] == "serviceentry":
            try:
                out[key] = service_entry_from_doc(json.loads(value))
            except (ValueError, KeyError, TypeError):
                continue  # not ours to judge here; the agents skip what they cannot decode
    return out


def _claim_entry_addresses(vip_owner: dict[str, str], key: str, r: ServiceEntry, loc: Located) -> None:
    """A ServiceEntry's own addresses are no other Service's or ServiceEntry's."""
    for j, a in enumerate(r.addresses):
        owner = vip_owner.get(a)
        if owner is not None and owner != key:
            o = split_key(owner)
            who = f"{Kind.SERVICE_ENTRY.value if o and o[0] == 'serviceentry' else 'Service'} {o[1]}/{o[2]}" \
                if o else owner
            raise loc.fail(f"spec.addresses[{j}]", f"address {a} is already taken by {who}",
                           hint="an address reaches one service; leave spec.addresses out to get a VIP")
        vip_owner[a] = key


def _check_entry_workloads(stored: Mapping[str, ServiceEntry], workloads: _AddressOwners,
                           resources: Sequence[Located]) -> None:
    """A ServiceEntry's address is no workload's (it would take the traffic meant for the pod),
    and a MESH_EXTERNAL endpoint is no workload (dialled in plaintext from the node, it would
    skip the workload's mTLS and authorization: such endpoints are MESH_INTERNAL)."""
    incoming = {_key(r): (loc, r) for loc in resources if isinstance(r := loc.resource, ServiceEntry)}
    for loc, r in incoming.values():
        fields = [(f"spec.addresses[{j}]", a) for j, a in enumerate(r.addresses)]
        if r.location == "MESH_EXTERNAL":
            fields += [(f"spec.endpoints[{j}].address", e.address) for j, e in enumerate(r.endpoints)]
        for path, a in fields:
            try:
                owner = workloads.get(address_key(a))
            except ValueError:
                continue  # a host name (resolution DNS)
            if owner is not None:
                o = split_key(owner[0])
                raise loc.fail(path, f"{a} is the address of Workload {o[1]}/{o[2]}" if o else a,
                               hint="a mesh workload is reached as one: name it in a MESH_INTERNAL "
                                    "ServiceEntry's endpoints, or address its Service")
    entry_addresses = {address_key(a): k for k, se in stored.items() if k not in incoming
                       for a in se.addresses}
    entry_addresses.update((address_key(a), k) for k, (_, r) in incoming.items() for a in r.addresses)
    for loc in resources:
        w = loc.resource
        if isinstance(w, Workload) and address_key(w.address) in entry_addresses:
            o = split_key(entry_addresses[address_key(w.address)])
            raise loc.fail(loc.address_path, f"address {w.address} is an address of ServiceEntry "
                           f"{o[1]}/{o[2]}" if o else w.address,
                           hint="give the workload its own address, or change the ServiceEntry's")


def _check_entry_hosts(stored: Mapping[str, ServiceEntry], resources: Sequence[Located]) -> None:
    """A host has at most one ServiceEntry (the input's replaces the stored one of its name)."""
    incoming = [(loc, r) for loc in resources if isinstance(r := loc.resource, ServiceEntry)]
    if not incoming:
        return
    mine = {_key(r) for _, r in incoming}
    owner = {h: se for k, se in sorted(stored.items()) if k not in mine for h in se.hosts}
    for loc, r in incoming:
        for i, h in enumerate(r.hosts):
            o = owner.setdefault(h, r)
            if o is not r:
                raise loc.fail(f"spec.hosts[{i}]", f"host {h!r} already has a ServiceEntry: "
                               f"{o.namespace}/{o.name}" + (f" ({o.source})" if o.source else ""),
                               hint="put its ports and endpoints in one ServiceEntry, or delete the "
                                    "other first")


def _check_one_per_host(items: Mapping[str, str], resources: Sequence[Located]) -> None:
    """At most one VirtualService (for mesh traffic) and one DestinationRule per host: Istio
    leaves unspecified which of two applies, so nodemesh refuses the second instead of
    picking one silently."""
    stored: dict[str, VirtualService | DestinationRule] = {}
    for key, value in items.items():
        parts = split_key(key)
        if parts is None or parts[0] not in ("virtualservice", "destinationrule"):
            continue
        try:
            doc = json.loads(value)
            stored[key] = (virtual_service_from_doc(doc) if parts[0] == "virtualservice"
                           else destination_rule_from_doc(doc))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    incoming = [(loc, r) for loc in resources
                if isinstance(r := loc.resource, VirtualService | DestinationRule)]
    for _, r in incoming:
        stored.pop(_key(r), None)  # (the input replaces the stored resource of the same name)
    owner: dict[tuple[str, str], VirtualService | DestinationRule] = {}  # (kind, host FQDN) -> resource
    for key in sorted(stored):
        for kh in _route_hosts(stored[key]):
            owner.setdefault(kh, stored[key])
    for loc, r in incoming:  # in input order: the second of two for a host is the one refused
        hosts = r.hosts if isinstance(r, VirtualService) else (r.host,)
        for i, (h, fq) in enumerate(zip(hosts, _route_hosts(r), strict=False)):
            o = owner.setdefault(fq, r)
            if o is not r and _key(o) != _key(r):
                kind = "VirtualService" if isinstance(r, VirtualService) else "DestinationRule"
                path = f"spec.hosts[{i}]" if isinstance(r, VirtualService) else "spec.host"
                raise loc.fail(path, f"host {h!r} already has a {kind}: {o.namespace}/{o.name}"
                               + (f" ({o.source})" if o.source else ""),
                               hint=f"Istio does not define which of two applies: put the rules in "
                                    f"one {kind}, or delete the other first")


def _route_hosts(r: VirtualService | DestinationRule) -> list[tuple[str, str]]:
    """(kind, host FQDN) of each host a resource is for (a VirtualService bound only to
    gateways has none here)."""
    if isinstance(r, VirtualService):
        if r.gateways and "mesh" not in r.gateways:
            return []
        return [("vs", host_fqdn(h, r.namespace)) for h in r.hosts]
    return [("dr", host_fqdn(r.host, r.namespace))]


def _check_routes(items: Mapping[str, str], resources: Sequence[Located],
                  entries: Mapping[str, ServiceEntry]) -> None:
    """Every route destination of the input's VirtualServices names a Service (stored or in
    this input) and, with a subset, one a DestinationRule for that host (stored or in this
    input, which replaces the stored one of the same name) defines."""
    located_vs = [(loc, r) for loc in resources if isinstance(r := loc.resource, VirtualService)]
    if not located_vs:
        return
    fqdns: set[str] = set()
    rules: dict[str, DestinationRule] = {}
    for key, value in items.items():
        parts = split_key(key)
        if parts is None:
            continue
        if parts[0] == "service":
            fqdns.add(service_fqdn(parts[1], parts[2]))
        elif parts[0] == "serviceentry" and key in entries:
            fqdns.update(n for h in entries[key].hosts for n in route_names(h))
        elif parts[0] == "destinationrule":
            try:
                rules[key] = destination_rule_from_doc(json.loads(value))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # not ours to judge here; the agents skip what they cannot decode
    for loc in resources:
        r = loc.resource
        if isinstance(r, Service):
            fqdns.add(service_fqdn(r.namespace, r.name))
        elif isinstance(r, ServiceEntry):
            fqdns.update(n for h in r.hosts for n in route_names(h))
        elif isinstance(r, DestinationRule):
            rules[_key(r)] = r
    for loc, vs in located_vs:
        for i, route in enumerate(vs.http):
            targets = [(f"spec.http[{i}].route[{j}].destination", rd.destination)
                       for j, rd in enumerate(route.route)]
            if route.mirror is not None:
                targets.append((f"spec.http[{i}].mirror", route.mirror))
            _check_targets(loc, vs, targets, fqdns, rules)
        for i, tr in enumerate(vs.tcp):
            _check_targets(loc, vs, [(f"spec.tcp[{i}].route[{j}].destination", rd.destination)
                                     for j, rd in enumerate(tr.route)], fqdns, rules)
        for i, tl in enumerate(vs.tls):
            _check_targets(loc, vs, [(f"spec.tls[{i}].route[{j}].destination", rd.destination)
                                     for j, rd in enumerate(tl.route)], fqdns, rules)


def _check_targets(loc: Located, vs: VirtualService, targets: list[tuple[str, Destination]],
                   fqdns: set[str], rules: dict[str, DestinationRule]) -> None:
    """A route's destinations name known services and subsets some DestinationRule defines."""
    for path, d in targets:
        fq = host_fqdn(d.host, vs.namespace)
        if fq not in fqdns:
            raise loc.fail(f"{path}.host", f"route to unknown host {d.host!r}: no Service "
                           f"{fq} (or ServiceEntry host) in the registry or in this input",
                           hint="apply the Service first or in the same input; a short "
                                "host is a service in the VirtualService's namespace")
        if not d.subset:
            continue
        for_host = [dr for dr in rules.values()
                    if host_matches(host_fqdn(dr.host, dr.namespace), fq)]
        if not any(s.name == d.subset for dr in for_host for s in dr.subsets):
            known = sorted({s.name for dr in for_host for s in dr.subsets})
            raise loc.fail(f"{path}.subset",
                           f"unknown subset {d.subset!r} of {fq}: no DestinationRule for "
                           "that host defines it",
                           hint=(f"subsets defined for it: {', '.join(known)}" if known else
                                 "define it under spec.subsets of a DestinationRule with "
                                 f"host: {d.host}"))


def _check_rate_limit_targets(items: Mapping[str, str], resources: Sequence[Located]) -> None:
    """A RateLimitPolicy's target is a Service of its namespace (stored, or in this input,
    which replaces the stored one), and its port one of that service's ports."""
    located = [(loc, r) for loc in resources if isinstance(r := loc.resource, RateLimitPolicy)]
    if not located:
        return
    services: dict[tuple[str, str], Service | None] = {}
    for key in items:
        parts = split_key(key)
        if parts is not None and parts[0] == "service":
            services[(parts[1], parts[2])] = None  # decoded only if a port is asked for
    for loc in resources:
        if isinstance(loc.resource, Service):
            services[(loc.resource.namespace, loc.resource.name)] = loc.resource
    for loc, p in located:
        k = (p.namespace, p.service)
        if k not in services:
            raise loc.fail("spec.targetRef.name", f"unknown target: no Service {p.namespace}/{p.service} "
                           "in the registry or in this input",
                           hint="apply the Service first or in the same input; the target is a "
                                "service of the policy's namespace")
        if p.port is None:
            continue
        svc = services[k]
        if svc is None:
            try:
                svc = services[k] = service_from_doc(json.loads(items[resource_key(Kind.SERVICE, *k)]))
            except (ValueError, KeyError, TypeError):
                continue  # not ours to judge here
        if all(sp.port != p.port for sp in svc.ports):
            raise loc.fail("spec.targetRef.port", f"Service {p.namespace}/{p.service} has no port {p.port}",
                           hint="ports: " + ", ".join(str(sp.port) for sp in svc.ports))
    _check_rate_limit_routes(items, resources, located)


def _check_rate_limit_routes(items: Mapping[str, str], resources: Sequence[Located],
                             located: Sequence[tuple[Located, RateLimitPolicy]]) -> None:
    """A RateLimitPolicy's route target names a VirtualService (stored, or in this input, which
    replaces the stored one) with an HTTP route of that name that sends to the policy's Service."""
    inputs = {(r.namespace, r.name): r for loc in resources if isinstance(r := loc.resource, VirtualService)}
    for loc, p in located:
        if not p.route:
            continue
        vs_ns, vs_name, rname = p.route.split("/", 2)
        vs = inputs.get((vs_ns, vs_name))
        if vs is None:
            stored = items.get(resource_key(Kind.VIRTUAL_SERVICE, vs_ns, vs_name))
            try:
                vs = virtual_service_from_doc(json.loads(stored)) if stored is not None else None
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # not ours to judge here
        if vs is None:
            raise loc.fail("spec.targetRef.route.virtualService",
                           f"unknown VirtualService {vs_ns}/{vs_name}: not in the registry or in this input",
                           hint="apply the VirtualService first or in the same input")
        routes = [r for r in vs.http if r.name == rname]
        if not routes:
            named = [r.name for r in vs.http if r.name]
            raise loc.fail("spec.targetRef.route.name",
                           f"VirtualService {vs_ns}/{vs_name} has no http route named {rname!r}",
                           hint=("its named routes: " + ", ".join(named)) if named else
                                "name the route with spec.http[].name in the VirtualService")
        fq = service_fqdn(p.namespace, p.service)
        if not any(host_fqdn(rd.destination.host, vs.namespace) == fq for r in routes for rd in r.route):
            raise loc.fail("spec.targetRef.route.name",
                           f"route {rname!r} of VirtualService {vs_ns}/{vs_name} sends nothing to "
                           f"Service {p.namespace}/{p.service}: the limit would never apply",
                           hint="target the Service its destinations name")


def _check_gateway_refs(items: Mapping[str, str], resources: Sequence[Located]) -> None:
    """Every Gateway a VirtualService of the input binds to (``gateways: [name]`` in its own
    namespace, or ``ns/name``) is stored or in this input."""
    known = {(p[1], p[2]) for key in items if (p := split_key(key)) is not None and p[0] == "gateway"}
    known |= {(r.namespace, r.name) for loc in resources if isinstance(r := loc.resource, Gateway)}
    for loc in resources:
        vs = loc.resource
        if not isinstance(vs, VirtualService):
            continue
        for i, g in enumerate(vs.gateways):
            if g != "mesh" and gateway_ref(g, vs.namespace) not in known:
                ns, name = gateway_ref(g, vs.namespace)
                raise loc.fail(f"spec.gateways[{i}]", f"unknown gateway {g!r}: no Gateway {ns}/{name} "
                               "in the registry or in this input",
                               hint="apply the Gateway first or in the same input; a bare name is a "
                                    "Gateway of the VirtualService's namespace, else write ns/name")


def apply(backend: Backend, resources: Sequence[Located], vip_range: IpNetwork) -> Plan:
    """Validate against the current state and commit everything at once, or nothing."""
    for _ in range(COMMIT_ATTEMPTS):
        state = backend.read()
        p = plan(state.items, resources, vip_range)
        if not p.puts:
            return replace(p, revision=state.revision)  # all unchanged: nothing to commit
        try:
            revision = backend.commit(p.puts, expect_revision=state.revision)
            return replace(p, revision=revision)
        except ConflictError:
            continue  # someone wrote meanwhile: read again and re-plan
    raise RegistryError(f"registry at {backend.location} kept changing during apply; "
                        f"gave up after {COMMIT_ATTEMPTS} attempts")


def delete(backend: Backend, kind: Kind, namespace: str, name: str) -> None:
    for _ in range(COMMIT_ATTEMPTS):
        state = backend.read()
        key = resource_key(kind, namespace, name)
        if key not in state.items:
            raise NotFound(f"{kind.value} {namespace}/{name} not found in {backend.location}")
        deletes = [key]
        if kind == Kind.WORKLOAD:
            deletes.append(health_key(namespace, name))
        try:
            backend.commit({}, deletes, expect_revision=state.revision)
            return
        except ConflictError:
            continue
    raise RegistryError(f"registry at {backend.location} kept changing during delete")
