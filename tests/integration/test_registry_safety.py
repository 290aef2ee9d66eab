"""The real agent against a registry it cannot trust (issue 10, finding 6).

One agent (no interception) on loopback addresses of the host, with an embedded
registry in a temporary directory; every connection stays on 127.0.0.0/8. A
workload written straight into the registry (around ``nodemesh apply``) at the
node's own addresses is never dialled for a peer coming through the tunnel, and a
corrupt state file leaves the agent stale and not ok, serving its last snapshot,
until the file is fixed."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.control.apply import _dump
from agent.control.embedded import EmbeddedBackend
from agent.control.model import Workload
from agent.dataplane.pool import TunnelPool
from agent.dataplane.tunnel import TunnelError
from agent.identity.ca import MeshCA
from agent.identity.clock import SystemClock
from agent.identity.spiffe import SpiffeId
from agent.identity.store import CertManager, LocalIssuer
from agent.identity.tls import ClientContexts
from agent.proto import hbone

NODEMESH = [sys.executable, "-m", "agent.cli.main"]
AGENT_IP = "127.0.0.3"  # proxy, hbone and metrics of node n1
PEER_IP = "127.0.0.1"  # node n2: where the tunnel client comes from
TD = "cluster.local"
MANIFEST = """\
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: web, labels: {app: web}}
spec: {address: 10.244.1.5, node: n1, serviceAccount: web, ports: {http: 8080}}
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: client}
spec: {address: 10.244.2.5, node: n2, serviceAccount: client}
"""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RunningAgent:
    dir: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]

    @property
    def state_file(self) -> Path:
        return self.dir / "registry" / "state.json"

    def get(self, path: str, port_name: str = "admin", host: str = "127.0.0.1") -> bytes:
        with urllib.request.urlopen(f"http://{host}:{self.ports[port_name]}{path}", timeout=5) as r:
            body: bytes = r.read()
            return body

    def status(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.get("/status"))
        return doc


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    ports = {n: free_port(AGENT_IP) for n in ("outbound", "hbone", "dns", "metrics", "health")}
    ports["admin"] = free_port("127.0.0.1")
    subprocess.run([*NODEMESH, "ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD],
                   check=True, capture_output=True)
    (tmp_path / "m.yaml").write_text(MANIFEST)
    subprocess.run([*NODEMESH, "apply", "-f", str(tmp_path / "m.yaml"), "--registry-dir",
                    str(tmp_path / "registry")], check=True, capture_output=True)
    cfg = {
        "node": "n1",
        "addresses": {"proxy": AGENT_IP, "hbone": AGENT_IP, "metrics": AGENT_IP},
        "ports": ports,
        "registry": {"backend": "embedded", "dir": str(tmp_path / "registry")},
        "ca": {"dir": str(tmp_path / "ca")},
        "peers": {"n2": PEER_IP},
        "runtime_dir": str(tmp_path),
        "drain_s": 0,
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen([*NODEMESH, "agent", "-c", str(tmp_path / "agent.yaml"),
                                 "--no-interception"], stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready", or EOF if it died
        assert line == b"ready\n", (tmp_path / "agent.log").read_text()[-3000:]
        yield RunningAgent(tmp_path, ports, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def registry_of(doc: dict[str, object]) -> dict[str, object]:
    reg = doc["registry"]
    assert isinstance(reg, dict)
    return reg


def test_corrupt_state_file_makes_the_agent_stale_until_fixed(agent: RunningAgent) -> None:
    assert registry_of(agent.status())["stale"] is False
    good = agent.state_file.read_bytes()
    agent.state_file.write_bytes(good[: len(good) // 2])  # a torn write, as an editor might leave
    samples: list[dict[str, object]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.5:  # the watcher polls 50x/s: it must stay stale throughout
        samples.append(agent.status())
        time.sleep(0.1)
    late = samples[5:]  # from 0.5 s on
    assert late and all(registry_of(s)["stale"] is True for s in late), [
        registry_of(s)["stale"] for s in samples]
    last = late[-1]
    assert last["ok"] is False
    err = str(registry_of(last)["last_error"])
    assert str(agent.state_file) in err and "corrupted" in err, err
    # still serving its last good snapshot
    names = {w["name"] for w in json.loads(agent.get("/workloads"))}
    assert names == {"web"}
    # the CLI says it, and exits "degraded"
    r = subprocess.run([*NODEMESH, "status", "--admin", f"127.0.0.1:{agent.ports['admin']}"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "STALE" in r.stdout and "corrupted" in r.stdout, r.stdout
    # fixed: recovers by itself
    agent.state_file.write_bytes(good)
    deadline = time.monotonic() + 5
    while registry_of(agent.status())["stale"] is not False:
        assert time.monotonic() < deadline, agent.status()
        time.sleep(0.1)
    assert registry_of(agent.status())["last_error"] == ""


class SecretServer:
    """A node-local service (a database, an admin port) the mesh must never expose."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"SECRET\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


