"""Accepting connections on a listening socket, whatever peers and the kernel do.

How this works: every TCP listener of the agent (outbound 15001, HBONE 15008,
DNS 15053, admin, metrics, health) runs :meth:`Listener.serve`. It accepts in
batches on the non-blocking socket and runs each connection's handler in its
own task; when the listener has nothing pending it waits for readability.

- Descriptors or kernel memory running out (``EMFILE``, ``ENFILE``,
  ``ENOBUFS``, ``ENOMEM``) never ends the loop: it backs off briefly
  (:func:`backoff_s`), counts the error, logs one line per listener per
  interval (:class:`LogLimiter`) and tries again. From the first such error
  until an accept succeeds (or nothing is pending) the listener reports that
  it cannot accept (:meth:`Listener.health`): readiness and ``nodemesh status``
  read this.
- Errors about one pending connection (reset before it was accepted) are
  skipped; any other error means the socket was closed under us: the loop ends.
- Limits (:class:`ListenerLimits`, kept by the pure :class:`ConnectionTable`):
  at most so many open connections per listener and per peer address; a
  connection over a limit is reset at once and counted.
- The agent's own endpoints (admin, health, metrics) get a small
  :class:`FdReserve`: descriptors held open for the moment all others are
  taken, released one at a time to accept an operator's request, taken back
  by the next listener that retries. So ``/healthz/ready`` can still say that
  the agent cannot accept on 15008.

What it does not do: TLS, reading, timeouts of a connection. The handler owns
the accepted socket (and closes it); its slot is freed when the handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.metrics.istio import MeshMetrics
from agent.ratelog import LogLimiter

log = logging.getLogger(__name__)

# no descriptor or no kernel memory for the new socket: the listener is fine, the process is not
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# the pending connection itself went away (or a firewall refused it): skip it
CONNECTION_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
     errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}
)
ACCEPT_BATCH = 64  # accepts per wake-up before other tasks get a turn
LOG_INTERVAL_S = 10.0
FIRST_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.2

Handler = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int = 16384
    max_connections_per_peer: int = 2048

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ValueError(f"connection limits must be at least 1, got {self}")
        if self.max_connections_per_peer > self.max_connections:
            raise ValueError(
                f"max_connections_per_peer ({self.max_connections_per_peer}) is above "
                f"max_connections ({self.max_connections})"
            )


class ConnectionTable:
    """Open connections of one listener, in total and per peer address (pure bookkeeping)."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self.open = 0
        self._per_peer: dict[str, int] = {}

    def admit(self, peer: str) -> str | None:
        """Take a slot for a new connection from ``peer``; or the reason it is refused."""
        if self.open >= self.limits.max_connections:
            return "listener_limit"
        n = self._per_peer.get(peer, 0)
        if n >= self.limits.max_connections_per_peer:
            return "peer_limit"
        self._per_peer[peer] = n + 1
        self.open += 1
        return None

    def release(self, peer: str) -> None:
        n = self._per_peer.get(peer, 0)
        if n <= 0:
            raise ValueError(f"release of a connection from {peer} that was not admitted")
        if n == 1:
            del self._per_peer[peer]
        else:
            self._per_peer[peer] = n - 1
        self.open -= 1

    def of_peer(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)


def backoff_s(consecutive_errors: int) -> float:
    """Pause before the next accept after ``consecutive_errors`` resource errors in a row."""
    if consecutive_errors <= 0:
        return 0.0
    return min(FIRST_BACKOFF_S * float(2 ** min(consecutive_errors - 1, 16)), MAX_BACKOFF_S)


