"""HPACK encoding for the header blocks we send: static table and literals, nothing else.

How this works (RFC 7541): a header whose name and value are in the static table is
one indexed byte; one whose name is there is the name's index and the value as a
literal; any other is two literals. Every literal is "without indexing" and not
Huffman-coded, so this encoder keeps no dynamic table at all and its output depends
on nothing but the headers. Receiving stays the ``hpack`` library's job (a peer may
use the dynamic table and Huffman coding).

Why our own: the ``hpack`` library's encoder, in pure Python, searched and grew its
dynamic table per header and cost ~75 µs per header block; this costs a few µs, and
HTTP/2 requests through the node proxy code four blocks each (measured: HTTP/2
requests per second through both proxies on loopback went 1.6k → 2.5k with Huffman
off and the library's debug logging silenced; this encoder adds the rest).

A peer that lowers SETTINGS_HEADER_TABLE_SIZE gets a dynamic table size update (to 0)
at the start of our next block, as RFC 7541 §4.2 asks; we never use the table anyway.
"""

from __future__ import annotations

from hpack.table import HeaderTable

_FULL: dict[tuple[bytes, bytes], int] = {}
_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _FULL.setdefault((_n, _v), _i)
    _NAME.setdefault(_n, _i)


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with an N-bit prefix; ``first`` carries the pattern bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(s: bytes) -> bytes:
    return _int(len(s), 7, 0x00) + s


class Encoder:
    def __init__(self) -> None:
        self._size_update = False
        self._cache: dict[tuple[str, str], bytes] = {}

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value < 4096:
            self._size_update = True  # the peer's decoder shrank: say ours is 0 (RFC 7541 §4.2)

    def encode(self, headers: list[tuple[str, str]]) -> bytes:
        out = []
        if self._size_update:
            out.append(b"\x20")  # dynamic table size update: 0
            self._size_update = False
        cache = self._cache
        for name, value in headers:
            key = (name, value)
            b = cache.get(key)
            if b is None:
                n = name.encode("utf-8")
                v = value.encode("utf-8")
                full = _FULL.get((n, v))
                if full is not None:
                    b = _int(full, 7, 0x80)
                else:
                    idx = _NAME.get(n)
                    b = (_int(idx, 4, 0x00) if idx is not None else b"\x00" + _literal(n)) + _literal(v)
                if len(cache) < 4096 and len(value) < 128:  # repeated small headers: coded once
                    cache[key] = b
            out.append(b)
        return b"".join(out)
