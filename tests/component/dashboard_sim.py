"""Simulated agents for the dashboard's tests and benchmark: the agent's own metric code
(:class:`agent.metrics.istio.MeshMetrics`) behind a loopback HTTP server.

Each simulated flow counts its requests as a function of wall time (``rate_rps``
since start), caught up when ``/metrics`` is read, so a reader that knows the
rates can check the numbers it computes. ``/status`` answers a fixed document
like the agent's. :meth:`SimAgent.freeze` makes the server accept connections
and never answer (an agent that stopped answering).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from agent.metrics.istio import ConnLabels, MeshMetrics, RequestLabels


@dataclass(frozen=True)
class Flow:
    labels: RequestLabels
    rate_rps: float
    latencies_ms: tuple[float, ...] = (2.0,)  # cycled through, one per request
    code: int = 200
    protocol: str = "http"


@dataclass(frozen=True)
class TcpFlow:
    labels: ConnLabels
    conns_per_s: float
    bytes_each: tuple[int, int] = (1000, 4000)  # request, response


def status_doc(node: str, revision: int = 1) -> dict[str, Any]:
    return {
        "node": node, "ok": True, "ready": True, "pid": 1, "uptime_s": 10.0, "draining": False,
        "interception": {"ok": True, "hooks": [{"attached": True}] * 6, "enrolled": 2, "counters": {}},
        "registry": {"backend": "embedded", "location": "/x", "revision": revision, "stale": False,
                     "stale_for_s": None, "last_error": None},
        "certificates": [{"spiffe_id": f"spiffe://cluster.local/ns/default/sa/{node}",
                          "expires_in_s": 80000, "renew_at": None, "error": None}],
        "degraded": [], "policies": {"AuthorizationPolicy": 1, "VirtualService": 0},
    }


class SimAgent:
    def __init__(self, host: str, port: int, node: str, flows: list[Flow],
                 tcp: list[TcpFlow] | None = None) -> None:
        self.node = node
        self.flows = flows
        self.tcp = list(tcp or [])
        self.registry = CollectorRegistry()
        self.metrics = MeshMetrics(self.registry)
        self.started = time.monotonic()
        self.done = [0] * len(flows)
        self.tcp_done = [0] * len(self.tcp)
        self.lock = threading.Lock()
        self.frozen = threading.Event()
        self.release = threading.Event()
        self.status = status_doc(node)
        sim = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if sim.frozen.is_set():
                    sim.release.wait(30)  # accepted, never answered
                    return
                if self.path == "/metrics":
                    body = sim.metrics_text()
                elif self.path == "/status":
                    body = json.dumps(sim.status).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # a reader that gave up
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)

    def catch_up(self) -> None:
        with self.lock:
            elapsed = time.monotonic() - self.started
            for i, f in enumerate(self.flows):
                due = int(f.rate_rps * elapsed)
                for n in range(self.done[i], due):
                    self.metrics.request(f.labels, f.protocol, f.code, "", "-",
                                         f.latencies_ms[n % len(f.latencies_ms)], 100, 200)
                self.done[i] = max(self.done[i], due)
            for i, t in enumerate(self.tcp):
                due = int(t.conns_per_s * elapsed)
                for _ in range(self.tcp_done[i], due):
                    self.metrics.opened(t.labels)
                    self.metrics.closed(t.labels, *t.bytes_each)
                self.tcp_done[i] = max(self.tcp_done[i], due)

    def metrics_text(self) -> bytes:
        self.catch_up()
        return generate_latest(self.registry)

    def freeze(self) -> None:
        self.frozen.set()

    def __enter__(self) -> SimAgent:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def request_labels(src: str, svc: str, dst: str, *, mtls: bool = True) -> RequestLabels:
    host = f"{svc}.default.svc.cluster.local"
    return RequestLabels(
        "source", src, "default", f"spiffe://cluster.local/ns/default/sa/{src}", src, "v1", host, svc,
        "default", dst, "default", f"spiffe://cluster.local/ns/default/sa/{svc}", svc, "v1",
        "mutual_tls" if mtls else "none",
    )
