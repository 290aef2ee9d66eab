"""Relay bytes between two ends (app socket, pod socket, tunnel stream), both ways.

How this works: one pump per direction: read, write, drain (or for a tunnel
stream: wait for flow-control credit), and only then read again, so a slow
receiver slows the sender and nothing buffers without bound. End of stream on
one side becomes a half-close (``write_eof``) on the other; the relay ends when
both directions ended, when either side fails, or when no byte moved in either
direction for ``idle_timeout_s``.

An abnormal end is passed on as an abnormal end, as it would be without the
mesh: when either side fails (a reset, a write error, a reset stream, a dead
tunnel) both are aborted, a socket with SO_LINGER 0 (its peer gets a TCP RST,
never a FIN that would make a truncated transfer look complete) and a tunnel
stream with RST_STREAM ``CONNECT_ERROR`` (RFC 9113 §8.5). Tunnel streams are
released at the end, so the credit of anything left unread comes back.

A socket's end of stream is passed on only once what we sent to that socket's
peer has been delivered (its kernel send queue is empty): a peer that closed
while our data was still on its way answers that data with a reset, and that
reset, not the FIN before it, is what the other side must see (as a client
talking to the server directly would).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.dataplane.tunnel import DRAIN_ABOVE_BYTES, TunnelStream
from agent.proto.h2.frames import ErrorCode

LINGER_ZERO = struct.pack("ii", 1, 0)
SETTLE_TIMEOUT_S = 2.0  # how long an end of stream waits for our data to reach that peer
SETTLE_POLL_S = 0.002
CHUNK_BYTES = 256 * 1024
# StreamReader limit of the sockets the proxy relays (apps, pods): the transport stops reading
# the socket at twice this while the other side is slow, so each relayed connection holds at
# most ~2x this in user space (1 MiB let 200 never-read streams cost 400 MB)
SOCKET_READ_LIMIT = 32 * 1024


class End(Protocol):
    async def read(self) -> tuple[bytes, int]: ...
    def ack(self, credit: int) -> None: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def reusable(self) -> bool: ...


class SocketEnd:
    """An asyncio stream pair over a TCP socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # (uvloop builds a new socket wrapper per get_extra_info call: ask once)
        self.sock = sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def read(self) -> tuple[bytes, int]:
        return await self.reader.read(CHUNK_BYTES), 0

    def ack(self, credit: int) -> None:
        pass

    def failure(self) -> BaseException | None:
        """The error this socket ended with (a reset from its peer), if any."""
        exc = self.reader.exception()
        if exc is not None:
            return exc
        sock = self.sock
        if sock is None:
            return None
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except (OSError, ValueError):
            return None
        return ConnectionResetError(err, os.strerror(err)) if err else None

    def unsent_bytes(self) -> int:
        """Bytes we wrote that the peer has not acknowledged yet (transport + kernel queue)."""
        n = self.writer.transport.get_write_buffer_size()
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                n += struct.unpack("i", buf)[0]
        return n

    async def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise self.failure() or ConnectionResetError(errno.EPIPE, "connection closed")
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() >= DRAIN_ABOVE_BYTES or self.writer.is_closing():
            await self.writer.drain()  # backpressure: wait until the peer reads

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()

    def abort(self) -> None:
        """End abnormally: the peer gets a TCP RST (SO_LINGER 0), not a FIN."""
        sock = self.sock
        if sock is not None and not self.writer.transport.is_closing():
            with contextlib.suppress(OSError, ValueError):  # (uvloop: ValueError once closed)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()

    def reusable(self) -> bool:
        """Open both ways with nothing unread: may carry another request (HTTP pools)."""
        r = self.reader
        unread = len(getattr(r, "_buffer", b""))
        return not (self.writer.is_closing() or r.at_eof() or r.exception() is not None or unread)


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
        self.stream.reset(ErrorCode.CONNECT_ERROR)

    def close(self) -> None:
        """End our side; the peer ends its own (an immediate reset would make a graceful end of
        a pooled stream look abnormal to the far side, which then resets its pod connection)."""
        if self.stream.at_eof and not self.stream.queued_bytes:
            self.stream.release()
        else:
            self.stream.write_eof()

    def reusable(self) -> bool:
        s = self.stream
        return not (s.conn.closed or s.was_reset or s.at_eof or s.queued_bytes)


@dataclass(slots=True)
class RelayResult:
    sent_bytes: int  # a -> b
    received_bytes: int  # b -> a
    idle_timeout: bool = False
    error: str = ""


