"""The agent's small HTTP endpoints: admin API (15000), metrics (15020), health (15021).

How this works: :func:`parse_request` is a strict, sans-I/O parser of one
HTTP/1.1 request head (request line, headers, no body: only GET and HEAD are
served); :class:`HttpEndpoints` is an asyncio server that answers each
request from a table of ``path -> handler`` and closes the connection. It
accepts through a :class:`agent.dataplane.listener.Listener` (limits, EMFILE
back-off, a reserve of descriptors so readiness can still answer when all
others are taken). The servers take their listening socket from the caller, so a restarting agent
can hand them to its successor (see :mod:`agent.handoff`).

Routes (JSON unless noted):

- admin, 127.0.0.1:15000: ``/status``, ``/config_dump``, ``/workloads``,
  ``/certs``, ``/outliers`` (the proxy's outlier detection state per cluster and
  endpoint), ``/healthz/ready`` (text)
- metrics, node address:15020: ``/metrics`` (Prometheus text format)
- health, node address:15021: ``/healthz/ready`` (text), ``/status`` and
  ``/outliers`` (read-only, so ``nodemesh status --node HOST`` and ``nodemesh
  explain --node HOST`` work from another host)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.dataplane.listener import Listener, stream_handler

MAX_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0

_REQUEST_LINE = re.compile(r"(GET|HEAD) (/[!-~]*) HTTP/1\.[01]", re.ASCII)
_HEADER = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([ -~\t]*?)[ \t]*", re.ASCII)


class HttpRequestError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, doc: object, status: int = 200) -> Response:
        return cls(status, (json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n").encode())

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8")


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def parse_request(head: bytes) -> Request:
    """Parse a request head (up to and including the blank line). Raises HttpRequestError."""
    if len(head) > MAX_HEAD_BYTES:
        raise HttpRequestError("request head too large", 431)
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpRequestError("request head is not ASCII") from None
    lines = text.split("\r\n")
    if len(lines) < 3 or lines[-1] != "" or lines[-2] != "":
        raise HttpRequestError("request head does not end with an empty line")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise HttpRequestError(f"unsupported request line {lines[0][:80]!r}", 405 if " " in lines[0] else 400)
    headers: dict[str, str] = {}
    for line in lines[1:-2]:
        h = _HEADER.fullmatch(line)
        if h is None:
            raise HttpRequestError(f"malformed header line {line[:80]!r}")
        headers[h.group(1).lower()] = h.group(2)
    if "content-length" in headers and headers["content-length"] != "0":
        raise HttpRequestError("request bodies are not accepted")
    if "transfer-encoding" in headers:
        raise HttpRequestError("request bodies are not accepted")
    path, _, query = m.group(2).partition("?")
    return Request(m.group(1), path, query, headers)


def render(resp: Response, head_only: bool = False) -> bytes:
    reason = _REASONS.get(resp.status, "Unknown")
    head = (
        f"HTTP/1.1 {resp.status} {reason}\r\nContent-Type: {resp.content_type}\r\n"
        f"Content-Length: {len(resp.body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + resp.body


Handler = Callable[[Request], Awaitable[Response]]


class HttpEndpoints:
    def __init__(self, routes: dict[str, Handler], name: str, listener: Listener | None = None) -> None:
        self.routes = routes
        self.name = name
        self.listener = listener or Listener(name)
        self._task: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        self._task = asyncio.create_task(
            self.listener.serve(sock, stream_handler(self._handle)), name=f"listener {self.name}"
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            try:
                req = parse_request(head)
            except HttpRequestError as e:
                writer.write(render(Response.text(f"{e}\n", e.status)))
                return
            handler = self.routes.get(req.path)
            if handler is None:
                resp = Response.text(f"no such path: {req.path}\n", 404)
            else:
                try:
                    resp = await handler(req)
                except Exception as e:  # a broken handler must not take the endpoint down
                    resp = Response.text(f"internal error: {type(e).__name__}: {e}\n", 500)
            writer.write(render(resp, head_only=req.method == "HEAD"))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        """Stop accepting (the listening socket stays open: its owner closes it)."""
        if self._task is not None:
            self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def listen_tcp(host: str, port: int, backlog: int = 1024, *, reuse_port: bool = False) -> socket.socket:
    """``reuse_port``: SO_REUSEPORT, another socket of the same user may listen on the port too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s
