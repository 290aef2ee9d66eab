"""Health bookkeeping with Consul's semantics; time is passed in, nothing sleeps."""

from __future__ import annotations

import json

from agent.control.health import HealthTracker, Probe
from agent.control.model import CheckSpec, Health, Service, ServicePort, Workload
from agent.control.snapshot import SnapshotBuilder, healthy_endpoints


def workload(**check: object) -> Workload:
    spec = CheckSpec(name="c", kind="http", target="http://127.0.0.1:1/", interval_s=10.0,
                     **check)  # type: ignore[arg-type]
    return Workload(name="w", namespace="default", address="10.244.1.2", node="n1",
                    labels={"app": "web"}, checks=(spec,))


def feed(t: HealthTracker, results: list[Health], start: float = 0.0) -> list[Health | None]:
    out = []
    now = start
    for r in results:
        (p,) = t.due(now)
        ch = t.record(p, r, "", now)
        out.append(None if ch is None else ch.status)
        now += 10.0
    return out


def test_initial_status_is_critical_unless_configured() -> None:
    t = HealthTracker()
    t.sync([workload()], 0.0)
    assert t.status(("default", "w")) == Health.CRITICAL
    t2 = HealthTracker()
    t2.sync([workload(initial_status=Health.PASSING)], 0.0)
    assert t2.status(("default", "w")) == Health.PASSING


def test_failures_before_critical_and_success_before_passing() -> None:
    t = HealthTracker()
    t.sync([workload(initial_status=Health.PASSING, failures_before_critical=3,
                     success_before_passing=2)], 0.0)
    P, C = Health.PASSING, Health.CRITICAL
    # two failures are tolerated, a success resets the count, the third in a row is critical
    assert feed(t, [C, C, P, C, C, C]) == [None, None, None, None, None, C]
    # one success is not enough, two in a row are
    assert feed(t, [P, C, P, P], start=100.0) == [None, None, None, P]


def test_warning_counts_as_success_and_is_reported() -> None:
    t = HealthTracker()
    t.sync([workload()], 0.0)
    assert feed(t, [Health.WARNING]) == [Health.WARNING]


def test_schedule_follows_interval() -> None:
    t = HealthTracker()
    t.sync([workload()], 5.0)
    assert len(t.due(5.0)) == 1
    assert t.due(14.9) == [] and t.next_due_s() == 15.0
    assert len(t.due(15.0)) == 1


def test_deregister_after_critical_for_long_enough() -> None:
    t = HealthTracker()
    t.sync([workload(initial_status=Health.PASSING, deregister_critical_after_s=60.0)], 0.0)
    (p,) = t.due(0.0)
    t.record(p, Health.CRITICAL, "boom", 0.0)
    assert t.to_deregister(59.0) == []
    assert t.to_deregister(60.0) == [("default", "w")]


def test_stale_probe_for_a_removed_workload_is_ignored() -> None:
    t = HealthTracker()
    t.sync([workload()], 0.0)
    (p,) = t.due(0.0)
    t.sync([], 1.0)
    assert t.record(p, Health.PASSING, "", 1.0) is None
    assert t.record(Probe(("x", "y"), 0, p.spec), Health.PASSING, "", 1.0) is None


def test_critical_endpoints_leave_load_balancing() -> None:
    svc = Service(name="web", namespace="default", vip="10.96.0.1",
                  ports=(ServicePort("http", 80, 8080),), selector={"app": "web"})
    w1 = workload(initial_status=Health.PASSING)
    w2 = Workload(name="w2", namespace="default", address="10.244.1.3", labels={"app": "web"})
    b = SnapshotBuilder()
    b.reset({svc.key: json.dumps(svc.to_doc()), w1.key: json.dumps(w1.to_doc()),
             w2.key: json.dumps(w2.to_doc())})
    assert {e.workload for e in healthy_endpoints(b.build(1), svc, 80)} == {"w", "w2"}
    b.apply({"/nodemesh/registry/health/default/w": json.dumps(
        {"status": "critical", "output": "HTTP 500"})}, ())
    snap = b.build(2)
    assert [e.workload for e in healthy_endpoints(snap, svc, 80)] == ["w2"]
    assert healthy_endpoints(snap, svc, 81) == ()
