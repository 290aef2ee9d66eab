"""Relay bytes between two ends (app socket, pod socket, tunnel stream), both ways.

How this works: one pump per direction: read, write, drain (or for a tunnel
stream: wait for flow-control credit), and only then read again, so a slow
receiver slows the sender and nothing buffers without bound. End of stream on
one side becomes a half-close (``write_eof``) on the other; the relay ends when
both directions ended, when either side fails (the other is aborted), or when
no byte moved in either direction for ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Protocol

from agent.dataplane.tunnel import TunnelStream

CHUNK_BYTES = 256 * 1024
DRAIN_ABOVE_BYTES = 256 * 1024  # below this the kernel and transport buffers absorb the write


class End(Protocol):
    async def read(self) -> tuple[bytes, int]: ...
    def ack(self, credit: int) -> None: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def abort(self) -> None: ...


class SocketEnd:
    """An asyncio stream pair over a TCP socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def read(self) -> tuple[bytes, int]:
        return await self.reader.read(CHUNK_BYTES), 0

    def ack(self, credit: int) -> None:
        pass

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() >= DRAIN_ABOVE_BYTES or self.writer.is_closing():
            await self.writer.drain()  # backpressure: wait until the peer reads

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()

    def close(self) -> None:
        self.writer.close()


class TunnelEnd:
    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream

    async def read(self) -> tuple[bytes, int]:
        return await self.stream.read()

    def ack(self, credit: int) -> None:
        self.stream.ack(credit)

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    def write_eof(self) -> None:
        self.stream.write_eof()

    def abort(self) -> None:
        self.stream.reset()


@dataclass(slots=True)
class RelayResult:
    sent_bytes: int  # a -> b
    received_bytes: int  # b -> a
    idle_timeout: bool = False
    error: str = ""


async def relay(a: End, b: End, *, idle_timeout_s: float = 3600.0) -> RelayResult:
    result = RelayResult(0, 0)
    last = [time.monotonic()]
    # a tunnel stream feeding a socket writes to it directly while it can (see set_sink)
    for src, dst in ((a, b), (b, a)):
        if isinstance(src, TunnelEnd) and isinstance(dst, SocketEnd):
            src.stream.set_sink(dst.writer.transport)

    async def pump(src: End, dst: End, forward: bool) -> None:
        while True:
            data, credit = await src.read()
            if not data and not credit:
                dst.write_eof()
                return
            if data:
                await dst.write(data)
                if forward:
                    result.sent_bytes += len(data)
                else:
                    result.received_bytes += len(data)
            src.ack(credit)
            last[0] = time.monotonic()

    def direct() -> int:
        return sum(e.stream.direct_bytes for e in (a, b) if isinstance(e, TunnelEnd))

    async def watchdog() -> None:
        seen = direct()
        while True:
            if direct() != seen:  # bytes written straight to a socket count as activity too
                seen = direct()
                last[0] = time.monotonic()
            idle = time.monotonic() - last[0]
            if idle >= idle_timeout_s:
                result.idle_timeout = True
                return
            await asyncio.sleep(min(idle_timeout_s - idle + 0.01, 30.0))

    pumps = [asyncio.ensure_future(pump(a, b, True)), asyncio.ensure_future(pump(b, a, False))]
    dog = asyncio.ensure_future(watchdog())
    try:
        pending = set(pumps)
        while pending:
            done, _ = await asyncio.wait([*pending, dog], return_when=asyncio.FIRST_COMPLETED)
            if dog in done:
                break
            for t in done:
                pending.discard(t)
                if t.exception() is not None:
                    result.error = f"{type(t.exception()).__name__}: {t.exception()}"
                    pending.clear()
                    break
        if result.error or result.idle_timeout:
            a.abort()
            b.abort()
    finally:
        for t in (*pumps, dog):
            t.cancel()
        for t in (*pumps, dog):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    if isinstance(a, TunnelEnd):
        result.sent_bytes += a.stream.direct_bytes
    if isinstance(b, TunnelEnd):
        result.received_bytes += b.stream.direct_bytes
    return result
