"""The CA service (several hosts): node agents send CSRs over mutual TLS, it signs placed workloads only.

How this works:

- Node identity: every node agent holds a node cert ``spiffe://<td>/node/<name>``
  (EKU clientAuth only), issued offline with ``nodemesh ca issue-node``. The
  service presents ``spiffe://<td>/ca`` (serverAuth only). Both chain to the
  mesh trust bundle; a node cert can never be used on the data path (wrong
  kind) and a workload cert can never ask the CA for anything.
- Each connection: TLS 1.3 handshake (OpenSSL checks chain and validity), then
  :func:`agent.identity.verify.verify_node_chain` gives the verified node
  name. Then requests are served one line at a time (:mod:`agent.identity.wire`).
- Authorization: a ``sign`` request is signed only if the CSR is valid and
  ``placement(node_name, spiffe_id)`` (a callable the registry provides) says
  that workload is placed on that node. Everything else in the cert is
  decided by the CA, never taken from the CSR.
- The client side, :class:`CaClient`, verifies it talks to ``spiffe://<td>/ca``;
  :class:`RemoteIssuer` makes a key and CSR locally (the workload key never
  leaves the node) and plugs into :class:`agent.identity.store.CertManager`.

Every network await runs under ``asyncio.timeout``; a connection serves at most
``max_requests`` requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from agent.identity.bundle import TrustBundle
from agent.identity.ca import MeshCA, csr_identity, make_csr
from agent.identity.certs import (
    DEFAULT_TTL_S,
    WorkloadCert,
    cert_pem,
    key_pem,
    load_certs_pem,
    new_key,
    uri_sans,
)
from agent.identity.clock import Clock
from agent.identity.errors import CaFileError, CaServiceError, IdentityError, IssuanceError, PeerRejected
from agent.identity.spiffe import NodeId, SpiffeId, ca_service_uri
from agent.identity.tls import configure, load_pem_pair, rejection_from_ssl_error
from agent.identity.verify import SERVER_AUTH, verify_node_chain, verify_uri_chain
from agent.identity.wire import (
    MAX_LINE_BYTES,
    BundleRequest,
    BundleResponse,
    ErrorResponse,
    Request,
    Response,
    SignRequest,
    SignResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

log = logging.getLogger(__name__)

Placement = Callable[[str, SpiffeId], bool]


class CaService:
    def __init__(self, ca: MeshCA, placement: Placement, clock: Clock, *,
                 timeout_s: float = 10.0, max_requests: int = 64) -> None:
        self.ca = ca
        self.placement = placement
        self.clock = clock
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.rejections: dict[str, int] = {}  # reason -> count, for metrics
        service_pem, service_key = ca.issue_ca_service(now=clock.now())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        configure(ctx, ca.bundle)
        ctx.set_alpn_protocols(["nodemesh-ca/1"])
        ctx.num_tickets = 0
        load_pem_pair(ctx, service_pem, service_key, what="CA service cert")
        self._ctx = ctx

    def _count(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def answer(self, node: NodeId, req: Request, *, now: datetime) -> Response:
        """The decision for one request of an authenticated node (no I/O)."""
        if isinstance(req, BundleRequest):
            return BundleResponse(self.ca.bundle.to_pem())
        try:
            spiffe_id, _ = csr_identity(req.csr_pem)
        except IssuanceError as e:
            self._count("bad_csr")
            return ErrorResponse("bad_csr", e.message)
        try:
            placed = self.placement(node.name, spiffe_id)
        except Exception as e:  # the registry's callable: any failure is a refusal, never a crash
            log.exception("placement(%s, %s) failed", node.name, spiffe_id)
            self._count("internal")
            return ErrorResponse("internal", f"placement check failed: {type(e).__name__}")
        if not placed:
            self._count("not_placed")
            return ErrorResponse("not_placed", f"node {node.name!r} asked for {spiffe_id}, "
                                               f"but the registry places no such workload on it")
        try:
            _, cert = self.ca.sign_csr(req.csr_pem, now=now, ttl_s=req.ttl_s)
        except IssuanceError as e:
            self._count("bad_csr")
            return ErrorResponse("bad_csr", e.message)
        log.info("signed %s for node %s until %s", spiffe_id, node.name, cert.not_valid_after_utc.isoformat())
        return SignResponse(cert_pem(cert), (cert_pem(self.ca.root),))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await writer.start_tls(self._ctx)
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                node = verify_node_chain([der] if der else [], self.ca.bundle, now=self.clock.now(),
                                         trust_domain=self.ca.trust_domain)
            except (ssl.SSLError, ConnectionError, PeerRejected) as e:
                rej = rejection_from_ssl_error(e)
                self._count(f"unauthenticated:{rej.reason}")
                log.warning("CA service: refused %s: %s", peer, rej.message)
                with contextlib.suppress(Exception):
                    writer.write(encode_response(ErrorResponse("unauthenticated", rej.message)))
                    await writer.drain()
                return
            for _ in range(self.max_requests):
                async with asyncio.timeout(self.timeout_s):
                    line = await reader.readuntil(b"\n")
                try:
                    resp: Response = self.answer(node, decode_request(line), now=self.clock.now())
                except CaServiceError as e:
                    resp = ErrorResponse("bad_request", e.message)
                async with asyncio.timeout(self.timeout_s):
                    writer.write(encode_response(resp))
                    await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError,
                ssl.SSLError):
            pass  # the client went away, was too slow or sent an overlong line
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def serving(self, host: str, port: int) -> AsyncIterator[tuple[str, int]]:
        """Listen on ``host:port`` (port 0: any free port); yields the bound address."""
        server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE_BYTES + 1)
        try:
            addr = server.sockets[0].getsockname()
            yield addr[0], addr[1]
        finally:
            server.close()
            await server.wait_closed()


class CaClient:
    """A node agent's connection to the CA service, authenticated by the node cert."""

    def __init__(self, host: str, port: int, *, node_cert_pem: bytes, node_key_pem: bytes,
                 bundle: TrustBundle, trust_domain: str, clock: Clock, timeout_s: float = 10.0) -> None:
        self.host, self.port = host, port
        self.bundle = bundle
        self.trust_domain = trust_domain
        self.clock = clock
        self.timeout_s = timeout_s
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        configure(ctx, bundle)
        ctx.set_alpn_protocols(["nodemesh-ca/1"])
        load_pem_pair(ctx, node_cert_pem, node_key_pem, what="node cert")
        self._ctx = ctx

    async def request(self, req: Request) -> Response:
        where = f"CA service {self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ctx,
                                                               limit=MAX_LINE_BYTES + 1)
        except ssl.SSLError as e:
            rej = rejection_from_ssl_error(e)
            raise CaServiceError(f"{where}: TLS handshake failed: {rej.message}", code="unauthenticated") \
                from None
        except (OSError, TimeoutError) as e:
            raise CaServiceError(f"{where}: cannot connect: {e}", hint="is the CA service running?") from None
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            verify_uri_chain([der] if der else [], self.bundle, now=self.clock.now(),
                             expected_uri=ca_service_uri(self.trust_domain), usage=SERVER_AUTH)
            async with asyncio.timeout(self.timeout_s):
                writer.write(encode_request(req))
                await writer.drain()
                line = await reader.readuntil(b"\n")
            return decode_response(line)
        except PeerRejected as e:
            raise CaServiceError(f"{where}: not our CA service: {e.message}", code="unauthenticated") \
                from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, TimeoutError) as e:
            raise CaServiceError(f"{where}: no answer ({type(e).__name__}: {e})") from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def sign(self, csr_pem: bytes, *, ttl_s: int = DEFAULT_TTL_S) -> SignResponse:
        resp = await self.request(SignRequest(csr_pem=csr_pem, ttl_s=ttl_s))
        if isinstance(resp, ErrorResponse):
            raise CaServiceError(f"CA service refused: {resp.message}", code=resp.code)
        if not isinstance(resp, SignResponse):
            raise CaServiceError("CA service: expected a signed cert, got another answer", code="bad_request")
        return resp

    async def fetch_bundle(self) -> TrustBundle:
        resp = await self.request(BundleRequest())
        if not isinstance(resp, BundleResponse):
            raise CaServiceError("CA service: expected a bundle, got another answer", code="bad_request")
        try:
            return TrustBundle.from_pem(resp.bundle_pem, source=f"CA service {self.host}:{self.port}")
        except CaFileError as e:
            raise CaServiceError(e.message, code="bad_request") from None


class RemoteIssuer:
    """An :class:`agent.identity.store.Issuer` backed by the CA service; keys stay on this node."""

    def __init__(self, client: CaClient) -> None:
        self.client = client

    async def issue(self, spiffe_id: SpiffeId, *, now: datetime, ttl_s: int) -> WorkloadCert:
        key = new_key()
        resp = await self.client.sign(make_csr(spiffe_id, key), ttl_s=ttl_s)
        where = f"CA service {self.client.host}:{self.client.port}"
        try:
            cert = load_certs_pem(resp.cert_pem, source=where, what="a PEM cert")[0]
            chain = [c for pem in resp.chain_pem for c in load_certs_pem(pem, source=where)]
        except CaFileError as e:
            raise CaServiceError(e.message, code="bad_request") from None
        if uri_sans(cert) != [spiffe_id.uri] or cert.public_key() != key.public_key():
            raise IdentityError(f"{where}: expected a cert for {spiffe_id} with our key, "
                                f"got one for {uri_sans(cert)}")
        return WorkloadCert.from_x509(spiffe_id, cert, key_pem(key), chain)
