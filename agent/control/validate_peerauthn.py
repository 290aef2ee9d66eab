"""Istio's PeerAuthentication from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``security.istio.io/v1``, ``v1beta1``), ``kind`` and
``metadata`` and hands the ``spec`` mapping here. ``selector.matchLabels`` and
``mtls.mode`` (STRICT, PERMISSIVE, DISABLE, UNSET; none is UNSET) are read; a
field Istio has and nodemesh does not implement (``portLevelMtls``,
``targetRef(s)``) is refused by name, and so is a selector in the root
namespace, which Istio silently ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.control.authz import DEFAULT_ROOT_NAMESPACE
from agent.control.peerauthn import MODES, PeerAuthentication
from agent.control.validate import _Doc, _map, _tname
from agent.control.validate_authz import workload_selector
from agent.control.validate_istio import _fields

_TARGET = ("is not supported: PeerAuthentications apply to workloads by selector (nodemesh has "
           "no waypoints or gateways to attach them to)")
_SPEC_REFUSED = {
    "portLevelMtls": "is not supported yet: the inbound filter judges per address, not per port",
    "targetRef": _TARGET,
    "targetRefs": _TARGET,
}


def peer_authentication(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> PeerAuthentication:
    _fields(doc, spec, "spec", ("selector", "mtls"), _SPEC_REFUSED)
    if spec.get("selector") is not None and ns == DEFAULT_ROOT_NAMESPACE:
        raise doc.fail("spec.selector", f"a PeerAuthentication in the root namespace "
                       f"({DEFAULT_ROOT_NAMESPACE}) is mesh-wide: Istio ignores one with a selector",
                       hint="drop the selector, or put the policy in the workload's namespace")
    selector = workload_selector(doc, spec)
    mode = "UNSET"
    if spec.get("mtls") is not None:
        mtls = _map(doc, spec["mtls"], "spec.mtls")
        _fields(doc, mtls, "spec.mtls", ("mode",))
        m = mtls.get("mode")
        if m is not None:
            if not isinstance(m, str) or m not in MODES:
                raise doc.fail("spec.mtls.mode", f"unknown mode {_tname(m)} {m!r}",
                               hint=f"one of: {', '.join(MODES)}")
            mode = m
    return PeerAuthentication(name, ns, selector, mode, f"{doc.file}:{doc.start_line}")
