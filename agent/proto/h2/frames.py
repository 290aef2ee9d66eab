"""HTTP/2 frame layer (RFC 9113 §4, §6): bytes <-> frames, no state, no I/O.

Only what the HBONE tunnel needs is interpreted; unknown frame types are
returned as such so the connection can ignore them, as the RFC requires.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_BYTES = 9
DEFAULT_MAX_FRAME_BYTES = 16_384
MAX_ALLOWED_FRAME_BYTES = (1 << 24) - 1
MAX_WINDOW_BYTES = (1 << 31) - 1
DEFAULT_WINDOW_BYTES = 65_535

_HEADER = struct.Struct(">BHBBL")  # length is 24 bits: split as (hi byte, lo 16 bits)


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    END_STREAM: Final = 0x1
    ACK: Final = 0x1
    END_HEADERS: Final = 0x4
    PADDED: Final = 0x8
    PRIORITY: Final = 0x20


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class H2ProtocolError(Exception):
    """The peer broke HTTP/2; ``code`` is what we send in GOAWAY (or RST_STREAM)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR, stream_id: int = 0):
        super().__init__(message)
        self.code = code
        self.stream_id = stream_id  # 0: connection error; else a stream error


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes


def encode(ftype: int, flags: int, stream_id: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    n = len(payload)
    return _HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id & 0x7FFFFFFF) + bytes(payload)


def header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    """Just the 9-byte header, for callers that send a large payload without copying it."""
    return _HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id & 0x7FFFFFFF)


def split(buf: bytearray, max_frame_bytes: int) -> tuple[list[Frame], int]:
    """Parse whole frames at the start of ``buf``; return them and the bytes consumed.

    A frame longer than ``max_frame_bytes`` (what we advertised) is a connection
    error (FRAME_SIZE_ERROR) before its payload even arrives.
    """
    frames: list[Frame] = []
    pos = 0
    end = len(buf)
    while end - pos >= FRAME_HEADER_BYTES:
        hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf, pos)
        length = (hi << 16) | lo
        if length > max_frame_bytes:
            raise H2ProtocolError(
                f"frame of {length} bytes exceeds the advertised maximum of {max_frame_bytes}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if end - pos - FRAME_HEADER_BYTES < length:
            break
        start = pos + FRAME_HEADER_BYTES
        frames.append(Frame(ftype, flags, sid & 0x7FFFFFFF, bytes(buf[start : start + length])))
        pos = start + length
    return frames, pos


def strip_padding(frame: Frame) -> bytes:
    """Payload of a DATA/HEADERS frame without padding (and without HEADERS priority)."""
    data = frame.payload
    pad = 0
    if frame.flags & Flag.PADDED:
        if not data:
            raise H2ProtocolError("PADDED frame without a pad length", stream_id=0)
        pad = data[0]
        data = data[1:]
    if frame.type == FrameType.HEADERS and frame.flags & Flag.PRIORITY:
        if len(data) < 5:
            raise H2ProtocolError("HEADERS priority fields truncated")
        data = data[5:]
    if pad > len(data):
        raise H2ProtocolError(f"pad length {pad} exceeds the payload of {len(data)} bytes")
    return data[: len(data) - pad] if pad else data


def encode_settings(settings: dict[int, int]) -> bytes:
    return b"".join(struct.pack(">HL", k, v) for k, v in settings.items())


def decode_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise H2ProtocolError(
            f"SETTINGS payload of {len(payload)} bytes is not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR
        )
    return [struct.unpack_from(">HL", payload, i) for i in range(0, len(payload), 6)]