class _Activity:
    """When a byte last moved, in either direction (the idle timeout's reference)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at


async def relay(
    a: End, b: End, *, idle_timeout_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
) -> RelayResult:
    """Relay until both directions ended, either side failed, or ``idle_timeout_s`` passed
    (by ``clock``) without a byte moving."""
    result = RelayResult(0, 0)
    activity = _Activity(clock())
    # a tunnel stream feeding a socket writes to it directly while it can (see set_sink)
    for src, dst in ((a, b), (b, a)):
        if isinstance(src, TunnelEnd) and isinstance(dst, SocketEnd):
            src.stream.set_sink(dst.writer.transport)

    ended: set[End] = set()

    async def settle(sock: SocketEnd, other: End) -> None:
        """``sock``'s peer ended its side: before passing that on, let what still flows *to*
        that peer (from ``other``) arrive, or fail with the reset the peer answers it with."""
        deadline = clock() + SETTLE_TIMEOUT_S
        # uvloop: a write that met the peer's RST consumed the socket error and scheduled
        # connection_lost(exc) for the next loop pass, while the read already returned EOF.
        # One pass lets that error arrive; a transport closing under us is that error too.
        await asyncio.sleep(0)
        while True:
            exc = sock.failure()
            if exc is None and sock.writer.transport.is_closing():
                exc = ConnectionResetError(errno.ECONNRESET, "connection reset while writing to it")
            if exc is not None:
                raise exc
            queued = other.stream.queued_bytes if isinstance(other, TunnelEnd) else 0
            if (other in ended or queued == 0) and sock.unsent_bytes() == 0:
                return
            if clock() >= deadline:
                return
            await asyncio.sleep(SETTLE_POLL_S)

    async def pump(src: End, dst: End, forward: bool) -> None:
        congested = dst.stream.conn if isinstance(dst, TunnelEnd) and isinstance(src, SocketEnd) else None
        while True:
            if congested is not None:
                # take nothing from the socket while the tunnel cannot send: a peer that stops
                # reading must not make every stream hold a chunk (the kernel holds it instead)
                await congested.drain()
            data, credit = await src.read()
            if not data and not credit:
                if isinstance(src, SocketEnd):
                    await settle(src, dst)  # a reset for our data in flight beats this FIN
                dst.write_eof()
                ended.add(src)
                return
            try:
                if data:
                    await dst.write(data)
                    if forward:
                        result.sent_bytes += len(data)
                    else:
                        result.received_bytes += len(data)
            finally:
                src.ack(credit)  # also when the write failed: those bytes are gone, the credit not
            activity.at = clock()

    def direct() -> int:
        return sum(e.stream.direct_bytes for e in (a, b) if isinstance(e, TunnelEnd))

    async def watchdog() -> None:
        seen = direct()
        while True:
            if direct() != seen:  # bytes written straight to a socket count as activity too
                seen = direct()
                activity.at = clock()
            idle = clock() - activity.at
            if idle >= idle_timeout_s:
                result.idle_timeout = True
                return
            await asyncio.sleep(min(idle_timeout_s - idle + 0.01, 30.0))

    pumps = [asyncio.ensure_future(pump(a, b, True)), asyncio.ensure_future(pump(b, a, False))]
    idle_watch = asyncio.ensure_future(watchdog())
    try:
        pending = set(pumps)
        while pending:
            done, _ = await asyncio.wait([*pending, idle_watch], return_when=asyncio.FIRST_COMPLETED)
            if idle_watch in done:
                break
            for t in done:
                pending.discard(t)
                if t.exception() is not None:
                    result.error = f"{type(t.exception()).__name__}: {t.exception()}"
                    pending.clear()
                    break
        if not result.error and not result.idle_timeout:
            failed = next((e.failure() for e in (a, b) if isinstance(e, SocketEnd) and e.failure()), None)
            if failed is not None:  # a reset that came after both directions ended
                result.error = f"{type(failed).__name__}: {failed}"
        if result.error or result.idle_timeout:
            a.abort()
            b.abort()
    finally:
        for t in (*pumps, idle_watch):
            t.cancel()
        for t in (*pumps, idle_watch):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
    for end in (a, b):
        if isinstance(end, TunnelEnd):
            end.stream.release()
    if isinstance(a, TunnelEnd):
        result.sent_bytes += a.stream.direct_bytes
    if isinstance(b, TunnelEnd):
        result.received_bytes += b.stream.direct_bytes
    return result
