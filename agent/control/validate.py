"""Pure validation of user input: Kubernetes-style YAML into model objects.

How this works: :func:`parse_yaml` composes the YAML into nodes (keeping line
numbers), turns each document into plain Python values plus a map from field
path (``spec.ports[0].port``) to line, and validates it strictly: unknown
fields, wrong types, out-of-range values and bad addresses are rejected with an
:class:`InputError` naming the file, the line, the field path and the reason.
There is no I/O here: callers pass the text and the file name. Istio's
VirtualService and DestinationRule (``networking.istio.io/...``) and
AuthorizationPolicy (``security.istio.io/...``) share the document and
metadata checks here; their specs are read in
:mod:`agent.control.validate_istio` and :mod:`agent.control.validate_authz`.

A Service without ``spec.vip`` comes out with ``vip=""``; :mod:`agent.control.apply`
allocates one from the configured range.
"""

from __future__ import annotations

import contextlib
import ipaddress
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from agent.control.authz import SECURITY_VERSIONS, AuthorizationPolicy
from agent.control.errors import InputError
from agent.control.gateway import Gateway
from agent.control.istio import ISTIO_NETWORKING_VERSIONS, DestinationRule, VirtualService
from agent.control.model import (
    DEFAULT_NAMESPACE,
    LABEL_KEY_RE,
    LABEL_VALUE_RE,
    LB_POLICIES,
    NAME_RE,
    CheckSpec,
    Health,
    Protocol,
    Service,
    ServicePort,
    Workload,
    canonical_ip,
)
from agent.control.peerauthn import PeerAuthentication
from agent.control.ratelimit import RateLimitPolicy
from agent.control.reqauthn import RequestAuthentication
from agent.control.screening import address_problem
from agent.control.serviceentry import ServiceEntry
from agent.gcpause import paused

API_VERSION = "nodemesh.io/v1"
_HEALTH = {h.value: h for h in Health}
KINDS = ("Service", "Workload", "RateLimitPolicy")
# under ISTIO_NETWORKING_VERSIONS
ISTIO_KINDS = ("VirtualService", "DestinationRule", "Gateway", "ServiceEntry")
# under SECURITY_VERSIONS
SECURITY_KINDS = ("AuthorizationPolicy", "RequestAuthentication", "PeerAuthentication")
Resource = (Service | Workload | VirtualService | DestinationRule | AuthorizationPolicy
            | RequestAuthentication | PeerAuthentication | RateLimitPolicy | Gateway
            | ServiceEntry)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# libyaml's parser when PyYAML was built with it (Debian's and the wheels are): ~10x faster.
try:
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - PyYAML without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

_STR_TAG = "tag:yaml.org,2002:str"
_TAG_CACHE: dict[str, str] = {}
_TAG_CACHE_MAX = 100_000


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
# PyYAML's implicit resolvers (YAML 1.1: null, bool, int, float, timestamp, ...) by
# first character, as SafeLoader.resolve looks them up.
_IMPLICIT: dict[str | None, list[tuple[str, re.Pattern[str]]]] = dict(
    _BaseLoader.yaml_implicit_resolvers)


