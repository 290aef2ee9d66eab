"""Istio's ServiceEntry from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``), ``kind``
and ``metadata`` and hands the ``spec`` mapping here. Read: ``hosts``,
``addresses``, ``ports`` (``number``, ``name``, ``protocol``, ``targetPort``),
``location``, ``resolution``, ``endpoints`` (``address``, ``ports``,
``labels``, ``locality``, ``weight``) and ``exportTo`` (``*`` or ``.``).
Istio's own rules are kept (STATIC needs endpoints with IP addresses, NONE takes
none, DNS_ROUND_ROBIN at most one); what nodemesh does not implement is refused
by name (``workloadSelector``, ``subjectAltNames``, wildcard hosts, CIDR
addresses, NONE without addresses). Whether hosts and addresses clash with
other resources is apply's business (:mod:`agent.control.apply`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from agent.control.screening import address_problem
from agent.control.serviceentry import (
    HOST_RE,
    LOCATIONS,
    PROTOCOLS,
    RESOLUTIONS,
    EntryEndpoint,
    EntryPort,
    ServiceEntry,
)
from agent.control.validate import _Doc, _int, _labels, _map, _name, _str, _tname
from agent.control.validate_istio import _fields, _list

MAX_HOSTS = 64
MAX_ENDPOINTS = 1024
_SPEC_FIELDS = ("hosts", "addresses", "ports", "location", "resolution", "endpoints", "exportTo")
_SPEC_REFUSED = {
    "workloadSelector": "is not supported yet (list the workloads' addresses under endpoints)",
    "subjectAltNames": "is not supported (nodemesh does not originate TLS to endpoints: MESH_INTERNAL "
                       "endpoints are reached over HBONE with their SPIFFE identity)",
}
_ENDPOINT_FIELDS = ("address", "ports", "labels", "locality", "weight")
_ENDPOINT_REFUSED = {
    "network": "is not supported (one network)",
    "serviceAccount": "is not supported (a MESH_INTERNAL endpoint has its workload's identity)",
}


def _host(doc: _Doc, v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise doc.fail(path, f"expected a host name, got {_tname(v)} {v!r}")
    h = v.lower().rstrip(".")
    if h.startswith("*"):
        raise doc.fail(path, f"wildcard host {v!r} is not supported",
                       hint="nodemesh matches external destinations by address: name each host")
    if not HOST_RE.match(h) or len(h) > 253:
        raise doc.fail(path, f"{v!r} is not a fully qualified host name",
                       hint="a DNS name with at least one dot, e.g. api.example.com")
    if h.endswith(".svc.cluster.local") or h.endswith(".service.consul"):
        raise doc.fail(path, f"{v!r} is a mesh service name",
                       hint="mesh services are Services; a ServiceEntry adds a host outside them")
    return h


def _address(doc: _Doc, v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise doc.fail(path, f"expected an IP address, got {_tname(v)} {v!r}")
    text = v
    if "/" in v:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError:
            raise doc.fail(path, f"{v!r} is not an IP address or CIDR block") from None
        if net.num_addresses != 1:
            raise doc.fail(path, f"CIDR block {v!r} is not supported",
                           hint="list the addresses one by one (a /32 or /128 is taken as its address)")
        text = str(net.network_address)
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        raise doc.fail(path, f"{v!r} is not an IP address") from None
    problem = address_problem(address)
    if problem is not None:
        raise doc.fail(path, f"address {problem.detail}",
                       hint="the proxy never dials loopback, link-local or multicast addresses")
    return address


def _ports(doc: _Doc, spec: Mapping[str, Any]) -> tuple[EntryPort, ...]:
    raw = _list(doc, spec, "ports", "spec", required=True)
    if not raw:
        raise doc.fail("spec.ports", "expected a non-empty list of ports")
    ports: list[EntryPort] = []
    for i, pv in enumerate(raw):
        path = f"spec.ports[{i}]"
        p = _map(doc, pv, path)
        _fields(doc, p, path, ("number", "name", "protocol", "targetPort"))
        number = _int(doc, p, "number", path, 1, 65535, required=True)
        name = _name(doc, _str(doc, p, "name", path, required=True), f"{path}.name")
        proto = _str(doc, p, "protocol", path).upper()
        if proto and proto not in PROTOCOLS:
            raise doc.fail(f"{path}.protocol", f"protocol {proto!r} is not supported",
                           hint=f"one of: {', '.join(PROTOCOLS)}")
        target = _int(doc, p, "targetPort", path, 1, 65535) if "targetPort" in p else 0
        if any(q.number == number for q in ports):
            raise doc.fail(f"{path}.number", f"port {number} is listed twice")
        if any(q.name == name for q in ports):
            raise doc.fail(f"{path}.name", f"port name {name!r} is listed twice")
        ports.append(EntryPort(number, name, proto, target))
    return tuple(ports)


def _endpoint(doc: _Doc, v: Any, path: str, ports: tuple[EntryPort, ...], by_name: bool) -> EntryEndpoint:
    e = _map(doc, v, path)
    _fields(doc, e, path, _ENDPOINT_FIELDS, _ENDPOINT_REFUSED)
    raw = _str(doc, e, "address", path, required=True)
    try:
        ipaddress.ip_address(raw)
        address = _address(doc, raw, f"{path}.address")
    except ValueError:
        if not by_name:
            raise doc.fail(f"{path}.address", f"{raw!r} is not an IP address",
                           hint="with resolution STATIC endpoints are IP addresses; use DNS for "
                                "names") from None
        if raw.startswith("unix://"):
            raise doc.fail(f"{path}.address", "unix domain socket endpoints are not supported") from None
        address = _host(doc, raw, f"{path}.address")
    names = {p.name for p in ports}
    eports: dict[str, int] = {}
    pm = _map(doc, e["ports"], f"{path}.ports") if e.get("ports") is not None else {}
    for k in pm:
        if k not in names:
            raise doc.fail(f"{path}.ports.{k}", f"no port named {k!r} in spec.ports",
                           hint=f"port names: {', '.join(sorted(names))}")
        eports[k] = _int(doc, pm, k, f"{path}.ports", 1, 65535)
    weight = _int(doc, e, "weight", path, 0, 10000, default=1) or 1
    return EntryEndpoint(address, tuple(sorted(eports.items())),
                         tuple(sorted(_labels(doc, e.get("labels"), f"{path}.labels").items())),
                         _str(doc, e, "locality", path), weight)


def service_entry(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> ServiceEntry:
    _fields(doc, spec, "spec", _SPEC_FIELDS, _SPEC_REFUSED)
    hosts_v = _list(doc, spec, "hosts", "spec", required=True)
    if not hosts_v:
        raise doc.fail("spec.hosts", "expected a non-empty list of hosts")
    if len(hosts_v) > MAX_HOSTS:
        raise doc.fail("spec.hosts", f"{len(hosts_v)} hosts: at most {MAX_HOSTS} per ServiceEntry")
    hosts: list[str] = []
    for i, h in enumerate(hosts_v):
        host = _host(doc, h, f"spec.hosts[{i}]")
        if host in hosts:
            raise doc.fail(f"spec.hosts[{i}]", f"host {host!r} is listed twice")
        hosts.append(host)
    addresses: list[str] = []
    for i, a in enumerate(_list(doc, spec, "addresses", "spec")):
        address = _address(doc, a, f"spec.addresses[{i}]")
        if ":" in address:
            raise doc.fail(f"spec.addresses[{i}]", f"IPv6 address {address} is not supported",
                           hint="nodemesh captures IPv4 destinations only; give an IPv4 address or leave "
                                "addresses out to get a VIP")
        if address in addresses:
            raise doc.fail(f"spec.addresses[{i}]", f"address {address} is listed twice")
        addresses.append(address)
    ports = _ports(doc, spec)
    location = _str(doc, spec, "location", "spec", default="MESH_EXTERNAL")
    if location not in LOCATIONS:
        raise doc.fail("spec.location", f"unknown location {location!r}",
                       hint=f"one of: {', '.join(LOCATIONS)}")
    resolution = _str(doc, spec, "resolution", "spec", default="NONE")
    if resolution not in RESOLUTIONS:
        raise doc.fail("spec.resolution", f"unknown resolution {resolution!r}",
                       hint=f"one of: {', '.join(RESOLUTIONS)}")
    by_name = resolution in ("DNS", "DNS_ROUND_ROBIN")
    raw_eps = _list(doc, spec, "endpoints", "spec")
    if len(raw_eps) > MAX_ENDPOINTS:
        raise doc.fail("spec.endpoints", f"{len(raw_eps)} endpoints: at most {MAX_ENDPOINTS}")
    endpoints = tuple(_endpoint(doc, e, f"spec.endpoints[{i}]", ports, by_name)
                      for i, e in enumerate(raw_eps))
    if resolution == "NONE":
        if endpoints:
            raise doc.fail("spec.endpoints", "no endpoints should be given with resolution NONE",
                           hint="NONE sends traffic to the address the app dialled; use STATIC or DNS "
                                "to name endpoints")
        if not addresses:
            raise doc.fail("spec.resolution", "resolution NONE needs spec.addresses",
                           hint="nodemesh matches a NONE entry by the addresses apps dial; give them, "
                                "or use DNS (resolve the host) or STATIC (list endpoints)")
        if location == "MESH_INTERNAL":
            raise doc.fail("spec.location", "MESH_INTERNAL with resolution NONE is not supported",
                           hint="list the mesh workloads' addresses as endpoints with resolution STATIC")
    if resolution == "STATIC" and not endpoints:
        raise doc.fail("spec.endpoints", "resolution STATIC needs at least one endpoint")
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        raise doc.fail("spec.endpoints", "resolution DNS_ROUND_ROBIN takes at most one endpoint",
                       hint="use DNS to balance over several")
    if location == "MESH_INTERNAL" and by_name:
        raise doc.fail("spec.resolution", f"MESH_INTERNAL with resolution {resolution} is not supported",
                       hint="MESH_INTERNAL endpoints are mesh workloads: list their addresses with STATIC")
    export = _list(doc, spec, "exportTo", "spec")
    for i, x in enumerate(export):
        if x not in ("*", "."):
            raise doc.fail(f"spec.exportTo[{i}]", f"exportTo {x!r} is not supported",
                           hint="'*' or '.': nodemesh makes every ServiceEntry visible mesh-wide")
    return ServiceEntry(name, ns, tuple(hosts), ports, location, resolution, tuple(addresses), endpoints,
                        source=f"{doc.file}:{doc.start_line}")
