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

Stream states (RFC 9113 §5.1) are tracked cheaply: a stream id is *idle* above
the highest the peer opened (or, of our parity, not yet opened by us), *open*
while in ``_streams``, and *closed* otherwise. A frame on an idle stream is a
connection error; DATA on a closed stream is a stream error STREAM_CLOSED
(the connection window is credited all the same); HEADERS on a closed stream
is a connection error STREAM_CLOSED; a second HEADERS without END_STREAM on a
stream whose headers we have is a stream error PROTOCOL_ERROR. Frames still in
flight on a stream *we* reset (the last ``RECENT_RESETS`` of them) are
ignored, header blocks still decoded to keep HPACK in step. A stream above
``max_concurrent_streams`` is refused with RST_STREAM REFUSED_STREAM.

Abuse limits (:mod:`agent.proto.h2.limits`, configured in
:class:`H2Config`): peer resets, streams reset for the peer's errors, PING and
SETTINGS to acknowledge, acknowledgements queued but not taken, empty frames
and oversized SETTINGS frames end the connection with GOAWAY
ENHANCE_YOUR_CALM; the raised :class:`H2ProtocolError` names the limit. Time is
the caller's: ``receive_data(data, now_s=...)`` (a monotonic clock in seconds;
omitted, the last value given is kept, so the bursts become lifetime caps).

For the I/O layer, without a log line per frame: :attr:`H2Connection.stats`
counts events by kind (:data:`STAT_KINDS`), and :attr:`pending_bytes` is what
``data_to_send()`` would return now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import hpack
import hpack.hpack
import hpack.table

from agent.proto.h2 import frames as fr
from agent.proto.h2 import hpack_out
from agent.proto.h2 import limits as lim
from agent.proto.h2.frames import ErrorCode, Flag, FrameType, H2ProtocolError, Setting


class _Silent:
    """hpack logs a debug line per header it codes; a logger call costs ~0.5 µs even when
    disabled, ~30 µs per proxied HTTP/2 request (measured). Its loggers are replaced by this."""

    def debug(self, *args: object, **kwargs: object) -> None:
        pass


hpack.hpack.log = hpack.table.log = _Silent()  # type: ignore[assignment]


Headers = list[tuple[str, str]]

RECENT_RESETS = 1024  # streams we reset whose in-flight frames are ignored (then: closed)

STAT_KINDS = (
    "peer_reset",  # RST_STREAM received on a stream that was not idle
    "refused_stream",  # streams refused above max_concurrent_streams
    "stream_error",  # streams we reset because of the peer's protocol error
    "empty_frame",  # DATA/HEADERS/CONTINUATION with an empty payload that ended nothing
    "flood",  # the connection was ended with ENHANCE_YOUR_CALM
    "protocol_error",  # the connection was ended for another protocol error
)

# plain ints for the per-frame dispatch (IntEnum member lookups cost more)
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH, _PING, _GOAWAY, _WINDOW, _CONT = 0x5, 0x6, 0x7, 0x8, 0x9


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
    # abuse limits: see agent/proto/h2/limits.py for what each follows
    max_peer_resets_per_s: float = lim.DEFAULT_MAX_PEER_RESETS_PER_S  # server side only
    peer_reset_burst: int = lim.DEFAULT_PEER_RESET_BURST
    max_peer_errors_per_s: float = lim.DEFAULT_MAX_PEER_ERRORS_PER_S  # stream errors, empty frames
    peer_error_burst: int = lim.DEFAULT_PEER_ERROR_BURST
    max_control_frames_per_s: float = lim.DEFAULT_MAX_CONTROL_FRAMES_PER_S
    control_frame_burst: int = lim.DEFAULT_CONTROL_FRAME_BURST
    max_queued_control_frames: int = lim.DEFAULT_MAX_QUEUED_CONTROL_FRAMES
    max_settings_entries: int = lim.DEFAULT_MAX_SETTINGS_ENTRIES
    max_priority_frames_per_stream: int = lim.DEFAULT_MAX_PRIORITY_FRAMES_PER_STREAM
    max_window_updates_per_data_frame: int = lim.DEFAULT_MAX_WINDOW_UPDATES_PER_DATA_FRAME

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_streams", "max_header_list_bytes", "max_peer_resets_per_s", "peer_reset_burst",
            "max_peer_errors_per_s", "peer_error_burst", "max_control_frames_per_s",
            "control_frame_burst", "max_queued_control_frames", "max_settings_entries",
            "max_priority_frames_per_stream", "max_window_updates_per_data_frame",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
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
    headers_seen: bool = False  # the final (non-1xx) header block arrived


