"""SPIFFE IDs of the mesh, their strict parser, and the SNI names of identities.

Three kinds of identity share one trust domain:

- workloads: ``spiffe://<td>/ns/<namespace>/sa/<service-account>`` (:class:`SpiffeId`);
- node agents: ``spiffe://<td>/node/<node-name>`` (:class:`NodeId`), used only
  to authenticate a node to the CA service, never on the data path;
- the CA service itself: ``spiffe://<td>/ca`` (:func:`ca_service_uri`).

The paths are disjoint, so a node cert can never pass as a workload and back.

Syntax follows the SPIFFE ID spec, strictly: lowercase scheme and trust domain
of ``[a-z0-9._-]``, path segments of ``[A-Za-z0-9._-]`` that are not ``.`` or
``..``, no port, user info, query or fragment, at most 2048 bytes.

SNI: a TLS client names the *destination workload identity* it wants to reach
in SNI; the HBONE server picks that identity's cert. SNI must be a DNS name and
should not reveal identities on the wire, so the name is
``<first 32 hex digits of sha256(spiffe-uri)>.sni.nodemesh`` (:func:`sni_name`).
The server maps it back by looking it up among the identities it serves.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from agent.identity.errors import SpiffeIdError

SCHEME = "spiffe://"
MAX_URI_BYTES = 2048
SNI_SUFFIX = ".sni.nodemesh"

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]{1,255}", re.ASCII)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,253}", re.ASCII)


def check_trust_domain(td: str, *, where: str = "trust domain") -> str:
    if not isinstance(td, str) or not _TRUST_DOMAIN_RE.fullmatch(td):
        raise SpiffeIdError(
            f"{where}: expected 1-255 characters of [a-z0-9._-] (lowercase), got {td!r}",
            hint="a trust domain looks like 'cluster.local' or 'example.org'",
        )
    return td


def _check_segment(seg: str, *, what: str, where: str) -> str:
    if not isinstance(seg, str) or not _SEGMENT_RE.fullmatch(seg) or seg in (".", ".."):
        raise SpiffeIdError(
            f"{where}: expected {what} of 1-253 characters [A-Za-z0-9._-], not '.' or '..', got {seg!r}"
        )
    return seg


def _split(uri: str) -> tuple[str, list[str]]:
    """Trust domain and path segments of any SPIFFE ID, strictly validated."""
    if not isinstance(uri, str):
        raise SpiffeIdError(f"expected a SPIFFE ID string, got {type(uri).__name__}")
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_URI_BYTES:
        raise SpiffeIdError(f"expected a SPIFFE ID of at most {MAX_URI_BYTES} bytes, got {len(uri)} chars")
    if not uri.startswith(SCHEME):
        raise SpiffeIdError(f"expected a URI starting with 'spiffe://', got {uri[:64]!r}")
    rest = uri[len(SCHEME):]
    td, sep, path = rest.partition("/")
    check_trust_domain(td, where=f"trust domain of {uri[:80]!r}")
    if not sep or not path:
        return td, []
    segments = path.split("/")
    for seg in segments:
        _check_segment(seg, what="a path segment", where=f"path of {uri[:80]!r}")
    return td, segments


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity: ``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment(self.namespace, what="a namespace", where="SPIFFE ID")
        _check_segment(self.service_account, what="a service account", where="SPIFFE ID")

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        return parse_workload_id(uri)


@dataclass(frozen=True, slots=True)
class NodeId:
    """A node agent's identity: ``spiffe://<trust_domain>/node/<name>``."""

    trust_domain: str
    name: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment(self.name, what="a node name", where="node ID")

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/node/{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse_workload_id(uri: str) -> SpiffeId:
    """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; anything else raises :class:`SpiffeIdError`."""
    td, segs = _split(uri)
    if len(segs) != 4 or segs[0] != "ns" or segs[2] != "sa":
        raise SpiffeIdError(
            f"expected a workload ID 'spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>', "
            f"got {uri[:120]!r}"
        )
    return SpiffeId(td, segs[1], segs[3])


def parse_node_id(uri: str) -> NodeId:
    """Parse ``spiffe://<td>/node/<name>``; anything else raises :class:`SpiffeIdError`."""
    td, segs = _split(uri)
    if len(segs) != 2 or segs[0] != "node":
        raise SpiffeIdError(f"expected a node ID 'spiffe://<trust-domain>/node/<name>', got {uri[:120]!r}")
    return NodeId(td, segs[1])


def parse_any(uri: str) -> tuple[str, list[str]]:
    """Trust domain and path segments of any syntactically valid SPIFFE ID."""
    return _split(uri)


def ca_service_uri(trust_domain: str) -> str:
    """The identity the CA service presents to node agents."""
    return f"{SCHEME}{check_trust_domain(trust_domain)}/ca"


def trust_domain_uri(trust_domain: str) -> str:
    """The SPIFFE ID of a trust domain itself (carried by its root certs)."""
    return f"{SCHEME}{check_trust_domain(trust_domain)}"


def sni_name(identity: SpiffeId) -> str:
    """The SNI host name a client sends to reach ``identity`` (see module docstring)."""
    return hashlib.sha256(identity.uri.encode("ascii")).hexdigest()[:32] + SNI_SUFFIX
