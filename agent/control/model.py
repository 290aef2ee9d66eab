"""The registry model: services, workloads, health checks, and their stored form.

How this works: a :class:`Service` owns a VIP and ports and selects
:class:`Workload` s by labels (every selector label must match). A workload
carries its address, named ports, weight, locality, declared health and its
health checks. Health *status* observed by the agents lives apart from the
workload spec (see :mod:`agent.control.snapshot`), so a re-apply of a workload
never erases it.

All values are frozen, slotted dataclasses validated in ``__post_init__``; the
stored form is canonical JSON (``to_doc`` / ``*_from_doc``) under keys built by
:func:`resource_key`. Validation of *user* input with file/line/field paths is in
:mod:`agent.control.validate`; here we only guard invariants.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "/nodemesh/registry/"
DEFAULT_NAMESPACE = "default"
DEFAULT_VIP_RANGE = "10.96.0.0/16"

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z", re.ASCII)
LABEL_KEY_RE = re.compile(r"([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z",
                          re.ASCII)
LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?\Z", re.ASCII)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z", re.ASCII)


def canonical_ip(text: str) -> str:
    """The canonical text of an IPv4/IPv6 address; ValueError if ``text`` is not one.

    Canonical dotted quads (the common case, and every address we store) are
    recognised by one regex match, ~10x cheaper than :mod:`ipaddress`; anything
    else goes through ``ipaddress`` (IPv6, or IPv4 it would reject)."""
    if _CANONICAL_V4.match(text):
        return text
    return str(ipaddress.ip_address(text))


class Protocol(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"
    HTTP2 = "http2"
    GRPC = "grpc"


class Health(enum.StrEnum):
    """Consul's check states. Passing and warning endpoints take traffic."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


class Kind(enum.StrEnum):
    SERVICE = "Service"
    WORKLOAD = "Workload"
    VIRTUAL_SERVICE = "VirtualService"  # Istio's (values in agent.control.istio)
    DESTINATION_RULE = "DestinationRule"
    AUTHORIZATION_POLICY = "AuthorizationPolicy"  # Istio's (values in agent.control.authz)
    REQUEST_AUTHENTICATION = "RequestAuthentication"  # Istio's (values in agent.control.reqauthn)
    PEER_AUTHENTICATION = "PeerAuthentication"  # Istio's (values in agent.control.peerauthn)
    RATE_LIMIT_POLICY = "RateLimitPolicy"  # nodemesh's (values in agent.control.ratelimit)
    GATEWAY = "Gateway"  # Istio's (values in agent.control.gateway)
    SERVICE_ENTRY = "ServiceEntry"  # Istio's (values in agent.control.serviceentry)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str  # a number, or the name of a workload port
    protocol: Protocol | None = None  # None: not declared (see l7_protocol)
    app_protocol: str = ""  # Kubernetes' appProtocol, as Istio reads it

    def __post_init__(self) -> None:
        if not (1 <= self.port <= 65535):
            raise ValueError(f"port {self.port} out of range 1-65535")
        if isinstance(self.target_port, int) and not (1 <= self.target_port <= 65535):
            raise ValueError(f"targetPort {self.target_port} out of range")


# Istio's port-name prefixes and appProtocol values (what Istio treats as opaque TCP too)
_NAMED = {
    "http": Protocol.HTTP, "http2": Protocol.HTTP2, "grpc": Protocol.GRPC, "grpc-web": Protocol.HTTP,
    "tcp": Protocol.TCP, "https": Protocol.TCP, "tls": Protocol.TCP, "mongo": Protocol.TCP,
    "mysql": Protocol.TCP, "redis": Protocol.TCP,
    "kubernetes.io/h2c": Protocol.HTTP2, "kubernetes.io/ws": Protocol.HTTP, "kubernetes.io/wss": Protocol.TCP,
}


def l7_protocol(port: ServicePort) -> Protocol | None:
    """How the proxy treats a service port, as Istio decides it: the declared ``protocol``,
    else ``appProtocol``, else the port name's prefix (``http-web``, ``grpc``, ``tcp-db``:
    ``<protocol>[-<suffix>]``); None when nothing declares it (the proxy sniffs)."""
    if port.protocol is not None:
        return port.protocol
    if port.app_protocol:
        p = _NAMED.get(port.app_protocol.lower())
        if p is not None:
            return p
    name = port.name.lower()
    p = _NAMED.get(name)
    if p is None and "-" in name:
        p = _NAMED.get(name.split("-", 1)[0])
        if p is None and name.startswith("grpc-web-"):
            p = Protocol.HTTP
    return p


