"""The HTTP/2 request loop (h2c with prior knowledge, gRPC included): one client connection,
many concurrent requests.

How this works: an :class:`H2Loop` serves the client's connection as an
:class:`~agent.dataplane.http.h2session.H2Session` (server side). Each request
stream is checked (RFC 9113 §8.3: the pseudo-headers a request needs, no
connection-specific headers), then its :class:`H2Side` gives an upstream
session: per request, so requests of one connection are balanced like
HTTP/1.1 requests. Upstream sessions are HTTP/2 too (the client's protocol is
kept, as Istio's ``useClientProtocol``) and shared by many requests. Headers,
body and trailers stream both ways; flow control carries backpressure.

gRPC: ``grpc-status`` is read from the trailers (or a trailers-only response)
into the metrics' ``grpc_response_status`` and ``request_protocol="grpc"``;
an answer the proxy makes itself to a gRPC call is a trailers-only response
with the gRPC status Envoy maps it to (503 -> 14 UNAVAILABLE, 404 -> 12
UNIMPLEMENTED), so gRPC clients see a gRPC error, not a bare HTTP one.

Retries (the route's, :mod:`agent.dataplane.http.retry`), as in the HTTP/1.1
loop: a try whose outcome the policy takes (a status; the ``grpc-status`` of a
trailers-only response; a reset or refused stream; a per-try timeout) is reset
before anything of its response reaches the client, :meth:`H2Side.abandon_h2`
moves its endpoint to the tried ones, and the request goes again on a new
stream, its body sent again from the copy (while it fits the connection's
budget). A gRPC status that comes in trailers after DATA is not retried: the
response has begun (Envoy does the same).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from agent.control.istio import Retry
from agent.dataplane.http import retry
from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.http.h2session import H2Session, H2Stream, StreamError
from agent.dataplane.http.headers import join_h2, split_h2
from agent.dataplane.http.retry import BodyBudget, BodyCopy
from agent.dataplane.tcp import End
from agent.proto.h2.connection import Headers
from agent.proto.h2.frames import ErrorCode

Clock = Callable[[], float]

CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
GRPC_CODES = {name: i for i, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}
GRPC_OF_HTTP = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}


class H2Side(Protocol):
    async def open_h2(self, ex: Exchange, headers: Headers, *, fresh: bool) -> H2Session:
        """An upstream session for this request (may raise :class:`LocalReply`)."""
        ...

    def response_headers(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The response headers to pass on (header operations of the route)."""
        ...

    def headers_h2(self, headers: Headers, ex: Exchange, *, ended: bool = False) -> Headers:
        """The request headers to send upstream (tracing, forwarding)."""
        ...

    def finished_h2(self, ex: Exchange, session: H2Session | None, grpc: bool) -> None:
        ...

    def abandon_h2(self, ex: Exchange, session: H2Session) -> None:
        """A try that will be retried (its stream is reset): end its count, and keep its
        endpoint out of the next try's choice while another is left."""
        ...


class BadRequest(Exception):
    pass


class _Retry(Exception):
    """The route's retry policy takes this outcome: try again (another endpoint if any)."""


class _ClientGone(Exception):
    """The client's request stream failed while its body was being forwarded."""


def check_request(headers: Headers) -> tuple[str, str, str, str]:
    """(method, scheme, authority, path) of a request header block, or BadRequest."""
    pseudo: dict[str, str] = {}
    regular = False
    for k, v in headers:
        if k.startswith(":"):
            if regular:
                raise BadRequest(f"pseudo-header {k} after a regular header")
            if k in pseudo or k not in (":method", ":scheme", ":authority", ":path", ":protocol"):
                raise BadRequest(f"duplicate or unknown pseudo-header {k}")
            pseudo[k] = v
        else:
            regular = True
            if k in CONNECTION_SPECIFIC or (k == "te" and v != "trailers") or k != k.lower():
                raise BadRequest(f"header {k!r} is not allowed in HTTP/2")
    method = pseudo.get(":method", "")
    if not method:
        raise BadRequest("request without :method")
    if method == "CONNECT" and ":protocol" not in pseudo:
        raise BadRequest("CONNECT over HTTP/2 from an app is not supported (use a TCP port)")
    if not pseudo.get(":path") or not pseudo.get(":scheme"):
        raise BadRequest("request without :path or :scheme")
    return method, pseudo[":scheme"], pseudo.get(":authority", ""), pseudo[":path"]


def _size(headers: Headers) -> int:
    return sum(len(k) + len(v) + 2 for k, v in headers)


