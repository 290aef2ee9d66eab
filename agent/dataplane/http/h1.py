"""The HTTP/1.1 request loop: one client connection, request after request.

How this works: the loop reads the client's bytes into a
:class:`~agent.proto.http1.RequestReader` and serves each request in turn
(pipelined requests wait their turn, so responses keep their order; the
reader is not fed past one chunk of unserved requests, so memory is bounded).
Per request, its :class:`Side` (outbound: route and balance per request;
inbound: the local pod) opens an upstream, the head goes out with the side's
headers, the body streams as it arrives (re-framed: chunked stays chunked with
its trailers, a length stays a length), and the response streams back,
interim ``1xx`` included. The upstream connection goes back to its pool when
both sides keep it; a reused connection the server had closed is retried once
on a fresh one, if the request had no body.

The route's retries (:mod:`agent.dataplane.http.retry`): a try whose outcome the policy takes
is abandoned before any byte of its response reaches the client and the request goes again,
to another endpoint if there is one; its body, as far as the client sent it, from the copy
kept while it fits the connection's budget (the rest streams on as it arrives).

``Upgrade`` (WebSocket) and ``CONNECT``: once the upstream answers 101 (or 2xx
to CONNECT) the connection becomes a byte relay (:func:`agent.dataplane.tcp.relay`).

Errors the client can act on, never a hang: a malformed request gets
400/414/431/505 and the connection closes; a request the side cannot place gets
503 with Envoy's flag (``NR``, ``UH``, ``UF``); an upstream that resets before
its response gets 503 ``UC`` (after its head was sent, the client connection is
reset instead: a truncated response must not look complete); a client that goes
away mid-request is ``DC``. Each ends up in :meth:`Side.report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agent.control.istio import Retry
from agent.dataplane.http import retry
from agent.dataplane.http.exchange import Exchange, LocalReply, UpstreamGone
from agent.dataplane.http.retry import BodyBudget, BodyCopy
from agent.dataplane.http.upstream import Upstream
from agent.dataplane.tcp import End, relay
from agent.dataplane.tunnel import TunnelError
from agent.proto import http1
from agent.proto.http1 import END, HEAD, UPGRADE, Event, H1Error, H1Limits, Header, RequestHead

Clock = Callable[[], float]


class Side(Protocol):
    """What differs between the source node (outbound) and the destination node (inbound)."""

    # True: the client connection is bound to one upstream connection (the destination node:
    # a tunnel stream to its pod connection), so it ends when the upstream's does
    bound: bool

    async def open(self, head: RequestHead, ex: Exchange, *, fresh: bool) -> Upstream:
        """An upstream for this request (may raise :class:`LocalReply`)."""
        ...

    def headers(self, head: RequestHead, ex: Exchange) -> list[Header]:
        """The end-to-end headers to send upstream (tracing, forwarding)."""
        ...

    def finished(self, ex: Exchange, up: Upstream | None, reusable: bool) -> None:
        """The exchange ended: give the upstream back (or drop it), count, log."""
        ...

    def response_headers(self, ex: Exchange, headers: list[Header]) -> list[Header]:
        """The response headers to pass on (header operations of the route)."""
        ...

    def abandon(self, ex: Exchange, up: Upstream) -> None:
        """A try that will be retried: drop its upstream connection, end its count."""
        ...


class _ClientGone(Exception):
    pass


class _Stale(Exception):
    """A reused upstream connection ended before any byte of the response."""


class _Retry(Exception):
    """The route's retry policy takes this outcome: try again (another endpoint if any)."""


@dataclass(frozen=True, slots=True)
class LoopConfig:
    limits: H1Limits = field(default_factory=H1Limits)
    idle_timeout_s: float = 3600.0  # a keep-alive client connection silent this long is closed
    relay_idle_timeout_s: float = 3600.0  # after an upgrade
    # a request body is copied for a retry up to this (per client connection; over it the
    # request is forwarded, not retried): Envoy's per_connection_buffer_limit_bytes
    retry_buffer_bytes: int = retry.RETRY_BUFFER_BYTES


