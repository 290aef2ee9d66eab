"""A sans-I/O HTTP/2 connection for HBONE: bytes in, events out.

How this works: :meth:`H2Connection.receive_data` takes bytes from the
transport and returns events (a CONNECT request arrived, data arrived, a
stream ended or was reset, windows opened, the peer went away);
:meth:`H2Connection.data_to_send` returns the bytes to write. Nothing here
touches a socket, a clock or asyncio.

Scope is what the tunnel needs — streams carrying a CONNECT request/response
and DATA both ways — with the RFC 9113 rules that keep a peer honest: frame
sizes, stream id parity and order, HEADERS/CONTINUATION sequencing, flow
control on both sides, SETTINGS/PING acknowledgements, GOAWAY. No server
push, no priority handling (PRIORITY frames are accepted and ignored),
no trailers beyond ending the stream.

Flow control is explicit: received DATA is counted against our windows and
only credited back when the application calls :meth:`acknowledge_received`
(after it has written the bytes onwards), which is how backpressure crosses
the tunnel. Senders ask :meth:`send_window` before :meth:`send_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hpack

from agent.dataplane.h2 import frames as fr
from agent.dataplane.h2.frames import ErrorCode, Flag, FrameType, H2ProtocolError, Setting

Headers = list[tuple[str, str]]


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    """A request (server side) or response (client side) header block."""

    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    flow_bytes: int  # what to acknowledge (payload plus padding)
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    stream_id: int  # 0: the connection window


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    error_code: int
    last_stream_id: int


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    settings: dict[int, int]


@dataclass(frozen=True, slots=True)
class PingAcked:
    data: bytes


Event = (
    HeadersReceived
    | DataReceived
    | StreamReset
    | WindowUpdated
    | ConnectionTerminated
    | SettingsReceived
    | PingAcked
)


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class H2Config:
    client: bool
    stream_window_bytes: int = 4 << 20
    connection_window_bytes: int = 64 << 20
    max_frame_bytes: int = 1 << 20
    max_concurrent_streams: int = 1000
    max_header_list_bytes: int = 16_384

    def __post_init__(self) -> None:
        if not fr.DEFAULT_WINDOW_BYTES <= self.stream_window_bytes <= fr.MAX_WINDOW_BYTES:
            raise ValueError(f"stream_window_bytes {self.stream_window_bytes} out of range")
        if not fr.DEFAULT_WINDOW_BYTES <= self.connection_window_bytes <= fr.MAX_WINDOW_BYTES:
            raise ValueError(f"connection_window_bytes {self.connection_window_bytes} out of range")
        if not fr.DEFAULT_MAX_FRAME_BYTES <= self.max_frame_bytes <= fr.MAX_ALLOWED_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes {self.max_frame_bytes} out of range")


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int  # what the peer may still send us on this stream
    recv_unacked: int = 0  # received and acknowledged by the app, not yet credited
    local_closed: bool = False
    remote_closed: bool = False
    headers_seen: bool = False


@dataclass(slots=True)
class _PendingHeaders:
    stream_id: int
    end_stream: bool
    block: bytearray = field(default_factory=bytearray)


class H2Connection:
    def __init__(self, config: H2Config) -> None:
        self.config = config
        self._out: list[bytes] = []
        self._in = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=config.max_header_list_bytes)
        self._next_local_id = 1 if config.client else 2
        self._highest_remote_id = 0
        self._preface_pending = not config.client  # a server first waits for the client preface
        self._pending_headers: _PendingHeaders | None = None
        # peer's settings (defaults until its SETTINGS arrives)
        self.peer_initial_window = fr.DEFAULT_WINDOW_BYTES
        self.peer_max_frame_bytes = fr.DEFAULT_MAX_FRAME_BYTES
        self.peer_max_concurrent_streams = 2**31 - 1
        self._conn_send_window = fr.DEFAULT_WINDOW_BYTES
        self._conn_recv_window = fr.DEFAULT_WINDOW_BYTES
        self._conn_recv_unacked = 0
        self.goaway_received = False
        self.goaway_sent = False

    # -- lifecycle ----------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection window increase."""
        c = self.config
        if c.client:
            self._out.append(fr.PREFACE)
        settings: dict[int, int] = {
            Setting.ENABLE_PUSH: 0,
            Setting.MAX_CONCURRENT_STREAMS: c.max_concurrent_streams,
            Setting.INITIAL_WINDOW_SIZE: c.stream_window_bytes,
            Setting.MAX_FRAME_SIZE: c.max_frame_bytes,
            Setting.MAX_HEADER_LIST_SIZE: c.max_header_list_bytes,
        }
        if not c.client:
            del settings[Setting.ENABLE_PUSH]  # only clients may send ENABLE_PUSH
        self._out.append(fr.encode(FrameType.SETTINGS, 0, 0, fr.encode_settings(settings)))
        grow = c.connection_window_bytes - fr.DEFAULT_WINDOW_BYTES
        if grow:
            self._out.append(fr.encode(FrameType.WINDOW_UPDATE, 0, 0, grow.to_bytes(4, "big")))
            self._conn_recv_window += grow

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def close(self, error_code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        if not self.goaway_sent:
            payload = self._highest_remote_id.to_bytes(4, "big") + int(error_code).to_bytes(4, "big") + debug
            self._out.append(fr.encode(FrameType.GOAWAY, 0, 0, payload))
            self.goaway_sent = True

    def ping(self, data: bytes = b"\0" * 8) -> None:
        self._out.append(fr.encode(FrameType.PING, 0, 0, data[:8].ljust(8, b"\0")))

    # -- streams, sending -------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def is_open(self, stream_id: int) -> bool:
        """False once the stream is closed both ways or reset."""
        return stream_id in self._streams

    def can_open_stream(self) -> bool:
        return (
            not self.goaway_received
            and not self.goaway_sent
            and (self.open_streams < self.peer_max_concurrent_streams)
        )

    def send_headers(self, stream_id: int | None, headers: Headers, end_stream: bool = False) -> int:
        """Send a header block; ``stream_id=None`` opens a new stream (client side)."""
        if stream_id is None:
            if not self.config.client:
                raise ValueError("only the client opens streams")
            stream_id = self._next_local_id
            self._next_local_id += 2
            self._streams[stream_id] = _Stream(
                send_window=self.peer_initial_window, recv_window=self.config.stream_window_bytes
            )
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise ValueError(f"stream {stream_id} is not open for sending")
        block = self._encoder.encode(headers)
        flags = Flag.END_STREAM if end_stream else 0
        first, rest = block[: self.peer_max_frame_bytes], block[self.peer_max_frame_bytes :]
        if not rest:
            self._out.append(fr.encode(FrameType.HEADERS, flags | Flag.END_HEADERS, stream_id, first))
        else:
            self._out.append(fr.encode(FrameType.HEADERS, flags, stream_id, first))
            while rest:
                chunk, rest = rest[: self.peer_max_frame_bytes], rest[self.peer_max_frame_bytes :]
                self._out.append(
                    fr.encode(FrameType.CONTINUATION, 0 if rest else Flag.END_HEADERS, stream_id, chunk)
                )
        if end_stream:
            self._local_close(stream_id, st)
        return stream_id

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes may be sent on ``stream_id`` right now."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        return max(0, min(st.send_window, self._conn_send_window))

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue DATA; the caller keeps ``len(data) <= send_window(stream_id)``."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise ValueError(f"stream {stream_id} is not open for sending")
        n = len(data)
        if n > min(st.send_window, self._conn_send_window):
            raise ValueError(f"{n} bytes exceed the flow-control window of stream {stream_id}")
        st.send_window -= n
        self._conn_send_window -= n
        mf = self.peer_max_frame_bytes
        view = memoryview(data)
        pos = 0
        while True:
            chunk = view[pos : pos + mf]
            pos += len(chunk)
            last = pos >= n
            flags = Flag.END_STREAM if (last and end_stream) else 0
            self._out.append(fr.header(FrameType.DATA, flags, stream_id, len(chunk)))
            self._out.append(bytes(chunk))
            if last:
                break
        if end_stream:
            self._local_close(stream_id, st)

    def end_stream(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return
        self._out.append(fr.encode(FrameType.DATA, Flag.END_STREAM, stream_id))
        self._local_close(stream_id, st)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(
                fr.encode(FrameType.RST_STREAM, 0, stream_id, int(error_code).to_bytes(4, "big"))
            )

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The app has consumed ``n`` flow-controlled bytes: credit them back in batches."""
        self._conn_recv_unacked += n
        if self._conn_recv_unacked >= self.config.connection_window_bytes // 4:
            self._out.append(
                fr.encode(FrameType.WINDOW_UPDATE, 0, 0, self._conn_recv_unacked.to_bytes(4, "big"))
            )
            self._conn_recv_window += self._conn_recv_unacked
            self._conn_recv_unacked = 0
        st = self._streams.get(stream_id)
        if st is None or st.remote_closed:
            return
        st.recv_unacked += n
        if st.recv_unacked >= self.config.stream_window_bytes // 4:
            self._out.append(
                fr.encode(FrameType.WINDOW_UPDATE, 0, stream_id, st.recv_unacked.to_bytes(4, "big"))
            )
            st.recv_window += st.recv_unacked
            st.recv_unacked = 0

    def _local_close(self, stream_id: int, st: _Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            del self._streams[stream_id]

    def _remote_close(self, stream_id: int, st: _Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            del self._streams[stream_id]

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the transport. Raises H2ProtocolError on a connection error
        (after queueing GOAWAY); stream errors reset the stream and go on."""
        self._in += data
        if self._preface_pending:
            n = min(len(self._in), len(fr.PREFACE))
            if self._in[:n] != fr.PREFACE[:n]:
                self._fail(H2ProtocolError("the client did not send the HTTP/2 connection preface"))
            if len(self._in) < len(fr.PREFACE):
                return []
            del self._in[: len(fr.PREFACE)]
            self._preface_pending = False
        try:
            frames, used = fr.split(self._in, self.config.max_frame_bytes)
        except H2ProtocolError as e:
            self._fail(e)
        del self._in[:used]
        events: list[Event] = []
        for frame in frames:
            try:
                self._on_frame(frame, events)
            except H2ProtocolError as e:
                if e.stream_id:
                    self.reset_stream(e.stream_id, e.code)
                else:
                    self._fail(e)
        return events

    def _fail(self, e: H2ProtocolError) -> None:
        self.close(e.code, str(e).encode()[:200])
        raise e

    def _on_frame(self, f: fr.Frame, events: list[Event]) -> None:
        if self._pending_headers is not None and (
            f.type != FrameType.CONTINUATION or f.stream_id != self._pending_headers.stream_id
        ):
            raise H2ProtocolError("expected CONTINUATION of the open header block")
        t = f.type
        if t == FrameType.DATA:
            self._on_data(f, events)
        elif t == FrameType.HEADERS:
            self._on_headers(f, events)
        elif t == FrameType.CONTINUATION:
            if self._pending_headers is None:
                raise H2ProtocolError("CONTINUATION without HEADERS")
            self._pending_headers.block += f.payload
            if len(self._pending_headers.block) > 4 * self.config.max_header_list_bytes:
                raise H2ProtocolError("header block too large", ErrorCode.ENHANCE_YOUR_CALM)
            if f.flags & Flag.END_HEADERS:
                p, self._pending_headers = self._pending_headers, None
                self._headers_done(p.stream_id, bytes(p.block), p.end_stream, events)
        elif t == FrameType.SETTINGS:
            self._on_settings(f, events)
        elif t == FrameType.WINDOW_UPDATE:
            self._on_window_update(f, events)
        elif t == FrameType.RST_STREAM:
            if f.stream_id == 0 or len(f.payload) != 4:
                raise H2ProtocolError(
                    "malformed RST_STREAM",
                    ErrorCode.FRAME_SIZE_ERROR if f.stream_id else ErrorCode.PROTOCOL_ERROR,
                )
            if self._streams.pop(f.stream_id, None) is not None:
                events.append(StreamReset(f.stream_id, int.from_bytes(f.payload, "big")))
        elif t == FrameType.PING:
            if f.stream_id != 0 or len(f.payload) != 8:
                raise H2ProtocolError("malformed PING", ErrorCode.FRAME_SIZE_ERROR)
            if f.flags & Flag.ACK:
                events.append(PingAcked(f.payload))
            else:
                self._out.append(fr.encode(FrameType.PING, Flag.ACK, 0, f.payload))
        elif t == FrameType.GOAWAY:
            if f.stream_id != 0 or len(f.payload) < 8:
                raise H2ProtocolError("malformed GOAWAY")
            self.goaway_received = True
            last = int.from_bytes(f.payload[:4], "big") & 0x7FFFFFFF
            events.append(ConnectionTerminated(int.from_bytes(f.payload[4:8], "big"), last))
        elif t == FrameType.PRIORITY:
            if f.stream_id == 0:
                raise H2ProtocolError("PRIORITY on stream 0")
            if len(f.payload) != 5:
                raise H2ProtocolError("malformed PRIORITY", ErrorCode.FRAME_SIZE_ERROR, f.stream_id)
        elif t == FrameType.PUSH_PROMISE:
            raise H2ProtocolError("PUSH_PROMISE although push is disabled")
        # unknown frame types are ignored (RFC 9113 §4.1)

    def _on_data(self, f: fr.Frame, events: list[Event]) -> None:
        if f.stream_id == 0:
            raise H2ProtocolError("DATA on stream 0")
        flow = len(f.payload)
        self._conn_recv_window -= flow
        if self._conn_recv_window < 0:
            raise H2ProtocolError("peer overran the connection window", ErrorCode.FLOW_CONTROL_ERROR)
        st = self._streams.get(f.stream_id)
        if st is None or st.remote_closed:
            # credit the connection window anyway so other streams keep flowing
            self.acknowledge_received(0, flow)
            raise H2ProtocolError(
                f"DATA on closed stream {f.stream_id}", ErrorCode.STREAM_CLOSED, f.stream_id
            )
        st.recv_window -= flow
        if st.recv_window < 0:
            self.acknowledge_received(0, flow)
            raise H2ProtocolError("peer overran the stream window", ErrorCode.FLOW_CONTROL_ERROR, f.stream_id)
        data = fr.strip_padding(f)
        end = bool(f.flags & Flag.END_STREAM)
        events.append(DataReceived(f.stream_id, data, flow, end))
        if end:
            self._remote_close(f.stream_id, st)

    def _on_headers(self, f: fr.Frame, events: list[Event]) -> None:
        sid = f.stream_id
        if sid == 0:
            raise H2ProtocolError("HEADERS on stream 0")
        block = fr.strip_padding(f)
        end_stream = bool(f.flags & Flag.END_STREAM)
        if sid not in self._streams:
            if self.config.client or sid % 2 == 0 or sid <= self._highest_remote_id:
                raise H2ProtocolError(f"HEADERS on unexpected stream {sid}", ErrorCode.PROTOCOL_ERROR)
            self._highest_remote_id = sid
            if len(self._streams) >= self.config.max_concurrent_streams:
                self._decode(block)  # keep HPACK state in sync
                raise H2ProtocolError("too many streams", ErrorCode.REFUSED_STREAM, sid)
            self._streams[sid] = _Stream(
                send_window=self.peer_initial_window, recv_window=self.config.stream_window_bytes
            )
        if f.flags & Flag.END_HEADERS:
            self._headers_done(sid, block, end_stream, events)
        else:
            self._pending_headers = _PendingHeaders(sid, end_stream, bytearray(block))

    def _decode(self, block: bytes) -> Headers:
        try:
            decoded = self._decoder.decode(block, raw=False)
        except Exception as e:  # hpack raises several types; all mean the same to us
            raise H2ProtocolError(f"cannot decode header block: {e}", ErrorCode.COMPRESSION_ERROR) from e
        return [(str(k), str(v)) for k, v in decoded]

    def _headers_done(self, sid: int, block: bytes, end_stream: bool, events: list[Event]) -> None:
        headers = self._decode(block)
        st = self._streams.get(sid)
        if st is None:
            return
        st.headers_seen = True
        events.append(HeadersReceived(sid, headers, end_stream))
        if end_stream:
            self._remote_close(sid, st)

    def _on_settings(self, f: fr.Frame, events: list[Event]) -> None:
        if f.stream_id != 0:
            raise H2ProtocolError("SETTINGS on a stream")
        if f.flags & Flag.ACK:
            if f.payload:
                raise H2ProtocolError("SETTINGS ACK with a payload", ErrorCode.FRAME_SIZE_ERROR)
            return
        changed: dict[int, int] = {}
        for key, value in fr.decode_settings(f.payload):
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW_BYTES:
                    raise H2ProtocolError("INITIAL_WINDOW_SIZE too large", ErrorCode.FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self._streams.values():
                    st.send_window += delta
            elif key == Setting.MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_BYTES <= value <= fr.MAX_ALLOWED_FRAME_BYTES:
                    raise H2ProtocolError(f"MAX_FRAME_SIZE {value} out of range")
                self.peer_max_frame_bytes = value
            elif key == Setting.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif key == Setting.HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
            elif key == Setting.ENABLE_PUSH and value not in (0, 1):
                raise H2ProtocolError("ENABLE_PUSH must be 0 or 1")
            changed[key] = value
        self._out.append(fr.encode(FrameType.SETTINGS, Flag.ACK, 0))
        events.append(SettingsReceived(changed))
        if Setting.INITIAL_WINDOW_SIZE in changed:
            events.append(WindowUpdated(0))

    def _on_window_update(self, f: fr.Frame, events: list[Event]) -> None:
        if len(f.payload) != 4:
            raise H2ProtocolError("malformed WINDOW_UPDATE", ErrorCode.FRAME_SIZE_ERROR)
        inc = int.from_bytes(f.payload, "big") & 0x7FFFFFFF
        if inc == 0:
            raise H2ProtocolError("WINDOW_UPDATE of 0", ErrorCode.PROTOCOL_ERROR, f.stream_id)
        if f.stream_id == 0:
            self._conn_send_window += inc
            if self._conn_send_window > fr.MAX_WINDOW_BYTES:
                raise H2ProtocolError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
        else:
            st = self._streams.get(f.stream_id)
            if st is None:
                return
            st.send_window += inc
            if st.send_window > fr.MAX_WINDOW_BYTES:
                raise H2ProtocolError("stream window overflow", ErrorCode.FLOW_CONTROL_ERROR, f.stream_id)
        events.append(WindowUpdated(f.stream_id))