LB_POLICIES = ("ROUND_ROBIN", "RANDOM", "WEIGHTED_ROUND_ROBIN", "WEIGHTED_RANDOM", "LEAST_REQUEST")


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=dict)
    lb_policy: str = "ROUND_ROBIN"  # one of LB_POLICIES (Istio's simple load balancers)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad service name {self.name!r}")
        if self.lb_policy not in LB_POLICIES:
            raise ValueError(f"unknown load-balancing policy {self.lb_policy!r}")
        if not NAME_RE.match(self.namespace):
            raise ValueError(f"bad namespace {self.namespace!r}")
        if self.vip:  # "" = to be allocated by apply
            canonical_ip(self.vip)

    @property
    def key(self) -> str:
        return resource_key(Kind.SERVICE, self.namespace, self.name)

    @property
    def fqdn(self) -> str:
        """Istio's destination_service: <name>.<namespace>.svc.cluster.local (a ServiceEntry's
        host for :class:`agent.control.serviceentry.EntryService`)."""
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name, "namespace": self.namespace, "vip": self.vip,
            "selector": dict(sorted(self.selector.items())),
            "ports": [{"name": p.name, "port": p.port, "targetPort": p.target_port,
                       **({"protocol": p.protocol.value} if p.protocol is not None else {}),
                       **({"appProtocol": p.app_protocol} if p.app_protocol else {})}
                      for p in self.ports],
            "loadBalancer": self.lb_policy,
        }


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """One active health check (Consul semantics)."""

    name: str
    kind: str  # "http" or "tcp"
    target: str  # URL for http, "host:port" for tcp
    interval_s: float = 10.0
    timeout_s: float = 10.0
    success_before_passing: int = 0
    failures_before_critical: int = 0
    deregister_critical_after_s: float | None = None
    initial_status: Health = Health.CRITICAL

    def __post_init__(self) -> None:
        if self.kind not in ("http", "tcp"):
            raise ValueError(f"unknown check kind {self.kind!r}")
        if not self.interval_s > 0:
            raise ValueError("interval must be > 0")
        if not self.timeout_s > 0:
            raise ValueError("timeout must be > 0")
        if not (self.success_before_passing >= 0):
            raise ValueError("success_before_passing must be >= 0")
        if not (self.failures_before_critical >= 0):
            raise ValueError("failures_before_critical must be >= 0")

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "target": self.target,
            "intervalS": self.interval_s, "timeoutS": self.timeout_s,
            "successBeforePassing": self.success_before_passing,
            "failuresBeforeCritical": self.failures_before_critical,
            "deregisterCriticalAfterS": self.deregister_critical_after_s,
            "initialStatus": self.initial_status.value,
        }


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    namespace: str
    address: str
    node: str = ""
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # port name -> number
    weight: int = 1
    locality: str = ""  # region/zone/subzone
    health: Health = Health.PASSING  # declared; checks override it once they ran
    checks: tuple[CheckSpec, ...] = ()

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad workload name {self.name!r}")
        if not NAME_RE.match(self.namespace):
            raise ValueError(f"bad namespace {self.namespace!r}")
        canonical_ip(self.address)
        if not (1 <= self.weight <= 10000):
            raise ValueError(f"weight {self.weight} out of range 1-10000")
        for n, p in self.ports.items():
            if not (1 <= p <= 65535):
                raise ValueError(f"port {n}={p} out of range")

    @property
    def key(self) -> str:
        return resource_key(Kind.WORKLOAD, self.namespace, self.name)

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name, "namespace": self.namespace, "address": self.address,
            "node": self.node, "serviceAccount": self.service_account,
            "labels": dict(sorted(self.labels.items())),
            "ports": dict(sorted(self.ports.items())), "weight": self.weight,
            "locality": self.locality, "health": self.health.value,
            "checks": [c.to_doc() for c in self.checks],
        }

    def to_stored(self) -> dict[str, Any]:
        """The stored form: :meth:`to_doc` without the fields at their default (what
        :func:`workload_from_doc` fills back in). Every agent decodes every stored
        workload on every change, so the text is kept short."""
        return {k: v for k, v in self.to_doc().items()
                if k not in _WORKLOAD_DEFAULTS or v != _WORKLOAD_DEFAULTS[k]}


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """What an agent observed for one workload (all its checks combined)."""

    status: Health
    output: str = ""
    since_s: float = 0.0  # wall-clock time of the last change

    def to_doc(self) -> dict[str, Any]:
        return {"status": self.status.value, "output": self.output, "sinceS": self.since_s}


