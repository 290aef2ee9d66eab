"""Issue 10, finding 3: anyone could stop a node's inbound with half-open connections.

Real agents on the testbed, n1 started with RLIMIT_NOFILE 256 (so a few hundred
connections exhaust it) and limits high enough to let an attacker get there;
n2 with the default handshake timeout and a small per-peer limit on 15008.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import yaml

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import run_prefix

WEB_VIP = "10.96.0.30"
MANIFEST = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  vip: {WEB_VIP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: tcp}}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("web", {"app": "web"}, {"http": 8080}),
    "n2-p1": ("client", {"app": "client"}, {}),
}
NOFILE = 256
HIGH = {"max_connections": 100000, "max_connections_per_peer": 100000}
N1_LIMITS = {"hbone_handshake_timeout_s": 30, "dns_tcp_idle_timeout_s": 30,
             "listeners": {"hbone": HIGH, "dns_tcp": HIGH}}
N2_LIMITS = {"listeners": {"hbone": {"max_connections": 1000, "max_connections_per_peer": 20}}}

# Opens N TCP connections to HOST:PORT (optionally from SRC) and sends nothing; prints how many
# connected and how many of those the server closed or reset at once; closes them all when stdin says so.
ATTACKER = textwrap.dedent(
    """
    import errno, resource, select, socket, sys, time
    host, port, n, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        if src:
            s.bind((src, 0))
        s.connect_ex((host, port))
        socks.append(s)
    time.sleep(1.0)
    state = [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for s in socks]
    connected = [s for s, e in zip(socks, state) if e == 0]
    readable, _, _ = select.select(connected, [], [], 0.5)
    closed = state.count(errno.ECONNRESET)  # accepted, then reset at once
    connected += [None] * closed
    for s in readable:
        try:
            if s.recv(1) == b"":
                closed += 1
        except OSError:
            closed += 1
    print(len(connected), closed, flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    """
)


def start_agent(bed: meshbed.MeshBed, name: str, nofile: int | None = None) -> None:
    node = bed.topo.node(name)
    assert node is not None
    with open(bed.config_path(node), "w") as f:
        yaml.safe_dump(bed.agent_config(node), f)
    log_path = os.path.join(bed.run_dir, f"agent-{name}.log")
    bed.logs[name] = log_path
    argv = [*meshbed.NODEMESH, "agent", "-c", bed.config_path(node)]
    if nofile is not None:  # soft and hard: the agent cannot raise it
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", *argv]
    with open(log_path, "ab") as log:
        proc = testbed.popen_in(node.netns, None, argv, stdout=subprocess.PIPE, stderr=log)
    bed.agents[name] = proc  # bed.stop() stops it by PID, also on failure
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready", bed.log_text(name)


@pytest.fixture(scope="module")
def bed() -> Iterator[meshbed.MeshBed]:
    prefix = run_prefix("x")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 1)))
    server: subprocess.Popen[bytes] | None = None
    try:
        with meshbed.running(topo, MANIFEST + meshbed.workload_manifest(topo, ROLES),
                             start_agents=False) as b:
            b.node_extra = {"n1": {"limits": N1_LIMITS}, "n2": {"limits": N2_LIMITS}}
            start_agent(b, "n1", NOFILE)
            start_agent(b, "n2")
            pod = topo.pod("n1-p1")
            assert pod is not None
            server = testbed.popen_in_pod(
                pod, [sys.executable, "-m", "http.server", "8080", "--bind", pod.address],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            yield b
    finally:
        if server is not None:
            server.kill()
            server.wait()
        testbed.down(prefix)


def attack(bed: meshbed.MeshBed, netns: str, host: str, port: int, n: int,
           src: str = "") -> tuple[subprocess.Popen[bytes], int, int]:
    p = testbed.popen_in(netns, None, [sys.executable, "-c", ATTACKER, host, str(port), str(n), src],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    connected, closed = (int(x) for x in line.split())
    return p, connected, closed


def stop_attack(p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()
    p.wait(timeout=10)


def status(bed: meshbed.MeshBed, node: str, json_out: bool = True) -> tuple[int, str]:
    n = bed.topo.node(node)
    assert n is not None
    args = ["status", "--netns", n.netns] + (["-o", "json"] if json_out else [])
    r = bed.cli(*args, check=False)
    return r.returncode, r.stdout


def ready(bed: meshbed.MeshBed, from_node: str, address: str) -> tuple[str, str]:
    """(HTTP code, body) of /healthz/ready on the health port, asked with curl from another node."""
    n = bed.topo.node(from_node)
    assert n is not None
    p = testbed.popen_in(n.netns, None, ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}",
                                         f"http://{address}:15021/healthz/ready"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=10)
    body, _, code = out.decode().rpartition("\n")
    return code, body or err.decode()


def curl_through_mesh(bed: meshbed.MeshBed) -> str:
    r = bed.exec("n2-p1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                           f"http://{WEB_VIP}/"])
    return r.stdout


def wait_for(check: object, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.1)
    return None


@pytest.mark.parametrize(("listener", "address", "port", "attacker"), [
    ("hbone", "10.250.0.1", 15008, "n2"),
    ("dns_tcp", "10.244.1.1", 15053, "n1-p1"),
])
def test_descriptor_exhaustion_is_reported_and_recovers(
    bed: meshbed.MeshBed, listener: str, address: str, port: int, attacker: str
) -> None:
    n2 = bed.topo.node("n2")
    assert n2 is not None
    netns = n2.netns if attacker == "n2" else bed.topo.pod(attacker).netns  # type: ignore[union-attr]
    p, connected, _closed = attack(bed, netns, address, port, NOFILE + 100)
    try:
        assert connected > NOFILE  # the kernel completed them; the agent could not accept them all
        # while exhausted: status and readiness say degraded and name the listener
        rc, out = status(bed, "n1")
        assert out.startswith("{"), f"the agent did not answer status while exhausted: {out}"
        doc = json.loads(out)
        assert rc == 1 and doc["ok"] is False, doc
        assert any(f"listener {listener} cannot accept" in d and "EMFILE" in d for d in doc["degraded"]), doc
        assert doc["accept"][listener]["accepting"] is False
        rc, text = status(bed, "n1", json_out=False)
        assert rc == 1 and f"DEGRADED: listener {listener} cannot accept" in text, text
        code, body = ready(bed, "n2", "10.250.0.1")
        assert code == "503" and f"listener {listener}" in body, (code, body)
    finally:
        stop_attack(p)
    # the attacker's sockets are gone: the agent accepts again by itself, readiness is back
    took = wait_for(lambda: ready(bed, "n2", "10.250.0.1")[0] == "200", 3.0)
    assert took is not None and took < 2.0, (took, ready(bed, "n2", "10.250.0.1"))
    rc, out = status(bed, "n1")
    assert rc == 0 and json.loads(out)["degraded"] == [], out
    # a new tunnel to n1 (its inbound accepts a real TLS client again) carries curl
    assert wait_for(lambda: curl_through_mesh(bed) == "200", 2.0) is not None
    log = bed.log_text("n1")
    assert "accept loop ends" not in log and "Traceback" not in log, log
    assert log.count(f"listener {listener} cannot accept") <= 2, log  # rate-limited, not per error


def test_per_peer_limit_resets_the_excess_and_serves_others(bed: meshbed.MeshBed) -> None:
    n1 = bed.topo.node("n1")
    assert n1 is not None
    # 30 silent connections from one address (the n1-p1 pod) to n2's 15008; the limit is 20
    pod = bed.topo.pod("n1-p1")
    assert pod is not None
    p, connected, closed = attack(bed, pod.netns, "10.250.0.2", 15008, 30)
    try:
        assert connected == 30 and closed == 10, (connected, closed)
        # another peer address (n1's, where its agent's tunnels come from) is still accepted
        other, connected, closed = attack(bed, n1.netns, "10.250.0.2", 15008, 1)
        stop_attack(other)
        assert (connected, closed) == (1, 0)
        metrics = bed.exec("n1-p1", ["curl", "-sS", "--max-time", "3", "http://10.250.0.2:15020/metrics"]).stdout
        assert 'nodemesh_listener_refused_connections_total{listener="hbone",reason="peer_limit"} 10.0' \
            in metrics, metrics[-2000:]
    finally:
        stop_attack(p)


def test_silent_connections_are_closed_quickly(bed: meshbed.MeshBed) -> None:
    """A TCP connection to 15008 that never starts TLS is closed after 3 s (was 10 s); one to DNS
    over TCP that sends no query after 5 s (was 10 s)."""
    n1 = bed.topo.node("n1")
    n2 = bed.topo.node("n2")
    assert n1 is not None and n2 is not None
    script = textwrap.dedent(
        """
        import socket, sys, time
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
        t0 = time.monotonic()
        try:
            s.recv(1)
        except OSError:
            pass
        print(round(time.monotonic() - t0, 2))
        """
    )
    procs = [
        testbed.popen_in(n1.netns, None, [sys.executable, "-c", script, "10.250.0.2", "15008"],
                         stdout=subprocess.PIPE),
        testbed.popen_in(n2.netns, None, [sys.executable, "-c", script, "10.244.2.1", "15053"],
                         stdout=subprocess.PIPE),
    ]
    hbone_s, dns_s = (float(p.communicate(timeout=20)[0]) for p in procs)
    assert 2.5 <= hbone_s <= 4.5, hbone_s
    assert 4.5 <= dns_s <= 6.5, dns_s
