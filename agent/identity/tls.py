"""TLS contexts of the HBONE tunnel, and peer verification after each handshake.

How this works:

- Every context is TLS 1.3 only, ALPN ``h2``, ``verify_mode=CERT_REQUIRED``
  with the trust bundle as CA data, ``check_hostname=False`` (OpenSSL does not
  understand SPIFFE IDs). OpenSSL checks chain and validity during the
  handshake; then :func:`verify_peer` MUST run on every connection: it applies
  :mod:`agent.identity.verify` to the peer's leaf and returns the verified
  :class:`SpiffeId`, the only identity authorization may use.
- Server (inbound, port 15008): one listening context whose ``sni_callback``
  switches the connection to the per-identity context of the destination
  workload named by SNI (:func:`agent.identity.spiffe.sni_name`). An unknown or
  missing SNI aborts the handshake with ``unrecognized_name``.
  :class:`ServerContexts` keeps these; ``set_identity`` after each renewal.
- Client (outbound): a context presents one cert, so there is one per source
  identity. :class:`ClientContexts` caches them and rebuilds one when the
  identity's cert changes (renewal) or the bundle changes.
- Handshake failures become :class:`PeerRejected` with the same reason codes
  via :func:`rejection_from_ssl_error`. In TLS 1.3 the *client* finishes its
  handshake before the server has judged the client cert: a rejection of our
  cert shows up as an alert on the first read, ``remote=True``.

Keys are handed to OpenSSL through an anonymous memory file (memfd), never
written to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime

from agent.identity.bundle import TrustBundle
from agent.identity.certs import WorkloadCert
from agent.identity.clock import Clock, SystemClock
from agent.identity.errors import IdentityError, PeerRejected, RejectReason
from agent.identity.spiffe import SpiffeId, sni_name
from agent.identity.verify import CLIENT_AUTH, SERVER_AUTH, verify_workload_chain

ALPN = "h2"

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h
_VERIFY_CODES: dict[int, RejectReason] = {
    2: RejectReason.UNKNOWN_CA,    # UNABLE_TO_GET_ISSUER_CERT
    7: RejectReason.UNKNOWN_CA,    # CERT_SIGNATURE_FAILURE
    9: RejectReason.NOT_YET_VALID,  # CERT_NOT_YET_VALID
    10: RejectReason.EXPIRED,       # CERT_HAS_EXPIRED
    18: RejectReason.UNKNOWN_CA,   # DEPTH_ZERO_SELF_SIGNED_CERT
    19: RejectReason.UNKNOWN_CA,   # SELF_SIGNED_CERT_IN_CHAIN
    20: RejectReason.UNKNOWN_CA,   # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: RejectReason.UNKNOWN_CA,   # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    24: RejectReason.IS_CA,         # INVALID_CA
    26: RejectReason.BAD_EKU,       # INVALID_PURPOSE
}

# OpenSSL reason strings of alerts the peer sent us (it rejected our cert or our SNI).
_ALERTS: dict[str, RejectReason] = {
    "TLSV1_ALERT_UNKNOWN_CA": RejectReason.UNKNOWN_CA,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": RejectReason.EXPIRED,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": RejectReason.BAD_EKU,
    "TLSV1_ALERT_UNSUPPORTED_CERTIFICATE": RejectReason.BAD_EKU,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": RejectReason.NO_PEER_CERT,
    "TLSV1_UNRECOGNIZED_NAME": RejectReason.UNKNOWN_SNI,
    "TLSV1_ALERT_UNRECOGNIZED_NAME": RejectReason.UNKNOWN_SNI,
}
_LOCAL: dict[str, RejectReason] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": RejectReason.NO_PEER_CERT,
    "CALLBACK_FAILED": RejectReason.UNKNOWN_SNI,  # our sni_callback refused the name
}


def rejection_from_ssl_error(exc: BaseException) -> PeerRejected:
    """The reason code of a failed handshake or of an alert seen on the first read."""
    if isinstance(exc, PeerRejected):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_CODES.get(exc.verify_code, RejectReason.HANDSHAKE_FAILED)
        return PeerRejected(reason, f"TLS handshake: {exc.verify_message} (X509 error {exc.verify_code})")
    name = getattr(exc, "reason", None) or ""
    if name in _ALERTS:
        return PeerRejected(_ALERTS[name], f"TLS alert {name}", remote=True)
    if name in _LOCAL:
        return PeerRejected(_LOCAL[name], f"TLS handshake: {name}")
    if isinstance(exc, ConnectionResetError):
        return PeerRejected(RejectReason.HANDSHAKE_FAILED, "connection reset during the TLS handshake",
                            remote=True)
    return PeerRejected(RejectReason.HANDSHAKE_FAILED, f"TLS: {type(exc).__name__}: {exc}")


def verify_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: SpiffeId | None, *,
                bundle: TrustBundle, trust_domain: str, now: datetime) -> SpiffeId:
    """The verified workload identity of the peer of a finished handshake, or :class:`PeerRejected`.

    On the server side the peer must be a client (EKU clientAuth), on the
    client side a server (serverAuth). ``expected`` pins the identity.
    """
    der = ssl_object.getpeercert(binary_form=True)
    usage = CLIENT_AUTH if ssl_object.server_side else SERVER_AUTH
    return verify_workload_chain([der] if der else [], bundle, now=now, trust_domain=trust_domain,
                                 usage=usage, expected=expected)


class _IdentityContext(ssl.SSLContext):
    """An SSLContext that remembers which workload identity it presents."""

    nodemesh_identity: SpiffeId | None = None
    nodemesh_fingerprint: str = ""


def configure(ctx: ssl.SSLContext, bundle: TrustBundle) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=bundle.pem_text)
    except ssl.SSLError as e:
        raise IdentityError(f"trust bundle: OpenSSL refused it ({e})") from None
    ctx.set_alpn_protocols([ALPN])


def _load_cert(ctx: ssl.SSLContext, cert: WorkloadCert) -> None:
    load_pem_pair(ctx, cert.cert_pem, cert.key_pem, what=f"cert for {cert.spiffe_id}")


def load_pem_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, *, what: str) -> None:
    """Load a cert and its key into ``ctx`` from memory (a memfd; nothing touches the disk)."""
    data = cert_pem + key_pem
    fd = os.memfd_create("nodemesh-identity", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as e:
        raise IdentityError(f"{what}: OpenSSL refused cert or key ({e})") from None
    finally:
        os.close(fd)


def identity_context(cert: WorkloadCert, bundle: TrustBundle, *, server_side: bool) -> ssl.SSLContext:
    """A context that presents ``cert``; the building block of both sides."""
    ctx = _IdentityContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    configure(ctx, bundle)
    if server_side:
        ctx.num_tickets = 0  # tunnels are pooled; resumption would only skip our verify
    _load_cert(ctx, cert)
    ctx.nodemesh_identity = cert.spiffe_id
    ctx.nodemesh_fingerprint = cert.fingerprint_sha256
    return ctx


def client_context(source: WorkloadCert, bundle: TrustBundle) -> ssl.SSLContext:
    """TLS 1.3 client context presenting the source workload's cert (uncached: see ClientContexts)."""
    return identity_context(source, bundle, server_side=False)


