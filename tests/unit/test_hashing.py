"""Consistent hashing: a key stays on one endpoint; when one of N endpoints leaves, about 1/N
of the keys move (the ones it held, for the ring; ~1/N for Maglev) and no others."""

from __future__ import annotations

import pytest

from agent.control.model import Health
from agent.control.snapshot import Endpoint
from agent.dataplane.http.hashing import HashRing, Maglev, hash64


def eps(n: int) -> list[Endpoint]:
    return [
        Endpoint("default", f"web-{i}", f"10.244.2.{i + 2}", 8080, 1, "", "n2", "web", Health.PASSING)
        for i in range(n)
    ]


@pytest.mark.parametrize(("kind", "size"), [("ring", 1024), ("maglev", 65537)])
def test_one_of_n_leaving_moves_about_one_nth_of_the_keys(kind: str, size: int) -> None:
    n = 8
    build = (lambda e: HashRing(e, size)) if kind == "ring" else (lambda e: Maglev(e, size))
    before, after = build(eps(n)), build(eps(n)[:-1])  # web-7 leaves
    keys = [hash64(f"user-{i}") for i in range(20_000)]
    a = [before.pick(k) for k in keys]
    b = [after.pick(k) for k in keys]
    assert all(x is not None for x in a + b)
    moved = sum(1 for x, y in zip(a, b, strict=True) if x != y)
    held = sum(1 for x in a if x is not None and x.workload == "web-7")
    assert moved <= 1.25 * 20_000 / n  # about 1/N (the ring: exactly the keys web-7 held)
    if kind == "ring":
        assert moved == held
    # spread: no endpoint takes more than twice its share
    share = {}
    for x in a:
        assert x is not None
        share[x.workload] = share.get(x.workload, 0) + 1
    assert len(share) == n and max(share.values()) < 2 * 20_000 / n


def test_a_key_is_stable_and_an_excluded_endpoint_is_skipped() -> None:
    ring = HashRing(eps(4), 1024)
    k = hash64("session-42")
    first = ring.pick(k)
    assert first is not None and all(ring.pick(k) == first for _ in range(10))
    other = ring.pick(k, frozenset({(first.address, first.port)}))
    assert other is not None and other != first
