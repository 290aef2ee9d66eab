"""Which connections are HTTP: declared, or sniffed from the client's first bytes.

The rule (README: "Which connections are HTTP"): a service port's declared
``protocol`` decides; else its ``appProtocol``; else Istio's port-name prefix
(``http-``, ``http2-``, ``grpc-``, ``tcp-``...; see
:func:`agent.control.model.l7_protocol`). A port nothing declares is sniffed:
the client's first bytes are an HTTP/1 request line (a known method and a
space) or the HTTP/2 connection preface, or the connection is TCP. A client
that says nothing within ``sniff_timeout_s`` is TCP at once, so server-first
protocols (MySQL, SMTP, SSH banners) work, after that short wait.

:func:`classify` is pure; :func:`sniff` reads.
"""

from __future__ import annotations

import asyncio
import enum

from agent.control.model import Protocol
from agent.dataplane.tcp import End


class Wire(enum.StrEnum):
    TCP = "tcp"
    HTTP1 = "http1"
    HTTP2 = "http2"


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
_LONGEST = max(len(m) for m in _METHODS) + 1
DEFAULT_SNIFF_TIMEOUT_S = 0.1
SNIFF_MAX_BYTES = 32  # enough to tell; more is never needed


def classify(first: bytes) -> Wire | None:
    """What ``first`` (the client's first bytes) is, or None while it could still be either."""
    if first.startswith(H2_PREFACE):
        return Wire.HTTP2
    if H2_PREFACE.startswith(first):
        return None  # (also the empty string)
    for m in _METHODS:
        if first.startswith(m + b" "):
            return Wire.HTTP1
    if len(first) < _LONGEST and any((m + b" ").startswith(first) for m in _METHODS):
        return None
    return Wire.TCP


def declared_wire(protocol: Protocol | None) -> Wire | None:
    """The wire a declared protocol means; None: not declared (sniff)."""
    if protocol is None:
        return None
    if protocol is Protocol.TCP:
        return Wire.TCP
    if protocol is Protocol.HTTP:
        return Wire.HTTP1  # (an HTTP/2 client on an `http` port is still recognised by its preface)
    return Wire.HTTP2


async def sniff(end: End, timeout_s: float) -> tuple[Wire, bytes]:
    """Read the client's first bytes until they tell; returns the wire and the bytes read
    (to be replayed). No byte within ``timeout_s``, or the end of stream: TCP."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    first = b""
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return Wire.TCP, first
        try:
            async with asyncio.timeout(left):
                data, credit = await end.read()
        except TimeoutError:
            return Wire.TCP, first
        end.ack(credit)
        if not data:
            return Wire.TCP, first
        first += data
        wire = classify(first[:SNIFF_MAX_BYTES])
        if wire is not None:
            return wire, first


async def resolve(declared: Protocol | None, end: End, timeout_s: float) -> tuple[Wire, bytes]:
    """The wire of a connection to a port with ``declared`` protocol (None: sniff)."""
    wire = declared_wire(declared)
    if wire is Wire.TCP:
        return wire, b""
    if wire is None:
        return await sniff(end, timeout_s)
    # declared HTTP: the first bytes still tell HTTP/1 from HTTP/2 (prior knowledge)
    sniffed, first = await sniff(end, timeout_s)
    if sniffed is Wire.TCP:
        return wire, first
    return sniffed, first
