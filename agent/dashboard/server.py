"""The dashboard's web server: the page, its script, and the view as JSON.

How this works: one thread runs the poller's rounds every ``refresh_s`` and
keeps the last view, serialised once, so a browser's refresh costs a copy of
bytes, not a computation (however many tabs are open). A standard-library
threading HTTP server answers ``/`` (the page), ``/app.js``, ``/app.css``
(shipped in the package: no CDN, works offline), ``/api/view`` and
``/healthz``. Only GET and HEAD; nothing is written anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from agent.dashboard.scrape import Poller

log = logging.getLogger(__name__)
DEFAULT_PORT = 15100

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return resources.files("agent.dashboard").joinpath("static", name).read_bytes()


class Dashboard:
    def __init__(self, poller: Poller, refresh_s: float, host: str, port: int) -> None:
        self.poller = poller
        self.refresh_s = refresh_s
        self.files = {path: (_static(name), ctype) for path, (name, ctype) in _STATIC.items()}
        self._view = b'{"round": 0, "nodes": [], "services": [], "workloads": [], "top": [], "graph": null}'
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.round_ms: float = 0.0
        dash = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "nodemesh-dashboard"
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(head_only=False)

            def do_HEAD(self) -> None:
                self._answer(head_only=True)

            def _answer(self, head_only: bool) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/api/view":
                    body, ctype = dash.view_bytes(), "application/json"
                elif path == "/healthz":
                    body, ctype = b"ok\n", "text/plain; charset=utf-8"
                elif path in dash.files:
                    body, ctype = dash.files[path]
                else:
                    body, ctype = b"not found\n", "text/plain; charset=utf-8"
                    self.send_response(404)
                    self._send(body, ctype, head_only)
                    return
                self.send_response(200)
                self._send(body, ctype, head_only)

            def _send(self, body: bytes, ctype: str, head_only: bool) -> None:
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if not head_only:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.httpd = Server((host, port), Handler)
        self.httpd.daemon_threads = True
        self._poll_thread = threading.Thread(target=self._poll_loop, name="dashboard-poll", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def view_bytes(self) -> bytes:
        with self._lock:
            return self._view

    def poll_once(self) -> None:
        t0 = time.perf_counter()
        view = self.poller.round()
        self.round_ms = (time.perf_counter() - t0) * 1000
        view["round_ms"] = round(self.round_ms, 1)
        body = json.dumps(view, separators=(",", ":")).encode()
        with self._lock:
            self._view = body

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception:  # a bug in one round must not stop the dashboard
                log.exception("dashboard round failed")
            self._stop.wait(max(0.05, self.refresh_s - (time.monotonic() - started)))

    def serve_forever(self) -> None:
        self._poll_thread.start()
        try:
            self.httpd.serve_forever(poll_interval=0.25)
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.httpd.server_close()
