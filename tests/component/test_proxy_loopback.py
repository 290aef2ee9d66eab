"""The node proxy's whole path on loopback: outbound → pooled HBONE mTLS → inbound → pod."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import Counter
from datetime import UTC, datetime, timedelta

import h2.config
import h2.connection
import h2.events
import pytest

from agent.identity.ca import MeshCA
from agent.identity.certs import WorkloadCert, key_pem, new_key, sign_leaf
from agent.identity.clock import FakeClock
from agent.identity.spiffe import SpiffeId, sni_name
from agent.identity.tls import ClientContexts, client_context
from tests.component.harness import (
    TD,
    VIP,
    build_snapshot,
    client_exchange,
    echo_server,
    metric,
    run,
    two_node_mesh,
    web_service,
    workload,
)

WEB = {"app": "web"}


def mesh_workloads(n_web: int = 2) -> list:
    ws = [workload("client", "127.0.0.5", "n1", sa="client")]
    ws += [workload(f"web-{i}", f"127.0.0.{10 + i}", "n2", sa="web", labels=WEB) for i in range(1, n_web + 1)]
    return ws


def test_vip_connection_crosses_the_tunnel_and_is_load_balanced() -> None:
    async def main() -> None:
        pods = [await echo_server(f"127.0.0.{10 + i}", 9000, f"web-{i}") for i in (1, 2)]
        async with two_node_mesh(mesh_workloads(), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            answers = [await client_exchange("127.0.0.5", n1.outbound_port, b"hi %d" % i) for i in range(10)]
            who = Counter(a.split(b":")[0].decode() for a in answers)
            assert who == {"web-1": 5, "web-2": 5}  # ROUND_ROBIN
            assert all(a.endswith(b"hi %d" % i) for i, a in enumerate(answers))
            # ten app connections, one TLS connection: the pool reuses the tunnel
            assert n1.outbound.pool.dials == 1
            # Istio metrics on both sides, with verified identities as principals
            src = f"spiffe://{TD}/ns/default/sa/client"
            dst = f"spiffe://{TD}/ns/default/sa/web"
            assert (
                metric(
                    n1,
                    "istio_tcp_connections_opened_total",
                    reporter="source",
                    source_principal=src,
                    destination_principal=dst,
                    destination_service="web.default.svc.cluster.local",
                    connection_security_policy="mutual_tls",
                )
                == 10
            )
            await asyncio.sleep(0.05)
            assert (
                metric(
                    n2,
                    "istio_tcp_connections_closed_total",
                    reporter="destination",
                    source_principal=src,
                    destination_workload="web-1",
                )
                == 5
            )
            # Istio's directions: received = request bytes (client to server), sent = response bytes
            assert metric(n1, "istio_tcp_received_bytes_total", reporter="source") == sum(
                len(b"hi %d" % i) for i in range(10)
            )
            assert metric(n1, "istio_tcp_sent_bytes_total", reporter="source") == sum(len(a) for a in answers)
        for p in pods:
            p.close()

    run(main())


def test_large_transfer_is_byte_identical_and_half_close_works() -> None:
    async def main() -> None:
        async def sha_pod(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            h = hashlib.sha256()
            n = 0
            while chunk := await r.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
            # the client already shut its write side; the reply still gets through
            w.write(f"{n} {h.hexdigest()}".encode())
            await w.drain()
            w.close()

        pod = await asyncio.start_server(sha_pod, "127.0.0.11", 9000)
        async with two_node_mesh(mesh_workloads(1), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            r, w = await asyncio.open_connection(
                "127.0.0.1", mesh.nodes["n1"].outbound_port, local_addr=("127.0.0.5", 0)
            )
            h = hashlib.sha256()
            block = bytes(range(256)) * 4096  # 1 MiB
            total = 64 * len(block)
            for i in range(64):
                chunk = block[i:] + block[:i]
                h.update(chunk)
                w.write(chunk)
                await w.drain()
            w.write_eof()
            reply = await asyncio.wait_for(r.read(), 30)
            assert reply.decode() == f"{total} {h.hexdigest()}"
            w.close()
        pod.close()

    run(main())


def test_dead_endpoint_is_skipped_within_the_attempt_budget() -> None:
    async def main() -> None:
        pod = await echo_server("127.0.0.12", 9000, "web-2")  # web-1 (127.0.0.11) has no listener
        async with two_node_mesh(mesh_workloads(), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            answers = [
                await client_exchange("127.0.0.5", mesh.nodes["n1"].outbound_port, b"x") for _ in range(6)
            ]
            assert all(a == b"web-2:x" for a in answers)
            assert (
                metric(mesh.nodes["n2"], "nodemesh_tunnel_rejections_total", reason="upstream_connect_failed")
                >= 1
            )
        pod.close()

    run(main())


def _h2_client_ctx(ca: MeshCA, sid: SpiffeId) -> ssl.SSLContext:
    cert = ca.issue(sid, now=datetime.now(UTC))
    ctx = ClientContexts(ca.bundle, trust_domain=TD).get(cert)
    return ctx


def test_independent_h2_client_interoperates_with_inbound() -> None:
    """The `h2` library (not our framing) opens CONNECT streams through our inbound."""

    async def main() -> None:
        pod = await echo_server("127.0.0.11", 9000, "web-1")
        async with two_node_mesh(mesh_workloads(1), [web_service()]) as mesh:
            port = mesh.nodes["n2"].hbone_port
            ctx = _h2_client_ctx(mesh.ca, SpiffeId(TD, "default", "client"))
            r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=sni_name(SpiffeId(TD, "default", "web"))
            )
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
            )
            conn.initiate_connection()
            ok = conn.get_next_available_stream_id()
            conn.send_headers(ok, [(":method", "CONNECT"), (":authority", "127.0.0.11:9000")])
            conn.send_data(ok, b"via h2", end_stream=True)
            bad = conn.get_next_available_stream_id()
            conn.send_headers(
                bad, [(":method", "CONNECT"), (":authority", "127.0.0.99:9000")], end_stream=True
            )
            w.write(conn.data_to_send())
            statuses: dict[int, str] = {}
            body = b""
            ended: set[int] = set()
            async with asyncio.timeout(10):
                while len(ended) < 2:
                    data = await r.read(65536)
                    assert data
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.ResponseReceived):
                            statuses[ev.stream_id] = dict(ev.headers)[":status"]
                        elif isinstance(ev, h2.events.DataReceived):
                            body += ev.data
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                            ended.add(ev.stream_id)
                    w.write(conn.data_to_send())
            assert statuses == {ok: "200", bad: "400"}  # not a local workload: 4xx on that stream only
            assert body == b"web-1:via h2"
            w.close()
        pod.close()

    run(main())


def _client_cert(mesh_ca: MeshCA, case: str) -> WorkloadCert:
    """A client certificate that the inbound must refuse, and why."""
    now = datetime.now(UTC)
    sid = SpiffeId(TD, "default", "client")
    if case == "wrong_trust_domain":
        return MeshCA.create("evil.example", now=now - timedelta(days=1)).issue(
            SpiffeId("evil.example", "default", "client"), now=now
        )
    if case == "unknown_ca":  # same trust domain name, a different key
        return MeshCA.create(TD, now=now - timedelta(days=1)).issue(sid, now=now)
    key = new_key()
    if case == "expired":
        nb, na, uris = now - timedelta(hours=2), now - timedelta(hours=1), [sid.uri]
    else:  # san_count: two URI SANs
        nb, na, uris = (
            now - timedelta(hours=1),
            now + timedelta(hours=1),
            [sid.uri, f"spiffe://{TD}/ns/x/sa/y"],
        )
    cert = sign_leaf(mesh_ca.root, mesh_ca.key, key.public_key(), uris=uris, not_before=nb, not_after=na)
    return WorkloadCert.from_x509(sid, cert, key_pem(key), [mesh_ca.root])


@pytest.mark.parametrize("case", ["wrong_trust_domain", "unknown_ca", "expired", "san_count"])
def test_bad_client_certificates_are_refused_logged_and_counted(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with two_node_mesh(mesh_workloads(1), [web_service()]) as mesh:
            port = mesh.nodes["n2"].hbone_port
            cert = _client_cert(mesh.ca, case)
            ctx = client_context(cert, mesh.ca.bundle)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                r, w = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=sni_name(SpiffeId(TD, "default", "web"))
                )
                w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                await w.drain()
                data = await asyncio.wait_for(r.read(100), 5)
                if not data:
                    raise ConnectionError("closed by the server")
            await asyncio.sleep(0.05)
            reason = "unknown_ca" if case in ("wrong_trust_domain", "unknown_ca") else case
            # a root of another trust domain is an unknown CA to OpenSSL: refused in the handshake
            assert metric(mesh.nodes["n2"], "nodemesh_tunnel_rejections_total", reason=reason) == 1

    with caplog.at_level("WARNING"):
        run(main())
    assert any("refused tunnel from 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_snapshot_without_the_source_workload_refuses_and_counts() -> None:
    async def main() -> None:
        async with two_node_mesh(mesh_workloads(1), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.6", 0)] = (VIP, 80)  # an enrolled pod nobody registered
            # refused with a reset, as a connection to a closed port would be
            with pytest.raises(ConnectionResetError):
                await client_exchange("127.0.0.6", mesh.nodes["n1"].outbound_port, b"x")
            assert metric(mesh.nodes["n1"], "nodemesh_outbound_failures_total", response_flags="UAEX") == 1
            # once registered, the same pod is served
            pod = await echo_server("127.0.0.11", 9000, "web-1")
            ws = [*mesh_workloads(1), workload("late", "127.0.0.6", "n1", sa="late")]
            mesh.set_snapshot(build_snapshot([web_service()], ws, revision=2))
            assert await client_exchange("127.0.0.6", mesh.nodes["n1"].outbound_port, b"x") == b"web-1:x"
            pod.close()

    run(main())


def test_certificate_renewal_while_traffic_flows() -> None:
    """Certs renew at half life (driven by an injected clock); connections keep flowing,
    the pool moves new streams to a tunnel handshaked with the new cert, none fails."""

    async def main() -> None:
        # 4 h certs, renewed at half life. The issuing clock starts 2 h (less 30 s) before real
        # time, so after advancing it by 2 h both the first certs and the renewed ones are valid
        # in real time, where the TLS handshakes check them.
        clock = FakeClock(datetime.now(UTC) - timedelta(hours=2) + timedelta(seconds=30))
        pods = [await echo_server(f"127.0.0.{10 + i}", 9000, f"web-{i}") for i in (1, 2)]
        async with two_node_mesh(mesh_workloads(), [web_service()], clock=clock) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            web = SpiffeId(TD, "default", "web")
            client = SpiffeId(TD, "default", "client")
            old_server = n2.certs.current(web)
            assert old_server is not None
            failures = 0
            done = 0
            stop = asyncio.Event()

            async def traffic() -> None:
                nonlocal failures, done
                while not stop.is_set():
                    try:
                        got = await client_exchange("127.0.0.5", n1.outbound_port, b"x")
                        failures += not got.endswith(b":x")
                    except OSError:
                        failures += 1
                    done += 1

            # one long-lived connection stays open across the renewal
            r, w = await asyncio.open_connection("127.0.0.1", n1.outbound_port, local_addr=("127.0.0.5", 0))
            w.write(b"long-lived ")
            await w.drain()
            loops = [asyncio.create_task(traffic()) for _ in range(4)]
            await asyncio.sleep(0.5)
            before = done
            assert n1.outbound.pool.dials == 1  # concurrent connections share one tunnel
            clock.advance(2 * 3600)
            renewed = [*(await n1.certs.renew_due()), *(await n2.certs.renew_due())]
            assert {c.spiffe_id for c in renewed} >= {web, client}
            await asyncio.sleep(0.5)
            await n1.outbound.pool.reap()
            assert n1.outbound.pool.size == 2  # the old tunnel still carries the long-lived stream
            stop.set()
            await asyncio.gather(*loops)
            w.write(b"still flowing")
            w.write_eof()
            assert (await r.read()).endswith(b":long-lived still flowing")
            w.close()
            assert failures == 0 and done - before > 20
            new_server = n2.certs.current(web)
            assert new_server is not None and new_server.fingerprint_sha256 != old_server.fingerprint_sha256
            assert n1.outbound.pool.dials == 2  # a second tunnel, handshaked with the renewed client cert
            await asyncio.sleep(0.1)
            await n1.outbound.pool.reap()
            assert n1.outbound.pool.size == 1  # drained, the old tunnel is closed
        for p in pods:
            p.close()

    run(main())
