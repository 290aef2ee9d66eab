"""Several agents on one real etcd: convergence, an etcd outage, a partitioned agent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from agent.control import apply as apply_mod
from agent.control.etcd import EtcdBackend
from agent.control.registry import Registry
from agent.control.snapshot import Snapshot
from agent.control.validate import parse_vip_range, parse_yaml
from tests.integration.etcd_fixture import Etcd, Partition, running_etcd

NET = parse_vip_range("10.96.0.0/16")


SERVICE_NET = {"web": 1, "api": 101}  # each service its own addresses: apply refuses duplicates


def docs(service: str, n: int, ns: str = "default") -> str:
    net = SERVICE_NET[service]
    out = [f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: {service}, namespace: {ns}}}
spec:
  selector: {{app: {service}}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
"""]
    for i in range(n):
        out.append(f"""apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: {service}-{i}, namespace: {ns}, labels: {{app: {service}}}}}
spec: {{address: 10.244.{net + i // 250}.{2 + i % 250}, node: node{i % 3}}}
""")
    return "---\n".join(out)


def apply_text(url: str, text: str) -> None:
    b = EtcdBackend(url)
    try:
        apply_mod.apply(b, parse_yaml(text, "test.yaml", NET), NET)
    finally:
        b.close()


def wait(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def content(s: Snapshot) -> tuple[object, ...]:
    return (dict(s.services), dict(s.workloads), dict(s.members))


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    with running_etcd() as e:
        yield e


@pytest.fixture
def agents() -> Iterator[Callable[[str], Registry]]:
    made: list[Registry] = []

    def make(url: str) -> Registry:
        r = Registry(EtcdBackend(url, timeout_s=2.0), poll_timeout_s=0.2)
        r.start()
        made.append(r)
        return r

    try:
        yield make
    finally:
        for r in made:
            r.stop()


def test_three_agents_see_an_apply_quickly_and_converge(
    etcd: Etcd, agents: Callable[[str], Registry],
) -> None:
    regs = [agents(etcd.url) for _ in range(3)]
    assert wait(lambda: all(not r.stale for r in regs), 5)
    t0 = time.monotonic()
    apply_text(etcd.url, docs("web", 100))
    assert all(r.wait_for(lambda s: len(s.workloads) == 100, 5) for r in regs)
    took = time.monotonic() - t0
    assert took < 2.0, f"propagation took {took:.3f}s"
    assert content(regs[0].snapshot) == content(regs[1].snapshot) == content(regs[2].snapshot)
    svc = regs[2].snapshot.service("default", "web")
    assert svc is not None and len(regs[2].snapshot.members[("default", "web")]) == 100


def test_etcd_down_10s_keeps_last_snapshot_and_marks_stale(
    etcd: Etcd, agents: Callable[[str], Registry],
) -> None:
    regs = [agents(etcd.url) for _ in range(3)]
    apply_text(etcd.url, docs("web", 5))
    assert all(r.wait_for(lambda s: len(s.workloads) == 5, 5) for r in regs)
    before = [r.snapshot for r in regs]
    etcd.kill()
    t_kill = time.monotonic()
    assert wait(lambda: all(r.stale for r in regs), 5), "agents did not notice the outage"
    while time.monotonic() - t_kill < 10:  # ten seconds without etcd
        for r, b in zip(regs, before, strict=True):
            assert r.snapshot is b  # still serving exactly the last snapshot
            assert r.stale and "etcd at " in r.status().last_error  # unreachable, or refused while dying
        time.sleep(0.5)
    etcd.start()
    assert wait(lambda: all(not r.stale for r in regs), 10), "agents did not reconnect"
    apply_text(etcd.url, docs("api", 3))  # a change after the outage reaches everyone
    assert all(r.wait_for(lambda s: s.service("default", "api") is not None
                          and len(s.workloads) == 8, 5) for r in regs)


@pytest.mark.parametrize("compact", [False, True], ids=["resume", "compacted"])
def test_partitioned_agent_gets_every_change_made_meanwhile(
    etcd: Etcd, agents: Callable[[str], Registry], compact: bool,
) -> None:
    part = Partition(etcd.client_port)
    try:
        a = agents(etcd.url)
        c = agents(part.url)  # this agent reaches etcd only through the relay
        apply_text(etcd.url, docs("web", 5))
        assert c.wait_for(lambda s: len(s.workloads) == 5, 5)
        reads_before = c.status().full_reads
        part.cut()
        assert wait(lambda: c.stale, 5)
        # while C is cut off: adds, updates and deletes, several revisions
        apply_text(etcd.url, docs("api", 4))
        apply_text(etcd.url, docs("web", 5).replace("10.244.1.2,", "10.244.9.9,"))
        b = EtcdBackend(etcd.url)
        try:
            apply_mod.delete(b, apply_mod.Kind.WORKLOAD, "default", "web-4")
            if compact:
                b.compact(b.read().revision)
        finally:
            b.close()
        assert a.wait_for(lambda s: len(s.workloads) == 8, 5)
        assert c.snapshot.service("default", "api") is None and c.stale
        part.heal()
        assert c.wait_for(lambda s: len(s.workloads) == 8, 10), "changes were lost"
        assert wait(lambda: not c.stale, 5)
        assert content(c.snapshot) == content(a.snapshot)
        assert c.snapshot.workloads[("default", "web-0")].address == "10.244.9.9"
        full_reads = c.status().full_reads - reads_before
        assert full_reads == (1 if compact else 0)  # resume from revision unless compacted
    finally:
        part.close()
