"""The mesh DNS server answering a real client (dig) on UDP and TCP, from a real registry."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control import apply as apply_mod
from agent.control.dns import MeshDns
from agent.control.embedded import EmbeddedBackend
from agent.control.registry import Registry
from agent.control.validate import parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")
DOC = """
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  vip: 10.96.3.4
  ports: [{name: http, port: 80, protocol: http}, {name: grpc, port: 9090, protocol: grpc}]
"""


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[int]:
    b = EmbeddedBackend(tmp_path / "reg")
    apply_mod.apply(b, parse_yaml(DOC, "svc.yaml", NET), NET)
    reg = Registry(b)
    assert reg.step()
    loop = asyncio.new_event_loop()
    server = MeshDns(lambda: reg.snapshot, upstream=None)
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        port.append(loop.run_until_complete(server.start("127.0.0.1", 0))[1])
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    try:
        yield port[0]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


def dig(port: int, *args: str) -> str:
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
                          capture_output=True, text=True, timeout=10).stdout


def test_dig_a_record_returns_the_vip(dns: int) -> None:
    for name in ("web.shop.svc.cluster.local", "web.shop", "WEB.Shop.svc.cluster.local"):
        assert dig(dns, "+short", name, "A").split() == ["10.96.3.4"], name
    assert dig(dns, "+short", "+tcp", "web.shop.svc.cluster.local", "A").split() == ["10.96.3.4"]


def test_dig_srv_returns_the_ports(dns: int) -> None:
    out = dig(dns, "+short", "web.shop.svc.cluster.local", "SRV").splitlines()
    ports = sorted(int(line.split()[2]) for line in out)
    assert ports == [80, 9090]
    assert all(line.split()[3] == "web.shop.svc.cluster.local." for line in out)
    out = dig(dns, "+short", "_grpc._tcp.web.shop.svc.cluster.local", "SRV").split()
    assert out[2] == "9090"


def test_unknown_names_answer_fast_never_hang(dns: int) -> None:
    assert "status: NXDOMAIN" in dig(dns, "nope.shop.svc.cluster.local", "A")
    t0 = time.monotonic()
    out = dig(dns, "www.example.org", "A")
    assert "status: REFUSED" in out  # no upstream configured: refused at once
    assert time.monotonic() - t0 < 1.5