class _FastLoader(_BaseLoader):
    """The safe loader, minus work it does per node for features we never use.

    - No path resolvers (the safe loader has none): the per-node descend/ascend
      hooks become C builtins that do nothing useful, instead of Python calls.
    - Implicit tags are resolved with the same regexes as ``SafeLoader.resolve``
      but without its generic machinery; a plain scalar whose first character
      starts no implicit type is a string at once, and results are cached (a
      manifest repeats ``apiVersion``, ``80``, ``true`` ... many times).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # The C composer looks these up on the instance: builtins with compatible
        # signatures whose results it ignores.
        self.descend_resolver = operator.is_  # type: ignore[method-assign,assignment]
        self.ascend_resolver = bool  # type: ignore[method-assign,assignment]

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode:
            if not implicit[0]:
                return _STR_TAG
            rs = _IMPLICIT.get(value[0] if value else "")
            if rs is None:
                return _STR_TAG
            tag = _TAG_CACHE.get(value)
            if tag is None:
                tag = next((t for t, rx in rs if rx.match(value)), _STR_TAG)
                if len(_TAG_CACHE) < _TAG_CACHE_MAX:
                    _TAG_CACHE[value] = tag
            return tag
        return _MAP_TAG if kind is yaml.MappingNode else _SEQ_TAG


@dataclass(frozen=True, slots=True)
class Located:
    """A validated resource and where it came from (for apply-time errors)."""

    resource: Resource
    file: str
    line: int
    doc: _Doc | None = None  # for errors found later (apply): the line of a field
    address_path: str = "spec.address"  # where a workload's address is in its document

    def line_of(self, path: str) -> int:
        return self.line if self.doc is None else self.doc.line_of(path)

    def fail(self, path: str, reason: str, hint: str | None = None) -> InputError:
        """An error at field ``path`` of this resource: its own line when known."""
        if self.doc is not None:
            return self.doc.fail(path, reason, hint)
        return InputError(reason, file=self.file, line=self.line, path=path, hint=hint)


class _Doc:
    """One document, for error messages: a failing field path is mapped to its line
    by walking the composed YAML nodes (only on the error path; the happy path never
    builds path strings)."""

    def __init__(self, file: str, start_line: int, root: yaml.Node | None = None):
        self.file = file
        self.start_line = start_line
        self.root = root

    def line_of(self, path: str) -> int:
        """Line of the deepest node along ``path`` (``spec.ports[0].port``; label keys
        may themselves contain dots)."""
        node = self.root
        if node is None:
            return self.start_line
        rest = path
        while rest:
            nxt: yaml.Node | None = None
            if isinstance(node, yaml.SequenceNode):
                m = re.match(r"\[(\d+)\]\.?", rest)
                if m and int(m.group(1)) < len(node.value):
                    nxt, rest = node.value[int(m.group(1))], rest[m.end():]
            elif isinstance(node, yaml.MappingNode):
                best = ""
                for k, v in node.value:
                    key = k.value if isinstance(k, yaml.ScalarNode) else None
                    if (isinstance(key, str) and len(key) > len(best)
                            and (rest == key or rest.startswith((key + ".", key + "[")))):
                        best, nxt = key, v
                rest = rest[len(best):].removeprefix(".")
            if nxt is None:
                break
            node = nxt
        return int(node.start_mark.line) + 1

    def fail(self, path: str, reason: str, hint: str | None = None) -> InputError:
        return InputError(reason, file=self.file, line=self.line_of(path), path=path, hint=hint)



class _BadNode(Exception):
    def __init__(self, node: yaml.Node, reason: str, key: str = ""):
        super().__init__(reason)
        self.node, self.reason, self.key = node, reason, key


def _to_python(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    """Plain Python values from composed nodes (strings without the constructor)."""
    if type(node) is yaml.ScalarNode:
        if node.tag == _STR_TAG:
            return node.value
        return loader.construct_object(node)
    if type(node) is yaml.MappingNode:
        out: dict[str, Any] = {}
        for k, v in node.value:
            if type(k) is not yaml.ScalarNode:
                raise _BadNode(k, "mapping keys must be plain strings")
            key = str(k.value)
            if key in out:
                raise _BadNode(k, f"duplicate field {key!r}", key)
            out[key] = _to_python(v, loader)
        return out
    if type(node) is yaml.SequenceNode:
        return [_to_python(v, loader) for v in node.value]
    return loader.construct_object(node)


def _path_to(root: yaml.Node, target: yaml.Node, path: str = "") -> str | None:
    """The field path of ``target`` (a node or a mapping key) under ``root``."""
    if root is target:
        return path
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            p = f"{path}.{k.value}".lstrip(".")
            if k is target:
                return p
            found = _path_to(v, target, p)
            if found is not None:
                return found
    elif isinstance(root, yaml.SequenceNode):
        for i, v in enumerate(root.value):
            found = _path_to(v, target, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse_yaml(text: str, file: str, vip_range: IpNetwork, *, root_namespace: str | None = None
               ) -> list[Located]:
    """All documents of one file, validated; the first error raises InputError. ``root_namespace``:
    the agents' ``mesh.root_namespace`` (None: istio-system)."""
    with paused():  # composing allocates many small acyclic objects
        return _parse_yaml(text, file, vip_range, root_namespace)


