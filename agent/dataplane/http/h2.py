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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.http.h2session import H2Session, H2Stream, StreamError
from agent.dataplane.http.headers import join_h2, split_h2
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

    def headers_h2(self, headers: Headers, ex: Exchange) -> Headers:
        """The request headers to send upstream (tracing, forwarding)."""
        ...

    def finished_h2(self, ex: Exchange, session: H2Session | None, grpc: bool) -> None:
        ...


class BadRequest(Exception):
    pass


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
    def __init__(self, down: End, side: H2Side, clock: Clock = time.monotonic, name: str = "") -> None:
        self.down = down
        self.side = side
        self.clock = clock
        self.session = H2Session(down, client=False, on_request=self._request, name=name)
        self.requests = 0

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
        try:
            for attempt in (0, 1):
                try:
                    session = await self.side.open_h2(ex, headers, fresh=attempt > 0)
                except LocalReply as r:
                    if grpc and r.grpc_status:  # a fault's gRPC abort: that status, HTTP 200
                        ex.grpc_status = str(GRPC_CODES.get(r.grpc_status.upper(), r.grpc_status))
                    self._reply(st, ex, r.status, str(r), r.flag, grpc, r.headers)
                    return
                try:
                    up = session.request(self.side.headers_h2(headers, ex), end=st.ended)
                    break
                except StreamError:
                    if attempt:
                        self._reply(st, ex, 503, "upstream connection closed", "UC", grpc)
                        return
            assert session is not None
            if ex.timeout_s is None:
                await self._exchange(st, up, ex, grpc)
            else:
                try:
                    async with asyncio.timeout(ex.timeout_s):
                        await self._exchange(st, up, ex, grpc)
                except TimeoutError:
                    up.reset()
                    if ex.response_bytes:  # the response had begun: it ends abnormally
                        ex.flags = "UT"
                        st.reset(ErrorCode.CANCEL)
                    else:
                        self._reply(st, ex, 504, "upstream request timeout", "UT", grpc)
            session.forget(up)
        finally:
            ex.duration_ms = (self.clock() - ex.start) * 1000.0
            self.side.finished_h2(ex, session, grpc)

    async def _exchange(self, st: H2Stream, up: H2Stream, ex: Exchange, grpc: bool) -> None:
        body = None if st.ended else asyncio.ensure_future(self._pump_request(st, up, ex))
        try:
            try:
                resp = await up.headers
            except StreamError as e:
                if body is not None and body.done() and not body.cancelled() and body.exception():
                    ex.flags = "DC"
                    return
                self._reply(st, ex, 503, f"upstream reset before the response ({e})", "UC", grpc)
                return
            for interim in up.interim:
                st.send_headers(interim)
            ex.status = _status(resp)
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

    async def _pump_request(self, st: H2Stream, up: H2Stream, ex: Exchange) -> None:
        try:
            while True:
                data, credit = await st.read()
                if not data and not credit:
                    break
                ex.request_bytes += len(data)
                try:
                    await up.write(data)
                finally:
                    st.ack(credit)
            up.end(st.trailers or None)
        except StreamError:
            if st.reset_code is not None:
                up.reset()  # the client gave up: so does the upstream request
            raise

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


def _grpc_status(headers: Headers) -> str:
    for k, v in headers:
        if k == "grpc-status":
            return v
    return ""
