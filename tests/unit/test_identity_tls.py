"""Real TLS 1.3 handshakes over 127.0.0.1 with certs from our CA: HBONE contexts and the CA service."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.bundle import TrustBundle
from agent.identity.ca import MeshCA, make_csr
from agent.identity.certs import WorkloadCert, key_pem, new_key, sign_leaf
from agent.identity.clock import FakeClock, SystemClock
from agent.identity.errors import CaServiceError, PeerRejected, RejectReason
from agent.identity.service import CaClient, CaService, RemoteIssuer
from agent.identity.spiffe import NodeId, SpiffeId
from agent.identity.store import CertManager
from agent.identity.tls import (
    ClientContexts,
    ServerContexts,
    TunnelPeer,
    accept_tls,
    connect_tls,
    rejection_from_ssl_error,
)
from agent.identity.wire import (
    BundleRequest,
    BundleResponse,
    ErrorResponse,
    SignRequest,
    decode_response,
    encode_request,
)

TD = "cluster.local"
NOW = datetime.now(UTC)
SRV = SpiffeId(TD, "default", "server")
CLI = SpiffeId(TD, "default", "client")
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create(TD, now=NOW - timedelta(days=30))


def custom(ca: MeshCA, sid: SpiffeId, uris: Sequence[str], **kw: object) -> WorkloadCert:
    key = new_key()
    cert = sign_leaf(ca.root, ca.key, key.public_key(), uris=uris, not_before=NOW - timedelta(hours=1),
                     not_after=NOW + timedelta(hours=1), **kw)  # type: ignore[arg-type]
    return WorkloadCert.from_x509(sid, cert, key_pem(key), [ca.root])


class Inbound:
    """A real inbound listener on 127.0.0.1 that records each connection's verdict."""

    def __init__(self, contexts: ServerContexts) -> None:
        self.contexts = contexts
        self.results: asyncio.Queue[TunnelPeer | PeerRejected] = asyncio.Queue()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = await accept_tls(writer, self.contexts, timeout_s=TIMEOUT_S)
        except PeerRejected as e:
            await self.results.put(e)
        else:
            await self.results.put(peer)
            writer.write(f"hello {peer.peer}\n".encode())
            await writer.drain()
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Inbound]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()

    async def verdict(self) -> TunnelPeer | PeerRejected:
        async with asyncio.timeout(TIMEOUT_S):
            return await self.results.get()


async def dial(port: int, source: WorkloadCert, bundle: TrustBundle, destination: SpiffeId = SRV,
               ) -> tuple[TunnelPeer, bytes]:
    contexts = ClientContexts(bundle, trust_domain=TD)
    reader, writer, peer = await connect_tls("127.0.0.1", port, source=source, destination=destination,
                                             contexts=contexts, timeout_s=TIMEOUT_S)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            data = await reader.readline()
    except (ssl.SSLError, ConnectionError):
        data = b""
    finally:
        writer.close()
    return peer, data


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_mutual_tls_success_and_sni_selects_identity(ca: MeshCA) -> None:
    other = SpiffeId(TD, "shop", "db")

    async def scenario() -> None:
        sc = ServerContexts(ca.bundle, trust_domain=TD)
        sc.set_identity(ca.issue(SRV, now=NOW))
        sc.set_identity(ca.issue(other, now=NOW))
        async with Inbound(sc).serving() as inbound:
            client = ca.issue(CLI, now=NOW)
            for dest in (SRV, other):
                peer, data = await dial(inbound.port, client, ca.bundle, destination=dest)
                assert peer == TunnelPeer(local=CLI, peer=dest)  # the client verified whom it reached
                verdict = await inbound.verdict()
                assert verdict == TunnelPeer(local=dest, peer=CLI)
                assert data == f"hello {CLI}\n".encode()

    run(scenario())


