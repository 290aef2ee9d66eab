"""Faults on the tunnel path, on loopback: abnormal endings must end abnormally on the
other side (a TCP reset, never a clean EOF), and must never cost the pooled tunnel its
flow-control credit (issue 10, findings 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

from agent.dataplane.tunnel import TunnelConnection
from tests.component.harness import (
    VIP,
    client_exchange,
    echo_server,
    run,
    two_node_mesh,
    web_service,
    workload,
)

WEB = {"app": "web"}
TWENTY_MB = 20 << 20


def workloads() -> list:
    return [
        workload("client", "127.0.0.5", "n1", sa="client"),
        workload("web-1", "127.0.0.11", "n2", sa="web", labels=WEB),
    ]


async def early_closer(host: str, port: int) -> asyncio.Server:
    """A pod that reads 1,000 bytes of each connection and closes it (unread data -> RST)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.readexactly(1000)
        w.close()

    return await asyncio.start_server(handle, host, port)


async def send_until_error(port: int, total: int, timeout_s: float = 10.0) -> tuple[str, int]:
    """Send ``total`` bytes through the outbound and read to the end: ('error'|'eof', bytes sent)."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.5", 0))
    block = b"x" * (256 * 1024)
    sent = 0
    try:
        async with asyncio.timeout(timeout_s):
            while sent < total:
                w.write(block)
                await w.drain()
                sent += len(block)
            w.write_eof()
            await r.read()
        return "eof", sent
    except (ConnectionError, OSError):
        return "error", sent
    finally:
        w.transport.abort()


def _tunnels(mesh) -> list[TunnelConnection]:  # type: ignore[no-untyped-def]
    pool = mesh.nodes["n1"].outbound.pool
    return [c for e in pool._entries.values() for c in e.conns]


def test_early_closing_server_never_exhausts_the_tunnel_and_the_client_sees_a_reset() -> None:
    """Finding 1: 20 MB to a server that reads 1,000 bytes and closes, 10 times in a row;
    every client must get an error (not a clean end), and the pooled tunnel must still
    carry a new connection at once: the credit of every discarded byte came back."""

    async def main() -> None:
        pod = await early_closer("127.0.0.11", 9000)
        async with two_node_mesh(workloads(), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            port = mesh.nodes["n1"].outbound_port
            outcomes = []
            for _ in range(10):
                outcomes.append(await send_until_error(port, TWENTY_MB))
            assert all(o == "error" for o, _ in outcomes), outcomes
            pod.close()
            await pod.wait_closed()
            echo = await echo_server("127.0.0.11", 9000, "web-1")
            try:
                t0 = time.monotonic()
                reply = await asyncio.wait_for(client_exchange("127.0.0.5", port, b"still there?"), 5)
                assert reply == b"web-1:still there?"
                assert time.monotonic() - t0 < 1.0
                # the same pooled tunnel carried all of it, and no credit was lost: what the
                # sender may still send plus what the receiver holds to credit back in its next
                # batch is the whole connection window
                tunnels = _tunnels(mesh)
                assert len(tunnels) == 1 and mesh.nodes["n1"].outbound.pool.dials == 1
                await asyncio.sleep(0.3)
                (inbound,) = mesh.nodes["n2"].inbound._conns
                rx = inbound.h2
                assert tunnels[0].h2._conn_send_window == rx._conn_recv_window
                assert rx._conn_recv_window + rx._conn_recv_unacked == rx.config.connection_window_bytes
            finally:
                echo.close()

    run(main())


def test_a_pod_reset_reaches_the_client_as_a_reset() -> None:
    """Finding 2: a pod that resets its connection (SO_LINGER 0) mid-download: the client
    across the tunnel gets ECONNRESET, not EOF."""

    async def main() -> None:
        async def resetter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"y" * 100_000)
            await w.drain()
            await asyncio.sleep(0.2)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()

        pod = await asyncio.start_server(resetter, "127.0.0.11", 9000)
        async with two_node_mesh(workloads(), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            r, w = await asyncio.open_connection(
                "127.0.0.1", mesh.nodes["n1"].outbound_port, local_addr=("127.0.0.5", 0)
            )
            got = 0
            outcome = "eof"
            try:
                async with asyncio.timeout(5):
                    while data := await r.read(65536):
                        got += len(data)
            except ConnectionResetError:
                outcome = "reset"
            w.transport.abort()
            assert outcome == "reset", f"client saw a clean end after {got} bytes"
        pod.close()

    run(main())


def test_a_client_reset_reaches_the_pod_as_a_reset() -> None:
    """Finding 2, the other way: the app resets its connection; the pod sees ECONNRESET."""

    async def main() -> None:
        seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def pod_handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while await r.read(65536):
                    pass
                seen.set_result("eof")
            except ConnectionResetError:
                seen.set_result("reset")
            w.close()

        pod = await asyncio.start_server(pod_handler, "127.0.0.11", 9000)
        async with two_node_mesh(workloads(), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            _r, w = await asyncio.open_connection(
                "127.0.0.1", mesh.nodes["n1"].outbound_port, local_addr=("127.0.0.5", 0)
            )
            w.write(b"z" * 100_000)
            await w.drain()
            await asyncio.sleep(0.2)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
            assert await asyncio.wait_for(seen, 5) == "reset"
        pod.close()

    run(main())


def test_a_dead_destination_agent_is_a_reset_for_the_client() -> None:
    """Finding 2: the destination node's proxy dies mid-download (its sockets close):
    the client gets a reset, so a truncated download never looks complete."""

    async def main() -> None:
        async def streamer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                for _ in range(1000):
                    w.write(b"d" * 65536)
                    await w.drain()
                    await asyncio.sleep(0.01)

        pod = await asyncio.start_server(streamer, "127.0.0.11", 9000)
        async with two_node_mesh(workloads(), [web_service()]) as mesh:
            mesh.original_dst[("127.0.0.5", 0)] = (VIP, 80)
            r, w = await asyncio.open_connection(
                "127.0.0.1", mesh.nodes["n1"].outbound_port, local_addr=("127.0.0.5", 0)
            )
            await r.readexactly(200_000)
            # the destination agent dies: its tunnel connections close under it
            for c in list(mesh.nodes["n2"].inbound._conns):
                c.writer.transport.abort()
            outcome = "eof"
            try:
                async with asyncio.timeout(5):
                    while await r.read(65536):
                        pass
            except ConnectionResetError:
                outcome = "reset"
            w.transport.abort()
            assert outcome == "reset"
        pod.close()

    run(main())
