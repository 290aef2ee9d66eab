"""Time as an input: the clock protocol, the system clock and a fake clock for tests.

Cores take ``now`` as an argument; services (renewal) take a :class:`Clock`.
:class:`FakeClock` never sleeps: ``sleep`` waits until a test calls
:meth:`FakeClock.advance` past the deadline.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC (certificate validity is wall-clock)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (timeouts, intervals)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = aware(start or datetime(2030, 1, 1, tzinfo=UTC))
        self._mono = 0.0
        self._waiters: set[asyncio.Event] = set()

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock only goes forward; got advance({seconds})")
        self._now += timedelta(seconds=seconds)
        self._mono += seconds
        for ev in self._waiters:
            ev.set()

    async def sleep(self, seconds: float) -> None:
        deadline = self._mono + max(0.0, seconds)
        while self._mono < deadline:
            ev = asyncio.Event()
            self._waiters.add(ev)
            try:
                await ev.wait()
            finally:
                self._waiters.discard(ev)


def aware(ts: datetime) -> datetime:
    """``ts`` as UTC; naive datetimes are refused (they are a bug waiting to happen)."""
    if ts.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {ts.isoformat()}")
    return ts.astimezone(UTC)
