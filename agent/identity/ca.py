"""The mesh CA: a root key on disk (0600) that signs short-lived workload certs.

How this works: ``MeshCA.init(dir, td)`` writes

- ``ca.key``     the current root's private key, PKCS#8 PEM, mode 0600;
- ``ca.crt``     the current root cert (self-signed, 10 years, URI SAN ``spiffe://<td>``);
- ``bundle.pem`` the trust bundle: every root peers should trust, current first.

``MeshCA.load(dir)`` reads them back and refuses a key readable by others.
Only ``issue*`` and ``sign_csr`` need the key; ``ca inspect`` and peers need
only the certs, so the key can live offline between issuing node certs.

Rotation (``rotated``): a new root is generated and put in front of the bundle;
the old root stays in the bundle so certs it signed keep verifying until they
expire; the old key is kept as ``ca.key.retired-<serial>`` (0600).

Issuance is pure given ``now``: a single-host agent calls :meth:`MeshCA.issue`
in-process; the CA service (:mod:`agent.identity.service`) calls
:meth:`MeshCA.sign_csr` for node agents after its placement check.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.bundle import TrustBundle, write_atomic
from agent.identity.certs import (
    DEFAULT_BACKDATE_S,
    DEFAULT_TTL_S,
    ROOT_VALIDITY_S,
    PrivateKey,
    WorkloadCert,
    cert_pem,
    key_pem,
    load_certs_pem,
    load_key_pem,
    make_root,
    new_key,
    read_bytes,
    sign_leaf,
    uri_sans,
)
from agent.identity.clock import aware
from agent.identity.errors import CaExistsError, CaFileError, CaNotFoundError, IssuanceError, SpiffeIdError
from agent.identity.spiffe import (
    NodeId,
    SpiffeId,
    ca_service_uri,
    check_trust_domain,
    parse_workload_id,
    trust_domain_uri,
)

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
BUNDLE_FILE = "bundle.pem"

MIN_TTL_S = 60
MAX_WORKLOAD_TTL_S = 7 * 24 * 3600
DEFAULT_NODE_TTL_S = 30 * 24 * 3600
MAX_NODE_TTL_S = 366 * 24 * 3600


@dataclass(frozen=True, slots=True)
class MeshCA:
    trust_domain: str
    root: x509.Certificate
    key: PrivateKey = field(repr=False)
    bundle: TrustBundle

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if self.root.public_key() != self.key.public_key():
            raise IssuanceError("mesh CA: expected the key to match the root cert, they differ")

    # -- creation and files -----------------------------------------------------------------------

    @classmethod
    def create(cls, trust_domain: str, *, now: datetime, validity_s: int = ROOT_VALIDITY_S) -> MeshCA:
        """A new CA in memory (see :meth:`save`)."""
        root, key = make_root(trust_domain_uri(check_trust_domain(trust_domain)), now=now,
                              validity_s=validity_s)
        return cls(trust_domain, root, key, TrustBundle((root,)))

    @classmethod
    def init(cls, directory: str, trust_domain: str, *, now: datetime, force: bool = False,
             validity_s: int = ROOT_VALIDITY_S) -> MeshCA:
        """Create a CA and write it to ``directory`` (created 0700 if missing)."""
        ca = cls.create(trust_domain, now=now, validity_s=validity_s)
        ca.save(directory, force=force)
        return ca

    def save(self, directory: str, *, force: bool = False) -> None:
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise CaFileError(directory, "expected a directory for the CA, found a file")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        key_path = os.path.join(directory, KEY_FILE)
        if not force:
            for name in (KEY_FILE, CERT_FILE):
                path = os.path.join(directory, name)
                if os.path.lexists(path):
                    raise CaExistsError(
                        path, "expected no CA here, found an existing one (refusing to overwrite)",
                        hint="pass --force to replace it; every cert it signed stops verifying")
        write_atomic(key_path, key_pem(self.key), mode=0o600)
        write_atomic(os.path.join(directory, CERT_FILE), cert_pem(self.root), mode=0o644)
        self.bundle.save(os.path.join(directory, BUNDLE_FILE))

    @classmethod
    def load(cls, directory: str) -> MeshCA:
        cert_path = os.path.join(directory, CERT_FILE)
        key_path = os.path.join(directory, KEY_FILE)
        if not os.path.isdir(directory):
            raise CaNotFoundError(directory, "expected a CA directory, it does not exist",
                                  hint="create one with: nodemesh ca init --dir DIR --trust-domain TD")
        if not os.path.exists(cert_path):
            raise CaNotFoundError(cert_path, "expected the CA root cert, the file does not exist",
                                  hint="create one with: nodemesh ca init --dir DIR --trust-domain TD")
        root = load_certs_pem(read_bytes(cert_path, what="a PEM root cert"), source=cert_path,
                              what="a PEM root certificate")[0]
        check_key_file_mode(key_path)
        key = load_key_pem(read_bytes(key_path, what="a PEM private key"), source=key_path)
        bundle = load_bundle(directory, fallback=root)
        td = root_trust_domain(root, source=cert_path)
        if root.public_key() != key.public_key():
            raise CaFileError(key_path, f"expected the key of the root in {cert_path}, got another key")
        if cert_pem(root) not in {cert_pem(r) for r in bundle}:
            bundle = bundle.with_root(root)
        return cls(td, root, key, bundle)

    def rotated(self, *, now: datetime, validity_s: int = ROOT_VALIDITY_S) -> MeshCA:
        """A CA with a fresh root in front of the bundle; the old roots stay trusted."""
        root, key = make_root(trust_domain_uri(self.trust_domain), now=now, validity_s=validity_s)
        return MeshCA(self.trust_domain, root, key, self.bundle.with_root(root))

    def rotate_on_disk(self, directory: str, *, now: datetime) -> MeshCA:
        new = self.rotated(now=now)
        retired = os.path.join(directory, f"{KEY_FILE}.retired-{self.root.serial_number:x}")
        write_atomic(retired, key_pem(self.key), mode=0o600)
        new.save(directory, force=True)
        return new

    # -- issuance ---------------------------------------------------------------------------------

    def _window(self, now: datetime, ttl_s: int, max_ttl_s: int, what: str) -> tuple[datetime, datetime]:
        now = aware(now)
        if not isinstance(ttl_s, int) or not MIN_TTL_S <= ttl_s <= max_ttl_s:
            raise IssuanceError(f"{what}: expected ttl_s between {MIN_TTL_S} and {max_ttl_s}, got {ttl_s!r}")
        root_nb, root_na = self.root.not_valid_before_utc, self.root.not_valid_after_utc
        if not root_nb <= now < root_na:
            raise IssuanceError(
                f"{what}: the CA root is valid {root_nb.isoformat()} .. {root_na.isoformat()}, "
                f"not at {now.isoformat()}", hint="rotate the CA: nodemesh ca rotate")
        not_before = max(now - timedelta(seconds=DEFAULT_BACKDATE_S), root_nb)
        return not_before, min(now + timedelta(seconds=ttl_s), root_na)

    def issue(self, spiffe_id: SpiffeId, *, now: datetime, ttl_s: int = DEFAULT_TTL_S) -> WorkloadCert:
        """A fresh key and a leaf cert for ``spiffe_id`` (in-process issuance, single host)."""
        self._check_td(spiffe_id)
        key = new_key()
        cert = self.sign_public_key(spiffe_id, key.public_key(), now=now, ttl_s=ttl_s)
        return WorkloadCert.from_x509(spiffe_id, cert, key_pem(key), [self.root])

    def sign_public_key(self, spiffe_id: SpiffeId, public_key: ec.EllipticCurvePublicKey, *,
                        now: datetime, ttl_s: int = DEFAULT_TTL_S) -> x509.Certificate:
        self._check_td(spiffe_id)
        nb, na = self._window(now, ttl_s, MAX_WORKLOAD_TTL_S, f"cert for {spiffe_id}")
        return sign_leaf(self.root, self.key, public_key, uris=[spiffe_id.uri], not_before=nb, not_after=na)

    def sign_csr(self, csr_pem: bytes, *, now: datetime,
                 ttl_s: int = DEFAULT_TTL_S) -> tuple[SpiffeId, x509.Certificate]:
        """Check a workload CSR (signature, P-256 key, exactly one SPIFFE URI SAN) and sign it.

        Only the CSR's public key and URI SAN are used; every other field is
        decided here. The caller checks *authorization* (placement) first.
        """
        spiffe_id, public_key = csr_identity(csr_pem)
        return spiffe_id, self.sign_public_key(spiffe_id, public_key, now=now, ttl_s=ttl_s)

    def issue_node(self, node: NodeId, *, now: datetime,
                   ttl_s: int = DEFAULT_NODE_TTL_S) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for a node agent to authenticate to the CA service (clientAuth only)."""
        if node.trust_domain != self.trust_domain:
            raise IssuanceError(f"node {node}: expected trust domain {self.trust_domain!r}, "
                                f"got {node.trust_domain!r}")
        nb, na = self._window(now, ttl_s, MAX_NODE_TTL_S, f"node cert for {node}")
        key = new_key()
        cert = sign_leaf(self.root, self.key, key.public_key(), uris=[node.uri], not_before=nb, not_after=na,
                         eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))
        return cert_pem(cert), key_pem(key)

    def issue_ca_service(self, *, now: datetime, ttl_s: int = DEFAULT_NODE_TTL_S) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) the CA service presents (``spiffe://<td>/ca``, serverAuth only)."""
        nb, na = self._window(now, ttl_s, MAX_NODE_TTL_S, "CA service cert")
        key = new_key()
        cert = sign_leaf(self.root, self.key, key.public_key(), uris=[ca_service_uri(self.trust_domain)],
                         not_before=nb, not_after=na, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
        return cert_pem(cert), key_pem(key)

    def _check_td(self, spiffe_id: SpiffeId) -> None:
        if spiffe_id.trust_domain != self.trust_domain:
            raise IssuanceError(f"cert for {spiffe_id}: expected trust domain {self.trust_domain!r}, "
                                f"got {spiffe_id.trust_domain!r}")


def csr_identity(csr_pem: bytes) -> tuple[SpiffeId, ec.EllipticCurvePublicKey]:
    """The workload ID and key a CSR asks for, after checking its self-signature."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise IssuanceError(f"CSR: expected a PEM certificate request, got something else ({e})") from None
    if not csr.is_signature_valid:
        raise IssuanceError("CSR: expected a valid self-signature, the signature does not verify")
    public_key = csr.public_key()
    if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
        raise IssuanceError(f"CSR: expected an ECDSA P-256 key, got {type(public_key).__name__}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IssuanceError("CSR: expected a subjectAltName with one SPIFFE URI, found none") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1:
        seen = [str(n.value) for n in san]
        raise IssuanceError(f"CSR: expected exactly one SAN (a SPIFFE URI), got {seen}")
    try:
        return parse_workload_id(uris[0]), public_key
    except SpiffeIdError as e:
        raise IssuanceError(f"CSR: {e.message}") from None


def make_csr(spiffe_id: SpiffeId, key: PrivateKey) -> bytes:
    """A CSR for ``spiffe_id`` signed by ``key`` (what a node agent sends to the CA service)."""
    from cryptography.hazmat.primitives import hashes, serialization

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def root_trust_domain(root: x509.Certificate, *, source: str) -> str:
    tds = [u.removeprefix("spiffe://") for u in uri_sans(root) if u.startswith("spiffe://")]
    if len(tds) != 1:
        raise CaFileError(source, f"expected a root with one URI SAN 'spiffe://<trust-domain>', got {tds}")
    try:
        return check_trust_domain(tds[0], where=f"{source}: URI SAN")
    except SpiffeIdError as e:
        raise CaFileError(source, e.message) from None


def check_key_file_mode(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CaFileError(path, "expected the CA private key, the file does not exist",
                          hint="the key may be offline; only issuing needs it") from None
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise CaFileError(path, f"expected mode 0600, got {mode:04o} (others can read the key)",
                          hint=f"chmod 600 {path}")


def load_bundle(directory: str, *, fallback: x509.Certificate | None = None) -> TrustBundle:
    path = os.path.join(directory, BUNDLE_FILE)
    if not os.path.exists(path) and fallback is not None:
        return TrustBundle((fallback,))
    return TrustBundle.load(path)
