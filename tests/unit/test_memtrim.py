"""Freed memory goes back to the system after a burst, and a resting agent never trims."""

from __future__ import annotations

import itertools
import subprocess
import sys

from agent.memtrim import MemoryTrimmer

MB = 1 << 20


class Fake:
    def __init__(self) -> None:
        self.rss = 60 * MB
        self.now = 0.0
        self.trims = 0
        self.freed_to = 60 * MB  # what RSS falls to when trimmed

    def trim(self) -> None:
        self.trims += 1
        self.rss = self.freed_to


def make(f: Fake) -> MemoryTrimmer:
    return MemoryTrimmer(growth_bytes=8 * MB, retry_s=20, max_retry_s=160, rss=lambda: f.rss, trim=f.trim,
                         clock=lambda: f.now)


def test_resting_agent_never_trims() -> None:
    f = Fake()
    m = make(f)
    for _ in range(100):
        f.now += 2
        f.rss += 10_000  # small drift stays under the growth mark
        assert not m.check()
    assert f.trims == 0


def test_burst_is_given_back_and_counted() -> None:
    f = Fake()
    m = make(f)
    f.rss = 110 * MB  # a burst's buffers, freed but kept by malloc
    f.now = 2
    assert m.check()
    assert f.rss == 60 * MB
    assert (m.stats.trims, m.stats.returned_bytes) == (1, 50 * MB)


def test_memory_still_in_use_is_retried_only_after_a_while() -> None:
    f = Fake()
    m = make(f)
    f.rss = f.freed_to = 100 * MB  # 200 streams still open: nothing to give back
    f.now = 2
    assert m.check()  # it grew
    for _ in range(9):  # not growing: no trim before retry_s (20 s)
        f.now += 2
        assert not m.check()
    f.now += 2
    assert m.check()  # a retry at 22 s: still in use, so the next waits 40 s
    f.freed_to = 61 * MB  # the streams end
    for _ in range(19):
        f.now += 2
        assert not m.check()
    f.now += 2
    assert m.check()
    assert f.rss == 61 * MB
    f.now += 60
    assert not m.check()  # back near the start: rests again


def test_trims_while_a_burst_grows_do_not_delay_trimming_its_end() -> None:
    f = Fake()
    m = make(f)
    for t in (2, 4, 6):  # a burst grows 10 MB per check; each trim finds it in use
        f.now, f.rss = t, f.rss + 10 * MB
        f.freed_to = f.rss
        assert m.check()
    f.freed_to = 61 * MB  # the burst ends at once
    f.now = 8
    assert not m.check()
    f.now = 26  # retry_s after the last growth, not 2 x 2 x 2 x retry_s
    assert m.check() and f.rss == 61 * MB


def test_memory_that_stays_in_use_is_tried_ever_more_rarely() -> None:
    f = Fake()
    m = make(f)
    f.rss = f.freed_to = 100 * MB  # a registry that grew for good
    trimmed_at = []
    for t in range(2, 2000, 2):
        f.now = t
        if m.check():
            trimmed_at.append(t)
    gaps = [b - a for a, b in itertools.pairwise(trimmed_at)]
    assert gaps[:5] == [20, 40, 80, 160, 160], trimmed_at  # 20 s doubled per useless retry, capped


def test_rebase_takes_the_started_agent_as_resting_size() -> None:
    f = Fake()
    m = make(f)
    f.rss = 90 * MB  # certificates, snapshot, listeners
    m.rebase()
    f.now = 100
    assert not m.check()


def test_without_malloc_trim_garbage_is_still_collected() -> None:
    f = Fake()
    collected = []
    m = MemoryTrimmer(rss=lambda: f.rss, clock=lambda: f.now, collect=lambda: collected.append(1))
    m._trim = None  # a libc without malloc_trim (musl)
    f.rss = 500 * MB
    f.now = 100
    assert m.check()
    assert collected == [1]


def test_real_malloc_trim_returns_a_fragmented_burst() -> None:
    """glibc keeps freed 40 KB buffers pinned by every 50th one kept; trim gives them back."""
    code = """
from agent.memtrim import MemoryTrimmer, resident_bytes
m = MemoryTrimmer()
blocks = [bytes(bytearray(40_000)) for _ in range(2000)]
keep = blocks[::50]
del blocks
before = resident_bytes()
assert m.check()
print(before - resident_bytes(), m.stats.returned_bytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    freed, counted = map(int, out.split())
    assert freed > 40 * MB, out
    assert counted >= freed - MB, out


def test_cyclic_garbage_of_ended_streams_is_collected_first() -> None:
    """An idle process never runs the collector; the check does, so cycles holding buffers go."""
    code = """
import gc
from agent.memtrim import MemoryTrimmer, resident_bytes
gc.disable()  # as an idle agent: nothing allocates, so no collection would run
m = MemoryTrimmer()
class Stream:
    pass
def end(s):
    try:
        raise RuntimeError("reset")
    except RuntimeError as e:
        s.error = e  # stream -> exception -> traceback -> this frame -> stream
for _ in range(1000):
    s = Stream()
    s.buf = bytes(bytearray(40_000))
    end(s)
del s
before = resident_bytes()
assert m.check()
print(before - resident_bytes())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) > 30 * MB, out
