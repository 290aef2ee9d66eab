"""Rate-limited logging: a peer that provokes a million refusals costs a few lines."""

from __future__ import annotations

import logging

import pytest

from agent.ratelog import LogLimiter, RateLimitedLog


def test_one_line_per_kind_per_interval_then_the_count(caplog: pytest.LogCaptureFixture) -> None:
    t = [100.0]
    rlog = RateLimitedLog(logging.getLogger("t.ratelog"), interval_s=10.0, now=lambda: t[0])
    with caplog.at_level(logging.INFO, logger="t.ratelog"):
        assert rlog.warning("flood", "tunnel %s: flood", "a")
        for _ in range(10_000):
            assert not rlog.warning("flood", "tunnel %s: flood", "a")
        assert rlog.info("other", "another kind gets its own line")
        t[0] += 10.0
        assert rlog.warning("flood", "tunnel %s: flood", "b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "tunnel a: flood",
        "another kind gets its own line",
        "tunnel b: flood (10000 more like this in the last 10s)",
    ]


def test_limiter_stays_bounded_whatever_the_keys() -> None:
    lim = LogLimiter(10.0, max_keys=4)
    for i in range(1_000):
        assert lim.tick(f"k{i}", 0.0) == 1
    assert len(lim._last) <= 4
