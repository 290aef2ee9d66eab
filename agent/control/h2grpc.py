"""A small blocking gRPC client over cleartext HTTP/2, on nodemesh's own HTTP/2 core.

How this works: gRPC is HTTP/2 with a POST per call to ``/package.Service/Method``,
``content-type: application/grpc``, each message framed as one flag byte (0:
not compressed), a 4-byte big-endian length and the protobuf bytes, and the
outcome in trailers (``grpc-status``, ``grpc-message``). We need it for etcd's
API, so this client does exactly that on a plain socket:

- :class:`GrpcConnection` is one TCP connection: h2c with prior knowledge
  (what etcd's plain client port speaks next to its JSON gateway), or TLS with
  ALPN ``h2`` (etcd's https:// client port, with a client certificate if asked).
  :meth:`GrpcConnection.unary` runs one call at a time (a lock serialises
  callers), sending as the peer's flow-control windows allow.
- :meth:`GrpcConnection.open_stream` starts a call whose request side stays
  open (etcd's watch); :meth:`GrpcConnection.read_messages` then blocks for the
  next response messages. A connection carrying a stream is used for nothing
  else, so one reader owns the socket.

Why not grpcio: it would add ~100 ms to every CLI start and ~27 MB to every
agent's RSS for four etcd methods; the HTTP/2 core here is already the one the
data path runs (agent/proto/h2), tested against the ``h2`` library.

Errors: a connection that cannot be made or breaks raises
:class:`GrpcUnavailable`; a call that etcd answers with a non-zero
``grpc-status`` raises :class:`GrpcError` carrying etcd's message.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import urllib.parse

from agent.proto.h2.connection import (
    ConnectionTerminated,
    DataReceived,
    H2Config,
    H2Connection,
    HeadersReceived,
    StreamReset,
)
from agent.proto.h2.frames import H2ProtocolError

# gRPC status codes we name in messages
UNAVAILABLE = 14
_STATUS_NAMES = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
                 5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED",
                 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
                 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
                 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
MAX_MESSAGE_BYTES = 256 << 20


class GrpcUnavailable(Exception):
    """The server cannot be reached or the connection broke."""


class GrpcError(Exception):
    """The server answered the call with a non-zero grpc-status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{_STATUS_NAMES.get(status, status)}: {message}")
        self.status = status
        self.message = message


def _unquote(msg: str) -> str:
    return urllib.parse.unquote(msg)  # grpc-message is percent-encoded


