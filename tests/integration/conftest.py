"""Fixtures for root tests: testbeds with a unique prefix, always torn down."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest

from netns import testbed, topology


def run_prefix(tag: str = "t") -> str:
    """A fresh prefix for a test's kernel objects: 't' + 5 hex digits."""
    return f"{tag}{secrets.token_hex(3)[:5]}"


@contextlib.contextmanager
def pod_servers(
    topo: topology.Topology, script: str, extra: Mapping[str, Sequence[str]]
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A test server in each named pod: ``python -c script <pod> <pod address> *extra[pod]``,
    started when it has printed ``ready``; stopped on exit, by PID (only what this started)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, args in extra.items():
            pod = topo.pod(name)
            assert pod is not None, name
            p = testbed.popen_in_pod(pod, [sys.executable, "-c", script, name, pod.address, *args],
                                     stdout=subprocess.PIPE)
            procs[name] = p
            assert p.stdout is not None and p.stdout.readline() == b"ready\n", f"{name}'s server"
        yield procs
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


@contextlib.contextmanager
def pod_nginx(
    topo: topology.Topology, work: str, conf: str, pods: Sequence[str]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """nginx in each named pod with ``conf`` (formatted with ``dir``, ``addr`` and ``pod``; it must
    answer the pod's name on ``addr:8080``), started when it does; stopped on exit, by PID."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in pods:
            pod = topo.pod(name)
            assert pod is not None, name
            d = os.path.join(work, name)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "nginx.conf"), "w") as f:
                f.write(conf.format(dir=d, addr=pod.address, pod=name))
            procs.append(testbed.popen_in_pod(pod, ["nginx", "-c", f"{d}/nginx.conf", "-p", d]))
        for name in pods:
            pod = topo.pod(name)
            assert pod is not None
            for _ in range(100):
                r = testbed.popen_in_pod(pod, ["curl", "-s", f"http://{pod.address}:8080/"],
                                         stdout=subprocess.PIPE)
                if r.communicate(timeout=10)[0] == name.encode():
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"nginx in {name} did not start")
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def make_testbed() -> Iterator[Callable[..., topology.Topology]]:
    """Factory: make_testbed(nodes=2, pods_per_node=2) -> Topology; all removed after."""
    made: list[str] = []

    def make(nodes: int = 2, pods_per_node: int = 2, prefix: str | None = None) -> topology.Topology:
        p = prefix or run_prefix()
        made.append(p)
        return testbed.up(topology.plan(topology.default_spec(p, nodes, pods_per_node)))

    try:
        yield make
    finally:
        for p in made:
            testbed.down(p)


@pytest.fixture(scope="module")
def shared_testbed() -> Iterator[topology.Topology]:
    """One 2-node x 3-pod testbed for a whole test module."""
    p = run_prefix("m")
    try:
        yield testbed.up(topology.plan(topology.default_spec(p, 2, 3)))
    finally:
        testbed.down(p)
