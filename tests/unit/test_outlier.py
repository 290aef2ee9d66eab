"""Outlier detection's counting, as Envoy's: 5xx and gateway errors, local-origin failures
counted as 5xx or (splitExternalLocalOriginErrors) apart, ejection time growing per ejection."""

from __future__ import annotations

from agent.control.istio import OutlierDetection
from agent.dataplane.http.outlier import Outliers

EP = ("10.0.0.1", 8080)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_local_origin_failures_count_as_5xx_unless_split() -> None:
    clock = FakeClock()
    o = Outliers(clock)
    od = OutlierDetection(consecutive_5xx=3, base_ejection_s=10.0, max_ejection_percent=100)
    assert not o.observe("c", EP, 500, "-", od, 2)
    assert not o.observe("c", EP, 0, "UF", od, 2)  # a connect failure: a 5xx here
    assert o.observe("c", EP, 503, "-", od, 2)
    assert o.ejected("c", EP)


def test_split_mode_counts_local_origin_failures_apart() -> None:
    clock = FakeClock()
    o = Outliers(clock)
    od = OutlierDetection(consecutive_5xx=2, base_ejection_s=10.0, max_ejection_percent=100,
                          split_local_origin=True, consecutive_local_origin=3)
    # local failures do not add to the 5xx count, nor reset it...
    assert not o.observe("c", EP, 500, "-", od, 2)
    assert not o.observe("c", EP, 0, "UF", od, 2)
    assert o.observe("c", EP, 500, "-", od, 2)  # ...so this is the second consecutive 5xx
    clock.t += 11
    assert not o.ejected("c", EP)
    # three local-origin failures in a row eject, whatever the 5xx count
    assert not o.observe("c", EP, 0, "UC", od, 2)
    assert not o.observe("c", EP, 0, "UF", od, 2)
    assert o.observe("c", EP, 0, "UT", od, 2)
    assert o.ejected("c", EP)
    clock.t += 19  # second ejection: 2 x baseEjectionTime
    assert o.ejected("c", EP)
    clock.t += 2
    assert not o.ejected("c", EP)
    # an answer from the endpoint (any status) resets the local count
    assert not o.observe("c", EP, 0, "UF", od, 2)
    assert not o.observe("c", EP, 0, "UF", od, 2)
    assert not o.observe("c", EP, 200, "-", od, 2)
    assert not o.observe("c", EP, 0, "UF", od, 2)
    assert not o.ejected("c", EP)


def test_split_mode_with_local_origin_failures_off() -> None:
    o = Outliers(FakeClock())
    od = OutlierDetection(consecutive_5xx=5, max_ejection_percent=100, split_local_origin=True,
                          consecutive_local_origin=0)
    for _ in range(20):
        assert not o.observe("c", EP, 0, "UF", od, 2)
