"""A real 3-member etcd cluster: agents and the CLI given every member keep working
when the member they talk to dies."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control import apply as apply_mod
from agent.control.errors import BackendUnavailable, RegistryError
from agent.control.etcd import EtcdBackend
from agent.control.registry import Registry
from agent.control.validate import parse_vip_range, parse_yaml
from tests.integration.etcd_fixture import Etcd, running_cluster

NET = parse_vip_range("10.96.0.0/16")
ROOT = Path(__file__).resolve().parents[2]


def doc(n: int) -> str:
    return "---\n".join(f"""apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: w-{i}, namespace: ha, labels: {{app: ha}}}}
spec: {{address: 10.244.9.{2 + i}, node: node1}}
""" for i in range(n))


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[Etcd]]:
    with running_cluster(3) as members:
        yield members


def test_the_member_in_use_dies_and_agents_and_writers_carry_on(cluster: list[Etcd]) -> None:
    urls = ",".join(m.url for m in cluster)
    agents = [Registry(EtcdBackend(urls, timeout_s=2.0), poll_timeout_s=0.2) for _ in range(2)]
    for r in agents:
        r.start()
    try:
        writer = EtcdBackend(urls, timeout_s=2.0)
        apply_mod.apply(writer, parse_yaml(doc(3), "a.yaml", NET), NET)
        assert all(r.wait_for(lambda s: len(s.workloads) == 3, 10) for r in agents)
        cluster[0].kill()  # the first URL: every client was talking to it
        t0 = time.monotonic()
        apply_mod.apply(writer, parse_yaml(doc(5), "a.yaml", NET), NET)  # fails over
        assert all(r.wait_for(lambda s: len(s.workloads) == 5, 20) for r in agents), \
            [r.status() for r in agents]
        took = time.monotonic() - t0
        assert took < 15, f"fail-over took {took:.1f}s"
        time.sleep(0.5)
        assert not any(r.stale for r in agents), [r.status() for r in agents]
        # the CLI, given every member, reads through the survivors
        out = subprocess.run([sys.executable, "-m", "agent.cli.main", "get", "workloads", "-n", "ha",
                              "--etcd", urls, "--output", "json"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count('"w-') == 5
        writer.close()
    finally:
        for r in agents:
            r.stop()
        cluster[0].start(30)  # rejoins with its data dir (for any later test)


def test_all_members_down_names_every_one_and_bad_urls_are_refused(cluster: list[Etcd]) -> None:
    dead = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    b = EtcdBackend(dead, timeout_s=1.0)
    with pytest.raises(BackendUnavailable) as e:
        b.read()
    assert all(u in str(e.value) for u in dead) and "refused" in str(e.value)
    b.close()
    for bad in ("127.0.0.1:2379", "ftp://a:1", "http://a:2379/v3", "http://a:99999", ""):
        with pytest.raises(RegistryError, match="etcd URL must look like http://HOST:PORT"):
            EtcdBackend(f"{cluster[1].url},{bad}")
    with pytest.raises(RegistryError, match="mix http:// and https://"):
        EtcdBackend(f"{cluster[1].url},https://127.0.0.1:2379")


def test_a_member_cut_off_from_the_quorum_makes_its_agents_stale(cluster: list[Etcd]) -> None:
    # Only m3 is given: when m1 and m2 die, m3 is alive but has no leader. Its watches
    # would stay silent; the agent must not take that silence for "no changes".
    r = Registry(EtcdBackend(cluster[2].url, timeout_s=2.0), poll_timeout_s=0.2)
    r.start()
    try:
        assert r.wait_for(lambda s: True, 5) is not None
        deadline = time.monotonic() + 10
        while r.stale and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not r.stale, r.status()
        cluster[0].kill()
        cluster[1].kill()
        deadline = time.monotonic() + 30
        while not r.stale and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.stale, "an agent on a leaderless member still claims to be current"
        assert "leader" in r.status().last_error, r.status()
    finally:
        r.stop()
        for m in cluster[:2]:
            m.launch()
        for m in cluster[:2]:
            m.wait_healthy(30)