class FdReserve:
    """A few descriptors held open on /dev/null, handed back for one accept when all are taken."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._fds: list[int] = []
        self.refill()

    def refill(self) -> None:
        while len(self._fds) < self.size:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release(self) -> bool:
        """Close one held descriptor; False when none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True

    @property
    def held(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


@dataclass(frozen=True, slots=True)
class ListenerHealth:
    name: str
    accepting: bool
    failing_for_s: float | None  # since the first error of the current run of errors
    last_error: str | None  # e.g. "EMFILE (Too many open files)"
    accept_errors: int
    refused: int
    open_connections: int

    def problem(self) -> str | None:
        if self.accepting:
            return None
        return f"listener {self.name} cannot accept for {self.failing_for_s or 0.0:.1f}s: {self.last_error}"

    def to_doc(self) -> dict[str, object]:
        return {
            "accepting": self.accepting,
            "failing_for_s": None if self.failing_for_s is None else round(self.failing_for_s, 1),
            "last_error": self.last_error,
            "accept_errors": self.accept_errors,
            "refused": self.refused,
            "open_connections": self.open_connections,
        }


def _errno_text(code: int) -> str:
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    conn.close()


class _Readable:
    """Waits for a listening socket to have a connection pending. The reader stays
    registered between waits (adding and removing it per wait cost ~11 µs per accepted
    connection under uvloop); :meth:`stop` removes it, the next :meth:`wait` adds it again."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.fd = sock.fileno()
        self.event = asyncio.Event()
        self.watching = False

    async def wait(self) -> None:
        self.event.clear()
        if not self.watching:
            self.loop.add_reader(self.fd, self.event.set)
            self.watching = True
        await self.event.wait()

    def stop(self) -> None:
        if self.watching:
            self.watching = False
            with contextlib.suppress(ValueError, OSError):  # (the socket closed under us)
                self.loop.remove_reader(self.fd)


class Listener:
    """The accept side of one listening socket: loop, limits, and what readiness reads."""

    def __init__(
        self,
        name: str,
        limits: ListenerLimits | None = None,
        *,
        metrics: MeshMetrics | None = None,
        reserve: FdReserve | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_limiter: LogLimiter | None = None,
    ) -> None:
        self.name = name
        self.table = ConnectionTable(limits or ListenerLimits())
        self.metrics = metrics
        self.reserve = reserve
        self.clock = clock
        self.logs = log_limiter or LogLimiter(LOG_INTERVAL_S)
        self.accept_errors = 0
        self.refused = 0
        self._failing_since_s: float | None = None
        self._last_errno: int | None = None
        self._consecutive = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._open_gauge = None if metrics is None else metrics.listener_connections.labels(name)

    # -- state -----------------------------------------------------------------------------

    def health(self) -> ListenerHealth:
        since = self._failing_since_s
        return ListenerHealth(
            name=self.name,
            accepting=since is None,
            failing_for_s=None if since is None else max(0.0, self.clock() - since),
            last_error=None if self._last_errno is None else _errno_text(self._last_errno),
            accept_errors=self.accept_errors,
            refused=self.refused,
            open_connections=self.table.open,
        )

    def _failed(self, code: int) -> None:
        now = self.clock()
        self.accept_errors += 1
        self._consecutive += 1
        self._last_errno = code
        if self._failing_since_s is None:
            self._failing_since_s = now
        if self.metrics is not None:
            self.metrics.listener_accept_errors.labels(self.name, errno.errorcode.get(code, str(code))).inc()
        n = self.logs.tick(f"{self.name}:fail", now)
        if n is not None:
            log.warning(
                "listener %s cannot accept: %s (%d errors since the last line); backing off, still accepting",
                self.name, _errno_text(code), n,
            )

    def _accepting(self) -> None:
        if self._failing_since_s is None:
            return
        failed_for = self.clock() - self._failing_since_s
        self._failing_since_s = None
        self._consecutive = 0
        if self.logs.tick(f"{self.name}:recover", self.clock()) is not None:
            log.info("listener %s accepts again after %.1fs", self.name, failed_for)

    def _refuse(self, conn: socket.socket, peer: str, reason: str) -> None:
        _reset(conn)
        self.refused += 1
        if self.metrics is not None:
            self.metrics.listener_refused.labels(self.name, reason).inc()
        n = self.logs.tick(f"{self.name}:{reason}", self.clock())
        if n is not None:
            lim = self.table.limits
            log.warning(
                "listener %s: refused a connection from %s over the %s (%d per listener, %d per peer); "
                "%d refused since the last line",
                self.name, peer, reason.replace("_", " "), lim.max_connections,
                lim.max_connections_per_peer, n,
            )

    # -- the loop --------------------------------------------------------------------------

    async def serve(self, sock: socket.socket, handle: Handler) -> None:
        """Accept until cancelled or until the socket is closed under us."""
        sock.setblocking(False)
        ready = _Readable(asyncio.get_running_loop(), sock)
        try:
            await self._accept_loop(sock, handle, ready)
        finally:
            ready.stop()

    async def _accept_loop(self, sock: socket.socket, handle: Handler, ready: _Readable) -> None:
        accepted = 0
        while True:
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                self._accepting()  # nothing pending: nothing we fail to accept
                accepted = 0
                await ready.wait()
                continue
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    if self.reserve is not None and self.reserve.release():
                        continue  # one held descriptor freed: accept this one with it
                    self._failed(e.errno)
                    ready.stop()  # (pending connections would wake the loop all through the pause)
                    await asyncio.sleep(backoff_s(self._consecutive))
                    if self.reserve is not None:
                        self.reserve.refill()
                    continue
                if e.errno in CONNECTION_ERRNOS:
                    continue
                log.info("listener %s: accept loop ends, the socket is closed: %s", self.name, e)
                return
            self._accepting()
            self._start(conn, addr, handle)
            accepted += 1
            if accepted >= ACCEPT_BATCH:
                accepted = 0
                await asyncio.sleep(0)

    def _start(self, conn: socket.socket, addr: tuple[str, int], handle: Handler) -> None:
        peer = addr[0] if isinstance(addr, tuple) else ""
        reason = self.table.admit(peer)
        if reason is not None:
            self._refuse(conn, peer, reason)
            return
        conn.setblocking(False)
        if self._open_gauge is not None:
            self._open_gauge.inc()
        task = asyncio.create_task(self._run(conn, (addr[0], addr[1]), peer, handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: socket.socket, addr: tuple[str, int], peer: str, handle: Handler) -> None:
        try:
            await handle(conn, addr)  # it owns the socket from here on, and closes it
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler's bug must not end the listener, nor log a traceback
            log.warning("listener %s: connection from %s failed: %s: %s", self.name, addr[0],
                        type(e).__name__, e)
        finally:
            self.table.release(peer)
            if self._open_gauge is not None:
                self._open_gauge.dec()
            if self.reserve is not None:
                self.reserve.refill()

    async def cancel_connections(self) -> None:
        """Cancel every connection's handler still running and wait for them."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def stream_handler(callback: StreamCallback, *, limit: int = 1 << 16) -> Handler:
    """A :data:`Handler` for callbacks written for ``asyncio.start_server`` (reader, writer)."""

    async def handle(conn: socket.socket, _addr: tuple[str, int]) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=limit)
        except OSError:
            conn.close()
            return
        try:
            await callback(reader, writer)
        except BaseException:
            writer.transport.abort()
            raise

    return handle
