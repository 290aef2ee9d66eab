"""The trust bundle: the set of root certs a peer's cert may chain to.

A bundle may hold several roots so a root can be rotated without downtime:
first distribute a bundle with old and new root, then issue from the new root,
and drop the old root once every cert it signed has expired. On disk it is a
PEM file of root certs (``bundle.pem`` in a CA directory), newest first.
A bundle is an immutable value: :meth:`TrustBundle.with_root` returns a new one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509

from agent.identity.certs import cert_pem, fingerprint_sha256, load_certs_pem, read_bytes, uri_sans
from agent.identity.errors import CaFileError, IdentityError


@dataclass(frozen=True, slots=True)
class TrustBundle:
    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.roots:
            raise IdentityError("trust bundle: expected at least one root cert, got none")
        for root in self.roots:
            try:
                bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise IdentityError(
                    f"trust bundle: expected CA certs only, got a non-CA cert {root.subject.rfc4514_string()}"
                )

    def __iter__(self) -> Iterator[x509.Certificate]:
        return iter(self.roots)

    def __len__(self) -> int:
        return len(self.roots)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(fingerprint_sha256(r) for r in self.roots)

    def with_root(self, root: x509.Certificate) -> TrustBundle:
        """This bundle with ``root`` added in front (no duplicates)."""
        fp = fingerprint_sha256(root)
        return TrustBundle((root, *(r for r in self.roots if fingerprint_sha256(r) != fp)))

    def without_root(self, fingerprint: str) -> TrustBundle:
        kept = tuple(r for r in self.roots if fingerprint_sha256(r) != fingerprint.upper())
        if len(kept) == len(self.roots):
            raise IdentityError(f"trust bundle: no root with fingerprint {fingerprint}")
        return TrustBundle(kept)

    def trust_domains(self, root: x509.Certificate) -> list[str]:
        return [u.removeprefix("spiffe://") for u in uri_sans(root) if u.startswith("spiffe://")]

    def to_pem(self) -> bytes:
        return b"".join(cert_pem(r) for r in self.roots)

    @property
    def pem_text(self) -> str:
        """The bundle as the ``cadata`` string ``ssl.SSLContext.load_verify_locations`` takes."""
        return self.to_pem().decode("ascii")

    @classmethod
    def from_pem(cls, data: bytes, *, source: str = "<bundle>") -> TrustBundle:
        roots = load_certs_pem(data, source=source, what="PEM root certificates")
        try:
            return cls(tuple(roots))
        except IdentityError as e:
            raise CaFileError(source, e.message) from None

    @classmethod
    def load(cls, path: str) -> TrustBundle:
        return cls.from_pem(read_bytes(path, what="a PEM trust bundle"), source=path)

    def save(self, path: str) -> None:
        write_atomic(path, self.to_pem(), mode=0o644)


def write_atomic(path: str, data: bytes, *, mode: int, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with ``mode`` via a temp file and rename.

    The temp file is created with ``mode`` from the start (never wider), so a
    key is never readable by others, even briefly. ``exclusive`` refuses to
    replace an existing file.
    """
    if exclusive and os.path.lexists(path):
        raise CaFileError(path, "expected no file here, found one (refusing to overwrite)")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        raise CaFileError(tmp, f"cannot create file: {e.strerror or e}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widens beyond mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