def _parse_yaml(text: str, file: str, vip_range: IpNetwork, root_namespace: str | None) -> list[Located]:
    try:
        nodes = list(yaml.compose_all(text, Loader=_FastLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise InputError(f"invalid YAML: {e.problem or e.context}", file=file,
                         line=None if mark is None else mark.line + 1) from e
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", file=file) from e
    out: list[Located] = []
    loader = yaml.SafeLoader("")
    for node in nodes:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.value == ""
                            and node.tag == "tag:yaml.org,2002:null"):
            continue  # an empty document (a file ending in ---, as kubectl accepts it)
        try:
            value = _to_python(node, loader)
        except _BadNode as e:
            raise InputError(e.reason, file=file, line=e.node.start_mark.line + 1,
                             path=_path_to(node, e.node) or "") from None
        except yaml.MarkedYAMLError as e:  # a value no safe constructor takes (!!python/..., <<)
            mark = e.problem_mark or e.context_mark
            raise InputError(f"invalid YAML: {e.problem or e.context}", file=file,
                             line=None if mark is None else mark.line + 1) from None
        doc = _Doc(file, node.start_mark.line + 1, node)
        out.append(Located(validate_document(value, doc, vip_range, root_namespace=root_namespace), file,
                           doc.start_line, doc))
    if not out:
        raise InputError("no documents found (expected YAML with apiVersion/kind)", file=file)
    return out


def parse_vip_range(text: str, where: str = "--vip-range") -> IpNetwork:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        hint = None
        with contextlib.suppress(ValueError):
            hint = f"did you mean {ipaddress.ip_network(text, strict=False)}?"
        raise InputError(f"{text!r} is not a network in CIDR form: {e}", file=where,
                         hint=hint) from e
    if net.num_addresses < 4:
        raise InputError(f"{text!r} is too small for service VIPs", file=where)
    return net


# -- field helpers -------------------------------------------------------------------

def _map(doc: _Doc, v: Any, path: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise doc.fail(path, f"expected a mapping, got {_tname(v)}")
    return v


def _tname(v: Any) -> str:
    return {type(None): "nothing", bool: "a boolean", int: "a number", float: "a number",
            str: "a string", list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _only(doc: _Doc, m: Mapping[str, Any], path: str, allowed: frozenset[str] | tuple[str, ...],
          ) -> None:
    for k in m:
        if k not in allowed:
            shown = allowed if isinstance(allowed, tuple) else sorted(allowed)
            raise doc.fail(_at(path, k), f"unknown field {k!r}",
                           hint=f"allowed here: {', '.join(shown)}")


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _str(doc: _Doc, m: Mapping[str, Any], key: str, path: str, *, required: bool = False,
         default: str = "") -> str:
    v = m.get(key)
    if type(v) is str:  # the common case first; paths are built only for messages
        return v
    if v is None:
        if required:
            raise doc.fail(_at(path, key), f"missing required field {key!r}")
        return default
    raise doc.fail(_at(path, key), f"expected a string, got {_tname(v)} {v!r}")


def _int(doc: _Doc, m: Mapping[str, Any], key: str, path: str, lo: int, hi: int, *,
         required: bool = False, default: int = 0) -> int:
    v = m.get(key)
    if type(v) is int and lo <= v <= hi:
        return v
    p = _at(path, key)
    if v is None:
        if required:
            raise doc.fail(p, f"missing required field {key!r}")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise doc.fail(p, f"expected an integer, got {_tname(v)} {v!r}")
    raise doc.fail(p, f"{v} is out of range {lo}-{hi}")


def _name(doc: _Doc, v: str, path: str) -> str:
    if not NAME_RE.match(v):
        raise doc.fail(path, f"{v!r} is not a valid name (lowercase letters, digits and '-', "
                             "at most 63, starting and ending with a letter or digit)")
    return v


def _labels(doc: _Doc, v: Any, path: str) -> dict[str, str]:
    if v is None:
        return {}
    m = _map(doc, v, path)
    out = {}
    for k, val in m.items():
        if not isinstance(val, str) or not LABEL_VALUE_RE.match(val):
            raise doc.fail(f"{path}.{k}", f"label value {val!r} must be a string of up to 63 "
                                          "letters, digits, '-', '_' or '.'")
        if not LABEL_KEY_RE.match(k):
            raise doc.fail(f"{path}.{k}", f"label key {k!r} is not valid")
        out[k] = val
    return out


def _ip(doc: _Doc, v: str, path: str) -> str:
    try:
        return canonical_ip(v)
    except ValueError:
        raise doc.fail(path, f"{v!r} is not an IP address") from None


def workload_ip(doc: _Doc, v: str, path: str) -> str:
    """A workload's address: an IP address the proxy may connect to (see
    :func:`agent.control.screening.address_problem`)."""
    address = _ip(doc, v, path)
    problem = address_problem(address)
    if problem is not None:
        raise doc.fail(path, f"workload address {problem.detail}",
                       hint="give the workload its own unicast address (the pod's)")
    return address


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)", re.ASCII)


def parse_duration_s(text: str) -> float:
    """Go/Consul durations: '10s', '1m30s', '500ms'; a bare number means seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text, re.ASCII):
        return float(text)
    if not text or _DURATION_RE.sub("", text) != "":
        raise ValueError(f"{text!r} is not a duration (like 10s, 1m30s, 500ms)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in _DURATION_RE.findall(text))


def _duration(doc: _Doc, m: Mapping[str, Any], key: str, path: str, default: float | None,
              ) -> float | None:
    p = f"{path}.{key}".lstrip(".")
    if key not in m or m[key] is None:
        return default
    v = m[key]
    try:
        s = float(v) if isinstance(v, int | float) and not isinstance(v, bool) \
            else parse_duration_s(str(v))
    except ValueError as e:
        raise doc.fail(p, str(e)) from None
    if s <= 0:
        raise doc.fail(p, f"duration must be positive, got {v!r}")
    return s


# -- documents -----------------------------------------------------------------------

def validate_document(value: Any, doc: _Doc, vip_range: IpNetwork, *, root_namespace: str | None = None
                      ) -> Resource:
    m = _map(doc, value, "")
    _only(doc, m, "", ("apiVersion", "kind", "metadata", "spec"))
    api = _str(doc, m, "apiVersion", "", required=True)
    if api == API_VERSION:
        kinds: tuple[str, ...] = KINDS
    elif api in ISTIO_NETWORKING_VERSIONS:
        kinds = ISTIO_KINDS
    elif api in SECURITY_VERSIONS:
        kinds = SECURITY_KINDS
    else:
        raise doc.fail("apiVersion", f"unsupported apiVersion {api!r}", hint=_api_hint(m.get("kind")))
    kind = _str(doc, m, "kind", "", required=True)
    if kind not in kinds:
        if kind in KINDS or kind in ISTIO_KINDS or kind in SECURITY_KINDS:
            raise doc.fail("kind", f"kind {kind} does not exist in {api}", hint=_api_hint(kind))
        raise doc.fail("kind", f"unknown kind {kind!r}",
                       hint=f"known kinds: {', '.join(KINDS)} ({API_VERSION}); "
                            f"{', '.join(ISTIO_KINDS)} ({ISTIO_NETWORKING_VERSIONS[0]}); "
                            f"{', '.join(SECURITY_KINDS)} ({SECURITY_VERSIONS[0]})")
    meta = _map(doc, m.get("metadata") or {}, "metadata")
    _only(doc, meta, "metadata", ("name", "namespace", "labels", "annotations"))
    name = _name(doc, _str(doc, meta, "name", "metadata", required=True), "metadata.name")
    ns = _name(doc, _str(doc, meta, "namespace", "metadata", default=DEFAULT_NAMESPACE),
               "metadata.namespace")
    labels = _labels(doc, meta.get("labels"), "metadata.labels")
    if "spec" not in m:
        raise doc.fail("spec", "missing required field 'spec'")
    spec = _map(doc, m["spec"], "spec")
    if kind == "Service":
        return _service(doc, spec, name, ns, vip_range)
    if kind == "Workload":
        return _workload(doc, spec, name, ns, labels)
    if kind == "AuthorizationPolicy":
        from agent.control import validate_authz  # it builds on the helpers above

        return validate_authz.authorization_policy(doc, spec, name, ns)
    if kind == "RequestAuthentication":
        from agent.control import validate_reqauthn  # it builds on the helpers above

        return validate_reqauthn.request_authentication(doc, spec, name, ns)
    if kind == "PeerAuthentication":
        from agent.control import validate_peerauthn  # it builds on the helpers above

        return validate_peerauthn.peer_authentication(doc, spec, name, ns, root_namespace)
    if kind == "RateLimitPolicy":
        from agent.control import validate_ratelimit  # it builds on the helpers above

        return validate_ratelimit.rate_limit_policy(doc, spec, name, ns)
    if kind == "Gateway":
        from agent.control import validate_gateway  # it builds on the helpers above

        return validate_gateway.gateway(doc, spec, name, ns)
    if kind == "ServiceEntry":
        from agent.control import validate_serviceentry  # it builds on the helpers above

        return validate_serviceentry.service_entry(doc, spec, name, ns)
    from agent.control import validate_istio  # it builds on the helpers above

    if kind == "VirtualService":
        return validate_istio.virtual_service(doc, spec, name, ns)
    return validate_istio.destination_rule(doc, spec, name, ns)


def _api_hint(kind: Any) -> str:
    if kind in ISTIO_KINDS:
        return (f"use apiVersion: {ISTIO_NETWORKING_VERSIONS[0]} "
                f"({', '.join(v.rsplit('/', 1)[1] for v in ISTIO_NETWORKING_VERSIONS[1:])} are read too)")
    if kind in SECURITY_KINDS:
        return (f"use apiVersion: {SECURITY_VERSIONS[0]} "
                f"({', '.join(v.rsplit('/', 1)[1] for v in SECURITY_VERSIONS[1:])} is read too)")
    if kind in KINDS:
        return f"use apiVersion: {API_VERSION}"
    return (f"use apiVersion: {API_VERSION} for {', '.join(KINDS)}, "
            f"{ISTIO_NETWORKING_VERSIONS[0]} for {', '.join(ISTIO_KINDS)}, "
            f"{SECURITY_VERSIONS[0]} for {', '.join(SECURITY_KINDS)}")


def _service(doc: _Doc, spec: dict[str, Any], name: str, ns: str, vip_range: IpNetwork,
             ) -> Service:
    _only(doc, spec, "spec", ("vip", "selector", "ports", "loadBalancer"))
    lb = _str(doc, spec, "loadBalancer", "spec", default="ROUND_ROBIN").upper()
    if lb not in LB_POLICIES:
        raise doc.fail("spec.loadBalancer", f"unknown load-balancing policy {lb!r}",
                       hint="one of: " + ", ".join(LB_POLICIES))
    vip = _str(doc, spec, "vip", "spec")
    if vip:
        vip = _ip(doc, vip, "spec.vip")
        if ipaddress.ip_address(vip) not in vip_range:
            raise doc.fail("spec.vip", f"VIP {vip} is outside the service range {vip_range}",
                           hint="leave spec.vip out to get one allocated")
    ports_v = spec.get("ports")
    if not isinstance(ports_v, list) or not ports_v:
        raise doc.fail("spec.ports", "expected a non-empty list of ports")
    ports: list[ServicePort] = []
    for i, pv in enumerate(ports_v):
        path = f"spec.ports[{i}]"
        p = _map(doc, pv, path)
        _only(doc, p, path, ("name", "port", "targetPort", "protocol", "appProtocol"))
        number = _int(doc, p, "port", path, 1, 65535, required=True)
        proto_s = _str(doc, p, "protocol", path, default="").lower()
        proto: Protocol | None = None
        if proto_s:
            try:
                proto = Protocol(proto_s)
            except ValueError:
                raise doc.fail(f"{path}.protocol", f"unknown protocol {proto_s!r}",
                               hint="one of: " + ", ".join(x.value for x in Protocol)
                               + " (or leave it out: the proxy then detects HTTP)") from None
        app_protocol = _str(doc, p, "appProtocol", path, default="")
        pname = _str(doc, p, "name", path, default=f"{proto.value}-{number}" if proto else f"port-{number}")
        target: int | str = number
        if "targetPort" in p:
            t = p["targetPort"]
            if isinstance(t, str):
                target = _name(doc, t, f"{path}.targetPort")
            else:
                target = _int(doc, p, "targetPort", path, 1, 65535)
        if any(q.port == number for q in ports):
            raise doc.fail(f"{path}.port", f"port {number} is listed twice")
        if any(q.name == pname for q in ports):
            raise doc.fail(f"{path}.name", f"port name {pname!r} is listed twice")
        ports.append(ServicePort(pname, number, target, proto, app_protocol))
    selector = _labels(doc, spec.get("selector"), "spec.selector")
    return Service(name=name, namespace=ns, vip=vip, ports=tuple(ports), selector=selector,
                   lb_policy=lb)


def _workload(doc: _Doc, spec: dict[str, Any], name: str, ns: str, labels: dict[str, str],
              ) -> Workload:
    _only(doc, spec, "spec", ("address", "node", "serviceAccount", "ports", "weight",
                              "locality", "health", "checks"))
    address = workload_ip(doc, _str(doc, spec, "address", "spec", required=True), "spec.address")
    ports: dict[str, int] = {}
    pv = spec.get("ports")
    if isinstance(pv, dict):
        for k in pv:
            _name(doc, k, f"spec.ports.{k}")
            ports[k] = _int(doc, pv, k, "spec.ports", 1, 65535)
    elif isinstance(pv, list):
        for i, item in enumerate(pv):
            path = f"spec.ports[{i}]"
            im = _map(doc, item, path)
            _only(doc, im, path, ("name", "port"))
            n = _int(doc, im, "port", path, 1, 65535, required=True)
            pname = _name(doc, _str(doc, im, "name", path, default=f"port-{n}"), f"{path}.name")
            ports[pname] = n
    elif pv is not None:
        raise doc.fail("spec.ports", f"expected a mapping name: port or a list, got {_tname(pv)}")
    health_s = _str(doc, spec, "health", "spec", default="passing")
    health = _HEALTH.get(health_s)
    if health is None:
        raise doc.fail("spec.health", f"unknown health {health_s!r}",
                       hint="one of: passing, warning, critical") from None
    checks_v = spec.get("checks") or ()
    if not isinstance(checks_v, list | tuple):
        raise doc.fail("spec.checks", f"expected a list, got {_tname(checks_v)}")
    checks = tuple(check_from_fields(doc, _map(doc, c, f"spec.checks[{i}]"), f"spec.checks[{i}]",
                                     f"{name}-check-{i}") for i, c in enumerate(checks_v))
    return Workload(
        name=name, namespace=ns, address=address,
        node=_str(doc, spec, "node", "spec"),
        service_account=_name(doc, _str(doc, spec, "serviceAccount", "spec", default="default"),
                              "spec.serviceAccount"),
        labels=labels, ports=ports,
        weight=_int(doc, spec, "weight", "spec", 1, 10000, default=1),
        locality=_str(doc, spec, "locality", "spec"), health=health, checks=checks,
    )


# Consul's snake_case names and our camelCase ones, both accepted.
_CHECK_FIELDS = {
    "name": "name", "id": "id", "checkid": "id", "http": "http", "tcp": "tcp",
    "interval": "interval", "timeout": "timeout", "status": "status", "notes": "notes",
    "success_before_passing": "sbp", "successBeforePassing": "sbp",
    "failures_before_critical": "fbc", "failuresBeforeCritical": "fbc",
    "deregister_critical_service_after": "dcsa", "deregisterCriticalServiceAfter": "dcsa",
}


def check_from_fields(doc: _Doc, m: Mapping[str, Any], path: str, default_name: str,
                      ) -> CheckSpec:
    """One health check, from YAML or from a Consul definition (already a mapping)."""
    f: dict[str, Any] = {}
    orig: dict[str, str] = {}
    for k, v in m.items():
        if k not in _CHECK_FIELDS:
            raise doc.fail(f"{path}.{k}", f"unsupported check field {k!r}",
                           hint="supported: http, tcp, interval, timeout, status, "
                                "success_before_passing, failures_before_critical, "
                                "deregister_critical_service_after")
        f[_CHECK_FIELDS[k]] = v
        orig[_CHECK_FIELDS[k]] = k

    def named(canon: str, fallback: str) -> tuple[dict[str, Any], str]:
        key = orig.get(canon, fallback)
        return {key: f.get(canon)}, key
    kinds = [k for k in ("http", "tcp") if k in f]
    if len(kinds) != 1:
        raise doc.fail(path, "a check needs exactly one of 'http' or 'tcp'")
    kind = kinds[0]
    target = f[kind]
    if not isinstance(target, str) or not target:
        raise doc.fail(f"{path}.{kind}", f"expected a non-empty string, got {target!r}")
    if kind == "http" and not re.match(r"https?://[^/\s]+", target, re.ASCII):
        raise doc.fail(f"{path}.http", f"{target!r} is not an http:// or https:// URL")
    if kind == "tcp" and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}", target,
                                          re.ASCII):
        raise doc.fail(f"{path}.tcp", f"{target!r} is not HOST:PORT")
    keys = {"interval": "interval", "timeout": "timeout",
            "dcsa": "deregister_critical_service_after"}
    durations = {k: _duration(doc, *named(k, fb), path, None) for k, fb in keys.items()}
    interval = durations["interval"]
    if interval is None:
        raise doc.fail(f"{path}.interval", "missing required field 'interval'")
    status_s = str(f.get("status", "critical"))
    try:
        status = Health(status_s)
    except ValueError:
        raise doc.fail(f"{path}.status", f"unknown status {status_s!r}") from None
    name = str(f.get("name") or f.get("id") or default_name)
    return CheckSpec(
        name=name, kind=kind, target=target, interval_s=interval,
        timeout_s=durations["timeout"] or min(10.0, interval),
        success_before_passing=_int(doc, *named("sbp", "success_before_passing"), path, 0, 1000),
        failures_before_critical=_int(doc, *named("fbc", "failures_before_critical"), path,
                                      0, 1000),
        deregister_critical_after_s=durations["dcsa"], initial_status=status,
    )
