"""The server name (SNI) of a TLS ClientHello, from the first bytes of a connection. Sans-I/O.

How this works: :func:`client_hello_sni` is fed the bytes a client has sent so far
(peeked, never consumed, so the TLS handshake can still happen on them: the
gateway terminates or passes it through). It answers :data:`NEED_MORE` while the
first handshake record is incomplete, raises :class:`NotTls` for anything that is
not a TLS ClientHello, and otherwise returns the ``server_name`` extension's host
name ("" when the client sent none). Only the first record is read: a ClientHello
split over several records (post-quantum key shares can be) is read as far as the
first record carries it, and a hello whose SNI lies beyond it counts as without SNI.
"""

from __future__ import annotations

import re

NEED_MORE = None
MAX_RECORD_BYTES = 16384 + 5  # a TLS plaintext record: the most the first read can need
_HOST_RE = re.compile(rb"[A-Za-z0-9*]([-A-Za-z0-9.]*[A-Za-z0-9])?\Z", re.ASCII)


class NotTls(ValueError):
    """The bytes are not a TLS ClientHello (or one we cannot read)."""


def client_hello_sni(data: bytes) -> str | None:
    """The SNI host name (lower case), "" if none, or NEED_MORE. Raises NotTls."""
    if len(data) < 5:
        if data and data[0] != 0x16:
            raise NotTls("not a TLS handshake record")
        return NEED_MORE
    if data[0] != 0x16 or data[1] != 3:
        raise NotTls("not a TLS handshake record")
    length = int.from_bytes(data[3:5], "big")
    if length < 4 or length > 16384:
        raise NotTls(f"bad TLS record length {length}")
    if len(data) < 5 + length:
        return NEED_MORE
    body = memoryview(data)[5: 5 + length]
    if body[0] != 1:
        raise NotTls("the first handshake message is not a ClientHello")
    hello_len = int.from_bytes(body[1:4], "big")
    hello = body[4: 4 + min(hello_len, len(body) - 4)]
    try:
        return _sni(hello)
    except IndexError:
        raise NotTls("truncated ClientHello") from None


def _sni(h: memoryview) -> str:
    pos = 2 + 32  # legacy version, random
    pos += 1 + h[pos]  # session id
    pos += 2 + int.from_bytes(h[pos: pos + 2], "big")  # cipher suites
    pos += 1 + h[pos]  # compression methods
    if pos + 2 > len(h):
        return ""  # no extensions
    end = min(len(h), pos + 2 + int.from_bytes(h[pos: pos + 2], "big"))
    pos += 2
    while pos + 4 <= end:
        kind = int.from_bytes(h[pos: pos + 2], "big")
        size = int.from_bytes(h[pos + 2: pos + 4], "big")
        pos += 4
        if kind == 0:  # server_name: list length, then (type, length, name)...
            ext = h[pos: pos + size]
            i = 2
            while i + 3 <= len(ext):
                name_type, n = ext[i], int.from_bytes(ext[i + 1: i + 3], "big")
                name = bytes(ext[i + 3: i + 3 + n])
                if name_type == 0:
                    if len(name) != n or not _HOST_RE.match(name):
                        raise NotTls("bad server_name")
                    return name.decode("ascii").lower().rstrip(".")
                i += 3 + n
            return ""
        pos += size
    return ""