def resource_key(kind: Kind | str, namespace: str, name: str) -> str:
    return f"{PREFIX}{str(kind).lower()}/{namespace}/{name}"


def health_key(namespace: str, workload: str) -> str:
    return f"{PREFIX}health/{namespace}/{workload}"


GUARD_KEY = f"{PREFIX}meta/guard"


# the first segment of every key resource_key/health_key make: 'service', 'workload',
# 'virtualservice', 'destinationrule', 'authorizationpolicy', 'requestauthentication',
# 'peerauthentication', 'ratelimitpolicy', 'gateway', 'serviceentry', 'health'
KEY_KINDS = frozenset([*(k.value.lower() for k in Kind), "health"])


def split_key(key: str) -> tuple[str, str, str] | None:
    """'<PREFIX>workload/ns/name' -> ('workload', 'ns', 'name'); None for other keys."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX):].split("/")
    if len(parts) != 3 or parts[0] not in KEY_KINDS:
        return None
    return parts[0], parts[1], parts[2]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A service selects a workload when every selector label matches; empty selects none."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_from_doc(d: Mapping[str, Any]) -> Service:
    return Service(
        name=d["name"], namespace=d["namespace"], vip=d["vip"],
        selector=dict(d.get("selector", {})),
        ports=tuple(ServicePort(p["name"], int(p["port"]), p["targetPort"],
                                Protocol(p["protocol"]) if p.get("protocol") else None,
                                p.get("appProtocol", "")) for p in d["ports"]),
        lb_policy=d.get("loadBalancer", "ROUND_ROBIN"),
    )


def check_from_doc(c: Mapping[str, Any]) -> CheckSpec:
    return CheckSpec(
        name=c["name"], kind=c["kind"], target=c["target"],
        interval_s=float(c["intervalS"]), timeout_s=float(c["timeoutS"]),
        success_before_passing=int(c["successBeforePassing"]),
        failures_before_critical=int(c["failuresBeforeCritical"]),
        deregister_critical_after_s=c.get("deregisterCriticalAfterS"),
        initial_status=Health(c.get("initialStatus", "critical")),
    )


_HEALTH = {h.value: h for h in Health}
# to_doc() of the field defaults: what to_stored() leaves out (identity fields are always kept)
_WORKLOAD_DEFAULTS = {k: v for k, v in Workload("x", "x", "0.0.0.0").to_doc().items()
                      if k not in ("name", "namespace", "address")}
_EMPTY_CHECKS: tuple[CheckSpec, ...] = ()


def _str_map(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise TypeError(f"{what} must be a mapping, got {type(v).__name__}")
    return v


def workload_from_doc(d: Mapping[str, Any]) -> Workload:
    # The agent decodes every stored workload on every change: no copies of the
    # fresh dicts json.loads made, enum members by dict lookup.
    ports = _str_map(d.get("ports", {}), "ports")
    checks = d.get("checks")
    # positional, in field order (cheaper than keywords; the round-trip test guards the order)
    return Workload(
        d["name"], d["namespace"], d["address"], d.get("node", ""),
        d.get("serviceAccount", "default"), _str_map(d.get("labels", {}), "labels"),
        {k: int(v) for k, v in ports.items()} if ports else ports,
        int(d.get("weight", 1)), d.get("locality", ""), _HEALTH[d.get("health", "passing")],
        tuple(check_from_doc(c) for c in checks) if checks else _EMPTY_CHECKS,
    )


def health_from_doc(d: Mapping[str, Any]) -> HealthStatus:
    return HealthStatus(Health(d["status"]), str(d.get("output", "")), float(d.get("sinceS", 0)))
