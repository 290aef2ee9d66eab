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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from agent.dataplane.h2 import connection as h2c
from agent.dataplane.h2.connection import H2Config, H2Connection, Headers
from agent.dataplane.h2.frames import ErrorCode, H2ProtocolError

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024
DRAIN_ABOVE_BYTES = 256 * 1024
URGENT_BELOW_BYTES = 16 * 1024  # smaller writes are sent at once, larger ones batched per loop pass


class TunnelError(Exception):
    """The tunnel or one of its streams failed."""


class TunnelStream:
    def __init__(self, conn: TunnelConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        self._reset: int | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self.headers: asyncio.Future[Headers] = asyncio.get_running_loop().create_future()
        self.request_headers: Headers = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.direct_bytes = 0  # written straight to the sink (not through read())
        self._sink: asyncio.WriteTransport | None = None

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
        if (
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
        if end:
            self._eof = True
        if self._chunks or end:
            self._readable.set()

    def _on_reset(self, code: int) -> None:
        self._reset = code
        self._eof = True
        self._readable.set()
        self._writable.set()
        if not self.headers.done():
            self.headers.set_exception(TunnelError(f"stream reset by peer (code {code})"))
            self.headers.exception()  # nobody may be waiting (server side): not an unhandled error

    # used by the relay
    async def read(self) -> tuple[bytes, int]:
        """Next chunk and its flow-control credit; ``(b"", 0)`` at end of stream.

        Raises TunnelError if the peer reset the stream. Pass the credit to
        :meth:`ack` once the bytes went onwards.
        """
        while not self._chunks:
            if self._reset is not None and self._reset != ErrorCode.NO_ERROR:
                raise TunnelError(f"stream {self.stream_id} reset by peer (code {self._reset})")
            if self._eof:
                return b"", 0
            self._readable.clear()
            await self._readable.wait()
        data, flow = self._chunks.popleft()
        self.bytes_in += len(data)
        return data, flow

    def ack(self, flow: int) -> None:
        """Credit ``flow`` bytes back to the peer (they were written onwards)."""
        if flow:
            self.conn.h2.acknowledge_received(self.stream_id, flow)
            self.conn.flush(urgent=False)

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._reset is not None:
                raise TunnelError(f"stream {self.stream_id} was reset")
            if self.conn.closed:
                raise TunnelError("tunnel connection closed")
            window = self.conn.h2.send_window(self.stream_id)
            if window <= 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            n = min(window, len(view))
            self.conn.h2.send_data(self.stream_id, view[:n])
            self.bytes_out += n
            view = view[n:]
            self.conn.flush(urgent=n < URGENT_BELOW_BYTES)
            await self.conn.drain()

    def write_eof(self) -> None:
        if self._reset is None and not self.conn.closed:
            self.conn.h2.end_stream(self.stream_id)
            self.conn.flush()
            self.conn._forget_if_closed(self.stream_id)

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        if self._reset is None and not self.conn.closed:
            self.conn.h2.reset_stream(self.stream_id, code)
            self.conn.flush()
        self._reset = self._reset if self._reset is not None else code
        self.conn._streams.pop(self.stream_id, None)

    async def respond(self, status: int, reason: str = "", end: bool = False) -> None:
        from agent.dataplane.hbone import response_headers

        self.conn.h2.send_headers(self.stream_id, response_headers(status, reason), end_stream=end)
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
    ) -> None:
        self.reader = reader
        self.writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:  # small frames (acks, window updates, requests) must not wait for Nagle
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2 = H2Connection(config or H2Config(client=client))
        self._streams: dict[int, TunnelStream] = {}
        self._on_stream = on_stream
        self._handlers: set[asyncio.Task[None]] = set()
        self.closed = False
        self.name = name
        self.cert_fingerprint = ""  # client side: the source cert it was handshaked with (pool)
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._flushed_this_pass = False
        self.h2.initiate()
        self.flush()
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"tunnel-read {name}")

    @property
    def active_streams(self) -> int:
        return len(self._streams)

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
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        # Waiting is only needed when the transport holds more than its high-water mark;
        # skipping the await otherwise saves a task switch per message on the hot path.
        if self.writer.transport.get_write_buffer_size() < DRAIN_ABOVE_BYTES and not self.writer.is_closing():
            return
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as e:
            self._close_all(f"write failed: {e}")
            raise TunnelError(f"tunnel write failed: {e}") from e

    async def wait_closed(self) -> None:
        """Until the peer or we close the connection."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)

    def can_open(self) -> bool:
        return not self.closed and self.h2.can_open_stream()

    async def open_stream(self, headers: Headers) -> TunnelStream:
        """Client: send a CONNECT request; returns the stream once the peer answered 2xx."""
        from agent.dataplane.hbone import response_status

        if not self.can_open():
            raise TunnelError("tunnel connection cannot open more streams")
        sid = self.h2.send_headers(None, headers)
        stream = TunnelStream(self, sid)
        stream.request_headers = headers
        self._streams[sid] = stream
        self.flush()
        await self.drain()
        resp = await stream.headers
        status = response_status(resp)
        if not 200 <= status < 300:
            reason = next((v for k, v in resp if k == "x-nodemesh-reason"), "")
            self._streams.pop(sid, None)
            raise TunnelError(f"peer refused CONNECT with {status}" + (f": {reason}" if reason else ""))
        return stream

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except H2ProtocolError as e:
                    log.warning("tunnel %s: protocol error from peer: %s", self.name, e)
                    self.flush()
                    break
                for ev in events:
                    self._dispatch(ev)
                self.flush()
        except (ConnectionError, OSError) as e:
            log.debug("tunnel %s read failed: %s", self.name, e)
        finally:
            self._close_all("connection closed")

    def _dispatch(self, ev: h2c.Event) -> None:
        if isinstance(ev, h2c.DataReceived):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st._on_data(ev.data, ev.flow_bytes, ev.end_stream)
                if ev.end_stream:
                    self._forget_if_closed(ev.stream_id)
            else:
                self.h2.acknowledge_received(ev.stream_id, ev.flow_bytes)
        elif isinstance(ev, h2c.HeadersReceived):
            st = self._streams.get(ev.stream_id)
            if st is None and not self.h2.config.client and self._on_stream is not None:
                st = TunnelStream(self, ev.stream_id)
                st.request_headers = ev.headers
                self._streams[ev.stream_id] = st
                if ev.end_stream:
                    st._on_data(b"", 0, True)
                task = asyncio.get_running_loop().create_task(self._run_handler(st))
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
            targets = self._streams.values() if ev.stream_id == 0 else [self._streams.get(ev.stream_id)]
            for st in targets:
                if st is not None:
                    st._writable.set()
        elif isinstance(ev, h2c.ConnectionTerminated):
            log.debug("tunnel %s: peer sent GOAWAY (code %d)", self.name, ev.error_code)

    async def _run_handler(self, st: TunnelStream) -> None:
        assert self._on_stream is not None
        try:
            await self._on_stream(st)
        except asyncio.CancelledError:
            st.reset()
            raise
        except Exception:
            log.exception("tunnel %s: stream handler failed", self.name)
            st.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            self._streams.pop(st.stream_id, None)

    def _forget_if_closed(self, stream_id: int) -> None:
        """Drop a stream closed both ways from the table (its object lives on while the relay
        drains what it buffered), so ``active_streams`` counts only streams in use."""
        if not self.h2.is_open(stream_id):
            self._streams.pop(stream_id, None)

    def _close_all(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        for st in list(self._streams.values()):
            st._on_reset(ErrorCode.CONNECT_ERROR)
        self._streams.clear()
        with contextlib.suppress(Exception):
            self.writer.close()

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