class _Call:
    """Receive-side state of one stream."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.messages: list[bytes] = []
        self.headers_seen = False
        self.status: int | None = None
        self.message = ""
        self.closed = False
        self.reset: int | None = None

    def on_headers(self, headers: list[tuple[str, str]], end_stream: bool) -> None:
        h = dict(headers)
        if not self.headers_seen and not end_stream:
            self.headers_seen = True
            st = h.get(":status", "200")
            if st != "200":
                self.status, self.message = UNAVAILABLE, f"HTTP status {st}"
            return
        # trailers (or a trailers-only response)
        if "grpc-status" in h:
            try:
                self.status = int(h["grpc-status"])
            except ValueError:
                self.status = 2
            self.message = _unquote(h.get("grpc-message", ""))
        elif self.status is None:
            self.status, self.message = 2, "response ended without grpc-status"

    def on_data(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 5:
            flag, n = struct.unpack_from(">BI", self.buf)
            if flag != 0:
                raise GrpcError(12, "compressed gRPC messages are not supported")
            if n > MAX_MESSAGE_BYTES:
                raise GrpcError(8, f"gRPC message of {n} bytes is over {MAX_MESSAGE_BYTES}")
            if len(self.buf) < 5 + n:
                return
            self.messages.append(bytes(self.buf[5:5 + n]))
            del self.buf[:5 + n]


class GrpcConnection:
    """One connection: cleartext HTTP/2 (h2c), or TLS with ALPN ``h2`` when ``tls`` is given."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 5.0, keepalive: bool = False,
                 tls: ssl.SSLContext | None = None):
        self.host, self.port = host, port
        self.where = f"{host}:{port}"
        self.timeout_s = timeout_s
        self._scheme = "http" if tls is None else "https"
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise GrpcUnavailable(str(e)) from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:  # long-lived idle streams: let the kernel find a dead peer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
        if tls is not None:
            sock = self._handshake(sock, tls, host)
        self._sock = sock
        self._h2 = H2Connection(H2Config(client=True, stream_window_bytes=16 << 20,
                                         connection_window_bytes=64 << 20,
                                         max_frame_bytes=1 << 20))
        self._h2.initiate()
        self._calls: dict[int, _Call] = {}
        self._rbuf = bytearray(256 << 10)
        self._rview = memoryview(self._rbuf)
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self.broken: str | None = None
        self.goaway = False  # the server will take no new calls on this connection
        self._heard_from_server = False
        self._flush()

    @staticmethod
    def _handshake(sock: socket.socket, tls: ssl.SSLContext, host: str) -> socket.socket:
        try:
            tsock = tls.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise GrpcUnavailable(f"TLS: the server's certificate is not trusted ({e.verify_message})") from e
        except (ssl.SSLError, OSError) as e:
            sock.close()
            raise GrpcUnavailable(f"TLS handshake failed: {e}") from e
        if tsock.selected_alpn_protocol() != "h2":
            tsock.close()
            raise GrpcUnavailable("TLS: the server did not agree to HTTP/2 (ALPN h2)")
        return tsock

    # -- plumbing -------------------------------------------------------------------------

    def _flush(self) -> None:
        with self._wlock:
            out = self._h2.data_to_send()
            if out:
                try:
                    self._sock.sendall(out)
                except (OSError, ValueError) as e:
                    self._break(f"send failed: {e}")

    def _break(self, why: str) -> None:
        if self.broken is None:
            if not self._heard_from_server:  # the server hung up before any HTTP/2: say what is likely
                why += (" (before any HTTP/2 from the server: does it require a client certificate?)"
                        if self._scheme == "https" else
                        " (before any HTTP/2 from the server: is it an https:// endpoint?)")
            self.broken = why
        raise GrpcUnavailable(self.broken)

    def _pump(self, timeout_s: float | None) -> None:
        """Read once from the socket and dispatch the events."""
        if self.broken is not None:
            raise GrpcUnavailable(self.broken)
        self._sock.settimeout(timeout_s)
        try:
            # into one reused buffer: a fresh 1 MiB bytes per recv() is an mmap/munmap pair
            n = self._sock.recv_into(self._rbuf)
        except TimeoutError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a TLS socket closed by another thread
            self._break(f"receive failed: {e}")
        if not n:
            self._break("connection closed by the server")
        self._heard_from_server = True
        data = bytes(self._rview[:n])
        try:
            events = self._h2.receive_data(data, now_s=time.monotonic())  # (the limits' clock)
        except H2ProtocolError as e:
            self._flush()
            self._break(f"HTTP/2 error: {e}")
        for ev in events:
            if isinstance(ev, HeadersReceived):
                call = self._calls.get(ev.stream_id)
                if call is not None:
                    call.on_headers(ev.headers, ev.end_stream)
                    call.closed = call.closed or ev.end_stream
            elif isinstance(ev, DataReceived):
                call = self._calls.get(ev.stream_id)
                if call is not None:
                    call.on_data(ev.data)
                    call.closed = call.closed or ev.end_stream
                self._h2.acknowledge_received(ev.stream_id, ev.flow_bytes)
            elif isinstance(ev, StreamReset):
                call = self._calls.get(ev.stream_id)
                if call is not None:
                    call.reset, call.closed = ev.error_code, True
            elif isinstance(ev, ConnectionTerminated):
                # calls above last_stream_id were not processed; the rest may finish
                for sid, call in self._calls.items():
                    if sid > ev.last_stream_id:
                        call.reset, call.closed = ev.error_code, True
                self.goaway = True
        self._flush()

    def _send_message(self, sid: int, message: bytes, end_stream: bool, timeout_s: float) -> None:
        view = memoryview(struct.pack(">BI", 0, len(message)) + message)
        while view:
            room = self._h2.send_window(sid)
            if not room:
                try:
                    self._pump(timeout_s)  # wait for the peer's WINDOW_UPDATE
                except TimeoutError:
                    self._break(f"the server did not open its flow-control window in {timeout_s:g}s")
                continue
            part, view = view[:room], view[room:]
            self._h2.send_data(sid, part, end_stream=end_stream and not view)
            self._flush()

    def _start(self, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        if self.broken is not None:
            raise GrpcUnavailable(self.broken)
        if self.goaway:
            self._break("the server is closing this connection (GOAWAY)")
        sid = self._h2.send_headers(None, [
            (":method", "POST"), (":scheme", self._scheme), (":path", method),
            (":authority", self.where), ("content-type", "application/grpc"), ("te", "trailers"),
            *metadata,
        ])
        self._calls[sid] = _Call()
        return sid

    @staticmethod
    def _outcome(call: _Call) -> None:
        if call.reset is not None and call.status is None:
            raise GrpcUnavailable(f"stream reset by the server (code {call.reset})")
        if call.status:
            if call.status == UNAVAILABLE:
                raise GrpcUnavailable(call.message)
            raise GrpcError(call.status, call.message)

    # -- calls ----------------------------------------------------------------------------

    def unary(self, method: str, request: bytes, timeout_s: float | None = None) -> bytes:
        t = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            sid = self._start(method)
            try:
                self._send_message(sid, request, True, t)
                call = self._calls[sid]
                while not call.closed:
                    try:
                        self._pump(t)
                    except TimeoutError:
                        self._break(f"no answer to {method} within {t:g}s")
            finally:
                self._calls.pop(sid, None)
        self._outcome(call)
        if len(call.messages) != 1:
            raise GrpcError(13, f"{method} answered with {len(call.messages)} messages, expected 1")
        return call.messages[0]

    def open_stream(self, method: str, first_request: bytes,
                    metadata: tuple[tuple[str, str], ...] = ()) -> int:
        with self._lock:
            sid = self._start(method, metadata)
            self._send_message(sid, first_request, False, self.timeout_s)
            return sid

    def read_messages(self, sid: int, timeout_s: float | None) -> list[bytes]:
        """Block until at least one message arrives on ``sid`` (None: no timeout).
        Raises TimeoutError when none came in time; GrpcUnavailable/GrpcError when
        the stream ended."""
        call = self._calls[sid]
        while not call.messages:
            if call.closed:
                self._outcome(call)
                raise GrpcUnavailable("stream ended by the server")
            self._pump(timeout_s)
        out = call.messages[:]
        call.messages.clear()
        return out

    def close(self) -> None:
        if self.broken is None:
            self.broken = "closed"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
