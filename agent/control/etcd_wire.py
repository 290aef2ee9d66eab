"""The few etcd v3 protobuf messages nodemesh sends and reads, encoded by hand.

How this works: etcd's API is gRPC with protobuf messages (``etcdserverpb`` in
etcd's ``rpc.proto`` and ``mvccpb`` in ``kv.proto``). We use a handful of them
and only some of their fields, so instead of generated code (and a protobuf
runtime) this module writes and reads the protobuf wire format directly:
varints, and length-delimited fields for bytes and nested messages. Our own
gRPC client (``agent/control/h2grpc.py``, over the sans-I/O HTTP/2 core in
``agent/proto/h2``) carries the bytes; grpcio is not used at run time.

Field numbers are etcd's; unknown fields in responses are skipped, as
protobuf requires, so a newer etcd that adds fields still decodes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

# wire types
_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


class WireError(ValueError):
    """Bytes that are not the protobuf message we expected."""


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 negatives are ten-byte two's complement
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def f_bytes(field: int, value: bytes) -> bytes:
    return _tag(field, _LEN) + _varint(len(value)) + value


def f_int(field: int, value: int) -> bytes:
    return _tag(field, _VARINT) + _varint(value) if value else b""


def f_bool(field: int, value: bool) -> bytes:
    return _tag(field, _VARINT) + b"\x01" if value else b""


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each varint or LEN field; others skipped."""
    b = bytes(buf)
    i, end = 0, len(b)
    while i < end:
        key, i = _varint_at(b, i, end)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            v, i = _varint_at(b, i, end)
            yield field, wire, v - (1 << 64) if v >= 1 << 63 else v
        elif wire == _LEN:
            n, i = _varint_at(b, i, end)
            if i + n > end:
                raise WireError(f"field {field} says {n} bytes, {end - i} left")
            yield field, wire, b[i:i + n]
            i += n
        else:
            i = _skip(b, wire, i, end)


# -- requests ----------------------------------------------------------------------------

def range_request(key: bytes, range_end: bytes, *, revision: int = 0) -> bytes:
    return f_bytes(1, key) + f_bytes(2, range_end) + f_int(4, revision)


def _put(key: bytes, value: bytes) -> bytes:
    return f_bytes(1, key) + f_bytes(2, value)


def request_op_put(key: bytes, value: bytes) -> bytes:
    return f_bytes(2, _put(key, value))


def request_op_delete(key: bytes) -> bytes:
    return f_bytes(3, f_bytes(1, key))


# Compare.CompareResult / CompareTarget
CMP_LESS = 2
TARGET_MOD = 2


def compare_mod_less(key: bytes, mod_revision: int) -> bytes:
    return f_int(1, CMP_LESS) + f_int(2, TARGET_MOD) + f_bytes(3, key) + f_int(6, mod_revision)


def txn_request(compares: Iterable[bytes], success: Iterable[bytes]) -> bytes:
    return b"".join([*(f_bytes(1, c) for c in compares), *(f_bytes(2, op) for op in success)])


def compaction_request(revision: int, physical: bool) -> bytes:
    return f_int(1, revision) + f_bool(2, physical)


def watch_create_request(key: bytes, range_end: bytes, start_revision: int) -> bytes:
    create = f_bytes(1, key) + f_bytes(2, range_end) + f_int(3, start_revision)
    return f_bytes(1, create)


# -- responses ---------------------------------------------------------------------------

class KeyValue(NamedTuple):
    key: bytes
    value: bytes
    mod_revision: int


# One per key in every answer: built with tuple.__new__ directly (no Python frame).
_kv = functools.partial(tuple.__new__, KeyValue)


def header_revision(buf: bytes | memoryview) -> int:
    for f, _, v in fields(buf):
        if f == 3 and isinstance(v, int):
            return v
    return 0


def _varint_at(b: bytes, i: int, end: int) -> tuple[int, int]:
    """(value, next index) of the varint at ``b[i]``."""
    if i < end and b[i] < 0x80:
        return b[i], i + 1
    x = 0
    shift = 0
    while True:
        if i >= end:
            raise WireError("truncated varint")
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            return x, i
        shift += 7


