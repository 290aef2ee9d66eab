"""X.509 building blocks: keys, root and leaf certs, the WorkloadCert value, cert facts.

How this works: every key is ECDSA P-256 and every signature ECDSA-SHA256.
A root is self-signed, CA with path length 0 (it signs leaves only), and
carries its trust domain's SPIFFE ID as URI SAN. A leaf carries exactly one URI
SAN (its SPIFFE ID), EKU serverAuth+clientAuth, key usage digitalSignature,
CA=false, and AKI/SKI so OpenSSL can build the chain quickly. ``not_before`` is
back-dated a little (``backdate_s``) to tolerate clock skew between hosts.

:func:`sign_leaf` takes every knob as an argument so tests can build the
malformed certs the verifier must reject, with the same code the CA uses.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.clock import aware
from agent.identity.errors import CaFileError, IdentityError
from agent.identity.spiffe import SpiffeId

DEFAULT_TTL_S = 24 * 3600
DEFAULT_BACKDATE_S = 60
ROOT_VALIDITY_S = 10 * 365 * 24 * 3600
ORG = "nodemesh"

SERVER_AND_CLIENT = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _serial() -> int:
    return secrets.randbits(127) | 1  # positive, non-zero, < 2**159 as RFC 5280 asks


def make_root(trust_domain_uri: str, *, now: datetime, validity_s: int = ROOT_VALIDITY_S,
              key: PrivateKey | None = None) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed root for one trust domain."""
    now = aware(now)
    key = key or new_key()
    td = trust_domain_uri.removeprefix("spiffe://")
    serial = _serial()
    # a distinct name per root, so old and new roots of a rotation never share an issuer name
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root {serial:032x}"[:30] + f" {td}"[:34]),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(seconds=DEFAULT_BACKDATE_S))
        .not_valid_after(now + timedelta(seconds=validity_s))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain_uri)]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def sign_leaf(
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    uris: Sequence[str],
    not_before: datetime,
    not_after: datetime,
    eku: Sequence[x509.ObjectIdentifier] | None = SERVER_AND_CLIENT,
    digital_signature: bool = True,
    is_ca: bool = False,
) -> x509.Certificate:
    """Sign a leaf cert. ``eku=None`` leaves the EKU extension out (tests only)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(aware(not_before))
        .not_valid_after(aware(not_after))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                          key_encipherment=not digital_signature, data_encipherment=False,
                          key_agreement=False, key_cert_sign=is_ca, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                       critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class WorkloadCert:
    """A workload's current identity: leaf cert, its key, and the chain up to (and with) the root.

    ``chain_pem`` holds the issuer certs, nearest first; with one-level CAs
    that is just the root. The key is left out of ``repr``.
    """

    spiffe_id: SpiffeId
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    chain_pem: tuple[bytes, ...] = field(repr=False)
    not_before: datetime
    not_after: datetime
    serial: int
    fingerprint_sha256: str

    def __post_init__(self) -> None:
        if self.not_after <= self.not_before:
            raise IdentityError(
                f"cert for {self.spiffe_id}: expected not_after > not_before, got "
                f"{self.not_before.isoformat()} .. {self.not_after.isoformat()}"
            )

    @property
    def lifetime_s(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    @property
    def renew_at(self) -> datetime:
        """Half life: renewal is due from here on."""
        return self.not_before + (self.not_after - self.not_before) / 2

    @property
    def cert_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    @classmethod
    def from_x509(cls, spiffe_id: SpiffeId, cert: x509.Certificate, key_pem_bytes: bytes,
                  chain: Sequence[x509.Certificate]) -> WorkloadCert:
        return cls(
            spiffe_id=spiffe_id,
            cert_pem=cert_pem(cert),
            key_pem=key_pem_bytes,
            chain_pem=tuple(cert_pem(c) for c in chain),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
            fingerprint_sha256=fingerprint_sha256(cert),
        )


@dataclass(frozen=True, slots=True)
class CertFacts:
    """What ``ca inspect`` shows about one certificate."""

    subject: str
    issuer: str
    uri_sans: tuple[str, ...]
    is_ca: bool
    not_before: datetime
    not_after: datetime
    expires_in_s: float
    serial_hex: str
    sha256_fingerprint: str
    spki_sha256_b64: str

    def to_doc(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "spiffe_id": self.uri_sans[0] if len(self.uri_sans) == 1 else None,
            "uri_sans": list(self.uri_sans),
            "is_ca": self.is_ca,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "expires_in_s": round(self.expires_in_s),
            "serial": self.serial_hex,
            "sha256_fingerprint": self.sha256_fingerprint,
            "spki_sha256": self.spki_sha256_b64,
        }


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def facts(cert: x509.Certificate, *, now: datetime) -> CertFacts:
    import base64

    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return CertFacts(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        uri_sans=tuple(uri_sans(cert)),
        is_ca=is_ca,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        expires_in_s=(cert.not_valid_after_utc - aware(now)).total_seconds(),
        serial_hex=f"{cert.serial_number:x}",
        sha256_fingerprint=fingerprint_sha256(cert),
        spki_sha256_b64=base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii"),
    )


# -- reading files -------------------------------------------------------------------------------

def read_bytes(path: str, *, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except FileNotFoundError:
        raise CaFileError(path, f"expected {what}, but the file does not exist") from None
    except IsADirectoryError:
        raise CaFileError(path, f"expected {what}, got a directory") from None
    except OSError as e:
        raise CaFileError(path, f"cannot read {what}: {e.strerror or e}") from None


def load_certs_pem(data: bytes, *, source: str, what: str = "PEM certificates") -> list[x509.Certificate]:
    """Every cert in a PEM blob; a blob without any, or with a corrupt one, is an error naming ``source``."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CaFileError(source, f"expected {what} ('-----BEGIN CERTIFICATE-----'), found none")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CaFileError(source, f"expected {what}, got a corrupt PEM block ({e})") from None


def load_key_pem(data: bytes, *, source: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CaFileError(source, f"expected an unencrypted PEM private key, got something else ({e})") \
            from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaFileError(source, f"expected an ECDSA P-256 key, got {type(key).__name__}")
    return key