class ClientContexts:
    """One client context per source identity, rebuilt when its cert or the bundle changes."""

    def __init__(self, bundle: TrustBundle, *, trust_domain: str, clock: Clock | None = None) -> None:
        self._bundle = bundle
        self.trust_domain = trust_domain
        self._clock: Clock = clock or SystemClock()
        self._cache: dict[SpiffeId, ssl.SSLContext] = {}

    def get(self, source: WorkloadCert) -> ssl.SSLContext:
        ctx = self._cache.get(source.spiffe_id)
        if ctx is None or getattr(ctx, "nodemesh_fingerprint", "") != source.fingerprint_sha256:
            ctx = client_context(source, self._bundle)
            self._cache[source.spiffe_id] = ctx
        return ctx

    def forget(self, source: SpiffeId) -> None:
        self._cache.pop(source, None)

    def set_bundle(self, bundle: TrustBundle) -> None:
        self._bundle = bundle
        self._cache.clear()

    def verify_peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: SpiffeId) -> SpiffeId:
        return verify_peer(ssl_object, expected, bundle=self._bundle, trust_domain=self.trust_domain,
                           now=self._clock.now())


class ServerContexts:
    """The inbound listening context and the per-identity contexts its SNI callback switches to."""

    def __init__(self, bundle: TrustBundle, *, trust_domain: str, clock: Clock | None = None) -> None:
        self._bundle = bundle
        self.trust_domain = trust_domain
        self._clock: Clock = clock or SystemClock()
        self._certs: dict[SpiffeId, WorkloadCert] = {}
        self._by_sni: dict[str, ssl.SSLContext] = {}
        self.context = self._listening_context()

    def _listening_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        configure(ctx, self._bundle)
        ctx.num_tickets = 0
        ctx.sni_callback = self._on_sni
        return ctx

    def _on_sni(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        target = self._by_sni.get(server_name or "")
        if target is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = target
        return None

    def set_identity(self, cert: WorkloadCert) -> None:
        """Serve ``cert`` for its identity from now on (new handshakes); idempotent."""
        old = self._certs.get(cert.spiffe_id)
        if old is not None and old.fingerprint_sha256 == cert.fingerprint_sha256:
            return
        ctx = identity_context(cert, self._bundle, server_side=True)
        self._certs[cert.spiffe_id] = cert
        self._by_sni[sni_name(cert.spiffe_id)] = ctx

    def remove_identity(self, identity: SpiffeId) -> None:
        self._certs.pop(identity, None)
        self._by_sni.pop(sni_name(identity), None)

    def identities(self) -> list[SpiffeId]:
        return sorted(self._certs, key=str)

    def set_bundle(self, bundle: TrustBundle) -> None:
        """Trust a new bundle (root rotation): rebuild every context."""
        self._bundle = bundle
        certs = list(self._certs.values())
        self._certs.clear()
        self._by_sni.clear()
        for cert in certs:
            self.set_identity(cert)
        # accept_tls reads self.context per connection, so new handshakes use the new bundle
        self.context = self._listening_context()

    @staticmethod
    def local_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | None:
        """The destination identity this connection was served as (from SNI)."""
        return getattr(ssl_object.context, "nodemesh_identity", None)

    def verify_peer(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
        return verify_peer(ssl_object, None, bundle=self._bundle, trust_domain=self.trust_domain,
                           now=self._clock.now())


@dataclass(frozen=True, slots=True)
class TunnelPeer:
    """Both ends of a verified tunnel connection."""

    local: SpiffeId
    peer: SpiffeId


async def accept_tls(writer: asyncio.StreamWriter, contexts: ServerContexts, *,
                     timeout_s: float) -> TunnelPeer:
    """Server side: upgrade an accepted TCP stream to TLS and verify the client.

    Raises :class:`PeerRejected` (handshake or verification) or ``TimeoutError``.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await writer.start_tls(contexts.context)
    except (ssl.SSLError, ConnectionError) as e:
        raise rejection_from_ssl_error(e) from None
    sslobj = writer.get_extra_info("ssl_object")
    local = contexts.local_identity(sslobj)
    if local is None:  # cannot happen: the SNI callback refuses unknown names
        raise PeerRejected(RejectReason.UNKNOWN_SNI, "no destination identity selected by SNI")
    return TunnelPeer(local=local, peer=contexts.verify_peer(sslobj))


async def accept_tls_socket(
    sock: socket.socket, contexts: ServerContexts, *, timeout_s: float, limit: int = 1 << 20,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, TunnelPeer]:
    """Server side, from a freshly accepted socket: TLS handshake, then verify the client.

    Unlike upgrading a stream that is already reading (``start_tls``), no byte of the
    ClientHello can be consumed by a plain-text reader first, whatever the event loop.
    Raises :class:`PeerRejected` (handshake or verification) or ``TimeoutError``.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    protocol = asyncio.StreamReaderProtocol(reader)
    try:
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=contexts.context, ssl_handshake_timeout=timeout_s)
    except (ssl.SSLError, ConnectionError) as e:
        sock.close()
        raise rejection_from_ssl_error(e) from None
    except BaseException:
        sock.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    sslobj = writer.get_extra_info("ssl_object")
    try:
        local = contexts.local_identity(sslobj)
        if local is None:  # cannot happen: the SNI callback refuses unknown names
            raise PeerRejected(RejectReason.UNKNOWN_SNI, "no destination identity selected by SNI")
        return reader, writer, TunnelPeer(local=local, peer=contexts.verify_peer(sslobj))
    except BaseException:
        transport.abort()
        raise


async def connect_tls(host: str, port: int, *, source: WorkloadCert, destination: SpiffeId,
                      contexts: ClientContexts, timeout_s: float,
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, TunnelPeer]:
    """Client side: connect, handshake as ``source``, verify the server is ``destination``.

    The server's verdict on *our* cert arrives later (TLS 1.3): as a TLS alert
    on the first read; pass that error to :func:`rejection_from_ssl_error`.
    """
    ctx = contexts.get(source)
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                           server_hostname=sni_name(destination))
    except (ssl.SSLError, ConnectionResetError) as e:  # a reset mid-handshake: the server refused us
        raise rejection_from_ssl_error(e) from None
    try:
        peer = contexts.verify_peer(writer.get_extra_info("ssl_object"), destination)
    except PeerRejected:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        raise
    return reader, writer, TunnelPeer(local=source.spiffe_id, peer=peer)
