"""The route's retry decision (Envoy's conditions) and the bounded copy of a request body."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, from_mapping
from agent.control.istio import Retry
from agent.dataplane.http import retry
from agent.dataplane.http.retry import BodyBudget, BodyCopy


@pytest.mark.parametrize(
    ("on", "outcome", "grpc_status", "want"),
    [
        (("5xx",), 503, "", True),
        (("5xx",), 499, "", False),
        (("5xx",), retry.RESET, "", True),  # a reset becomes a 5xx, as in Envoy
        (("5xx",), retry.REFUSED, "", True),
        (("gateway-error",), 500, "", False),
        (("gateway-error",), 504, "", True),
        (("gateway-error",), retry.PER_TRY_TIMEOUT, "", True),
        (("retriable-4xx",), 409, "", True),
        (("retriable-4xx",), 404, "", False),
        (("refused-stream",), retry.REFUSED, "", True),
        (("refused-stream",), retry.RESET, "", False),  # only REFUSED_STREAM (or past a GOAWAY)
        (("reset",), retry.PER_TRY_TIMEOUT, "", True),
        (("reset",), 503, "", False),
        (("unavailable",), 200, "14", True),  # trailers-only gRPC answers: the header block's status
        (("unavailable",), 200, "13", False),
        (("internal", "cancelled"), 200, "13", True),
        (("deadline-exceeded",), 200, "4", True),
        (("resource-exhausted",), 200, "8", True),
        (("cancelled",), 200, "1", True),
        (("unavailable",), 200, "", False),
        (("connect-failure",), retry.RESET, "", False),
    ],
)
def test_retry_conditions_are_envoys(on: tuple[str, ...], outcome: retry.Outcome, grpc_status: str,
                                     want: bool) -> None:
    assert retry.wanted(Retry(1, None, on, ()), outcome, grpc_status) is want


def test_retriable_status_codes_and_spent_retries_are_urx() -> None:
    r = Retry(2, None, ("retriable-status-codes",), (418,))
    assert retry.decide(r, 0, 418) == "retry" and retry.decide(r, 1, 418) == "retry"
    assert retry.decide(r, 2, 418) == "URX"
    assert retry.decide(r, 0, 503) == ""
    assert retry.decide(None, 0, 503) == "" and retry.decide(Retry(0, None, ("5xx",), ()), 0, 503) == ""


def test_body_copy_stays_within_the_connections_budget_and_gives_it_back() -> None:
    budget = BodyBudget(100)
    a, b = BodyCopy.start(budget), BodyCopy.start(budget)
    a.add(b"x" * 60)
    b.add(b"y" * 30)
    assert a.intact and b.intact and budget.used_bytes == 90
    b.add(b"y" * 20)  # 110 > 100: b overflows and lets go of what it held
    assert not b.intact and b.chunks == [] and budget.used_bytes == 60
    b.add(b"y")  # (stays dropped)
    assert not b.intact and budget.used_bytes == 60
    a.release()
    assert budget.used_bytes == 0
    assert not BodyCopy.start(budget, expected_bytes=101).intact  # a declared length over it
    c = BodyCopy.start(budget, expected_bytes=100)
    c.add(b"z" * 100)
    assert c.intact and c.chunks == [b"z" * 100]


def test_retry_buffer_setting_is_checked() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.244.1.1"}}
    assert from_mapping(base).http.retry_buffer_bytes == retry.RETRY_BUFFER_BYTES
    assert from_mapping({**base, "http": {"retry_buffer_bytes": 65536}}).http.retry_buffer_bytes == 65536
    for bad in (-1, 1.5, "1MiB", 1 << 30):
        with pytest.raises(ConfigError, match=r"http\.retry_buffer_bytes"):
            from_mapping({**base, "http": {"retry_buffer_bytes": bad}})