class H2Loop:
    def __init__(
        self, down: End, side: H2Side, clock: Clock = time.monotonic, name: str = "",
        retry_buffer_bytes: int = retry.RETRY_BUFFER_BYTES, refuse_through: bool = False,
    ) -> None:
        self.down = down
        self.side = side
        self.clock = clock
        self.session = H2Session(down, client=False, on_request=self._request, name=name)
        self.requests = 0
        self.budget = BodyBudget(retry_buffer_bytes)  # request body copies of all its streams
        # the destination node: a stream the pod refused is refused to the source node in turn
        # (not answered 503), which then knows it is safe to retry (refused-stream)
        self.refuse_through = refuse_through

    async def run(self, first: bytes = b"") -> None:
        self.session.start(first)
        await self.session.wait()

    async def _request(self, st: H2Stream) -> None:
        self.requests += 1
        headers = st.headers.result()
        try:
            method, _scheme, authority, path = check_request(headers)
        except BadRequest as e:
            ex = Exchange(self.clock(), "", "", "", "HTTP/2", status=400, detail=str(e))
            self._reply(st, ex, 400, str(e), "-", grpc=False)
            self.side.finished_h2(ex, None, False)
            return
        grpc = any(k == "content-type" and v.startswith("application/grpc") for k, v in headers)
        ex = Exchange(self.clock(), method, authority, path, "HTTP/2")
        ex.request_bytes = _size(headers)
        session: H2Session | None = None
        copy: BodyCopy | None = None
        try:
            while True:  # one pass per try (the route's retries)
                opened = await self._open(st, ex, headers, grpc, copy)
                if opened is None:
                    return
                session, up, sent_end = opened
                r = ex.retry
                if copy is None and ((isinstance(r, Retry) and r.attempts) or ex.on_body is not None):
                    copy = BodyCopy.start(self.budget, _content_length(headers))
                try:
                    await self._attempt(st, up, ex, grpc, copy, not sent_end)
                    return
                except _Retry as why:
                    ex.tries += 1
                    ex.detail = f"retried after {why}"
                    self.side.abandon_h2(ex, session)
                    ex.status, ex.grpc_status = 0, ""
                finally:
                    session.forget(up)
        finally:
            if copy is not None:
                copy.release()
            ex.duration_ms = (self.clock() - ex.start) * 1000.0
            self.side.finished_h2(ex, session, grpc)

    async def _open(
        self, st: H2Stream, ex: Exchange, headers: Headers, grpc: bool, copy: BodyCopy | None
    ) -> tuple[H2Session, H2Stream, bool] | None:
        """A new upstream stream with the request's headers (on a fresh session if the pooled
        one cannot take it) and whether those ended the request; None when the request was
        answered here."""
        # ends with its headers only if nothing of a body is to follow (a retry sends the copy)
        end = st.ended and not st.trailers and not (copy is not None and copy.chunks)
        for attempt in (0, 1):
            try:
                session = await self.side.open_h2(ex, headers, fresh=attempt > 0)
            except LocalReply as r:
                if grpc and r.grpc_status:  # a fault's gRPC abort: that status, HTTP 200
                    ex.grpc_status = str(GRPC_CODES.get(r.grpc_status.upper(), r.grpc_status))
                self._reply(st, ex, r.status, str(r), r.flag, grpc, r.headers)
                return None
            try:
                return session, session.request(self.side.headers_h2(headers, ex, ended=end), end=end), end
            except StreamError:
                if attempt:
                    self._reply(st, ex, 503, "upstream connection closed", "UC", grpc)
        return None

    def _retry_ok(
        self, ex: Exchange, copy: BodyCopy | None, outcome: retry.Outcome, grpc_status: str = ""
    ) -> bool:
        """Will this outcome be retried (:func:`retry.take`)? Only while the request's body,
        if any, is whole in its copy."""
        if copy is None or not copy.intact:
            return False
        return retry.take(ex, outcome, grpc_status)

    async def _attempt(
        self, st: H2Stream, up: H2Stream, ex: Exchange, grpc: bool, copy: BodyCopy | None, pump: bool
    ) -> None:
        """One try within the route's timeout (the whole exchange, retries included) and the
        policy's per-try timeout, as the HTTP/1.1 loop's: 504 ``UT`` before the response began,
        a reset client stream after; a per-try timeout with a retry left is retried."""
        r = ex.retry
        per_try = r.per_try_timeout_s if isinstance(r, Retry) else None
        left = None if ex.timeout_s is None else ex.start + ex.timeout_s - self.clock()
        limits = [t for t in (per_try, left) if t is not None]
        if not limits:
            return await self._exchange(st, up, ex, grpc, copy, pump)
        limit = max(min(limits), 0.0)
        try:
            async with asyncio.timeout(limit):
                await self._exchange(st, up, ex, grpc, copy, pump)
        except TimeoutError:
            up.reset()
            if ex.response_bytes:  # the response had begun: it ends abnormally
                ex.flags = "UT"
                st.reset(ErrorCode.CANCEL)
                return
            route_timeout = left is not None and limit >= left
            if not route_timeout and self._retry_ok(ex, copy, retry.PER_TRY_TIMEOUT):
                raise _Retry("a per-try timeout") from None
            self._reply(st, ex, 504, "upstream request timeout", "UT", grpc)

    async def _exchange(
        self, st: H2Stream, up: H2Stream, ex: Exchange, grpc: bool, copy: BodyCopy | None, pump: bool
    ) -> None:
        body = asyncio.ensure_future(self._pump_request(st, up, ex, copy)) if pump else None
        try:
            try:
                resp = await up.headers
            except StreamError as e:
                if st.reset_code is not None or _failed(body, _ClientGone):
                    ex.flags = "DC"
                    return
                refused = up.reset_code == ErrorCode.REFUSED_STREAM
                if self._retry_ok(ex, copy, retry.REFUSED if refused else retry.RESET):
                    raise _Retry(f"a {'refused stream' if refused else 'reset'} ({e})") from None
                if refused and self.refuse_through:
                    ex.flags, ex.detail = "UC", f"upstream refused the stream ({e})"
                    st.reset(ErrorCode.REFUSED_STREAM)
                    return
                self._reply(st, ex, 503, f"upstream reset before the response ({e})", "UC", grpc)
                return
            status = _status(resp)
            if self._retry_ok(ex, copy, status, _grpc_status(resp)):
                ex.status = status  # (what the try got: outlier detection counts it)
                raise _Retry(f"status {status}" + (f", grpc-status {_grpc_status(resp)}" if grpc else ""))
            for interim in up.interim:
                st.send_headers(interim)
            ex.status = status
            out = [(k, v) for k, v in resp if k not in CONNECTION_SPECIFIC]
            pseudo, regular = split_h2(out)
            changed = self.side.response_headers(ex, regular)
            if changed is not regular:
                out = join_h2(pseudo, changed)
            ex.response_bytes = _size(out)
            ex.grpc_status = _grpc_status(resp)
            try:
                headers_only = up.ended
                st.send_headers(out, end=headers_only)
                if headers_only:
                    return
                while True:
                    data, credit = await up.read()
                    if not data and not credit:
                        break
                    ex.response_bytes += len(data)
                    try:
                        await st.write(data)
                    finally:
                        up.ack(credit)
                if up.trailers:
                    ex.grpc_status = _grpc_status(up.trailers) or ex.grpc_status
                    ex.response_bytes += _size(up.trailers)
                st.end(up.trailers or None)
            except StreamError as e:
                if up.reset_code is not None:
                    ex.flags = "UC"
                    ex.detail = f"upstream reset mid-response: {e}"
                    st.reset(ErrorCode.INTERNAL_ERROR)
                else:
                    ex.flags = "DC"
                    up.reset()
        finally:
            if body is not None and not body.done():
                body.cancel()

    async def _pump_request(self, st: H2Stream, up: H2Stream, ex: Exchange, copy: BodyCopy | None) -> None:
        """The request body to the upstream stream: on a retry first the copy of what the client
        sent so far, then what it sends, then its trailers. A failed client stream raises
        :class:`_ClientGone` (and resets the upstream one); a failed upstream stream ends the
        pump quietly (the response side sees the reset)."""
        try:
            if ex.tries and copy is not None:
                for piece in copy.chunks:
                    await up.write(piece)
            while True:
                try:
                    data, credit = await st.read()
                except StreamError:
                    up.reset()  # the client gave up: so does the upstream request
                    raise _ClientGone from None
                if not data and not credit:
                    if ex.on_body is not None and copy is not None and copy.intact:
                        ex.on_body(b"".join(copy.chunks))  # (the route's mirror)
                    ex.on_body = None
                    break
                ex.request_bytes += len(data)
                if copy is not None:
                    copy.add(data)  # (before the write: a cancelled write is still in the copy)
                try:
                    await up.write(data)
                finally:
                    st.ack(credit)
            up.end(st.trailers or None)
        except StreamError:
            return

    @staticmethod
    def _reply(
        st: H2Stream, ex: Exchange, status: int, why: str, flag: str, grpc: bool,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        ex.status, ex.flags, ex.detail = status, flag, why
        try:
            if grpc:
                ex.status = 200
                ex.grpc_status = ex.grpc_status or GRPC_OF_HTTP.get(status, "2")
                st.send_headers(
                    [
                        (":status", "200"),
                        ("content-type", "application/grpc"),
                        ("server", "nodemesh"),
                        ("grpc-status", ex.grpc_status),
                        ("grpc-message", why[:200]),
                    ],
                    end=True,
                )
                return
            body = why.encode("utf-8", "replace") + b"\n"
            st.send_headers(
                [
                    (":status", str(status)),
                    ("server", "nodemesh"),
                    ("content-type", "text/plain; charset=utf-8"),
                    ("content-length", str(len(body))),
                    *((k.decode("latin-1"), v.decode("latin-1")) for k, v in extra),
                ]
            )
            ex.response_bytes = len(body)
            st.session.h2.send_data(st.id, body, end_stream=True)  # (tiny: within any window)
            st.session.flush()
        except (StreamError, ValueError):
            pass


def _status(headers: Headers) -> int:
    for k, v in headers:
        if k == ":status":
            return int(v) if v.isdigit() else 0
    return 0


def _content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k == "content-length":
            return int(v) if v.isdigit() else None
    return None


def _failed(task: asyncio.Future[None] | None, kind: type[BaseException]) -> bool:
    return task is not None and task.done() and not task.cancelled() and isinstance(task.exception(), kind)


def _grpc_status(headers: Headers) -> str:
    for k, v in headers:
        if k == "grpc-status":
            return v
    return ""
