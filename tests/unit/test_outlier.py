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


def test_states_show_ejection_time_left_count_and_consecutive_errors() -> None:
    from agent.dataplane.http.outlier import outliers_doc

    clock = FakeClock()
    o = Outliers(clock)
    od = OutlierDetection(consecutive_5xx=2, base_ejection_s=10.0, max_ejection_percent=100)
    other = ("10.0.0.2", 8080)
    o.observe("c", other, 500, "-", od, 2)
    o.observe("c", EP, 500, "-", od, 2)
    assert o.observe("c", EP, 500, "-", od, 2)
    clock.t += 4
    s_ep, s_other = o.states()
    assert (s_ep.address, s_ep.port, s_ep.ejected, s_ep.ejected_for_s, s_ep.ejections) == (
        "10.0.0.1", 8080, True, 6.0, 1)
    assert (s_other.ejected, s_other.ejections, s_other.consecutive_5xx) == (False, 0, 1)
    doc = outliers_doc("n1", o.states(), 1_700_000_000.0)
    assert doc["node"] == "n1" and [e["endpoint"] for e in doc["clusters"]["c"]] == [
        "10.0.0.1:8080", "10.0.0.2:8080"]
    assert doc["clusters"]["c"][0]["ejected_until"] == "2023-11-14T22:13:26.000+00:00"
    assert doc["clusters"]["c"][1]["ejected_until"] is None
    clock.t += 7  # the first ejection ends; the second lasts twice as long
    assert not o.states()[0].ejected
    o.observe("c", EP, 500, "-", od, 2)
    assert o.observe("c", EP, 500, "-", od, 2)
    assert o.states()[0].ejected_for_s == 20.0 and o.states()[0].ejections == 2