def _skip(b: bytes, wt: int, i: int, end: int) -> int:
    """Index after a field value of wire type ``wt`` starting at ``i``."""
    if wt == _VARINT:
        return _varint_at(b, i, end)[1]
    if wt == _LEN:
        n, i = _varint_at(b, i, end)
        i += n
    elif wt == _I64:
        i += 8
    elif wt == _I32:
        i += 4
    else:
        raise WireError(f"unsupported wire type {wt}")
    if i > end:
        raise WireError("field runs past the end of its message")
    return i


def _kv_at(b: bytes, i: int, end: int) -> KeyValue:
    """mvccpb.KeyValue in ``b[i:end]``: key=1, mod_revision=3, value=5 (others skipped).

    The hottest decoder (one per key in a watch or range answer), so it walks
    indexes into one buffer instead of slicing views field by field."""
    key = value = b""
    mod = 0
    while i < end:
        tag = b[i]
        if tag < 0x80:
            i += 1
        else:
            tag, i = _varint_at(b, i, end)
        wt = tag & 7
        if tag == 0x0A or tag == 0x2A:  # key, value
            n = b[i] if i < end else 0x80
            if n < 0x80:
                i += 1
            else:
                n, i = _varint_at(b, i, end)
            if i + n > end:
                raise WireError(f"field {tag >> 3} says {n} bytes, {end - i} left")
            if tag == 0x0A:
                key = b[i:i + n]
            else:
                value = b[i:i + n]
            i += n
        elif tag == 0x18:  # mod_revision
            mod, i = _varint_at(b, i, end)
        else:
            i = _skip(b, wt, i, end)
    return _kv((key, value, mod))


def range_response(buf: bytes) -> tuple[int, list[KeyValue]]:
    """(header revision, kvs)."""
    rev = 0
    kvs: list[KeyValue] = []
    for field, _, v in fields(buf):
        if isinstance(v, bytes):
            if field == 2:
                kvs.append(_kv_at(v, 0, len(v)))
            elif field == 1:
                rev = header_revision(v)
    return rev, kvs


def txn_response(buf: bytes) -> tuple[int, bool]:
    """(header revision, succeeded)."""
    rev = 0
    ok = False
    for f, _, v in fields(buf):
        if f == 1 and isinstance(v, bytes):
            rev = header_revision(v)
        elif f == 2 and isinstance(v, int):
            ok = bool(v)
    return rev, ok


EVENT_PUT = 0
EVENT_DELETE = 1


@dataclass(frozen=True, slots=True)
class WatchResponse:
    revision: int  # header revision
    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    events: tuple[tuple[int, KeyValue], ...]  # (EVENT_PUT | EVENT_DELETE, kv)


def _event(b: bytes) -> tuple[int, KeyValue]:
    """mvccpb.Event: type=1 (PUT=0, DELETE=1), kv=2 (prev_kv=3 is never asked for)."""
    etype = EVENT_PUT
    kv = _kv((b"", b"", 0))
    i, end = 0, len(b)
    while i < end:
        t, i = _varint_at(b, i, end)
        if t == 0x08:
            etype, i = _varint_at(b, i, end)
        elif t == 0x12:
            n, i = _varint_at(b, i, end)
            if i + n > end:
                raise WireError(f"event kv says {n} bytes, {end - i} left")
            kv = _kv_at(b, i, i + n)
            i += n
        else:
            i = _skip(b, t & 7, i, end)
    return etype, kv


def watch_response(buf: bytes) -> WatchResponse:
    rev = compact = 0
    created = canceled = False
    reason = ""
    events: list[tuple[int, KeyValue]] = []
    for field, _, v in fields(buf):
        if isinstance(v, bytes):
            if field == 11:
                events.append(_event(v))
            elif field == 1:
                rev = header_revision(v)
            elif field == 6:
                reason = v.decode(errors="replace")
        elif field == 3:
            created = bool(v)
        elif field == 4:
            canceled = bool(v)
        elif field == 5:
            compact = v
    return WatchResponse(rev, created, canceled, compact, reason, tuple(events))
