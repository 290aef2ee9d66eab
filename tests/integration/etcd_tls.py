"""Certificates for an etcd served over TLS in tests: a CA, a server cert for 127.0.0.1
and a client cert, written to a directory (made with `cryptography`, like etcd's own
test certs; nothing here is nodemesh's mesh CA)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, data: bytes, mode: int = 0o644) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def make_tls_files(directory: str, name: str = "test") -> TlsFiles:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"etcd {name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        k = _key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name).public_key(k.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(k)

    os.makedirs(directory, exist_ok=True)
    s_cert, s_key = leaf("etcd server", ExtendedKeyUsageOID.SERVER_AUTH)
    c_cert, c_key = leaf("nodemesh client", ExtendedKeyUsageOID.CLIENT_AUTH)
    j = os.path.join
    return TlsFiles(
        ca=_write(j(directory, "ca.crt"), ca.public_bytes(serialization.Encoding.PEM)),
        server_cert=_write(j(directory, "server.crt"), s_cert),
        server_key=_write(j(directory, "server.key"), s_key, 0o600),
        client_cert=_write(j(directory, "client.crt"), c_cert),
        client_key=_write(j(directory, "client.key"), c_key, 0o600),
    )