def _bad_clients(ca: MeshCA) -> dict[RejectReason, tuple[WorkloadCert, TrustBundle]]:
    """Client certs each of which the server must reject, and the bundle the server trusts."""
    other_ca = MeshCA.create(TD, now=NOW - timedelta(days=1))
    foreign = MeshCA.create("other.example", now=NOW - timedelta(days=1))
    federated = ca.bundle.with_root(foreign.root)
    return {
        RejectReason.UNKNOWN_CA: (other_ca.issue(CLI, now=NOW), ca.bundle),
        RejectReason.EXPIRED: (ca.issue(CLI, now=NOW - timedelta(days=2)), ca.bundle),
        RejectReason.NOT_YET_VALID: (ca.issue(CLI, now=NOW + timedelta(days=2)), ca.bundle),
        RejectReason.WRONG_TRUST_DOMAIN: (foreign.issue(SpiffeId("other.example", "default", "client"),
                                                        now=NOW), federated),
        RejectReason.SAN_COUNT: (custom(ca, CLI, [CLI.uri, f"spiffe://{TD}/ns/default/sa/admin"]), ca.bundle),
        RejectReason.BAD_EKU: (custom(ca, CLI, [CLI.uri], eku=None), ca.bundle),
    }


@pytest.mark.parametrize("reason", [
    RejectReason.UNKNOWN_CA, RejectReason.EXPIRED, RejectReason.NOT_YET_VALID,
    RejectReason.WRONG_TRUST_DOMAIN, RejectReason.SAN_COUNT, RejectReason.BAD_EKU,
])
def test_server_rejects_bad_client_cert_with_reason(ca: MeshCA, reason: RejectReason) -> None:
    client, bundle = _bad_clients(ca)[reason]

    async def scenario() -> None:
        sc = ServerContexts(bundle, trust_domain=TD)
        sc.set_identity(ca.issue(SRV, now=NOW))
        async with Inbound(sc).serving() as inbound:
            _, data = await dial(inbound.port, client, bundle)
            verdict = await inbound.verdict()
            assert isinstance(verdict, PeerRejected), verdict
            assert verdict.reason is reason, verdict.message
            assert data == b""  # the client got nothing through

    run(scenario())


def test_server_auth_only_cert_fails_in_openssl_as_bad_eku(ca: MeshCA) -> None:
    client = custom(ca, CLI, [CLI.uri], eku=(ExtendedKeyUsageOID.SERVER_AUTH,))

    async def scenario() -> None:
        sc = ServerContexts(ca.bundle, trust_domain=TD)
        sc.set_identity(ca.issue(SRV, now=NOW))
        async with Inbound(sc).serving() as inbound:
            await dial(inbound.port, client, ca.bundle)
            verdict = await inbound.verdict()
            assert isinstance(verdict, PeerRejected) and verdict.reason is RejectReason.BAD_EKU
            assert "X509 error 26" in verdict.message  # rejected during the handshake, by OpenSSL

    run(scenario())


def test_client_rejects_bad_server(ca: MeshCA) -> None:
    async def scenario() -> None:
        sc = ServerContexts(ca.bundle, trust_domain=TD)
        sc.set_identity(ca.issue(SRV, now=NOW - timedelta(days=2)))  # expired server cert
        client = ca.issue(CLI, now=NOW)
        async with Inbound(sc).serving() as inbound:
            with pytest.raises(PeerRejected) as e:
                await dial(inbound.port, client, ca.bundle)
            assert e.value.reason is RejectReason.EXPIRED and not e.value.remote
            # a destination this node does not serve: the server refuses the SNI
            with pytest.raises(PeerRejected) as e:
                await dial(inbound.port, client, ca.bundle, destination=SpiffeId(TD, "x", "y"))
            assert e.value.remote
            assert e.value.reason in (RejectReason.UNKNOWN_SNI, RejectReason.HANDSHAKE_FAILED)
            first, second = await inbound.verdict(), await inbound.verdict()
            assert isinstance(first, PeerRejected) and first.remote  # the client hung up on our expired cert
            assert isinstance(second, PeerRejected) and second.reason is RejectReason.UNKNOWN_SNI

    run(scenario())


def test_renewal_and_root_rotation_while_serving(ca: MeshCA) -> None:
    async def scenario() -> None:
        sc = ServerContexts(ca.bundle, trust_domain=TD)
        first = ca.issue(SRV, now=NOW)
        sc.set_identity(first)
        clients = ClientContexts(ca.bundle, trust_domain=TD)
        c1 = ca.issue(CLI, now=NOW)
        ctx1 = clients.get(c1)
        assert clients.get(c1) is ctx1
        c2 = ca.issue(CLI, now=NOW)  # renewal: a new cert for the same identity
        assert clients.get(c2) is not ctx1
        new_ca = ca.rotated(now=NOW - timedelta(days=1))
        async with Inbound(sc).serving() as inbound:
            # the server learns the new root and renews its own cert from it
            sc.set_bundle(new_ca.bundle)
            sc.set_identity(new_ca.issue(SRV, now=NOW))
            for client in (ca.issue(CLI, now=NOW), new_ca.issue(CLI, now=NOW)):
                peer, _ = await dial(inbound.port, client, new_ca.bundle)
                assert peer.peer == SRV
                assert await inbound.verdict() == TunnelPeer(local=SRV, peer=CLI)

    run(scenario())


