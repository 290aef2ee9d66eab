"""Istio's PeerAuthentication from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``security.istio.io/v1``, ``v1beta1``), ``kind`` and
``metadata`` and hands the ``spec`` mapping here. ``selector.matchLabels``,
``mtls.mode`` (STRICT, PERMISSIVE, DISABLE, UNSET; none is UNSET) and
``portLevelMtls`` (workload port -> ``{mode}``, only with a selector, as
Istio's validation says) are read; a field Istio has and nodemesh does not
implement (``targetRef(s)``) is refused by name, and so is a selector in the
root namespace, which Istio silently ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.control.authz import DEFAULT_ROOT_NAMESPACE
from agent.control.peerauthn import MAX_PORTS, MODES, PeerAuthentication
from agent.control.validate import _Doc, _map, _tname
from agent.control.validate_authz import workload_selector
from agent.control.validate_istio import _fields

_TARGET = ("is not supported: PeerAuthentications apply to workloads by selector (nodemesh has "
           "no waypoints or gateways to attach them to)")
_SPEC_REFUSED = {
    "targetRef": _TARGET,
    "targetRefs": _TARGET,
}


def _mode(doc: _Doc, m: Mapping[str, Any], path: str) -> str:
    _fields(doc, m, path, ("mode",))
    v = m.get("mode")
    if v is None:
        return "UNSET"
    if not isinstance(v, str) or v not in MODES:
        raise doc.fail(f"{path}.mode", f"unknown mode {_tname(v)} {v!r}", hint=f"one of: {', '.join(MODES)}")
    return v


def _port_level(doc: _Doc, spec: Mapping[str, Any], selector: tuple[tuple[str, str], ...] | None,
                ) -> tuple[tuple[int, str], ...]:
    raw = _map(doc, spec["portLevelMtls"], "spec.portLevelMtls")
    if raw and not selector:
        raise doc.fail("spec.portLevelMtls", "portLevelMtls requires a workload selector",
                       hint="add spec.selector.matchLabels naming the workloads whose ports these are")
    if len(raw) > MAX_PORTS:
        raise doc.fail("spec.portLevelMtls",
                       f"{len(raw)} ports: nodemesh holds at most {MAX_PORTS} per workload")
    ports: dict[int, str] = {}
    for key, value in raw.items():
        path = f"spec.portLevelMtls.{key}"
        port = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise doc.fail(path, f"expected a port number 1-65535 as the key, got {_tname(key)} {key!r}",
                           hint="the workload's port (a Service's targetPort), not the Service port")
        if port in ports:
            raise doc.fail(path, f"port {port} is given twice")
        if value is None:
            raise doc.fail(path, f"portLevelMtls[{port}] must not be null", hint="give {mode: ...}")
        ports[port] = _mode(doc, _map(doc, value, path), path)
    return tuple(sorted(ports.items()))


def peer_authentication(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str,
                        root_namespace: str | None = None) -> PeerAuthentication:
    root_namespace = root_namespace or DEFAULT_ROOT_NAMESPACE
    _fields(doc, spec, "spec", ("selector", "mtls", "portLevelMtls"), _SPEC_REFUSED)
    selector = workload_selector(doc, spec)
    if selector and ns == root_namespace:
        raise doc.fail("spec.selector", f"a PeerAuthentication in the root namespace "
                       f"({root_namespace}) is mesh-wide: Istio ignores one with a selector",
                       hint="drop the selector, or put the policy in the workload's namespace")
    mode = "UNSET"
    if spec.get("mtls") is not None:
        mode = _mode(doc, _map(doc, spec["mtls"], "spec.mtls"), "spec.mtls")
    ports = _port_level(doc, spec, selector) if spec.get("portLevelMtls") is not None else ()
    return PeerAuthentication(name, ns, selector, mode, f"{doc.file}:{doc.start_line}", ports)
