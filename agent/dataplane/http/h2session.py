"""One HTTP/2 connection for L7 over any byte end (a socket, or an HBONE stream), either side.

How this works: a :class:`H2Session` owns a sans-I/O
:class:`~agent.proto.h2.connection.H2Connection` and an
:class:`~agent.dataplane.tcp.End`. One reader task feeds the end's bytes to
the core and hands its events to :class:`H2Stream` objects; one writer task
sends what the core queued, so a slow end slows only that session. A server
session starts a handler task per request stream; a client session opens
streams (:meth:`H2Session.request`) that many requests share.

Flow control is the backpressure: received DATA is credited back to the peer
only when the stream's consumer acknowledges it (after writing it onwards),
so what a session buffers is bounded by its windows (:data:`L7_H2`: 1 MiB per
stream, 4 MiB per connection).

(The HBONE tunnel, :mod:`agent.dataplane.tunnel`, stays a separate, tuned
layer over TLS sockets; see the issue note on folding the two together.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from agent.dataplane.tcp import End
from agent.proto.h2 import connection as h2c
from agent.proto.h2.connection import H2Config, H2Connection, Headers
from agent.proto.h2.frames import ErrorCode, H2ProtocolError

log = logging.getLogger(__name__)

L7_WINDOWS = {"stream_window_bytes": 1 << 20, "connection_window_bytes": 4 << 20}


def l7_config(client: bool) -> H2Config:
    return H2Config(client=client, max_concurrent_streams=256, max_header_list_bytes=65536, **L7_WINDOWS)


class StreamError(Exception):
    """The stream (or its whole session) ended abnormally."""


class H2Stream:
    def __init__(self, session: H2Session, stream_id: int) -> None:
        self.session = session
        self.id = stream_id
        self.headers: asyncio.Future[Headers] = asyncio.get_running_loop().create_future()
        self.interim: list[Headers] = []  # 1xx header blocks (client side)
        self.trailers: Headers = []
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        self.reset_code: int | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    # -- from the session
    def _on_headers(self, headers: Headers, end: bool) -> None:
        if not self.headers.done():
            interim = any(k == ":status" and v[:1] == "1" and v != "101" for k, v in headers)
            if self.session.client and interim:
                self.interim.append(headers)
                return
            self.headers.set_result(headers)
        else:
            self.trailers = headers
        if end:
            self._eof = True
            self._readable.set()

    def _on_data(self, data: bytes, flow: int, end: bool) -> None:
        if data or flow:
            self._chunks.append((data, flow))
        if end:
            self._eof = True
        self._readable.set()

    def _on_reset(self, code: int) -> None:
        self.reset_code = code
        self._eof = True
        for _, flow in self._chunks:
            self.session._credit(self.id, flow)
        self._chunks.clear()
        self._readable.set()
        self._writable.set()
        if not self.headers.done():
            self.headers.set_exception(StreamError(f"stream reset (code {code})"))
            self.headers.exception()

    # -- for the proxy
    @property
    def ended(self) -> bool:
        return self._eof and not self._chunks

    async def read(self) -> tuple[bytes, int]:
        """Next body chunk and its credit; ``(b"", 0)`` at the end (then :attr:`trailers`)."""
        while not self._chunks:
            if self.reset_code is not None:
                raise StreamError(f"stream {self.id} reset (code {self.reset_code})")
            if self._eof:
                return b"", 0
            self._readable.clear()
            await self._readable.wait()
        return self._chunks.popleft()

    def ack(self, flow: int) -> None:
        if flow:
            self.session._credit(self.id, flow)

    def send_headers(self, headers: Headers, end: bool = False) -> None:
        s = self.session
        if self.reset_code is not None or s.closed:
            raise StreamError(f"stream {self.id} ended")
        s.h2.send_headers(self.id, headers, end_stream=end)
        s.flush()

    async def write(self, data: bytes) -> None:
        s = self.session
        view = memoryview(data)
        while view:
            if self.reset_code is not None or s.closed:
                raise StreamError(f"stream {self.id} ended")
            window = s.h2.send_window(self.id)
            if window <= 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            n = min(window, len(view))
            s.h2.send_data(self.id, view[:n])
            view = view[n:]
            s.flush()
            await s.drain()

    def end(self, trailers: Headers | None = None) -> None:
        s = self.session
        if self.reset_code is not None or s.closed:
            return
        if trailers:
            s.h2.send_headers(self.id, trailers, end_stream=True)
        else:
            s.h2.end_stream(self.id)
        s.flush()

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        s = self.session
        if self.reset_code is None and not s.closed:
            s.h2.reset_stream(self.id, code)
            s.flush()
        self._on_reset(code if self.reset_code is None else self.reset_code)
        s._streams.pop(self.id, None)


RequestHandler = Callable[[H2Stream], Awaitable[None]]


class H2Session:
    def __init__(
        self,
        end: End,
        *,
        client: bool,
        on_request: RequestHandler | None = None,
        config: H2Config | None = None,
        name: str = "",
    ) -> None:
        self.end = end
        self.client = client
        self.h2 = H2Connection(config or l7_config(client))
        self.on_request = on_request
        self.name = name
        self.closed = False
        self.close_reason = ""
        self._streams: dict[int, H2Stream] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._pending = 0
        self.last_used = time.monotonic()
        self.h2.initiate()
        self._out: deque[bytes] = deque()
        self.flush()
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name=f"h2-write {name}")
        self._reader: asyncio.Task[None] | None = None

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def start(self, first: bytes = b"") -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop(first), name=f"h2-read {self.name}")
        return self._reader

    def can_open(self) -> bool:
        return not self.closed and self.h2.can_open_stream()

    def request(self, headers: Headers, end: bool) -> H2Stream:
        """Client: open a stream with a request header block."""
        if not self.can_open():
            raise StreamError("session cannot open more streams")
        sid = self.h2.send_headers(None, headers, end_stream=end)
        st = H2Stream(self, sid)
        self._streams[sid] = st
        self.last_used = time.monotonic()
        self.flush()
        return st

    def _credit(self, stream_id: int, flow: int) -> None:
        if flow and not self.closed:
            self.h2.acknowledge_received(stream_id, flow)
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self._out.append(data)
            self._pending += len(data)
            self._drained.clear()
            self._wake.set()

    async def drain(self) -> None:
        """Wait while more than 256 KiB wait for the end (a slow peer slows its writers)."""
        while self._pending > 256 * 1024 and not self.closed:
            await self._drained.wait()

    async def _write_loop(self) -> None:
        try:
            while True:
                while not self._out:
                    self._wake.clear()
                    await self._wake.wait()
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out.clear()
                await self.end.write(data)
                self._pending -= len(data)
                if self._pending <= 0:
                    self._pending = 0
                    self._drained.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._close_all(f"write failed: {e}")

    async def _read_loop(self, first: bytes) -> None:
        why = "closed by peer"
        try:
            while True:
                if first:
                    data, credit, first = first, 0, b""
                else:
                    data, credit = await self.end.read()
                    if not data:
                        break
                try:
                    events = self.h2.receive_data(data, now_s=time.monotonic())
                except H2ProtocolError as e:
                    why = f"protocol error: {e}"
                    self.flush()
                    break
                finally:
                    self.end.ack(credit)
                for ev in events:
                    self._dispatch(ev)
                self.flush()
        except (ConnectionError, OSError, StreamError) as e:
            why = f"read failed: {e}"
        except Exception as e:  # (a tunnel end raises TunnelError)
            why = f"read failed: {type(e).__name__}: {e}"
        finally:
            self._close_all(why)

    def _dispatch(self, ev: h2c.Event) -> None:
        if isinstance(ev, h2c.DataReceived):
            st = self._streams.get(ev.stream_id)
            if st is not None:
                st._on_data(ev.data, ev.flow_bytes, ev.end_stream)
                if ev.end_stream and not self.h2.is_open(ev.stream_id):
                    self._streams.pop(ev.stream_id, None)
            else:
                self._credit(ev.stream_id, ev.flow_bytes)
        elif isinstance(ev, h2c.HeadersReceived):
            st = self._streams.get(ev.stream_id)
            if st is None and not self.client and self.on_request is not None:
                st = H2Stream(self, ev.stream_id)
                self._streams[ev.stream_id] = st
                st._on_headers(ev.headers, ev.end_stream)
                task = asyncio.get_running_loop().create_task(self._serve(st))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            elif st is not None:
                st._on_headers(ev.headers, ev.end_stream)
                if ev.end_stream and not self.h2.is_open(ev.stream_id):
                    self._streams.pop(ev.stream_id, None)
        elif isinstance(ev, h2c.StreamReset):
            st = self._streams.pop(ev.stream_id, None)
            if st is not None:
                st._on_reset(ev.error_code)
        elif isinstance(ev, h2c.ConnectionTerminated) and self.client:
            # GOAWAY: streams above its last id were not processed and never will be, so they
            # end as refused (safe to retry elsewhere, as nghttp2 reports them to Envoy)
            for sid in [sid for sid in self._streams if sid > ev.last_stream_id]:
                self.h2.reset_stream(sid, ErrorCode.CANCEL)
                self._streams.pop(sid)._on_reset(ErrorCode.REFUSED_STREAM)
        elif isinstance(ev, h2c.WindowUpdated):
            targets = list(self._streams.values()) if ev.stream_id == 0 else [self._streams.get(ev.stream_id)]
            for s in targets:
                if s is not None:
                    s._writable.set()

    async def _serve(self, st: H2Stream) -> None:
        assert self.on_request is not None
        try:
            await self.on_request(st)
        except asyncio.CancelledError:
            st.reset()
            raise
        except Exception as e:
            log.warning("h2 %s: request handler failed: %s: %s", self.name, type(e).__name__, e)
            st.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            if self.h2.is_open(st.id) and st.reset_code is None:
                st.reset()
            self._streams.pop(st.id, None)
            for _, flow in st._chunks:
                self._credit(st.id, flow)
            st._chunks.clear()
            self.last_used = time.monotonic()

    def forget(self, st: H2Stream) -> None:
        """Client: the exchange on ``st`` is over (reset it if it is still open)."""
        if self.h2.is_open(st.id) and st.reset_code is None:
            st.reset()
        self._streams.pop(st.id, None)
        for _, flow in st._chunks:
            self._credit(st.id, flow)
        st._chunks.clear()
        self.last_used = time.monotonic()

    def _close_all(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = why
        for st in list(self._streams.values()):
            st._on_reset(ErrorCode.CONNECT_ERROR)
        self._streams.clear()
        self._drained.set()
        if asyncio.current_task() is not self._writer:
            self._writer.cancel()
        self.end.abort() if "failed" in why or "protocol" in why else self.end.close()

    async def close(self) -> None:
        if not self.closed:
            self.h2.close()
            data = self.h2.data_to_send()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.end.write(data)
        self._close_all("closed locally")
        for t in list(self._handlers):
            t.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    async def wait(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._reader)
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