def test_rejection_mapping_of_plain_errors() -> None:
    assert rejection_from_ssl_error(ConnectionResetError()).reason is RejectReason.HANDSHAKE_FAILED


# -- CA service -------------------------------------------------------------------------------------

def test_ca_service_signs_only_placed_identities(ca: MeshCA) -> None:
    placed = {("n1", SpiffeId(TD, "default", "web"))}
    asked: list[tuple[str, SpiffeId]] = []

    def placement(node: str, sid: SpiffeId) -> bool:
        asked.append((node, sid))
        return (node, sid) in placed

    def node_client(port: int, name: str, issuer: MeshCA = ca) -> CaClient:
        cert, key = issuer.issue_node(NodeId(TD, name), now=NOW)
        return CaClient("127.0.0.1", port, node_cert_pem=cert, node_key_pem=key, bundle=ca.bundle,
                        trust_domain=TD, clock=SystemClock(), timeout_s=TIMEOUT_S)

    async def scenario() -> None:
        service = CaService(ca, placement, SystemClock(), timeout_s=TIMEOUT_S)
        async with service.serving("127.0.0.1", 0) as (_, port):
            web = SpiffeId(TD, "default", "web")
            mgr = CertManager(RemoteIssuer(node_client(port, "n1")), FakeClock(NOW), ttl_s=3600)
            cert = await mgr.ensure(web)
            leaf = x509.load_pem_x509_certificate(cert.cert_pem)
            leaf.verify_directly_issued_by(ca.root)
            assert cert.spiffe_id == web and cert.lifetime_s <= 3600 + 60
            assert asked == [("n1", web)]
            # the same workload asked for by another node: refused
            with pytest.raises(CaServiceError) as e:
                await RemoteIssuer(node_client(port, "n2")).issue(web, now=NOW, ttl_s=3600)
            assert e.value.code == "not_placed"
            # an identity not placed anywhere: refused
            with pytest.raises(CaServiceError) as e:
                await RemoteIssuer(node_client(port, "n1")).issue(SpiffeId(TD, "kube", "admin"),
                                                                  now=NOW, ttl_s=3600)
            assert e.value.code == "not_placed"
            # a node cert from another CA cannot even talk to it
            stranger = MeshCA.create(TD, now=NOW - timedelta(days=1))
            with pytest.raises(CaServiceError) as e:
                await node_client(port, "n1", issuer=stranger).fetch_bundle()
            assert e.value.code in ("unavailable", "unauthenticated")
            assert service.rejections.get("not_placed") == 2
            assert any(k.startswith("unauthenticated") for k in service.rejections)
            # a workload cert is not a node identity
            wl = ca.issue(web, now=NOW)
            as_workload = CaClient("127.0.0.1", port, node_cert_pem=wl.cert_pem, node_key_pem=wl.key_pem,
                                   bundle=ca.bundle, trust_domain=TD, clock=SystemClock(),
                                   timeout_s=TIMEOUT_S)
            resp = await as_workload.request(SignRequest(make_csr(web, new_key()), 3600))
            assert getattr(resp, "code", None) == "unauthenticated"
            assert "wrong_kind" in getattr(resp, "message", "")
            # bundle distribution
            assert (await node_client(port, "n1").fetch_bundle()) == ca.bundle
            # garbage on the wire: a clear error, and the connection keeps serving
            raw_ctx = node_client(port, "n1")._ctx
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=raw_ctx)
            writer.write(b"not json\n" + encode_request(BundleRequest()))
            await writer.drain()
            async with asyncio.timeout(TIMEOUT_S):
                bad, good = decode_response(await reader.readline()), decode_response(await reader.readline())
            writer.close()
            assert isinstance(bad, ErrorResponse) and bad.code == "bad_request" and "expected" in bad.message
            assert isinstance(good, BundleResponse)
            assert (await mgr.ensure(web)) is cert

    run(scenario())