@dataclass(slots=True)
class _PendingHeaders:
    stream_id: int
    end_stream: bool
    block: bytearray = field(default_factory=bytearray)
    error: H2ProtocolError | None = None  # raised once the block is decoded (HPACK stays in step)
    ignore: bool = False  # a stream we reset: decode and drop


class H2Connection:
    def __init__(self, config: H2Config) -> None:
        self.config = config
        self._out: list[bytes] = []
        self._in = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._encoder = hpack_out.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=config.max_header_list_bytes)
        self._next_local_id = 1 if config.client else 2
        self._our_parity = 1 if config.client else 0  # stream ids we open: odd for a client
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
        self.stats: dict[str, int] = dict.fromkeys(STAT_KINDS, 0)
        self._failed: H2ProtocolError | None = None
        self._now_s = 0.0
        self._reset_by_us: dict[int, None] = {}  # insertion-ordered, at most RECENT_RESETS
        self._peer_resets = lim.TokenBucket(config.max_peer_resets_per_s, config.peer_reset_burst)
        self._peer_errors = lim.TokenBucket(config.max_peer_errors_per_s, config.peer_error_burst)
        self._control_frames = lim.TokenBucket(config.max_control_frames_per_s, config.control_frame_burst)
        self._queued_control = 0  # acknowledgements and resets queued since data_to_send()
        # frames that give us nothing, held against what they could be for (Envoy's ratios)
        self._streams_opened = 0  # by either side, over the connection's life
        self._data_frames_sent = 0
        self._priority_frames = 0
        self._window_updates = 0

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
        self._queued_control = 0
        return out

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for the transport, not yet taken by :meth:`data_to_send`."""
        return sum(len(b) for b in self._out)

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
            self._streams_opened += 1
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
            self._data_frames_sent += 1
            if last:
                break
        if end_stream:
            self._local_close(stream_id, st)

    def end_stream(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return
        self._out.append(fr.encode(FrameType.DATA, Flag.END_STREAM, stream_id))
        self._data_frames_sent += 1
        self._local_close(stream_id, st)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Reset an open stream (a no-op for one that is closed already)."""
        if stream_id in self._streams:
            self._send_rst(stream_id, error_code)

    def _send_rst(self, stream_id: int, error_code: int) -> None:
        self._streams.pop(stream_id, None)
        self._out.append(fr.encode(FrameType.RST_STREAM, 0, stream_id, int(error_code).to_bytes(4, "big")))
        recent = self._reset_by_us
        recent[stream_id] = None
        if len(recent) > RECENT_RESETS:
            del recent[next(iter(recent))]

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

    def receive_data(self, data: bytes, now_s: float | None = None) -> list[Event]:
        """Feed bytes from the transport; ``now_s`` is the caller's monotonic clock for the rate
        limits (omitted: the last value given). Raises H2ProtocolError on a connection error
        (after queueing GOAWAY), again on every later call; stream errors reset the stream."""
        if self._failed is not None:
            raise self._failed
        if now_s is not None:
            self._now_s = now_s
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
                    self._stream_error(e)
                else:
                    self._fail(e)
        return events

    def _fail(self, e: H2ProtocolError) -> None:
        if self._failed is None:  # (a limit hit inside a frame handler passes here twice)
            self.stats["flood" if e.code == ErrorCode.ENHANCE_YOUR_CALM else "protocol_error"] += 1
            self._failed = e
            self.close(e.code, str(e).encode()[:200])
        raise e

    def _stream_error(self, e: H2ProtocolError) -> None:
        """Reset the stream the peer broke; too many of these is itself abuse."""
        if self._is_idle(e.stream_id):  # a RST_STREAM on an idle stream would be our error
            self._fail(H2ProtocolError(f"{e} (on idle stream {e.stream_id})", e.code))
        self._send_rst(e.stream_id, e.code)
        self.stats["refused_stream" if e.code == ErrorCode.REFUSED_STREAM else "stream_error"] += 1
        c = self.config
        if not self._peer_errors.take(self._now_s):
            self._fail(lim.calm(f"streams reset for its errors and empty frames, last: {e}",
                                "max_peer_errors_per_s", c.max_peer_errors_per_s, c.peer_error_burst))
        self._queue_control()

    def _queue_control(self) -> None:
        """An acknowledgement or reset was queued in answer to the peer."""
        self._queued_control += 1
        if self._queued_control > self.config.max_queued_control_frames:
            self._fail(lim.calm("acknowledgements and resets queued but not sent",
                                "max_queued_control_frames", self.config.max_queued_control_frames))

    def _empty_frame(self, what: str) -> None:
        """A frame with an empty payload that ends nothing: work for us, none for the peer."""
        self.stats["empty_frame"] += 1
        c = self.config
        if not self._peer_errors.take(self._now_s):
            self._fail(lim.calm(f"empty {what} frames and streams reset for its errors",
                                "max_peer_errors_per_s", c.max_peer_errors_per_s, c.peer_error_burst))

    def _is_idle(self, sid: int) -> bool:
        """Never opened: above what the peer opened, or of our parity and not yet opened by us."""
        if (sid & 1) == self._our_parity:
            return sid >= self._next_local_id
        return sid > self._highest_remote_id

    def _on_frame(self, f: fr.Frame, events: list[Event]) -> None:
        t = f.type
        if t == _DATA and self._pending_headers is None:
            self._on_data(f, events)
            return
        p = self._pending_headers
        if p is not None and (t != _CONT or f.stream_id != p.stream_id):
            raise H2ProtocolError("expected CONTINUATION of the open header block")
        if t == _HEADERS:
            self._on_headers(f, events)
        elif t == _CONT:
            if p is None:
                raise H2ProtocolError("CONTINUATION without HEADERS")
            p.block += f.payload
            if len(p.block) > 4 * self.config.max_header_list_bytes:
                raise lim.calm("header block too large", "max_header_list_bytes",
                               4 * self.config.max_header_list_bytes)
            if f.flags & Flag.END_HEADERS:
                self._pending_headers = None
                self._headers_done(p, events)
            elif not f.payload:
                self._empty_frame("CONTINUATION")
        elif t == _SETTINGS:
            self._on_settings(f, events)
        elif t == _WINDOW:
            self._on_window_update(f, events)
        elif t == _RST:
            self._on_rst_stream(f, events)
        elif t == _PING:
            if f.stream_id != 0 or len(f.payload) != 8:
                raise H2ProtocolError("malformed PING", ErrorCode.FRAME_SIZE_ERROR)
            if f.flags & Flag.ACK:
                events.append(PingAcked(f.payload))
            else:
                self._control_frame("PING")
                self._out.append(fr.encode(FrameType.PING, Flag.ACK, 0, f.payload))
                self._queue_control()
        elif t == _GOAWAY:
            if f.stream_id != 0 or len(f.payload) < 8:
                raise H2ProtocolError("malformed GOAWAY")
            self.goaway_received = True
            last = int.from_bytes(f.payload[:4], "big") & 0x7FFFFFFF
            events.append(ConnectionTerminated(int.from_bytes(f.payload[4:8], "big"), last))
        elif t == _PRIORITY:
            if f.stream_id == 0:
                raise H2ProtocolError("PRIORITY on stream 0")
            if len(f.payload) != 5:
                raise H2ProtocolError("malformed PRIORITY", ErrorCode.FRAME_SIZE_ERROR, f.stream_id)
            self._priority_frames += 1
            per = self.config.max_priority_frames_per_stream
            if self._priority_frames > per * (1 + self._streams_opened):
                raise lim.calm(f"PRIORITY frames ({self._priority_frames} for {self._streams_opened} "
                               "streams)", "max_priority_frames_per_stream", per)
        elif t == _PUSH:
            raise H2ProtocolError("PUSH_PROMISE although push is disabled")
        # unknown frame types are ignored (RFC 9113 §4.1)

    def _control_frame(self, what: str) -> None:
        c = self.config
        if not self._control_frames.take(self._now_s):
            self._fail(lim.calm(f"{what} frames to acknowledge", "max_control_frames_per_s",
                                c.max_control_frames_per_s, c.control_frame_burst))

    def _on_data(self, f: fr.Frame, events: list[Event]) -> None:
        sid = f.stream_id
        if sid == 0:
            raise H2ProtocolError("DATA on stream 0")
        flow = len(f.payload)
        self._conn_recv_window -= flow
        if self._conn_recv_window < 0:
            raise H2ProtocolError("peer overran the connection window", ErrorCode.FLOW_CONTROL_ERROR)
        st = self._streams.get(sid)
        if st is None or st.remote_closed:
            # credit the connection window anyway so other streams keep flowing
            self.acknowledge_received(0, flow)
            if st is None:
                if self._is_idle(sid):
                    raise H2ProtocolError(f"DATA on idle stream {sid}")
                if sid in self._reset_by_us:
                    if not flow:
                        self._empty_frame("DATA")
                    return  # in flight when we reset it (RFC 9113 §5.1, closed)
            raise H2ProtocolError(f"DATA on closed stream {sid}", ErrorCode.STREAM_CLOSED, sid)
        st.recv_window -= flow
        if st.recv_window < 0:
            self.acknowledge_received(0, flow)
            raise H2ProtocolError("peer overran the stream window", ErrorCode.FLOW_CONTROL_ERROR, sid)
        data = fr.strip_padding(f)
        end = bool(f.flags & Flag.END_STREAM)
        if not data and not end:
            self._empty_frame("DATA")
        events.append(DataReceived(sid, data, flow, end))
        if end:
            self._remote_close(sid, st)

    def _on_rst_stream(self, f: fr.Frame, events: list[Event]) -> None:
        sid = f.stream_id
        if sid == 0 or len(f.payload) != 4:
            raise H2ProtocolError(
                "malformed RST_STREAM", ErrorCode.FRAME_SIZE_ERROR if sid else ErrorCode.PROTOCOL_ERROR
            )
        st = self._streams.pop(sid, None)
        if st is None and self._is_idle(sid):
            raise H2ProtocolError(f"RST_STREAM on idle stream {sid}")
        self.stats["peer_reset"] += 1
        c = self.config
        if not c.client and not self._peer_resets.take(self._now_s):
            self._fail(lim.calm("streams reset by the peer (rapid reset)", "max_peer_resets_per_s",
                                c.max_peer_resets_per_s, c.peer_reset_burst))
        if st is not None:
            events.append(StreamReset(sid, int.from_bytes(f.payload, "big")))

    def _on_headers(self, f: fr.Frame, events: list[Event]) -> None:
        sid = f.stream_id
        if sid == 0:
            raise H2ProtocolError("HEADERS on stream 0")
        block = fr.strip_padding(f)
        p = _PendingHeaders(sid, bool(f.flags & Flag.END_STREAM), bytearray(block))
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                if self.config.client or sid % 2 == 0:
                    raise H2ProtocolError(f"HEADERS on unexpected stream {sid}", ErrorCode.PROTOCOL_ERROR)
                self._highest_remote_id = sid
                if len(self._streams) >= self.config.max_concurrent_streams:
                    p.error = H2ProtocolError(
                        f"stream {sid} is above max_concurrent_streams={self.config.max_concurrent_streams}",
                        ErrorCode.REFUSED_STREAM, sid,
                    )
                else:
                    self._streams[sid] = _Stream(
                        send_window=self.peer_initial_window, recv_window=self.config.stream_window_bytes
                    )
                    self._streams_opened += 1
            elif sid in self._reset_by_us:
                p.ignore = True  # in flight when we reset it
            else:
                raise H2ProtocolError(f"HEADERS on closed stream {sid}", ErrorCode.STREAM_CLOSED)
        elif st.remote_closed:
            p.error = H2ProtocolError(
                f"HEADERS on stream {sid} after it ended", ErrorCode.STREAM_CLOSED, sid
            )
        elif st.headers_seen and not p.end_stream:
            p.error = H2ProtocolError(
                f"second HEADERS without END_STREAM on stream {sid} (trailers must end the stream)",
                ErrorCode.PROTOCOL_ERROR, sid,
            )
        if f.flags & Flag.END_HEADERS:
            self._headers_done(p, events)
        else:
            if not block:
                self._empty_frame("HEADERS")
            self._pending_headers = p

    def _decode(self, block: bytes) -> Headers:
        try:
            # str pairs with raw=False (its stubs say bytes, which compiled code would enforce)
            decoded: Any = self._decoder.decode(block, raw=False)
        except Exception as e:  # hpack raises several types; all mean the same to us
            raise H2ProtocolError(f"cannot decode header block: {e}", ErrorCode.COMPRESSION_ERROR) from e
        return [(str(k), str(v)) for k, v in decoded]

    def _headers_done(self, p: _PendingHeaders, events: list[Event]) -> None:
        headers = self._decode(bytes(p.block))  # always: the HPACK state must stay in step
        if p.error is not None:
            raise p.error
        st = self._streams.get(p.stream_id)
        if p.ignore or st is None:
            return
        if not (self.config.client and any(k == ":status" and v[:1] == "1" for k, v in headers)):
            st.headers_seen = True  # (a client may get 1xx blocks before the final one)
        events.append(HeadersReceived(p.stream_id, headers, p.end_stream))
        if p.end_stream:
            self._remote_close(p.stream_id, st)

    def _on_settings(self, f: fr.Frame, events: list[Event]) -> None:
        if f.stream_id != 0:
            raise H2ProtocolError("SETTINGS on a stream")
        if f.flags & Flag.ACK:
            if f.payload:
                raise H2ProtocolError("SETTINGS ACK with a payload", ErrorCode.FRAME_SIZE_ERROR)
            return
        self._control_frame("SETTINGS")
        if len(f.payload) // 6 > self.config.max_settings_entries:
            raise lim.calm(f"SETTINGS frame with {len(f.payload) // 6} entries", "max_settings_entries",
                           self.config.max_settings_entries)
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
        self._queue_control()
        events.append(SettingsReceived(changed))
        if Setting.INITIAL_WINDOW_SIZE in changed:
            events.append(WindowUpdated(0))

    def _on_window_update(self, f: fr.Frame, events: list[Event]) -> None:
        if len(f.payload) != 4:
            raise H2ProtocolError("malformed WINDOW_UPDATE", ErrorCode.FRAME_SIZE_ERROR)
        sid = f.stream_id
        inc = int.from_bytes(f.payload, "big") & 0x7FFFFFFF
        self._window_updates += 1
        per = self.config.max_window_updates_per_data_frame
        if self._window_updates > 5 + 2 * (self._streams_opened + per * self._data_frames_sent):
            raise lim.calm(f"WINDOW_UPDATE frames ({self._window_updates} for {self._data_frames_sent} DATA "
                           "frames sent)", "max_window_updates_per_data_frame", per)
        if sid == 0:
            if inc == 0:
                raise H2ProtocolError("WINDOW_UPDATE of 0 on the connection")
            self._conn_send_window += inc
            if self._conn_send_window > fr.MAX_WINDOW_BYTES:
                raise H2ProtocolError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
        else:
            st = self._streams.get(sid)
            if st is None:
                if self._is_idle(sid):
                    raise H2ProtocolError(f"WINDOW_UPDATE on idle stream {sid}")
                return  # closed: may still be in flight (RFC 9113 §6.9)
            if inc == 0:
                raise H2ProtocolError(f"WINDOW_UPDATE of 0 on stream {sid}", ErrorCode.PROTOCOL_ERROR, sid)
            st.send_window += inc
            if st.send_window > fr.MAX_WINDOW_BYTES:
                raise H2ProtocolError("stream window overflow", ErrorCode.FLOW_CONTROL_ERROR, sid)
        events.append(WindowUpdated(sid))
