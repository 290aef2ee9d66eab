"""Load-balancing policies and route decisions, without sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.control.model import Health
from agent.control.snapshot import Endpoint
from agent.dataplane.lb import Balancer, Policy


def ep(addr: str, weight: int = 1) -> Endpoint:
    return Endpoint("default", f"w-{addr}", addr, 8080, weight, "", "n2", "default", Health.PASSING)


EPS = [ep("10.244.2.2"), ep("10.244.2.3"), ep("10.244.2.4")]


def test_round_robin_cycles_in_a_stable_order() -> None:
    b = Balancer()
    picks = [b.pick("s", Policy.ROUND_ROBIN, list(reversed(EPS))) for _ in range(6)]
    assert [p.address for p in picks if p] == ["10.244.2.2", "10.244.2.3", "10.244.2.4"] * 2


def test_random_is_roughly_uniform() -> None:
    b = Balancer(random.Random(7))
    c = Counter(b.pick("s", Policy.RANDOM, EPS).address for _ in range(3000))  # type: ignore[union-attr]
    assert all(900 < n < 1100 for n in c.values())


@pytest.mark.parametrize("policy", [Policy.WEIGHTED_ROUND_ROBIN, Policy.WEIGHTED_RANDOM])
def test_weighted_policies_follow_weights(policy: Policy) -> None:
    b = Balancer(random.Random(1))
    eps = [ep("10.244.2.2", 1), ep("10.244.2.3", 3)]
    c = Counter(b.pick("s", policy, eps).address for _ in range(4000))  # type: ignore[union-attr]
    assert 0.22 < c["10.244.2.2"] / 4000 < 0.28


def test_smooth_wrr_interleaves() -> None:
    b = Balancer()
    eps = [ep("a", 5), ep("b", 1), ep("c", 1)]
    seq = "".join(b.pick("s", Policy.WEIGHTED_ROUND_ROBIN, eps).address for _ in range(7))  # type: ignore[union-attr]
    assert sorted(seq) == sorted("aaaaabc") and "aaaaa" not in seq


def test_least_request_prefers_the_idle_endpoint() -> None:
    b = Balancer(random.Random(3))
    busy, idle = ep("10.244.2.2"), ep("10.244.2.3")
    for _ in range(5):
        b.started(busy)
    assert all(b.pick("s", Policy.LEAST_REQUEST, [busy, idle]) == idle for _ in range(50))
    for _ in range(5):
        b.finished(busy)
    assert b.in_flight == {}


def test_exclude_and_zero_weight() -> None:
    b = Balancer()
    tried = frozenset({("10.244.2.2", 8080), ("10.244.2.3", 8080)})
    assert b.pick("s", Policy.ROUND_ROBIN, EPS, exclude=tried) == EPS[2]
    assert b.pick("s", Policy.RANDOM, EPS, exclude=tried | {("10.244.2.4", 8080)}) is None
    assert b.pick("s", Policy.RANDOM, [ep("x", 0)]) is None


def test_policy_parse() -> None:
    assert Policy.parse("least_request") is Policy.LEAST_REQUEST
    with pytest.raises(ValueError, match="unknown load-balancing policy 'FASTEST'"):
        Policy.parse("FASTEST")
