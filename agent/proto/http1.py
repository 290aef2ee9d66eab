"""HTTP/1.1 messages, sans I/O, over httptools (llhttp): bytes in, events out.

How this works: :class:`RequestReader` (server side) and :class:`ResponseReader`
(client side) wrap llhttp's parsers. ``feed(data)`` returns the events the
bytes complete, in order: ``(HEAD, head)``, ``(DATA, bytes)`` (a body's bytes,
already de-chunked), ``(END, trailers)``, ``(UPGRADE, rest)`` (the connection
switches protocol after this message; ``rest`` are the bytes already read past
it). Pipelined requests come out one after another.

llhttp in its strict mode is the smuggling defence: Content-Length together
with Transfer-Encoding, a duplicate or signed Content-Length, a bare LF,
obs-fold, a header name or value with bytes RFC 9110 forbids, a
Transfer-Encoding whose last coding is not ``chunked`` all raise
:class:`H1Error` (400). On top, this module refuses what llhttp lets through
but a proxy must not forward: HTTP/0.9 and versions other than 1.0/1.1 (505),
an HTTP/1.1 request without exactly one Host (400), and heads over the
configured limits (request line: 414; header block: 431). Nothing here
buffers without bound: a head is refused as soon as the bytes fed for it
exceed its limit, and bodies pass through as they arrive.

Serialisation (:func:`request_head`, :func:`response_head`, :func:`chunk`,
:func:`last_chunk`) writes what the proxy sends: the framing is always
regenerated from what was parsed (never the peer's bytes passed on), so the two
sides of the proxy cannot disagree about where a message ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import httptools

HEAD = 0
DATA = 1
END = 2
UPGRADE = 3

Header = tuple[bytes, bytes]  # (lower-case name, value)
Event = tuple[int, object]

# hop-by-hop headers (RFC 9110 §7.6.1): never forwarded, the proxy writes its own framing
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


class H1Error(Exception):
    """A message the proxy refuses; ``status`` is what the client gets (400, 414, 431, 505)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class H1Limits:
    max_request_line_bytes: int = 8 * 1024  # over: 414
    max_header_bytes: int = 64 * 1024  # the whole head; over: 431 (Envoy's default is 60 KiB)
    max_headers: int = 100  # over: 431 (Envoy's default)

    def __post_init__(self) -> None:
        for name in ("max_request_line_bytes", "max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # request-target as sent (origin form for normal requests)
    version: str  # "1.0" or "1.1"
    headers: list[Header]
    keep_alive: bool
    chunked: bool = False
    content_length: int | None = None
    upgrade: bytes = b""  # the Upgrade header's value when the client asks to switch
    expect_continue: bool = False

    def get(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def authority(self) -> str:
        host = self.get(b"host")
        return host.decode("latin-1") if host is not None else ""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: list[Header]
    keep_alive: bool
    chunked: bool = False
    content_length: int | None = None
    until_close: bool = False  # no length: the body ends when the server closes

    def get(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(slots=True)
class _Message:
    headers: list[Header] = field(default_factory=list)
    trailers: list[Header] = field(default_factory=list)
    url: bytes = b""
    status_text: bytes = b""
    in_head: bool = True
    header_bytes: int = 0


def _framing(headers: list[Header]) -> tuple[bool, int | None]:
    chunked = False
    length: int | None = None
    for k, v in headers:
        if k == b"transfer-encoding":
            chunked = v.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        elif k == b"content-length":
            length = int(v)  # llhttp checked it: digits only, one value
    return chunked, length


class _Reader:
    def __init__(self, limits: H1Limits) -> None:
        self.limits = limits
        self._msg: _Message | None = None
        self._events: list[Event] = []
        self._fed_in_head = 0  # bytes fed since the current head began

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self._msg = _Message()
        self._fed_in_head = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        m = self._msg
        assert m is not None
        if not m.in_head:
            m.trailers.append((name.lower(), value))
            if len(m.trailers) > self.limits.max_headers:
                raise H1Error(431, f"more than {self.limits.max_headers} trailers")
            return
        m.header_bytes += len(name) + len(value) + 4
        if m.header_bytes > self.limits.max_header_bytes:
            raise H1Error(431, f"header block over {self.limits.max_header_bytes} bytes")
        m.headers.append((name.lower(), value))
        if len(m.headers) > self.limits.max_headers:
            raise H1Error(431, f"more than {self.limits.max_headers} headers")

    def on_body(self, body: bytes) -> None:
        self._events.append((DATA, body))

    def on_message_complete(self) -> None:
        m = self._msg
        self._events.append((END, m.trailers if m is not None else []))
        self._msg = None

    def _check_head_size(self, n: int) -> None:
        m = self._msg
        if m is not None and m.in_head:
            self._fed_in_head += n
            if self._fed_in_head > self.limits.max_header_bytes + self.limits.max_request_line_bytes:
                raise H1Error(431, f"request head over {self.limits.max_header_bytes} bytes")


class RequestReader(_Reader):
    """Server side: requests from a client connection."""

    def __init__(self, limits: H1Limits | None = None) -> None:
        super().__init__(limits or H1Limits())
        self._parser = httptools.HttpRequestParser(self)
        self.upgraded = False

    def on_url(self, url: bytes) -> None:
        m = self._msg
        assert m is not None
        m.url += url
        if len(m.url) > self.limits.max_request_line_bytes:
            raise H1Error(414, f"request target over {self.limits.max_request_line_bytes} bytes")

    def on_headers_complete(self) -> None:
        m = self._msg
        assert m is not None
        m.in_head = False
        p = self._parser
        version = p.get_http_version()
        if version not in ("1.1", "1.0"):
            raise H1Error(505, f"HTTP/{version} is not supported (HTTP/1.0 and 1.1 are)")
        hosts = sum(1 for k, _ in m.headers if k == b"host")
        if version == "1.1" and hosts != 1:
            raise H1Error(400, "an HTTP/1.1 request needs exactly one Host header" + (
                f" (it has {hosts})" if hosts else ""))
        chunked, length = _framing(m.headers)
        upgrade = b""
        expect = False
        for k, v in m.headers:
            if k == b"upgrade":
                upgrade = v
            elif k == b"expect" and v.lower() == b"100-continue":
                expect = True
        self._events.append(
            (
                HEAD,
                RequestHead(
                    method=p.get_method().decode("ascii"),
                    target=m.url.decode("latin-1"),
                    version=version,
                    headers=m.headers,
                    keep_alive=p.should_keep_alive(),
                    chunked=chunked,
                    content_length=length,
                    upgrade=upgrade if p.should_upgrade() else b"",
                    expect_continue=expect,
                ),
            )
        )

    def feed(self, data: bytes) -> list[Event]:
        """Events the bytes complete. Raises :class:`H1Error` for a message to refuse."""
        events: list[Event] = []
        self._events = events
        if self.upgraded:
            raise H1Error(400, "bytes after a protocol switch")  # (the caller relays them instead)
        self._check_head_size(len(data))
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            events.append((UPGRADE, data[int(e.args[0]) :]))
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, H1Error):
                raise e.__context__ from None
            raise H1Error(400, f"malformed request: {e}") from None
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, H1Error):
                raise e.__context__ from None
            raise H1Error(400, f"malformed request: {e}") from None
        if self._msg is not None and self._msg.in_head:
            self._check_head_size(0)
        return events

    @property
    def idle(self) -> bool:
        """No message begun: between requests."""
        return self._msg is None


class _StopAtHead(Exception):
    pass


class ResponseReader(_Reader):
    """Client side: the response(s) to one request (interim 1xx ones, then the final one).
    ``head_only``: the request was HEAD, the response has no body whatever its headers say."""

    def __init__(self, *, head_only: bool = False, limits: H1Limits | None = None) -> None:
        super().__init__(limits or H1Limits(max_header_bytes=256 * 1024, max_headers=500))
        self._parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.final: ResponseHead | None = None
        self.done = False
        self.extra = False  # bytes after the final response (the connection is not reusable)
        self.rest = b""  # head_only: bytes after the head (a CONNECT's tunnelled data)
        self._tail = b""

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True
        super().on_message_begin()

    def on_status(self, status: bytes) -> None:
        m = self._msg
        assert m is not None
        m.status_text += status

    def on_headers_complete(self) -> None:
        m = self._msg
        assert m is not None
        m.in_head = False
        p = self._parser
        status = p.get_status_code()
        chunked, length = _framing(m.headers)
        head = ResponseHead(
            status=status,
            reason=m.status_text,
            version=p.get_http_version(),
            headers=m.headers,
            keep_alive=p.should_keep_alive(),
            chunked=chunked,
            content_length=length,
            until_close=(
                not chunked
                and length is None
                and status >= 200
                and status not in (204, 304)
                and not self.head_only
            ),
        )
        self._events.append((HEAD, head))
        if status >= 200 or status == 101:
            self.final = head
            if self.head_only:
                raise _StopAtHead

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.final is not None:
            self.done = True

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        self._events = events
        if self.done:
            if data:
                self.extra = True
            return events
        self._check_head_size(len(data))
        prev = self._tail
        if self.head_only:
            self._tail = data[-3:]
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            events.append((UPGRADE, data[int(e.args[0]) :]))
            self.done = True
        except (httptools.HttpParserCallbackError, httptools.HttpParserError) as e:
            ctx = e.__context__
            if isinstance(ctx, _StopAtHead):
                events.append((END, []))
                self.done = True
                seen = prev + data
                end = seen.find(b"\r\n\r\n")
                self.rest = seen[end + 4 :] if end >= 0 else b""
                self.extra = bool(self.rest)
                return events
            if isinstance(ctx, H1Error):
                raise H1Error(502, f"upstream response refused: {ctx}") from None
            raise H1Error(502, f"malformed upstream response: {e}") from None
        return events

    def eof(self) -> list[Event]:
        """The server closed: the end of a body that runs until close, else an error."""
        if self.final is not None and self.final.until_close and not self.done:
            self.done = True
            return [(END, [])]
        if self.done:
            return []
        raise H1Error(502, "upstream closed the connection before the response ended")


def _headers_bytes(out: list[bytes], headers: Iterable[Header]) -> None:
    for k, v in headers:
        out += (k, b": ", v, b"\r\n")


def request_head(method: str, target: str, headers: Iterable[Header], framing: Iterable[Header]) -> bytes:
    out = [method.encode("ascii"), b" ", target.encode("latin-1"), b" HTTP/1.1\r\n"]
    _headers_bytes(out, headers)
    _headers_bytes(out, framing)
    out.append(b"\r\n")
    return b"".join(out)


def response_head(
    status: int, reason: bytes, headers: Iterable[Header], framing: Iterable[Header], version: str = "1.1"
) -> bytes:
    out = [b"HTTP/", version.encode("ascii"), b" %d " % status, reason or b"-", b"\r\n"]
    _headers_bytes(out, headers)
    _headers_bytes(out, framing)
    out.append(b"\r\n")
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Iterable[Header] = ()) -> bytes:
    out = [b"0\r\n"]
    _headers_bytes(out, trailers)
    out.append(b"\r\n")
    return b"".join(out)


def end_to_end(headers: list[Header]) -> list[Header]:
    """The headers a proxy forwards: without hop-by-hop ones and those ``connection`` names."""
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    return [(k, v) for k, v in headers if k not in drop and k != b"content-length"]


REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def local_reply(status: int, message: str, *, close: bool, extra: Iterable[Header] = ()) -> bytes:
    """A response the proxy itself generates: says so (``server: nodemesh``) and why."""
    body = message.encode("utf-8", "replace") + b"\n" if message else b""
    headers: list[Header] = [
        (b"server", b"nodemesh"),
        (b"content-type", b"text/plain; charset=utf-8"),
        *extra,
    ]
    framing: list[Header] = [(b"content-length", b"%d" % len(body))]
    if close:
        framing.append((b"connection", b"close"))
    return response_head(status, REASONS.get(status, b"-"), headers, framing) + body
