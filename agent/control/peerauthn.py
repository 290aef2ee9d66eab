"""Istio's PeerAuthentication as nodemesh holds it, and which mode a workload gets. Pure.

How this works: ``validate_peerauthn.py`` turns the YAML users write for Istio
(``security.istio.io/v1``, ``v1beta1``) into these frozen values; they are
stored as JSON (:func:`peer_authentication_doc` /
:func:`peer_authentication_from_doc`) and reach every node in snapshots. The
node decides each enrolled pod's inbound mode with :func:`mode_for`, Istio's
precedence: a policy of the workload's namespace whose selector matches it,
else the workload's namespace's policy without a selector, else the mesh-wide
one (the root namespace, no selector), else agent.yaml's setting; ``UNSET``
inherits from the next level. Enforcing the mode is the tc filter's business
(:mod:`bpf.peerauth`); ``portLevelMtls`` is not supported (the filter judges
per address, not per port).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.control.authz import DEFAULT_ROOT_NAMESPACE

MODES = ("STRICT", "PERMISSIVE", "DISABLE", "UNSET")


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...] | None = None  # matchLabels; None: the whole namespace
    mode: str = "UNSET"  # one of MODES
    source: str = ""  # file:line it was applied from

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mTLS mode {self.mode!r} (one of: {', '.join(MODES)})")


def mode_for(
    resources: Iterable[PeerAuthentication], namespace: str, labels: Mapping[str, str], default: str,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> str:
    """The inbound mode (STRICT, PERMISSIVE or DISABLE) of a workload of ``namespace`` with
    ``labels``. Several policies at one level: the first by name wins (Istio keeps the oldest;
    nodemesh keeps no creation time). A policy with a selector in the root namespace is ignored,
    as Istio does (validation refuses it)."""
    workload: PeerAuthentication | None = None
    ns_wide: PeerAuthentication | None = None
    mesh: PeerAuthentication | None = None
    for r in sorted(resources, key=lambda r: r.name):
        if r.namespace == namespace and r.selector is not None:
            if workload is None and all(labels.get(k) == v for k, v in r.selector):
                workload = r
        elif r.namespace == namespace:
            if ns_wide is None:
                ns_wide = r
        elif r.namespace == root_namespace and r.selector is None and mesh is None:
            mesh = r
    for level in (workload, ns_wide, mesh):
        if level is not None and level.mode != "UNSET":
            return level.mode
    return default


# -- JSON documents ---------------------------------------------------------------------------


def peer_authentication_doc(r: PeerAuthentication) -> dict[str, Any]:
    return {"name": r.name, "namespace": r.namespace,
            "selector": dict(r.selector) if r.selector is not None else None,
            "mtls": {"mode": r.mode}, "source": r.source}


def peer_authentication_from_doc(d: Mapping[str, Any]) -> PeerAuthentication:
    sel = d.get("selector")
    selector = tuple(sorted(sel.items())) if sel is not None else None
    return PeerAuthentication(d["name"], d["namespace"], selector, d.get("mtls", {}).get("mode", "UNSET"),
                              d.get("source", ""))
