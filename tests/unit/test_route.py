"""route.decide: where a captured connection goes, over one snapshot, without sockets."""

from __future__ import annotations

import json

import pytest

from agent.control.model import Health, Kind, Service, ServicePort, Workload, resource_key
from agent.control.snapshot import Snapshot, SnapshotBuilder
from agent.dataplane import route
from agent.dataplane.lb import Policy
from agent.dataplane.route import Directory, RouteError, decide

VIP = "10.96.0.10"


def snapshot(workloads: list[Workload], *, policy: str = "ROUND_ROBIN", revision: int = 1) -> Snapshot:
    svc = Service("web", "default", VIP, (ServicePort("http", 80, 8080),), {"app": "web"}, lb_policy=policy)
    b = SnapshotBuilder()
    puts = {resource_key(Kind.SERVICE, "default", "web"): json.dumps(svc.to_doc())}
    puts.update({resource_key(Kind.WORKLOAD, w.namespace, w.name): json.dumps(w.to_doc()) for w in workloads})
    b.apply(puts, [])
    return b.build(revision)


def wl(name: str, address: str, *, health: Health = Health.PASSING, app: str = "web") -> Workload:
    return Workload(name=name, namespace="default", address=address, node="n2", service_account="web",
                    labels={"app": app}, health=health)


WEB = [
    wl("web-1", "10.244.2.2"),
    wl("web-2", "10.244.2.3"),
    wl("web-3", "10.244.2.4", health=Health.CRITICAL),
]


def test_a_vip_routes_to_the_services_healthy_endpoints_on_the_target_port() -> None:
    r = decide(Directory.build(snapshot(WEB, policy="LEAST_REQUEST")), VIP, 80)
    assert r.service is not None and r.service_key == "default/web"
    assert r.service_host == "web.default.svc.cluster.local"
    assert sorted(e.address for e in r.endpoints) == ["10.244.2.2", "10.244.2.3"]  # web-3 is critical
    assert {e.port for e in r.endpoints} == {8080}
    assert r.port == 80 and r.policy == Policy.LEAST_REQUEST


def test_a_vip_port_the_service_does_not_have_is_no_route() -> None:
    with pytest.raises(RouteError, match="has no port 81") as e:
        decide(Directory.build(snapshot(WEB)), VIP, 81)
    assert e.value.flag == "NR"


def test_no_healthy_endpoint_is_a_route_without_endpoints() -> None:
    # (the proxy answers UH: per connection for TCP, per request for HTTP)
    sick = [wl("web-1", "10.244.2.2", health=Health.CRITICAL)]
    r = decide(Directory.build(snapshot(sick)), VIP, 80)
    assert r.service is not None and r.endpoints == ()


def test_a_pod_address_routes_to_that_workload_on_the_dialled_port() -> None:
    r = decide(Directory.build(snapshot(WEB)), "10.244.2.3", 9090)
    assert r.service is None and r.service_host == "unknown"
    assert [(e.workload, e.port) for e in r.endpoints] == [("web-2", 9090)]
    assert r.policy == Policy.ROUND_ROBIN


def test_an_unknown_address_is_no_route() -> None:
    with pytest.raises(RouteError, match="neither a service VIP nor a known workload") as e:
        decide(Directory.build(snapshot(WEB)), "10.244.9.9", 80)
    assert e.value.flag == "NR"


def test_a_route_is_computed_once_per_snapshot() -> None:
    d = Directory.build(snapshot(WEB))
    assert decide(d, VIP, 80) is decide(d, VIP, 80)
    with pytest.raises(RouteError):  # failures are not kept: a pod may try any address
        decide(d, "10.244.9.9", 80)
    assert list(d.routes) == [(VIP, 80)]
    # the next snapshot is a new directory: it sees the change
    later = Directory.build(snapshot([*WEB, wl("web-4", "10.244.2.5")], revision=2))
    assert len(decide(later, VIP, 80).endpoints) == 3


def test_the_route_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route, "MAX_CACHED_ROUTES", 10)
    d = Directory.build(snapshot(WEB))
    for port in range(1000, 1100):  # a pod dialling one workload on every port
        decide(d, "10.244.2.2", port)
    assert len(d.routes) <= 10
