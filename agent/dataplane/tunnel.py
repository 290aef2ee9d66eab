"""One HBONE connection (HTTP/2 over mTLS) carrying many app connections as streams.

How this works: a :class:`TunnelConnection` owns the TLS transport and a
sans-I/O :class:`H2Connection`. One reader task feeds received bytes to the
core and routes its events to :class:`TunnelStream` objects; every write goes
through :meth:`TunnelConnection.flush`. A stream looks like a socket to the
relay: ``read()`` returns bytes or ``b""`` at end of stream, ``write()`` waits for
flow-control credit, ``write_eof()`` half-closes. Received bytes are credited
back to the peer only when the relay acknowledges them (after it has written
them onwards and drained), so a slow reader slows the sender: backpressure
crosses the tunnel and buffers stay bounded by the windows.

Every byte's credit comes back, however a stream ends: a stream that is reset
(by either side) or dropped by its handler credits whatever it still had
queued (:meth:`TunnelStream.release`); otherwise each abnormal ending would
shrink the connection window until the tunnel stalls for good.

Bounded memory whatever the peer does: writers wait while the transport holds
more than ``DRAIN_ABOVE_BYTES``; the reader stops reading the peer while our own
replies (PING/SETTINGS acks, resets) pile up unread beyond
``TunnelLimits.max_write_buffer_bytes``, and while the agent-wide
:class:`BufferBudget` of received-but-unconsumed bytes is spent.

A watchdog per connection (:meth:`TunnelConnection._watch`) detects a tunnel
that stops making progress while it has data to send (connection window at
zero, or the transport not draining, for ``stall_timeout_s``): it is counted,
logged once, retired from the pool (no new streams) and probed with a PING; a
peer that does not answer within ``ping_timeout_s`` is declared dead and every
stream is reset, so apps see a reset, never a hang. The server side also
closes connections that never send the HTTP/2 preface and idle ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.proto.h2 import connection as h2c
from agent.proto.h2.connection import H2Config, H2Connection, Headers
from agent.proto.h2.frames import ErrorCode, H2ProtocolError
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024
DRAIN_ABOVE_BYTES = 256 * 1024
CLOSE_GRACE_S = 5.0  # a closed connection's last bytes get this long before the socket is aborted
HOSTILE_GRACE_S = 0.5  # ... and this long after the peer broke HTTP/2 (time to send GOAWAY)
URGENT_BELOW_BYTES = 16 * 1024  # smaller writes are sent at once, larger ones batched per loop pass
PROBE = b"nm-probe"


class TunnelError(Exception):
    """The tunnel or one of its streams failed."""


@dataclass(frozen=True, slots=True)
class TunnelLimits:
    stall_timeout_s: float = 10.0  # data to send and no progress for this long: stalled
    ping_timeout_s: float = 5.0  # a stalled tunnel whose PING is not answered by then is dead
    preface_timeout_s: float = 10.0  # server: TLS done, but no HTTP/2 preface by then: closed
    idle_timeout_s: float = 600.0  # server: no stream and no frame for this long: closed
    max_write_buffer_bytes: int = 1 << 20  # stop reading the peer while our replies pile up
    check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("stall_timeout_s", "ping_timeout_s", "preface_timeout_s", "idle_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_write_buffer_bytes < DRAIN_ABOVE_BYTES:
            raise ValueError(f"max_write_buffer_bytes must be >= {DRAIN_ABOVE_BYTES}")
        if not 0 < self.check_interval_s <= self.stall_timeout_s:
            raise ValueError("check_interval_s must be > 0 and <= stall_timeout_s")


class BufferBudget:
    """Agent-wide bytes received on tunnel streams and not yet consumed by their relays.

    Each connection's share is bounded by its flow-control window; this bounds the sum
    over all connections: above ``limit_bytes`` connections holding queued bytes stop
    reading their peers (TCP backpressure) until consumers drain below the low mark."""

    def __init__(self, limit_bytes: int = 256 << 20) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be > 0, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.pauses = 0
        self._ok: asyncio.Event | None = None

    def add(self, n: int) -> None:
        self.used_bytes += n

    def release(self, n: int) -> None:
        self.used_bytes -= n
        if self._ok is not None and self.used_bytes <= self.limit_bytes // 2:
            self._ok.set()

    @property
    def over(self) -> bool:
        return self.used_bytes > self.limit_bytes

    async def wait_ok(self) -> None:
        if self._ok is None:
            self._ok = asyncio.Event()
        self.pauses += 1
        while self.over:
            self._ok.clear()
            await self._ok.wait()


def _connection_window(h2: H2Connection) -> int:
    return h2._conn_send_window


EventSink = Callable[[str], None]
"""Counts tunnel events by kind (stall, dead_peer, protocol_error, ...) into metrics."""


class TunnelStream:
    def __init__(self, conn: TunnelConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._queued_flow = 0  # credit held by queued chunks
        self._eof = False
        self._reset: int | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self.headers: asyncio.Future[Headers] = asyncio.get_running_loop().create_future()
        self.request_headers: Headers = []
        self.direct_bytes = 0  # written straight to the sink (not through read())
        self.established = False  # server: answered 2xx, the relay runs
        self.handler: asyncio.Task[None] | None = None  # server: the task serving this stream
        self._sink: asyncio.WriteTransport | None = None

    @property
    def queued_bytes(self) -> int:
        """Received bytes waiting for :meth:`read` (their credit is not yet back)."""
        return self._queued_flow

    @property
    def was_reset(self) -> bool:
        return self._reset is not None

    @property
    def at_eof(self) -> bool:
        """The peer ended its side (or the stream was reset)."""
        return self._eof

    def set_sink(self, transport: asyncio.WriteTransport) -> None:
        """Where this stream's data goes (the relay's socket). While nothing is queued and
        the sink holds less than DRAIN_ABOVE_BYTES, received data is written to it at once
        and credited back, without waking the relay task: one event-loop pass less per
        message. Otherwise data queues for :meth:`read`, whose caller drains before it
        credits (backpressure); order is kept because direct writes only happen with an
        empty queue."""
        self._sink = transport

    # called by the connection
    def _on_data(self, data: bytes, flow: int, end: bool) -> None:
        sink = self._sink
        if self._reset is not None:
            self.conn._credit(self.stream_id, flow)  # nobody will read it: credit at once
        elif (
            data
            and sink is not None
            and not self._chunks
            and not sink.is_closing()
            and sink.get_write_buffer_size() < DRAIN_ABOVE_BYTES
        ):
            sink.write(data)
            self.direct_bytes += len(data)
            self.ack(flow)
        elif data or flow:
            self._chunks.append((data, flow))
            self._queued_flow += flow
            self.conn.budget.add(flow)
        if end:
            self._eof = True
        if self._chunks or end:
            self._readable.set()

    def _on_reset(self, code: int) -> None:
        self._reset = code
        self._eof = True
        self._drop_queued()  # a reset discards what was not yet delivered, as TCP's does
        self._readable.set()
        self._writable.set()
        if not self.headers.done():
            self.headers.set_exception(TunnelError(f"stream reset by peer (code {code})"))
            self.headers.exception()  # nobody may be waiting (server side): not an unhandled error
        if self.handler is not None and not self.established and not self.handler.done():
            self.handler.cancel()  # still setting up (dialling the pod): stop, nothing to serve

    def _drop_queued(self) -> None:
        if self._queued_flow:
            self.conn._credit(self.stream_id, self._queued_flow)
            self.conn.budget.release(self._queued_flow)
            self._queued_flow = 0
        self._chunks.clear()

    # used by the relay
    async def read(self) -> tuple[bytes, int]:
        """Next chunk and its flow-control credit; ``(b"", 0)`` at end of stream.

        Raises TunnelError if the stream was reset. Pass the credit to
        :meth:`ack` once the bytes went onwards.
        """
        while not self._chunks:
            if self._reset is not None and self._reset != ErrorCode.NO_ERROR:
                raise TunnelError(f"stream {self.stream_id} reset (code {self._reset})")
            if self._eof:
                return b"", 0
            self._readable.clear()
            await self._readable.wait()
        data, flow = self._chunks.popleft()
        self._queued_flow -= flow
        self.conn.budget.release(flow)
        return data, flow

    def ack(self, flow: int) -> None:
        """Credit ``flow`` bytes back to the peer (they were written onwards)."""
        if flow:
            self.conn._credit(self.stream_id, flow)
            self.conn.flush(urgent=False)

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._reset is not None:
                raise TunnelError(f"stream {self.stream_id} was reset")
            if self.conn.closed:
                raise TunnelError("tunnel connection closed")
            await self.conn.drain()  # the transport takes no more while it holds a lot
            window = self.conn.h2.send_window(self.stream_id)
            if window <= 0:
                self.conn._blocked()
                self._writable.clear()
                await self._writable.wait()
                continue
            if self._reset is not None or self.conn.closed:
                continue
            n = min(window, len(view))
            self.conn.h2.send_data(self.stream_id, view[:n])
            self.conn._unflushed += n
            view = view[n:]
            self.conn.flush(urgent=n < URGENT_BELOW_BYTES)

    def write_eof(self) -> None:
        if self._reset is None and not self.conn.closed:
            self.conn.h2.end_stream(self.stream_id)
            self.conn.flush()
            self.conn._forget_if_closed(self.stream_id)

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        """End the stream abnormally (RST_STREAM ``code``); queued data is discarded and
        credited back."""
        if self._reset is None and not self.conn.closed:
            self.conn.h2.reset_stream(self.stream_id, code)
            self.conn.flush()
        self._reset = self._reset if self._reset is not None else code
        self._eof = True
        self._drop_queued()
        self._readable.set()
        self._writable.set()
        self.conn._streams.pop(self.stream_id, None)

    def release(self) -> None:
        """The stream's user is done with it: a stream still open is reset (the peer must
        not wait for it forever) and every queued byte is credited back."""
        if self.conn.h2.is_open(self.stream_id) and self._reset is None:
            self.reset(ErrorCode.CANCEL)
        else:
            self._drop_queued()
            self.conn._streams.pop(self.stream_id, None)

    async def respond(self, status: int, reason: str = "", end: bool = False) -> None:
        from agent.proto.hbone import response_headers

        if self._reset is not None or self.conn.closed or not self.conn.h2.is_open(self.stream_id):
            raise TunnelError(f"stream {self.stream_id} ended before the answer")
        self.conn.h2.send_headers(self.stream_id, response_headers(status, reason), end_stream=end)
        if 200 <= status < 300:
            self.established = True
        self.conn.flush()
        await self.conn.drain()


StreamHandler = Callable[[TunnelStream], Awaitable[None]]


class TunnelConnection:
    """Client or server side of one HBONE connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client: bool,
        on_stream: StreamHandler | None = None,
        config: H2Config | None = None,
        name: str = "",
        limits: TunnelLimits | None = None,
        budget: BufferBudget | None = None,
        on_event: EventSink | None = None,
        rlog: RateLimitedLog | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:  # small frames (acks, window updates, requests) must not wait for Nagle
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # drain() waits at DRAIN_ABOVE_BYTES, so the transport must pause writers there too:
        # uvloop's TLS transport pauses only at 512 KiB by default, and writer.drain() returns
        # at once below that, which made drain() spin and starve the loop (seen in the chaos
        # suite: a peer that reads slowly froze the whole agent).
        with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
            writer.transport.set_write_buffer_limits(high=DRAIN_ABOVE_BYTES, low=DRAIN_ABOVE_BYTES // 4)
        self.h2 = H2Connection(config or H2Config(client=client))
        self.limits = limits or TunnelLimits()
        self.budget = budget or BufferBudget()
        self._on_event = on_event
        self.rlog = rlog or RateLimitedLog(log)  # shared by the owner's connections
        self._streams: dict[int, TunnelStream] = {}
        self._on_stream = on_stream
        self._handlers: set[asyncio.Task[None]] = set()
        self.closed = False
        self.close_reason = ""
        self.retired = False  # stalled: takes no new streams (the pool dials a fresh one)
        self.name = name
        self.cert_fingerprint = ""  # client side: the source cert it was handshaked with (pool)
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._flushed_this_pass = False
        self._unflushed = 0  # DATA bytes handed to the core since the last flush
        now = time.monotonic()
        self._last_rx = now
        self._last_progress = now
        self._frames_seen = False
        self._blocked_since: float | None = None
        self._probe_sent_at: float | None = None
        self.h2.initiate()
        self.flush()
        self._task = self._loop.create_task(self._read_loop(), name=f"tunnel-read {name}")
        self._watchdog = self._loop.create_task(self._watch(), name=f"tunnel-watch {name}")

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def _event(self, kind: str) -> None:
        if self._on_event is not None:
            self._on_event(kind)

    def _credit(self, stream_id: int, flow: int) -> None:
        if flow and not self.closed:
            self.h2.acknowledge_received(stream_id, flow)

    def flush(self, urgent: bool = True) -> None:
        """Send what the HTTP/2 core queued. The first urgent flush of an event-loop pass (a
        small message: latency matters) writes at once; everything else in the pass (bulk
        data, credit updates, more messages) is joined into one TLS write at its end."""
        if self._flush_scheduled:
            return
        if urgent and not self._flushed_this_pass:
            self._flush_now()
            self._flushed_this_pass = True
            self._loop.call_soon(self._end_pass)
        else:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)

    def _end_pass(self) -> None:
        self._flushed_this_pass = False

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        self._unflushed = 0
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def _buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size() + self._unflushed

    async def drain(self) -> None:
        """Wait while the transport holds more than DRAIN_ABOVE_BYTES. Waiting is rarely
        needed; skipping the await then saves a task switch per message on the hot path.
        A transport that does not drain for ``stall_timeout_s`` means a peer that stopped
        reading: the tunnel is closed (its streams reset)."""
        while self._buffered() >= DRAIN_ABOVE_BYTES or self.writer.is_closing():
            if self.closed or self.writer.is_closing():
                raise TunnelError("tunnel connection closed")
            if self._unflushed:
                self._flush_now()
                continue
            before = self._buffered()
            try:
                async with asyncio.timeout(self.limits.stall_timeout_s):
                    await self.writer.drain()
                    while self._buffered() >= before and not self.writer.is_closing():
                        # drain() returned without the buffer shrinking (a transport whose
                        # pause mark is above ours): poll, never spin
                        await asyncio.sleep(0.002)
                        await self.writer.drain()
            except TimeoutError:
                self._stalled("the peer read nothing", close=True)
                raise TunnelError("tunnel stalled: the peer stopped reading") from None
            except (ConnectionError, RuntimeError) as e:
                self._close_all(f"write failed: {e}")
                raise TunnelError(f"tunnel write failed: {e}") from e
            self._last_progress = time.monotonic()

    async def wait_closed(self) -> None:
        """Until the peer or we close the connection."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)

    def can_open(self) -> bool:
        return not self.closed and not self.retired and self.h2.can_open_stream()

    async def open_stream(self, headers: Headers) -> TunnelStream:
        """Client: send a CONNECT request; returns the stream once the peer answered 2xx."""
        from agent.proto.hbone import response_status

        if not self.can_open():
            raise TunnelError("tunnel connection cannot open more streams")
        sid = self.h2.send_headers(None, headers)
        stream = TunnelStream(self, sid)
        stream.request_headers = headers
        self._streams[sid] = stream
        self.flush()
        try:
            await self.drain()
            resp = await stream.headers
        except BaseException:
            stream.release()
            raise
        status = response_status(resp)
        if not 200 <= status < 300:
            reason = next((v for k, v in resp if k == "x-nodemesh-reason"), "")
            stream.release()
            raise TunnelError(f"peer refused CONNECT with {status}" + (f": {reason}" if reason else ""))
        return stream

    async def _read_loop(self) -> None:
        why = "connection closed by peer"
        try:
            while True:
                if self.budget.over and any(s._queued_flow for s in self._streams.values()):
                    await self.budget.wait_ok()  # agent-wide budget spent: let consumers catch up
                data = await self.reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                self._last_rx = time.monotonic()
                try:
                    events = self.h2.receive_data(data, now_s=self._last_rx)
                except H2ProtocolError as e:
                    kind = "flood" if e.code == ErrorCode.ENHANCE_YOUR_CALM else "protocol_error"
                    self._event(kind)
                    self.rlog.warning(kind, "tunnel %s: ended, peer broke HTTP/2: %s", self.name, e)
                    self._flush_now()
                    self._close_all(f"protocol error: {e}", hostile=True)
                    break
                if events:
                    self._frames_seen = True
                for ev in events:
                    self._dispatch(ev)
                self.flush()
                if self.writer.transport.get_write_buffer_size() > self.limits.max_write_buffer_bytes:
                    # our answers to this peer pile up unread: read no more until they drain
                    await self.drain()
        except TunnelError as e:
            why = str(e)
        except (ConnectionError, OSError) as e:
            why = f"read failed: {e}"
            log.debug("tunnel %s read failed: %s", self.name, e)
        finally:
            self._close_all(why)

    def _dispatch(self, ev: h2c.Event) -> None:
        if isinstance(ev, h2c.DataReceived):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st._on_data(ev.data, ev.flow_bytes, ev.end_stream)
                if ev.end_stream:
                    self._forget_if_closed(ev.stream_id)
            else:
                self._credit(ev.stream_id, ev.flow_bytes)
        elif isinstance(ev, h2c.HeadersReceived):
            st = self._streams.get(ev.stream_id)
            if st is None and not self.h2.config.client and self._on_stream is not None:
                st = TunnelStream(self, ev.stream_id)
                st.request_headers = ev.headers
                self._streams[ev.stream_id] = st
                if ev.end_stream:
                    st._on_data(b"", 0, True)
                task = self._loop.create_task(self._run_handler(st))
                st.handler = task
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            elif st is not None:
                if not st.headers.done():
                    st.headers.set_result(ev.headers)
                if ev.end_stream:
                    st._on_data(b"", 0, True)
                    self._forget_if_closed(ev.stream_id)
        elif isinstance(ev, h2c.StreamReset):
            st = self._streams.pop(ev.stream_id, None)
            if st is not None:
                st._on_reset(ev.error_code)
        elif isinstance(ev, h2c.WindowUpdated):
            if ev.stream_id == 0:
                self._progress()
            targets = self._streams.values() if ev.stream_id == 0 else [self._streams.get(ev.stream_id)]
            for st in targets:
                if st is not None:
                    st._writable.set()
        elif isinstance(ev, h2c.PingAcked):
            if ev.data == PROBE:
                self._probe_sent_at = None
        elif isinstance(ev, h2c.ConnectionTerminated):
            log.debug("tunnel %s: peer sent GOAWAY (code %d)", self.name, ev.error_code)

    async def _run_handler(self, st: TunnelStream) -> None:
        assert self._on_stream is not None
        try:
            await self._on_stream(st)
        except asyncio.CancelledError:
            if not st.was_reset:  # (cancelled by the peer's reset: nothing more to say)
                st.reset()
            raise
        except TunnelError as e:
            self.rlog.info("stream_ended", "tunnel %s: stream %d ended: %s", self.name, st.stream_id, e)
        except Exception as e:
            self._event("handler_failed")
            self.rlog.warning(
                "handler_failed",
                "tunnel %s: stream handler failed: %s: %s",
                self.name,
                type(e).__name__,
                e,
            )
            st.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            st.release()

    def _forget_if_closed(self, stream_id: int) -> None:
        """Drop a stream closed both ways from the table (its object lives on while the relay
        drains what it buffered), so ``active_streams`` counts only streams in use."""
        if not self.h2.is_open(stream_id):
            self._streams.pop(stream_id, None)

    # -- liveness ------------------------------------------------------------------------

    def _blocked(self) -> None:
        """A writer waits for credit; the clock starts if the connection window is empty."""
        if self._blocked_since is None and _connection_window(self.h2) <= 0:
            self._blocked_since = time.monotonic()

    def _progress(self) -> None:
        self._last_progress = time.monotonic()
        self._blocked_since = None

    def _stalled(self, why: str, *, close: bool) -> None:
        if not self.retired:
            self.retired = True
            self._event("stall")
            self.rlog.warning("stall", "tunnel %s stalled (%s): retired from the pool", self.name, why)
        if close:
            self._close_all(f"stalled: {why}", hostile=True)

    async def _watch(self) -> None:
        lim = self.limits
        server = not self.h2.config.client
        with contextlib.suppress(asyncio.CancelledError):
            while not self.closed:
                await asyncio.sleep(lim.check_interval_s)
                now = time.monotonic()
                if server and not self._frames_seen and now - self._last_rx >= lim.preface_timeout_s:
                    self._event("preface_timeout")
                    self._close_all("no HTTP/2 preface", hostile=True)
                    return
                if server and not self._streams and now - self._last_rx >= lim.idle_timeout_s:
                    self._event("idle_closed")
                    await self.close()
                    return
                blocked = self._blocked_since
                if blocked is not None and _connection_window(self.h2) > 0:
                    self._blocked_since = blocked = None
                if blocked is not None and now - blocked >= lim.stall_timeout_s:
                    self._stalled("no connection credit from the peer", close=False)
                    if self._probe_sent_at is None:
                        self._probe_sent_at = now
                        self.h2.ping(PROBE)
                        self.flush()
                if self._probe_sent_at is not None and now - self._probe_sent_at >= lim.ping_timeout_s:
                    self._event("dead_peer")
                    self.rlog.warning(
                        "dead_peer", "tunnel %s: peer did not answer a PING: closing", self.name
                    )
                    self._close_all("peer did not answer a PING", hostile=True)
                    return

    def _close_all(self, why: str, *, hostile: bool = False) -> None:
        """End the connection. A TLS close waits for our last bytes (GOAWAY, close_notify)
        to be read and, meanwhile, reads and drops whatever the peer sends (uvloop: at
        hundreds of MB/s, even with reading paused). So a close is aborted after a grace,
        and a hostile peer's (it broke HTTP/2) is never closed gracefully: reading stops at
        once and the socket is aborted when the GOAWAY had a short chance to leave."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = why
        for st in list(self._streams.values()):
            st._on_reset(ErrorCode.CONNECT_ERROR)
        self._streams.clear()
        with contextlib.suppress(Exception):
            if hostile:  # (uvloop's TLS transport is no asyncio.ReadTransport subclass)
                getattr(self.writer.transport, "pause_reading")()  # noqa: B009
            else:
                self.writer.close()
        self._loop.call_later(HOSTILE_GRACE_S if hostile else CLOSE_GRACE_S, self._abort_transport)
        if asyncio.current_task() is not self._watchdog:
            self._watchdog.cancel()

    def _abort_transport(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def close(self, timeout_s: float = 2.0) -> None:
        if not self.closed:
            self.h2.close()
            self._flush_now()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout_s):
                    await self.writer.drain()
        self._close_all("closed locally")
        for t in list(self._handlers):
            t.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                await self.writer.wait_closed()