async def through_tunnel(agent: RunningAgent, target: hbone.Target) -> bytes | str:
    """What a peer node's client reads from ``target`` through n1's HBONE port: bytes, or
    the refusal."""
    ca = MeshCA.load(str(agent.dir / "ca"))
    certs = CertManager(LocalIssuer(ca), SystemClock(), ttl_s=3600)
    pool = TunnelPool(certs.ensure, ClientContexts(ca.bundle, trust_domain=TD), connect_timeout_s=3)
    try:
        async with asyncio.timeout(10):
            stream = await pool.open_stream(
                SpiffeId(TD, "default", "client"), SpiffeId(TD, "default", "web"), AGENT_IP,
                hbone.connect_headers(target, "10.244.2.5", 40000), agent.ports["hbone"])
            out = b""
            while True:
                data, flow = await stream.read()
                if not data:
                    return out
                stream.ack(flow)
                out += data
    except (TunnelError, ConnectionError) as e:
        return f"refused: {e}"
    finally:
        await pool.close()


def test_workload_at_a_node_address_is_never_dialled(agent: RunningAgent) -> None:
    secret = SecretServer("127.0.0.9")
    try:
        # written around apply, as someone with write access to the store could
        EmbeddedBackend(agent.dir / "registry").commit({w.key: _dump(w) for w in (
            Workload("evil-lo", "default", "127.0.0.9", node="n1", service_account="web"),
            Workload("evil-peer", "default", PEER_IP, node="n1", service_account="web"),
            Workload("evil-self", "default", AGENT_IP, node="n1", service_account="web"),
        )})
        deadline = time.monotonic() + 5
        while int(registry_of(agent.status())["revision"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the snapshot task picks the new snapshot up within 0.2 s
        for target in (hbone.Target("127.0.0.9", secret.port),
                       hbone.Target(PEER_IP, agent.ports["admin"]),
                       hbone.Target(AGENT_IP, agent.ports["metrics"])):
            got = asyncio.run(through_tunnel(agent, target))
            assert isinstance(got, str) and got.startswith("refused"), (target, got)
        assert secret.accepted == 0
        # the agent says what it left out, by reason, and does not list them as its workloads
        metrics = agent.get("/metrics", "metrics", AGENT_IP).decode()
        assert 'nodemesh_registry_rejected_workloads{reason="loopback"} 1.0' in metrics
        assert 'nodemesh_registry_rejected_workloads{reason="node_address"} 2.0' in metrics
        names = {w["name"] for w in json.loads(agent.get("/workloads"))}
        assert names == {"web"}
        log = (agent.dir / "agent.log").read_text()
        assert "default/evil-lo takes no traffic: 127.0.0.9 is a loopback address" in log
        assert f"default/evil-peer takes no traffic: {PEER_IP} is the address of node n2" in log
        assert f"default/evil-self takes no traffic: {AGENT_IP} is this agent's" in log
        assert log.count("evil-self takes no traffic") == 1
    finally:
        secret.close()

