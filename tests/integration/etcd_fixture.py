"""A real etcd (Debian's etcd-server) on 127.0.0.1, started and stopped by the tests.

Random free ports, a temp data dir named with the run prefix; stopped by its PID
and the dir removed at teardown, also on failure. ``restart()`` keeps the data
dir (for the outage test). ``Partition`` is a TCP relay on 127.0.0.1 an agent can
be pointed at and cut off from etcd, while etcd itself keeps running.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator

from tests.integration.etcd_tls import TlsFiles

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Etcd:
    def __init__(self, prefix: str, name: str = "t", tls: TlsFiles | None = None):
        self.name = name
        self.tls = tls  # serve clients over https:// with these files (client certs required)
        self.token = f"nodemesh-{prefix}"  # shared by the members of one cluster
        self.dir = tempfile.mkdtemp(prefix=f"nodemesh-{prefix}-etcd-{name}-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.initial_cluster = f"{name}={self.peer_url}"  # the members of a cluster, for --initial-cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(os.path.join(self.dir, "etcd.log"), "ab")  # noqa: SIM115

    def launch(self) -> None:
        self.proc = subprocess.Popen([
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster, "--initial-cluster-token", self.token,
            "--max-txn-ops", "100000",
            "--max-request-bytes", str(64 * 1024 * 1024), "--quota-backend-bytes",
            str(2 * 1024 ** 3), "--log-level", "warn",
            *(["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                "--trusted-ca-file", self.tls.ca, "--client-cert-auth"] if self.tls else []),
        ], stdout=self._log, stderr=self._log)

    def start(self, timeout_s: float = 15.0) -> None:
        self.launch()
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.dir}/etcd.log")
            ctx = None
            if self.tls is not None:
                ctx = ssl.create_default_context(cafile=self.tls.ca)
                ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=ctx) as r:
                    if b"true" in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy in {timeout_s}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.kill()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_etcd(tls: TlsFiles | None = None) -> Iterator[Etcd]:
    e = Etcd(secrets.token_hex(3), tls=tls)
    try:
        e.start()
        yield e
    finally:
        e.close()


@contextlib.contextmanager
def running_cluster(members: int = 3) -> Iterator[list[Etcd]]:
    """A real etcd cluster of ``members`` on loopback (each stopped by PID at the end)."""
    token = secrets.token_hex(3)
    made = [Etcd(token, f"m{i + 1}") for i in range(members)]
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in made)
    try:
        for m in made:
            m.initial_cluster = cluster
            m.launch()  # all at once: no member is healthy before a quorum is up
        for m in made:
            m.wait_healthy(30)
        yield made
    finally:
        for m in made:
            m.close()


class Partition:
    """127.0.0.1:<port> -> etcd. ``cut()`` closes every relayed connection and refuses
    new ones until ``heal()``: the agent behind it is partitioned, etcd is not."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._conns.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self.lsock.close()
        self._thread.join(timeout=2)
