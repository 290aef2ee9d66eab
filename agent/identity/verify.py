"""Peer verification: a pure function from (peer chain, bundle, now, trust domain) to a verified ID.

How this works, in order, first failure wins (each has a :class:`RejectReason`):

1. the leaf parses as X.509 (``malformed_cert``);
2. it was signed directly by a root of the bundle whose name matches its issuer
   (``unknown_ca``); the mesh CA is one level, so intermediates in the chain
   are not used; the root must be valid now (``expired`` / ``not_yet_valid``);
3. the leaf is valid now (``expired`` / ``not_yet_valid``), is not a CA
   (``is_ca``), has key usage digitalSignature (``bad_key_usage``) and an EKU
   containing the usage this side needs: clientAuth for a peer that connected
   to us, serverAuth for a server we connected to (``bad_eku``);
4. it has exactly one URI SAN (``san_count``) that is a SPIFFE ID
   (``bad_spiffe_id``) of our trust domain (``wrong_trust_domain``); a root
   that names a trust domain may sign only for that trust domain;
5. the ID has the expected kind, workload or node (``wrong_kind``).

OpenSSL already checks chain and validity during the handshake; this runs after
it on every connection anyway, because OpenSSL does not know SPIFFE and
authorization must use only an identity verified here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.bundle import TrustBundle
from agent.identity.certs import uri_sans
from agent.identity.clock import aware
from agent.identity.errors import PeerRejected, RejectReason, SpiffeIdError
from agent.identity.spiffe import NodeId, SpiffeId, parse_any, parse_node_id, parse_workload_id

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def _reject(reason: RejectReason, message: str) -> PeerRejected:
    return PeerRejected(reason, message)


def _who(cert: x509.Certificate) -> str:
    sans = uri_sans(cert)
    return f"cert serial {cert.serial_number:x}" + (f" ({', '.join(sans)})" if sans else "")


def _check_window(cert: x509.Certificate, now: datetime, what: str) -> None:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < nb:
        raise _reject(RejectReason.NOT_YET_VALID,
                      f"{what}: expected valid at {now.isoformat()}, valid only from {nb.isoformat()}")
    if now >= na:
        raise _reject(RejectReason.EXPIRED,
                      f"{what}: expected valid at {now.isoformat()}, expired at {na.isoformat()}")


def _issuing_root(leaf: x509.Certificate, bundle: TrustBundle) -> x509.Certificate:
    for root in bundle:
        if root.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root
    raise _reject(RejectReason.UNKNOWN_CA,
                  f"{_who(leaf)}: expected a cert signed by a root of the trust bundle "
                  f"({len(bundle)} roots), issuer {leaf.issuer.rfc4514_string()!r} is not one of them")


def verify_leaf(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime,
                usage: x509.ObjectIdentifier) -> tuple[str, str, list[str]]:
    """Steps 1-4 for any SPIFFE leaf: (URI, trust domain, path segments)."""
    now = aware(now)
    if not chain_der:
        raise _reject(RejectReason.NO_PEER_CERT, "expected a peer certificate, the peer sent none")
    try:
        leaf = x509.load_der_x509_certificate(chain_der[0])
    except ValueError as e:
        raise _reject(RejectReason.MALFORMED_CERT, f"expected a DER X.509 cert, got garbage ({e})") from None
    root = _issuing_root(leaf, bundle)
    _check_window(root, now, f"root {root.subject.rfc4514_string()!r}")
    _check_window(leaf, now, _who(leaf))
    try:
        bc = _ext(leaf, x509.BasicConstraints)
        ku = _ext(leaf, x509.KeyUsage)
        eku_ext = _ext(leaf, x509.ExtendedKeyUsage)
        eku = list(eku_ext) if eku_ext is not None else []
        uris = uri_sans(leaf)
    except ValueError as e:
        raise _reject(RejectReason.MALFORMED_CERT, f"{_who(leaf)}: unparsable extension ({e})") from None
    if bc is not None and bc.ca:
        raise _reject(RejectReason.IS_CA, f"{_who(leaf)}: expected a leaf cert (CA=false), got a CA cert")
    if ku is None or not ku.digital_signature:
        got_ku = "no keyUsage" if ku is None else "keyUsage without it"
        raise _reject(RejectReason.BAD_KEY_USAGE,
                      f"{_who(leaf)}: expected key usage digitalSignature, got {got_ku}")
    if usage not in eku:
        got = ", ".join(o._name for o in eku) or "no extendedKeyUsage"
        raise _reject(RejectReason.BAD_EKU, f"{_who(leaf)}: expected EKU {usage._name}, got {got}")
    if len(uris) != 1:
        raise _reject(RejectReason.SAN_COUNT, f"{_who(leaf)}: expected exactly one URI SAN, got {len(uris)}")
    try:
        td, segs = parse_any(uris[0])
    except SpiffeIdError as e:
        raise _reject(RejectReason.BAD_SPIFFE_ID, f"{_who(leaf)}: {e.message}") from None
    root_tds = bundle.trust_domains(root)
    if root_tds and td not in root_tds:
        raise _reject(RejectReason.WRONG_TRUST_DOMAIN,
                      f"{_who(leaf)}: expected trust domain {root_tds[0]!r} of its signing root, got {td!r}")
    return uris[0], td, segs


E = TypeVar("E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, ext: type[E]) -> E | None:
    try:
        return cert.extensions.get_extension_for_class(ext).value
    except x509.ExtensionNotFound:
        return None


def _check_td(uri: str, td: str, trust_domain: str) -> None:
    if td != trust_domain:
        raise _reject(RejectReason.WRONG_TRUST_DOMAIN,
                      f"peer {uri}: expected trust domain {trust_domain!r}, got {td!r}")


def verify_workload_chain(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime,
                          trust_domain: str, usage: x509.ObjectIdentifier,
                          expected: SpiffeId | None = None) -> SpiffeId:
    """The verified workload identity of a peer, or :class:`PeerRejected`.

    ``usage`` is :data:`CLIENT_AUTH` when the peer connected to us (server
    side), :data:`SERVER_AUTH` when we connected to it. ``expected`` pins the
    identity (the client knows which destination it wants).
    """
    uri, td, _ = verify_leaf(chain_der, bundle, now=now, usage=usage)
    _check_td(uri, td, trust_domain)
    try:
        ident = parse_workload_id(uri)
    except SpiffeIdError as e:
        raise _reject(RejectReason.WRONG_KIND, f"peer {uri}: {e.message}") from None
    if expected is not None and ident != expected:
        raise _reject(RejectReason.UNEXPECTED_IDENTITY, f"expected peer {expected}, got {ident}")
    return ident


def verify_node_chain(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime,
                      trust_domain: str) -> NodeId:
    """The verified node identity of a node agent connecting to the CA service."""
    uri, td, _ = verify_leaf(chain_der, bundle, now=now, usage=CLIENT_AUTH)
    _check_td(uri, td, trust_domain)
    try:
        return parse_node_id(uri)
    except SpiffeIdError as e:
        raise _reject(RejectReason.WRONG_KIND, f"peer {uri}: {e.message}") from None


def verify_uri_chain(chain_der: Sequence[bytes], bundle: TrustBundle, *, now: datetime,
                     expected_uri: str, usage: x509.ObjectIdentifier) -> str:
    """A peer whose exact URI we know (a node checking the CA service)."""
    uri, _, _ = verify_leaf(chain_der, bundle, now=now, usage=usage)
    if uri != expected_uri:
        raise _reject(RejectReason.UNEXPECTED_IDENTITY, f"expected peer {expected_uri}, got {uri}")
    return uri
