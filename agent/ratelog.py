"""Log lines that a peer can provoke, at most one per kind per interval.

How this works: :class:`RateLimitedLog` remembers, per event kind, when it last
wrote a line and how many events it swallowed since. The first event of a
kind is logged at once; later ones within ``interval_s`` are only counted, and
the next line that gets through says how many were suppressed. A hostile
peer that triggers a million refusals therefore costs a handful of lines, not
a million (or a traceback each). Time is an input (``now`` callable).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogLimiter:
    """The decision alone: one line per key per interval, counting what it held back.
    Pure (time is an argument); bounded to ``max_keys`` keys."""

    def __init__(self, interval_s: float = 10.0, *, max_keys: int = 256) -> None:
        self.interval_s = interval_s
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def tick(self, key: str, now_s: float) -> int | None:
        """An event of ``key`` at ``now_s``: the number of events a line now stands for
        (1 + those held back since the last line), or None to log nothing now."""
        last = self._last.get(key)
        if last is not None and now_s - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()  # keys are a small fixed set; this is a safety net
            self._held.clear()
        self._last[key] = now_s
        return 1 + self._held.pop(key, 0)


class RateLimitedLog:
    """A :class:`LogLimiter` in front of a logger."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        now: Callable[[], float] = time.monotonic,
        max_kinds: int = 256,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._now = now
        self._limiter = LogLimiter(interval_s, max_keys=max_kinds)

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` under ``kind`` unless one was logged within the interval.
        Returns whether a line was written."""
        n = self._limiter.tick(kind, self._now())
        if n is None:
            return False
        if n > 1:
            msg = f"{msg} ({n - 1} more like this in the last {self.interval_s:.0f}s)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, msg, *args)
