"""The gRPC client against peers that are not etcd: clear errors, never a hang or a crash."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from agent.control.errors import BackendUnavailable
from agent.control.etcd import EtcdBackend
from agent.control.h2grpc import GrpcConnection


@pytest.fixture
def fake_server() -> Iterator[Callable[[bytes], str]]:
    """A loopback server that answers any connection with fixed bytes, then closes."""
    socks: list[socket.socket] = []

    def start(reply: bytes) -> str:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        socks.append(srv)

        def serve() -> None:
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                with c:
                    try:
                        c.settimeout(0.3)  # take everything the client sends first
                        with contextlib.suppress(TimeoutError):
                            while c.recv(65536):
                                pass
                        if reply == b"silence":  # hold the connection, say nothing
                            c.settimeout(5)
                            while c.recv(65536):
                                pass
                            continue
                        c.sendall(reply)
                        c.shutdown(socket.SHUT_WR)  # a clean end (FIN), not a reset
                        c.settimeout(5)
                        while c.recv(65536):
                            pass
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{srv.getsockname()[1]}"

    yield start
    for s in socks:
        s.close()


@pytest.mark.parametrize("reply, says", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "HTTP/2 error"),
    (b"", "closed by the server"),
    (b"\x00\x00\x04\x04\x00\x00\x00\x00\x00", "closed by the server"),  # a SETTINGS frame, then EOF
])
def test_a_peer_that_is_not_etcd_is_reported_as_unreachable(
        fake_server: Callable[[bytes], str], reply: bytes, says: str) -> None:
    url = fake_server(reply)
    b = EtcdBackend(url, timeout_s=2.0)
    try:
        with pytest.raises(BackendUnavailable, match=f"etcd at {url} is unreachable: .*{says}"):
            b.read()
        with pytest.raises(BackendUnavailable):
            b.changes(0, 1.0)
    finally:
        b.close()


def test_a_silent_peer_times_out_with_a_message(fake_server: Callable[[bytes], str]) -> None:
    url = fake_server(b"silence")
    b = EtcdBackend(url, timeout_s=0.5)
    try:
        with pytest.raises(BackendUnavailable, match=r"no answer to /etcdserverpb.KV/Range within 0.5s"):
            b.read()
    finally:
        b.close()


def test_nothing_listening_is_unreachable_at_once() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    b = EtcdBackend(f"http://127.0.0.1:{port}", timeout_s=2.0)
    with pytest.raises(BackendUnavailable, match="Connection refused"):
        b.commit({"k": "v"})
    b.close()


def test_server_pings_over_a_long_life_never_trip_the_control_frame_limit() -> None:
    """The client's HTTP/2 limits run on a real clock: PINGs from the server (gRPC keepalive)
    beyond the burst of 1,000, spread over time, are answered, never a flood (at 0f4970d..f8b48fd
    the clock stood still at 0, so the 1,001st PING of a connection's life ended it)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            c, _ = srv.accept()
            c.settimeout(5)
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            c.sendall(h2c.data_to_send())
            sid = None
            while sid is None:
                for ev in h2c.receive_data(c.recv(65536)):
                    if isinstance(ev, h2.events.RequestReceived):
                        sid = ev.stream_id
                c.sendall(h2c.data_to_send())
            for i in range(990):  # the burst at once (1,000 with our SETTINGS, less some slack)
                h2c.ping(struct.pack(">Q", i))
            c.sendall(h2c.data_to_send())
            acked = 0
            while acked < 990:  # the client read them all (at one time), then time passes
                events = h2c.receive_data(c.recv(65536))
                acked += sum(isinstance(ev, h2.events.PingAckReceived) for ev in events)
            time.sleep(0.8)  # ~80 tokens come back
            for i in range(50):
                h2c.ping(struct.pack(">Q", 990 + i))
            c.sendall(h2c.data_to_send())
            h2c.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            h2c.send_data(sid, b"\x00" + struct.pack(">I", 2) + b"ok")
            h2c.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            c.sendall(h2c.data_to_send())
            time.sleep(0.5)
            c.close()
        except BaseException as e:  # reported by the test
            failed.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    conn = GrpcConnection("127.0.0.1", srv.getsockname()[1], timeout_s=5.0)
    try:
        assert conn.unary("/test.Svc/Call", b"") == b"ok"
        assert conn.broken is None
    finally:
        conn.close()
        srv.close()
        t.join(5)
    assert not failed, failed
