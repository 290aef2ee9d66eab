"""Access log: one JSON line per request (and per TCP connection), off by default.

How this works: :class:`AccessLog` turns an :class:`Exchange` (or a TCP
connection's summary) into one JSON object per line, written to a file opened
for appending or to stdout. ``sampling`` (0 < s <= 1) keeps that fraction of
lines, chosen at random; errors (status >= 500 or a response flag) are always
kept, as they are the lines someone will look for. A write that fails (disk
full) is counted and dropped: the data path never waits for the log.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = False
    path: str = "-"  # a file, or "-" for stdout
    sampling: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.sampling <= 1:
            raise ValueError(f"sampling must be in (0, 1], got {self.sampling}")


class AccessLog:
    def __init__(self, config: AccessLogConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.dropped = 0
        self.written = 0
        self._fd = -1
        if config.enabled:
            if config.path == "-":
                self._fd = sys.stdout.fileno()
            else:
                self._fd = os.open(config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @property
    def enabled(self) -> bool:
        return self._fd >= 0

    def keep(self, status: int, flags: str) -> bool:
        s = self.config.sampling
        return s >= 1 or status >= 500 or flags != "-" or self.rng.random() < s

    def write(self, entry: dict[str, Any]) -> None:
        if "time" not in entry:
            entry["time"] = _now_iso()
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        try:
            os.write(self._fd, line)
            self.written += 1
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self._fd >= 0 and self.config.path != "-":
            os.close(self._fd)
        self._fd = -1


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
