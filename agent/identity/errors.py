"""Errors of the identity layer (SPIFFE IDs, the mesh CA, certs, peer checks).

Every message says what was expected, what was seen and where. Foreign
exceptions (OSError, ValueError from cryptography, ssl.SSLError) are converted
once, at the boundary of this package.

``PeerRejected`` carries a machine-readable :class:`RejectReason` so the proxy
can log and count rejections by reason without parsing messages.
"""

from __future__ import annotations

import enum


class IdentityError(Exception):
    """Base of every error raised by agent.identity."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class SpiffeIdError(IdentityError, ValueError):
    """A string is not a valid SPIFFE ID of the expected form."""


class CaFileError(IdentityError):
    """A CA, key, bundle or cert file is missing, unreadable, corrupt or unsafe."""

    def __init__(self, path: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {reason}", hint=hint)
        self.path = path
        self.reason = reason


class CaNotFoundError(CaFileError):
    """The directory holds no mesh CA."""


class CaExistsError(CaFileError):
    """``ca init`` would overwrite an existing CA."""


class IssuanceError(IdentityError):
    """The CA refused or failed to sign (bad CSR, wrong trust domain, bad TTL)."""


class CaServiceError(IdentityError):
    """The CA service could not be reached or answered with an error."""

    def __init__(self, message: str, *, code: str = "unavailable", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class RejectReason(enum.StrEnum):
    """Why a peer certificate was rejected. Stable: used as a metric label."""

    NO_PEER_CERT = "no_peer_cert"
    MALFORMED_CERT = "malformed_cert"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_EKU = "bad_eku"
    BAD_KEY_USAGE = "bad_key_usage"
    IS_CA = "is_ca"
    SAN_COUNT = "san_count"
    BAD_SPIFFE_ID = "bad_spiffe_id"
    WRONG_TRUST_DOMAIN = "wrong_trust_domain"
    WRONG_KIND = "wrong_kind"
    UNEXPECTED_IDENTITY = "unexpected_identity"
    UNKNOWN_SNI = "unknown_sni"
    HANDSHAKE_FAILED = "handshake_failed"


class PeerRejected(IdentityError):
    """A peer's certificate failed verification.

    ``remote`` is True when the *peer* rejected *our* certificate (we learnt it
    from a TLS alert); the reason is then the peer's, mapped from the alert.
    """

    def __init__(self, reason: RejectReason, message: str, *, remote: bool = False) -> None:
        super().__init__(f"peer rejected ({reason}): {message}" if not remote
                         else f"rejected by peer ({reason}): {message}")
        self.reason = reason
        self.remote = remote