class H1Loop:
    def __init__(self, down: End, side: Side, config: LoopConfig, clock: Clock = time.monotonic) -> None:
        self.down = down
        self.side = side
        self.config = config
        self.clock = clock
        self.reader = http1.RequestReader(config.limits)
        self.pending: deque[Event] = deque()
        self._first = b""
        self.requests = 0
        self._waiting = False  # waiting for the client's bytes (between requests, or within one)
        self._request_read = False
        self._active = 0.0  # when the client last sent bytes (clock)
        self.idled_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._budget = BodyBudget(config.retry_buffer_bytes)
        self._copy: BodyCopy | None = None  # the request body sent so far (the route retries)
        self._trailers: list[Header] = []  # the request's chunked trailers, once read

    async def run(self, first: bytes = b"") -> None:
        """Serve requests until the client closes, an error closes, or the idle timeout."""
        self._first = first
        self._active = self.clock()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.config.idle_timeout_s, self._idle_check, loop)
        self._timer = timer
        try:
            while True:
                ev = await self._next(idle=True)
                if ev is None:
                    return
                kind, head = ev
                if kind != HEAD or not isinstance(head, RequestHead):  # (the reader never does this)
                    return
                self.requests += 1
                if not await self._exchange(head):
                    return
        except H1Error as e:
            with contextlib.suppress(Exception):
                await self.down.write(http1.local_reply(e.status, str(e), close=True))
            self.down.write_eof()
        except (_ClientGone, ConnectionError, TunnelError, OSError):
            self.down.abort()
        finally:
            if self._timer is not None:
                self._timer.cancel()

    def _idle_check(self, loop: asyncio.AbstractEventLoop) -> None:
        """The keep-alive idle timeout: one timer per connection, moved on when it fires
        early (not a timeout context per request)."""
        idle = self.clock() - self._active
        limit = self.config.idle_timeout_s
        if self._waiting and idle >= limit:
            self.idled_out = True
            self.down.close()  # a graceful close, as servers end idle keep-alive connections
            return
        self._timer = loop.call_later(max(limit - idle, 0.05), self._idle_check, loop)

    async def _next(self, idle: bool = False) -> Event | None:
        while not self.pending:
            if self._first:
                data, credit = self._first, 0
                self._first = b""
            else:
                # (the idle timer looks at this: a client silent mid-request, a slowloris
                # head, is held no longer than an idle one)
                self._waiting = True
                data, credit = await self.down.read()
                self._waiting = False
                self._active = self.clock()
            if not data:
                if self.reader.idle and idle:
                    return None
                raise _ClientGone("client closed in the middle of a request")
            try:
                self.pending.extend(self.reader.feed(data))
            finally:
                self.down.ack(credit)
        return self.pending.popleft()

    # -- one request ----------------------------------------------------------------------

    async def _exchange(self, head: RequestHead) -> bool:
        """Serve one request; True if the client connection carries on."""
        ex = Exchange(self.clock(), head.method, head.authority, head.target)
        self._request_read = False  # the request's END event taken from the client
        if head.version == "1.0":
            ex.protocol = "HTTP/1.0"
        up: Upstream | None = None
        keep = False
        reusable = False
        self._copy = None
        self._trailers = []
        try:
            while True:  # one pass per try (the route's retries)
                try:
                    for attempt in (0, 1):  # (a second one when a reused connection was stale)
                        try:
                            up = await self.side.open(head, ex, fresh=attempt > 0)
                        except LocalReply as r:
                            return await self._local(head, ex, r.status, str(r), r.flag, r.headers)
                        except UpstreamGone as e:
                            ex.flags, ex.detail = "UF", str(e)
                            self.down.abort()
                            return False
                        try:
                            keep, reusable = await self._attempt(head, ex, up)
                            break
                        except _Stale:
                            up.end.abort()
                            up = None
                            if attempt:
                                raise
                    return keep
                except _Retry as r:
                    ex.tries += 1
                    ex.detail = f"retried after {r}"
                    if up is not None:
                        self.side.abandon(ex, up)
                    up = None
                    ex.status = 0
        except _Stale:
            ex.flags = "UC"
            return await self._local(head, ex, 503, "upstream connection closed before the response", "UC")
        except _ClientGone:
            ex.flags = "DC"
            raise
        finally:
            ex.duration_ms = (self.clock() - ex.start) * 1000.0
            if self._copy is not None:
                self._copy.release()
                self._copy = None
            self.side.finished(ex, up, reusable and keep)

    def _retry_ok(self, ex: Exchange, head: RequestHead, outcome: retry.Outcome) -> bool:
        """Will this outcome be retried (:func:`retry.take`)? A request with a body only while
        the copy of its body is whole; never a protocol switch."""
        if head.upgrade or head.method == "CONNECT":
            return False
        if head.has_body and (self._copy is None or not self._copy.intact):
            return False
        return retry.take(ex, outcome)

    async def _attempt(
        self, head: RequestHead, ex: Exchange, up: Upstream
    ) -> tuple[bool, bool]:
        """One try within the route's timeout (the whole exchange, retries included, as Envoy's
        route timeout) and the retry policy's per-try timeout: 504 ``UT`` when the time is up
        before the response began, a reset client connection after; a per-try timeout with a
        retry left is retried."""
        r = ex.retry
        per_try = r.per_try_timeout_s if isinstance(r, Retry) else None
        left = None if ex.timeout_s is None else ex.start + ex.timeout_s - self.clock()
        limits = [t for t in (per_try, left) if t is not None]
        if not limits:
            return await self._forward(head, ex, up)
        limit = max(min(limits), 0.0)
        try:
            async with asyncio.timeout(limit):
                return await self._forward(head, ex, up)
        except TimeoutError:
            up.end.abort()  # the upstream is in an unknown state: never reused
            if ex.response_bytes:
                ex.flags = "UT"
                self.down.abort()
                return False, False
            route_timeout = left is not None and limit >= left
            if not route_timeout and self._retry_ok(ex, head, "per-try-timeout"):
                raise _Retry("a per-try timeout") from None
            return await self._local(head, ex, 504, "upstream request timeout", "UT"), False

    async def _local(
        self, head: RequestHead, ex: Exchange, status: int, why: str, flag: str,
        extra: tuple[Header, ...] = (),
    ) -> bool:
        ex.status, ex.flags, ex.detail = status, flag, why
        # a request body we did not read (or a switch we did not make) ends the connection
        close = not head.keep_alive or head.has_body or head.method == "CONNECT" or bool(head.upgrade)
        if not close:
            while not self._request_read and (ev := await self._next()) is not None and ev[0] != END:
                pass
            self._request_read = True
        reply = http1.local_reply(status, why, close=close, extra=extra)
        ex.response_bytes = len(reply)
        await self._to_client(reply)
        if close:
            self.down.write_eof()
        return not close

    async def _to_client(self, data: bytes) -> None:
        try:
            await self.down.write(data)
        except (ConnectionError, TunnelError, OSError) as e:
            raise _ClientGone(str(e)) from e

    async def _forward(self, head: RequestHead, ex: Exchange, up: Upstream) -> tuple[bool, bool]:
        framing: list[Header] = []
        if head.chunked:
            framing.append((b"transfer-encoding", b"chunked"))
        elif head.content_length is not None:
            framing.append((b"content-length", b"%d" % head.content_length))
        if head.upgrade:
            framing += [(b"connection", b"upgrade"), (b"upgrade", head.upgrade)]
        headers = self.side.headers(head, ex)
        data = http1.request_head(head.method, ex.target or head.target, headers, framing)
        ex.request_bytes = len(data)
        try:
            await up.end.write(data)
        except (ConnectionError, TunnelError, OSError):
            if up.reused and not head.has_body:
                raise _Stale from None
            return await self._local(head, ex, 503, "upstream connection failed", "UC"), False
        body: asyncio.Future[None] | None = None
        if head.has_body:
            r = ex.retry
            wanted = (isinstance(r, Retry) and r.attempts) or ex.on_body is not None
            if self._copy is None and wanted and not head.upgrade:
                self._copy = BodyCopy.start(self._budget, head.content_length)
            body = asyncio.ensure_future(self._send_body(head, ex, up))
        elif not self._request_read:  # (a retry: the first try took it)
            ev = await self._next()  # the request's END (it came with the head)
            assert ev is not None and ev[0] == END
            self._request_read = True
        try:
            keep, reusable, rest = await self._response(head, ex, up, body)
        finally:
            if body is not None and not body.done():
                body.cancel()
                with contextlib.suppress(BaseException):
                    await body
        if body is not None and (body.cancelled() or body.exception() is not None):
            # the response ended before the request body: neither connection is in a known state
            keep = reusable = False
        if rest is not None:  # switched: bytes both ways from now on
            await self._switch(up, rest)
            return False, False
        return keep, reusable

    async def _send_body(self, head: RequestHead, ex: Exchange, up: Upstream) -> None:
        try:
            await self._body(head, ex, up)
        except (_ClientGone, ConnectionError, TunnelError, OSError, H1Error):
            up.end.abort()  # the response side, waiting to read, learns of it at once
            raise

    async def _body(self, head: RequestHead, ex: Exchange, up: Upstream) -> None:
        chunked = head.chunked
        copy = self._copy
        if ex.tries and copy is not None:  # a retry: first what the client sent so far
            for piece in copy.chunks:
                await up.end.write(http1.chunk(piece) if chunked else piece)
        while not self._request_read:
            ev = await self._next()
            assert ev is not None
            kind, val = ev
            if kind == END:
                assert isinstance(val, list)
                self._request_read = True
                self._trailers = val
                if ex.on_body is not None and copy is not None and copy.intact:
                    ex.on_body(b"".join(copy.chunks))  # (the route's mirror)
                ex.on_body = None
                break
            assert isinstance(val, bytes)
            ex.request_bytes += len(val)
            if copy is not None:
                copy.add(val)  # (before the write: a cancelled write is still in the copy)
            await up.end.write(http1.chunk(val) if chunked else val)
        if chunked:
            await up.end.write(http1.last_chunk(self._trailers))

    async def _response(
        self, head: RequestHead, ex: Exchange, up: Upstream, body: asyncio.Future[None] | None
    ) -> tuple[bool, bool, bytes | None]:
        """Relay the response; returns (client keeps the connection, upstream reusable, and
        for a protocol switch the bytes already read from upstream past its head)."""
        connect = head.method == "CONNECT"
        rr = http1.ResponseReader(head_only=head.method == "HEAD" or connect)
        keep = head.keep_alive and not head.upgrade and not connect
        reusable = True
        chunked_out = False
        got_any = False
        switched: bytes | None = None
        sent_head = False
        while not rr.done:
            try:
                data, credit = await up.end.read()
            except (ConnectionError, TunnelError, OSError) as e:
                self._body_failure(body)
                if not got_any and up.reused and body is None:
                    raise _Stale from None
                if not sent_head and self._retry_ok(ex, head, "reset"):
                    raise _Retry(f"a reset ({e})") from None
                return await self._upstream_failed(ex, sent_head, 503, "UC", str(e))
            if not data and not got_any and up.reused and body is None:
                raise _Stale
            got_any = True
            try:
                events = rr.feed(data) if data else rr.eof()
            except H1Error as e:
                up.end.ack(credit)
                self._body_failure(body)
                if not data and not sent_head and self._retry_ok(ex, head, "reset"):
                    raise _Retry("the upstream closed before its response") from None
                flag = "UC" if not data else "UPE"
                return await self._upstream_failed(ex, sent_head, 503 if not data else 502, flag, str(e))
            out: list[bytes] = []  # what this chunk gives the client: one write, not one per event
            try:
                for kind, val in events:
                    if kind == HEAD:
                        assert isinstance(val, http1.ResponseHead)
                        r = val
                        if r.status < 200 and r.status != 101:
                            if head.version == "1.1":  # interim (100 Continue...): passed on
                                out.append(http1.response_head(r.status, r.reason, r.headers, ()))
                            continue
                        if not sent_head and self._retry_ok(ex, head, r.status):
                            ex.status = r.status  # (what the try got: outlier detection counts it)
                            raise _Retry(f"status {r.status}")
                        ex.status = r.status
                        headers = self.side.response_headers(ex, http1.end_to_end(r.headers))
                        framing: list[Header] = []
                        if (r.status == 101 and head.upgrade) or (connect and 200 <= r.status < 300):
                            switched = b""
                            if r.status == 101:
                                up_proto = r.get(b"upgrade") or b""
                                framing = [(b"connection", b"upgrade"), (b"upgrade", up_proto)]
                        elif rr.head_only or r.status in (204, 304):
                            if r.content_length is not None and r.status != 204:
                                framing.append((b"content-length", b"%d" % r.content_length))
                        elif r.content_length is not None:
                            framing.append((b"content-length", b"%d" % r.content_length))
                        elif head.version == "1.1":
                            chunked_out = True
                            framing.append((b"transfer-encoding", b"chunked"))
                        else:
                            keep = False
                        if not r.keep_alive or r.until_close:
                            reusable = False
                            if self.side.bound:  # the client's connection ends with the upstream's
                                keep = False
                        if switched is None and not keep:
                            framing.append((b"connection", b"close"))
                        hb = http1.response_head(r.status, r.reason, headers, framing)
                        ex.response_bytes += len(hb)
                        out.append(hb)
                        sent_head = True
                    elif kind == http1.DATA:
                        assert isinstance(val, bytes)
                        ex.response_bytes += len(val)
                        out.append(http1.chunk(val) if chunked_out else val)
                    elif kind == END:
                        if chunked_out:
                            assert isinstance(val, list)
                            out.append(http1.last_chunk(val))
                    elif kind == UPGRADE:
                        assert isinstance(val, bytes)
                        switched = val
                if out:
                    await self._to_client(out[0] if len(out) == 1 else b"".join(out))
            finally:
                up.end.ack(credit)
        if rr.extra and switched is None:
            reusable = False
        if switched is not None:
            if connect:
                switched = rr.rest
            if ex.status != 101 and not connect:
                switched = None
        elif head.upgrade or connect:  # refused the switch: the reader stopped at that request
            keep = False
        if not keep and switched is None:
            self.down.write_eof()
        return keep, reusable, switched

    @staticmethod
    def _body_failure(body: asyncio.Future[None] | None) -> None:
        """The upstream failed while the request body was on its way: a client that went away
        is the cause (DC), not the upstream."""
        if body is not None and body.done() and not body.cancelled():
            exc = body.exception()
            if isinstance(exc, _ClientGone):
                raise exc

    async def _upstream_failed(
        self, ex: Exchange, sent_head: bool, status: int, flag: str, why: str
    ) -> tuple[bool, bool, None]:
        ex.flags = flag
        ex.detail = f"upstream failed: {why}"
        if sent_head:  # a truncated response must not look complete
            self.down.abort()
            return False, False, None
        ex.status = status
        what = "sent a malformed response" if flag == "UPE" else "connection terminated before the response"
        reply = http1.local_reply(status, f"upstream {what} ({why})", close=True)
        ex.response_bytes = len(reply)
        await self._to_client(reply)
        self.down.write_eof()
        return False, False, None

    async def _switch(self, up: Upstream, upstream_rest: bytes) -> None:
        client_rest = b""
        while self.pending:  # the UPGRADE event: bytes the client sent past its request
            kind, val = self.pending.popleft()
            if kind == UPGRADE and isinstance(val, bytes):
                client_rest += val
        if client_rest:
            await up.end.write(client_rest)
        if upstream_rest:
            await self._to_client(upstream_rest)
        await relay(self.down, up.end, idle_timeout_s=self.config.relay_idle_timeout_s)
