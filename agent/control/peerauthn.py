"""Istio's PeerAuthentication as nodemesh holds it, and which mode a workload's port gets. Pure.

How this works: ``validate_peerauthn.py`` turns the YAML users write for Istio
(``security.istio.io/v1``, ``v1beta1``) into these frozen values; they are
stored as JSON (:func:`peer_authentication_doc` /
:func:`peer_authentication_from_doc`) and reach every node in snapshots. The
node decides each enrolled pod's inbound modes with :func:`decide`, Istio's
precedence (its ``ComposePeerAuthentication``): a policy of the workload's
namespace whose selector matches it, else the workload's namespace's policy
without a selector, else the mesh-wide one (the root namespace, no selector),
else agent.yaml's setting; ``UNSET`` inherits from the next level. The
workload-level policy's ``portLevelMtls`` then sets single ports (the
workload's own port, the Service's targetPort), an ``UNSET`` port taking the
workload's mode. The result says which resource set each mode, for
``nodemesh explain``. Enforcing it is the tc filter's business
(:mod:`bpf.peerauth`: one mode per pod address, overrides per port).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.control.authz import DEFAULT_ROOT_NAMESPACE

MODES = ("STRICT", "PERMISSIVE", "DISABLE", "UNSET")
MAX_PORTS = 32  # portLevelMtls entries one policy may hold (bpf: NM_PA_PORTS_PER_POD)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...] | None = None  # matchLabels; None: the whole namespace
    mode: str = "UNSET"  # one of MODES
    source: str = ""  # file:line it was applied from
    ports: tuple[tuple[int, str], ...] = ()  # portLevelMtls: (workload port, mode), sorted

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mTLS mode {self.mode!r} (one of: {', '.join(MODES)})")
        for port, mode in self.ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"portLevelMtls port {port!r} is not a port number")
            if mode not in MODES:
                raise ValueError(f"unknown mTLS mode {mode!r} for port {port}")
        if len(self.ports) > MAX_PORTS:
            raise ValueError(f"{len(self.ports)} portLevelMtls ports: at most {MAX_PORTS}")
        if len({p for p, _ in self.ports}) != len(self.ports):
            raise ValueError("a portLevelMtls port is given twice")
        if self.ports and not self.selector:
            raise ValueError("portLevelMtls requires a workload selector")
        object.__setattr__(self, "ports", tuple(sorted(self.ports)))

    @property
    def ref(self) -> str:
        return f"PeerAuthentication {self.namespace}/{self.name}"


DEFAULT_SET_BY = "agent.yaml peer_authentication"


@dataclass(frozen=True, slots=True)
class PeerAuthDecision:
    """The modes of one workload: ``mode`` for every port not in ``ports``."""

    mode: str  # STRICT, PERMISSIVE or DISABLE
    set_by: str  # "PeerAuthentication ns/name", or DEFAULT_SET_BY
    ports: tuple[tuple[int, str], ...] = ()  # (workload port, mode): portLevelMtls, UNSET resolved
    ports_set_by: str = ""  # the workload-level policy holding them

    def mode_of(self, port: int) -> tuple[str, str]:
        """The mode of ``port`` and what set it."""
        for p, m in self.ports:
            if p == port:
                return m, f"{self.ports_set_by} portLevelMtls {p}"
        return self.mode, self.set_by


def _levels(resources: Iterable[PeerAuthentication], namespace: str, labels: Mapping[str, str],
            root_namespace: str) -> tuple[PeerAuthentication | None, ...]:
    """The (workload, namespace, mesh) policies of a workload. Several at one level: the first
    by name wins (Istio keeps the oldest; nodemesh keeps no creation time). A selector with no
    labels counts as none (Istio); one in the root namespace is ignored for other namespaces'
    workloads, as Istio does (validation refuses it)."""
    workload: PeerAuthentication | None = None
    ns_wide: PeerAuthentication | None = None
    mesh: PeerAuthentication | None = None
    for r in sorted(resources, key=lambda r: r.name):
        if r.selector:
            if r.namespace == namespace and namespace != root_namespace and workload is None \
                    and all(labels.get(k) == v for k, v in r.selector):
                workload = r
        elif r.namespace == root_namespace:
            if mesh is None:
                mesh = r
        elif r.namespace == namespace and ns_wide is None:
            ns_wide = r
    return workload, ns_wide, mesh


def decide(
    resources: Iterable[PeerAuthentication], namespace: str, labels: Mapping[str, str], default: str,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE, default_set_by: str = DEFAULT_SET_BY,
) -> PeerAuthDecision:
    """The inbound modes (STRICT, PERMISSIVE or DISABLE) of a workload of ``namespace`` with
    ``labels``, per port, and which resource set each; ``default`` where none applies."""
    workload, ns_wide, mesh = _levels(resources, namespace, labels, root_namespace)
    mode, set_by = default, default_set_by
    for level in (mesh, ns_wide, workload):
        if level is not None and level.mode != "UNSET":
            mode, set_by = level.mode, level.ref
    if workload is None or not workload.ports:
        return PeerAuthDecision(mode, set_by)
    ports = tuple((p, mode if m == "UNSET" else m) for p, m in workload.ports)
    return PeerAuthDecision(mode, set_by, ports, workload.ref)


# -- JSON documents ---------------------------------------------------------------------------


def peer_authentication_doc(r: PeerAuthentication) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": r.name, "namespace": r.namespace,
                           "selector": dict(r.selector) if r.selector is not None else None,
                           "mtls": {"mode": r.mode}, "source": r.source}
    if r.ports:
        doc["portLevelMtls"] = {str(p): {"mode": m} for p, m in r.ports}
    return doc


def peer_authentication_from_doc(d: Mapping[str, Any]) -> PeerAuthentication:
    sel = d.get("selector")
    selector = tuple(sorted(sel.items())) if sel is not None else None
    ports = tuple(sorted((int(p), m.get("mode", "UNSET")) for p, m in (d.get("portLevelMtls") or {}).items()))
    return PeerAuthentication(d["name"], d["namespace"], selector, d.get("mtls", {}).get("mode", "UNSET"),
                              d.get("source", ""), ports)
