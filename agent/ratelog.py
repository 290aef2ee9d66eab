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


class RateLimitedLog:
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
        self._max_kinds = max_kinds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` under ``kind`` unless one was logged within the interval.
        Returns whether a line was written."""
        now = self._now()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        if last is None and len(self._last) >= self._max_kinds:
            self._last.clear()  # bounded: kinds are a small fixed set; this is a safety net
            self._suppressed.clear()
        self._last[kind] = now
        n = self._suppressed.pop(kind, 0)
        if n:
            msg = f"{msg} ({n} more like this in the last {self.interval_s:.0f}s)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, msg, *args)
