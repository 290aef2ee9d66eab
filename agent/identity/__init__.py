"""Identity and mTLS: SPIFFE IDs, the mesh CA, workload certs, renewal, TLS contexts, peer checks.

Where to look: :mod:`.spiffe` (IDs, SNI names), :mod:`.ca` (root on disk,
issuance), :mod:`.bundle` (trust bundle), :mod:`.verify` (pure peer check),
:mod:`.store` (renewal at half life), :mod:`.tls` (SSLContexts, ``verify_peer``),
:mod:`.service` + :mod:`.wire` (CA service for several hosts).
"""

from agent.identity.bundle import TrustBundle
from agent.identity.ca import MeshCA
from agent.identity.certs import WorkloadCert
from agent.identity.clock import Clock, FakeClock, SystemClock
from agent.identity.errors import IdentityError, PeerRejected, RejectReason
from agent.identity.spiffe import NodeId, SpiffeId, sni_name
from agent.identity.store import CertManager, LocalIssuer
from agent.identity.tls import ClientContexts, ServerContexts, verify_peer

__all__ = [
    "CertManager",
    "ClientContexts",
    "Clock",
    "FakeClock",
    "IdentityError",
    "LocalIssuer",
    "MeshCA",
    "NodeId",
    "PeerRejected",
    "RejectReason",
    "ServerContexts",
    "SpiffeId",
    "SystemClock",
    "TrustBundle",
    "WorkloadCert",
    "sni_name",
    "verify_peer",
]
