"""Upstream HTTP connections, pooled per endpoint: pool -> connection -> exchange.

How this works (as httpcore arranges it): a :class:`UpstreamPool` keeps idle
:class:`Upstream` connections per key (source identity, endpoint address and
port, protocol); a request takes one (:meth:`UpstreamPool.acquire`) or dials a
new one with the caller's dial function, and gives it back
(:meth:`UpstreamPool.release`) when its exchange ended cleanly with both sides
willing to keep it. An upstream connection is an :class:`~agent.dataplane.tcp.End`:
a socket to a pod on this node, or an HBONE stream to a pod on another node,
so requests reuse tunnel streams (and the TLS connections under them) across
client connections. One exchange at a time per HTTP/1.1 upstream connection.

Limits: at most ``max_idle_per_key`` idle connections per key (a surplus one
is closed on release) and idle ones older than ``idle_timeout_s`` are closed
by :meth:`reap`. A connection the server closed while idle is found on
acquire (:meth:`~agent.dataplane.tcp.End.reusable`) and dropped, never used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.dataplane.http.h2session import H2Session
from agent.dataplane.tcp import End

Clock = Callable[[], float]
UpstreamKey = tuple[str, str, int, str]  # (source principal, address, port, protocol)
Dial = Callable[[], Awaitable[End]]


@dataclass(slots=True, eq=False)
class Upstream:
    key: UpstreamKey
    end: End
    reused: bool = False
    idle_since: float = 0.0
    requests: int = 0
    # the destination's connectionPool (0: the pool's limits): maxRequestsPerConnection, idleTimeout
    max_requests: int = 0
    idle_timeout_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_idle_per_key: int = 64
    idle_timeout_s: float = 60.0  # an idle upstream connection is closed after this long
    max_requests_per_connection: int = 0  # 0: unlimited

    def __post_init__(self) -> None:
        if self.max_idle_per_key < 0:
            raise ValueError(f"max_idle_per_key must be >= 0, got {self.max_idle_per_key}")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0, got {self.idle_timeout_s}")


@dataclass(slots=True)
class PoolStats:
    dials: int = 0
    reuses: int = 0
    stale: int = 0  # idle connections found closed by the server on acquire


@dataclass(slots=True)
class UpstreamPool:
    limits: PoolLimits = field(default_factory=PoolLimits)
    clock: Clock = time.monotonic
    stats: PoolStats = field(default_factory=PoolStats)
    _idle: dict[UpstreamKey, list[Upstream]] = field(default_factory=dict)

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def acquire(self, key: UpstreamKey, dial: Dial, *, fresh: bool = False) -> Upstream:
        """An idle connection for ``key``, or a new one from ``dial`` (always, if ``fresh``)."""
        conns = None if fresh else self._idle.get(key)
        while conns:
            up = conns.pop()
            if up.end.reusable():
                up.reused = True
                self.stats.reuses += 1
                return up
            self.stats.stale += 1
            up.end.close()
        end = await dial()
        self.stats.dials += 1
        return Upstream(key, end)

    def release(self, up: Upstream, reusable: bool) -> None:
        """The exchange on ``up`` ended; ``reusable``: both sides keep the connection."""
        up.requests += 1
        lim = self.limits
        most = up.max_requests or lim.max_requests_per_connection
        if not reusable or (most and up.requests >= most) or not up.end.reusable():
            up.end.close()
            return
        conns = self._idle.setdefault(up.key, [])
        if len(conns) >= lim.max_idle_per_key:
            up.end.close()
            return
        up.idle_since = self.clock()
        conns.append(up)

    def discard(self, up: Upstream) -> None:
        """The exchange on ``up`` failed: the connection ends abnormally."""
        up.end.abort()

    def reap(self) -> int:
        """Close connections idle for longer than the idle timeout."""
        now = self.clock()
        default = self.limits.idle_timeout_s
        closed = 0
        for key, conns in list(self._idle.items()):
            keep = [u for u in conns
                    if u.idle_since > now - (u.idle_timeout_s or default) and u.end.reusable()]
            for u in conns:
                if u not in keep:
                    u.end.close()
                    closed += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return closed

    def close(self) -> None:
        for conns in self._idle.values():
            for u in conns:
                u.end.close()
        self._idle.clear()


class H2Pool:
    """Upstream HTTP/2 sessions per key, shared by concurrent requests (up to
    ``max_streams`` each); a per-key lock makes concurrent requests share one new dial."""

    def __init__(
        self, limits: PoolLimits | None = None, *, max_streams: int = 100, clock: Clock = time.monotonic
    ) -> None:
        self.limits = limits or PoolLimits()
        self.max_streams = max_streams
        self.clock = clock
        self.stats = PoolStats()
        self._sessions: dict[UpstreamKey, list[H2Session]] = {}
        self._locks: dict[UpstreamKey, asyncio.Lock] = {}

    def _usable(self, key: UpstreamKey) -> H2Session | None:
        live = [s for s in self._sessions.get(key, ()) if not s.closed]
        if live:
            self._sessions[key] = live
        else:
            self._sessions.pop(key, None)
        for s in live:
            if s.can_open() and s.active_streams < self.max_streams:
                return s
        return None

    async def acquire(self, key: UpstreamKey, dial: Dial, *, fresh: bool = False) -> H2Session:
        s = None if fresh else self._usable(key)
        if s is not None:
            self.stats.reuses += 1
            return s
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            s = None if fresh else self._usable(key)
            if s is None:
                end = await dial()
                self.stats.dials += 1
                s = H2Session(end, client=True, name=f"{key[1]}:{key[2]}")
                s.start()
                self._sessions.setdefault(key, []).append(s)
            else:
                self.stats.reuses += 1
        if not lock.locked() and key not in self._sessions:
            self._locks.pop(key, None)
        return s

    async def reap(self) -> int:
        cutoff = self.clock() - self.limits.idle_timeout_s
        closed = 0
        for key, sessions in list(self._sessions.items()):
            for s in list(sessions):
                if s.closed or (s.active_streams == 0 and s.last_used <= cutoff):
                    await s.close()
                    sessions.remove(s)
                    closed += 1
            if not sessions:
                del self._sessions[key]
                self._locks.pop(key, None)
        return closed

    async def close(self) -> None:
        for sessions in self._sessions.values():
            for s in sessions:
                await s.close()
        self._sessions.clear()
