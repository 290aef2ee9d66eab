"""An HTTP check against a real server: critical after failures_before_critical, out of
load balancing, back after success_before_passing."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.control import apply as apply_mod
from agent.control.embedded import EmbeddedBackend
from agent.control.health import HealthMonitor
from agent.control.model import Health
from agent.control.registry import Registry
from agent.control.snapshot import Snapshot, healthy_endpoints
from agent.control.validate import parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")


class _State:
    code = 200
    hits = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        _State.hits += 1
        self.send_response(_State.code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def doc(port: int) -> str:
    return f"""
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: {port}, protocol: http}}]
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: web-1, labels: {{app: web}}}}
spec:
  address: 10.244.1.2
  node: node1
  checks:
  - http: http://127.0.0.1:{port}/healthz
    interval: 200ms
    timeout: 1s
    failuresBeforeCritical: 3
    successBeforePassing: 2
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: web-2, labels: {{app: web}}}}
spec: {{address: 10.244.1.3}}
"""


def selected(s: Snapshot) -> set[str]:
    svc = s.service("default", "web")
    return set() if svc is None else {e.workload for e in healthy_endpoints(s, svc, 80)}


def test_http_check_drives_endpoint_selection(server: int, tmp_path: Path) -> None:
    backend = EmbeddedBackend(tmp_path / "reg")
    apply_mod.apply(backend, parse_yaml(doc(server), "web.yaml", NET), NET)
    reg = Registry(EmbeddedBackend(tmp_path / "reg"), poll_timeout_s=0.05)
    reg.start()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    mon = HealthMonitor("node1", EmbeddedBackend(tmp_path / "reg"), lambda: reg.snapshot)
    t = threading.Thread(target=lambda: loop.run_until_complete(mon.run(stop)), daemon=True)
    try:
        assert reg.wait_for(lambda s: len(s.workloads) == 2, 5)
        assert selected(reg.snapshot) == {"web-2"}  # initial status: critical
        t.start()
        assert reg.wait_for(lambda s: selected(s) == {"web-1", "web-2"}, 5)
        _State.code = 500
        hits = _State.hits
        t0 = time.monotonic()
        assert reg.wait_for(lambda s: selected(s) == {"web-2"}, 5), "never went critical"
        assert _State.hits - hits >= 3  # failures_before_critical = 3 probes, not fewer
        assert time.monotonic() - t0 >= 0.35
        assert reg.snapshot.effective_health("default", "web-1") == Health.CRITICAL
        _State.code = 429  # warning: counts as success, takes traffic
        assert reg.wait_for(lambda s: selected(s) == {"web-1", "web-2"}, 5)
        assert reg.snapshot.effective_health("default", "web-1") == Health.WARNING
        _State.code = 200
        assert reg.wait_for(
            lambda s: s.effective_health("default", "web-1") == Health.PASSING, 5)
    finally:
        _State.code = 200
        loop.call_soon_threadsafe(stop.set)
        t.join(5)
        loop.close()
        reg.stop()
