"""The mesh end to end on the testbed: real eBPF capture, real agents in node
namespaces, real HBONE mTLS across the fabric, real clients (curl, dig)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import run_prefix

WEB_VIP = "10.96.0.10"
BULK_VIP = "10.96.0.11"

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web-weighted, namespace: default}}
spec:
  vip: 10.96.0.12
  selector: {{app: web}}
  loadBalancer: WEIGHTED_ROUND_ROBIN
  ports: [{{name: http, port: 80, targetPort: http, protocol: http}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web-random, namespace: default}}
spec:
  vip: 10.96.0.13
  selector: {{app: web}}
  loadBalancer: RANDOM
  ports: [{{name: http, port: 80, targetPort: http, protocol: http}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  vip: {WEB_VIP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http, protocol: http}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: bulk, namespace: default}}
spec:
  vip: {BULK_VIP}
  selector: {{app: bulk}}
  ports: [{{name: tcp, port: 9000, targetPort: 9000, protocol: tcp}}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n1-p2": ("client", {"app": "client"}, {}),
    "n2-p1": ("web", {"app": "web"}, {"http": 8080}, 1),
    "n2-p2": ("web", {"app": "web"}, {"http": 8080}, 3),
    "n2-p3": ("bulk", {"app": "bulk"}, {}),
}

# A TCP server: for each connection, hash everything until EOF, then reply "<bytes> <sha256>".
SHA_SERVER = textwrap.dedent(
    """
    import asyncio, hashlib
    async def handle(r, w):
        h = hashlib.sha256(); n = 0
        while chunk := await r.read(1 << 20):
            h.update(chunk); n += len(chunk)
        w.write(f"{n} {h.hexdigest()}".encode()); await w.drain(); w.close()
    async def main():
        s = await asyncio.start_server(handle, "0.0.0.0", 9000, backlog=1024)
        print("ready", flush=True)
        await s.serve_forever()
    asyncio.run(main())
    """
)


# Mesh-wide PERMISSIVE, the bulk pod STRICT: plaintext to web pods is delivered (and counted),
# plaintext to the bulk pod is refused unless it comes from the node proxy.
AGENT_EXTRA: dict[str, object] = {
    "peer_authentication": {"mode": "PERMISSIVE", "workloads": {"default/n2-p3": "STRICT"}},
}


class Mesh:
    def __init__(self, bed: meshbed.MeshBed, www: str) -> None:
        self.bed = bed
        self.www = www
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

    def start_http(self, pod: str) -> None:
        d = os.path.join(self.www, pod)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "whoami"), "w") as f:
            f.write(pod)
        p = self.bed.topo.pod(pod)
        assert p is not None
        self.servers[pod] = testbed.popen_in_pod(
            p,
            [sys.executable, "-m", "http.server", "8080", "--bind", p.address, "--directory", d],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop_server(self, pod: str) -> None:
        proc = self.servers.pop(pod)
        proc.kill()
        proc.wait()

    def curl(self, pod: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.bed.exec(pod, ["curl", "-sS", "--max-time", "10", *extra, url])

    def metrics(self, node: str) -> str:
        n = self.bed.topo.node(node)
        assert n is not None
        # scraped from inside the testbed, as Prometheus on the node would
        r = testbed.popen_in(
            n.netns, None, ["curl", "-sS", f"http://{n.fabric_address}:15020/metrics"], stdout=subprocess.PIPE
        )
        return r.communicate(timeout=10)[0].decode()


def wait_http(mesh: Mesh, pod: str) -> None:
    p = mesh.bed.topo.pod(pod)
    assert p is not None
    for _ in range(100):
        r = mesh.bed.exec(pod, ["curl", "-s", "-o", "/dev/null", f"http://{p.address}:8080/whoami"])
        if r.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"http server in {pod} did not start")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    prefix = run_prefix("e")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 3)))
    www = f"/run/nodemesh/{prefix}-www"
    try:
        with meshbed.running(
            topo, SERVICES + meshbed.workload_manifest(topo, ROLES), extra=AGENT_EXTRA
        ) as bed:
            m = Mesh(bed, www)
            for pod in ("n2-p1", "n2-p2"):
                m.start_http(pod)
                wait_http(m, pod)
            p3 = topo.pod("n2-p3")
            assert p3 is not None
            sha = testbed.popen_in_pod(p3, [sys.executable, "-c", SHA_SERVER], stdout=subprocess.PIPE)
            assert sha.stdout is not None and sha.stdout.readline() == b"ready\n"
            m.servers["n2-p3"] = sha
            try:
                yield m
            finally:
                for proc in m.servers.values():
                    proc.kill()
                    proc.wait()
    finally:
        testbed.down(prefix)
        shutil.rmtree(www, ignore_errors=True)


def test_curl_by_vip_and_by_name_is_served_by_pods_on_the_other_node(mesh: Mesh) -> None:
    by_vip = mesh.curl("n1-p1", f"http://{WEB_VIP}/whoami")
    assert by_vip.returncode == 0, by_vip.stderr
    assert by_vip.stdout in ("n2-p1", "n2-p2")
    for name in ("web.default.svc.cluster.local", "web.default", "web.service.consul"):
        r = mesh.curl("n1-p1", f"http://{name}/whoami")
        assert r.returncode == 0, (name, r.stderr)
        assert r.stdout in ("n2-p1", "n2-p2")
    # the app sees the service VIP as its peer (getpeername hook)
    r = mesh.curl("n1-p1", f"http://{WEB_VIP}/whoami", "-o", "/dev/null", "-w", "%{remote_ip}:%{remote_port}")
    assert r.stdout == f"{WEB_VIP}:80"


def test_300_requests_follow_round_robin(mesh: Mesh) -> None:
    script = f"for i in $(seq 300); do curl -s --max-time 5 http://{WEB_VIP}/whoami; echo; done"
    r = mesh.bed.exec("n1-p2", ["sh", "-c", script], timeout_s=120)
    got = Counter(line for line in r.stdout.splitlines() if line)
    assert sum(got.values()) == 300, r.stderr
    # ROUND_ROBIN on one agent: an exact alternation (other tests' traffic may shift the phase by one)
    assert abs(got["n2-p1"] - got["n2-p2"]) <= 2, got


def _split(mesh: Mesh, pod: str, vip: str, n: int = 300) -> Counter[str]:
    script = f"for i in $(seq {n}); do curl -s --max-time 5 http://{vip}/whoami; echo; done"
    r = mesh.bed.exec(pod, ["sh", "-c", script], timeout_s=120)
    got = Counter(line for line in r.stdout.splitlines() if line)
    assert sum(got.values()) == n, r.stderr
    return got


def test_300_requests_follow_weights_with_weighted_round_robin(mesh: Mesh) -> None:
    got = _split(mesh, "n1-p2", "10.96.0.12")
    # weights 1:3 -> exactly a quarter and three quarters with smooth weighted round robin
    assert (got["n2-p1"], got["n2-p2"]) == (75, 225), got


def test_300_requests_random_is_within_tolerance(mesh: Mesh) -> None:
    got = _split(mesh, "n1-p2", "10.96.0.13")
    # RANDOM ignores weights: 150 each, standard deviation ~8.7; allow 4 sigma
    assert 115 <= got["n2-p1"] <= 185, got


def test_the_fabric_carries_tls_only(mesh: Mesh) -> None:
    marker = "nodemesh-plaintext-marker-" + os.urandom(6).hex()
    fabric = mesh.bed.topo.fabric_netns
    dump = testbed.popen_in(
        fabric,
        None,
        ["tcpdump", "--immediate-mode", "-i", "any", "-U", "-s", "0", "-w", "-", "tcp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert dump.stderr is not None
        while b"listening on" not in dump.stderr.readline():
            pass
        time.sleep(0.5)  # the packet socket is bound just after tcpdump says so
        r = mesh.curl("n1-p1", f"http://{WEB_VIP}/whoami?{marker}", "-H", f"X-Marker: {marker}")
        assert r.returncode == 0
        time.sleep(0.3)
    finally:
        dump.send_signal(signal.SIGINT)
        raw, dump_err = dump.communicate(timeout=10)
    assert marker.encode() not in raw, "plaintext payload seen on the fabric"
    assert b"whoami" not in raw
    # what crossed was TLS application data to the HBONE port (the pooled tunnel was set up earlier)
    assert b"\x17\x03\x03" in raw, dump_err
    assert (15008).to_bytes(2, "big") in raw
    assert (8080).to_bytes(2, "big") + b"\x00" not in raw  # nothing went to the pods' port in the clear


def _sha_client(vip: str, total_mib: int) -> str:
    return textwrap.dedent(
        f"""
        import hashlib, socket
        s = socket.create_connection(("{vip}", 9000), timeout=60)
        h = hashlib.sha256(); block = bytes(range(256)) * 4096
        for i in range({total_mib}):
            chunk = block[i % 256:] + block[:i % 256]
            h.update(chunk); s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)     # half-close: we still read the reply
        reply = b""
        while data := s.recv(65536):
            reply += data
        print(reply.decode(), {total_mib} << 20, h.hexdigest())
        """
    )


def test_one_gib_arrives_byte_identical_with_half_close(mesh: Mesh) -> None:
    r = mesh.bed.exec("n1-p1", [sys.executable, "-c", _sha_client(BULK_VIP, 1024)], timeout_s=300)
    assert r.returncode == 0, r.stderr
    got_n, got_sha, sent_n, sent_sha = r.stdout.split()
    assert (got_n, got_sha) == (sent_n, sent_sha)
    assert int(got_n) == 1 << 30


def test_500_concurrent_connections_all_complete(mesh: Mesh) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, hashlib
        async def one(i):
            r, w = await asyncio.open_connection("{BULK_VIP}", 9000)
            data = f"connection {{i}}".encode() * 100
            w.write(data); await w.drain(); w.write_eof()
            reply = await r.read(); w.close()
            return reply.decode() == f"{{len(data)}} {{hashlib.sha256(data).hexdigest()}}"
        async def main():
            res = await asyncio.gather(*(one(i) for i in range(500)), return_exceptions=True)
            print(sum(x is True for x in res), [repr(x) for x in res if x is not True][:3])
        asyncio.run(main())
        """
    )
    r = mesh.bed.exec(
        "n1-p2", ["sh", "-c", f"ulimit -n 4096; exec {sys.executable} -c '{script}'"], timeout_s=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("500 "), r.stdout


def test_metrics_on_15020_carry_istio_labels(mesh: Mesh) -> None:
    mesh.curl("n1-p1", f"http://{WEB_VIP}/whoami")
    text = mesh.metrics("n1")
    line = next(  # web's port is declared http: counted per request
        (
            ln
            for ln in text.splitlines()
            if ln.startswith("istio_requests_total{")
            and 'destination_service="web.default' in ln
            and 'reporter="source"' in ln
            and 'response_code="200"' in ln
        ),
        None,
    )
    assert line is not None, text[:2000]
    for label in (
        'reporter="source"',
        'source_workload="n1-p',
        'source_principal="spiffe://cluster.local/ns/default/sa/client"',
        'destination_principal="spiffe://cluster.local/ns/default/sa/web"',
        'connection_security_policy="mutual_tls"',
        'destination_workload="n2-p',
    ):
        assert label in line, (label, line)
    assert 'request_protocol="http"' in line and 'destination_service_name="web"' in line, line
    assert re.search(r"^nodemesh_bpf_\w+ \d", text, re.M), "eBPF counters are exported"
    inbound = mesh.metrics("n2")
    dest_ok = r'^istio_requests_total\{[^}]*reporter="destination"[^}]*response_code="200"'
    assert re.search(dest_ok, inbound, re.M)
    # the bulk service's port is declared tcp: counted per connection, by both reporters
    bulk = r'^istio_tcp_received_bytes_total\{[^}]*destination_workload="n2-p3"[^}]*reporter="destination"'
    assert re.search(bulk, inbound, re.M)


def test_status_shows_the_data_path(mesh: Mesh) -> None:
    node = mesh.bed.topo.nodes[0]
    r = mesh.bed.cli("status", "--bpffs-root", mesh.bed.bpffs_root(node), "-o", "json", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["enrolled"] == len(node.pods), doc
    assert "connect4" in r.stdout


def test_endpoint_killed_mid_run_no_request_to_healthy_endpoints_fails(mesh: Mesh) -> None:
    script = f"for i in $(seq 300); do curl -s --max-time 5 http://{WEB_VIP}/whoami || echo FAIL; echo; done"
    p = mesh.bed.topo.pod("n1-p1")
    assert p is not None
    loop = testbed.popen_in_pod(p, ["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    mesh.stop_server("n2-p2")  # an endpoint dies while requests flow
    try:
        out, _ = loop.communicate(timeout=120)
    finally:
        mesh.start_http("n2-p2")
        wait_http(mesh, "n2-p2")
    lines = [ln for ln in out.decode().splitlines() if ln]
    assert len(lines) == 300
    # At most the one request that was in flight on n2-p2 when it was killed may fail (with
    # round robin, the one after n2-p2's last answer and n2-p1's next); every request after
    # that is served by the healthy endpoint.
    last_p2 = max(i for i, ln in enumerate(lines) if ln == "n2-p2")
    fails = [i for i, ln in enumerate(lines) if ln == "FAIL"]
    assert len(fails) <= 1 and all(i <= last_p2 + 2 for i in fails), Counter(lines)
    assert set(lines[last_p2 + 3 :]) == {"n2-p1"}
    assert len(lines) - last_p2 > 50  # many requests ran after the kill


def test_metrics_listen_only_on_the_node_fabric_address(mesh: Mesh) -> None:
    """The metrics port is bound to the node's fabric address inside the node's namespace, not
    to every address; a scrape from inside the testbed works. (Nothing is sent from the root
    namespace: a refused connection there said nothing, a dead agent refuses too.)"""
    n = mesh.bed.topo.nodes[0]
    r = testbed.popen_in(n.netns, None, ["ss", "-Hltn", "sport = :15020"], stdout=subprocess.PIPE)
    out = r.communicate(timeout=10)[0].decode()
    bound = [ln.split()[3] for ln in out.splitlines() if ln.strip()]
    assert bound == [f"{n.fabric_address}:15020"], out
    text = mesh.metrics(n.name)
    assert re.search(r"^nodemesh_registry_revision \d", text, re.M)
    assert re.search(r"^nodemesh_registry_dataplane_revision \d", text, re.M)


PLAIN_CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)
        s.sendall(b"GET /whoami HTTP/1.0\\r\\n\\r\\n")
        s.shutdown(socket.SHUT_WR)
        print("connected", s.recv(200).decode(errors="replace").split("\\r\\n")[0])
    except OSError as e:
        print("refused", type(e).__name__)
    """
)


def _plain_from_node(mesh: Mesh, node: str, addr: str, port: int) -> str:
    n = mesh.bed.topo.node(node)
    assert n is not None
    # a process on node n1 itself (no pod, no capture): plaintext straight to a pod IP on n2
    p = testbed.popen_in(
        n.netns, None, [sys.executable, "-c", PLAIN_CONNECT, addr, str(port)], stdout=subprocess.PIPE
    )
    return p.communicate(timeout=20)[0].decode().strip()


def _counter(text: str, workload: str, verdict: str) -> float:
    for ln in text.splitlines():
        if (
            ln.startswith("nodemesh_peer_auth_connections_total{")
            and f'workload="{workload}"' in ln
            and f'verdict="{verdict}"' in ln
        ):
            return float(ln.rsplit(" ", 1)[1])
    return 0.0


def test_permissive_delivers_plaintext_and_strict_refuses_it(mesh: Mesh) -> None:
    web = mesh.bed.topo.pod("n2-p1")
    bulk = mesh.bed.topo.pod("n2-p3")
    assert web and bulk
    before = mesh.metrics("n2")
    # PERMISSIVE (mesh-wide): delivered, and counted as plaintext
    assert _plain_from_node(mesh, "n1", web.address, 8080).startswith("connected HTTP/1.0 200")
    # STRICT (this workload): refused
    assert _plain_from_node(mesh, "n1", bulk.address, 9000).startswith("refused")
    # ... while the mesh path to the same pod works (it arrives from the node proxy)
    r = mesh.bed.exec("n1-p1", [sys.executable, "-c", _sha_client(BULK_VIP, 1)], timeout_s=60)
    assert r.returncode == 0 and r.stdout.split()[0] == str(1 << 20), r.stderr
    after = mesh.metrics("n2")
    assert _counter(after, "n2-p1", "plaintext") == _counter(before, "n2-p1", "plaintext") + 1
    assert _counter(after, "n2-p3", "refused") >= _counter(before, "n2-p3", "refused") + 1
    assert _counter(after, "n2-p3", "proxied") >= _counter(before, "n2-p3", "proxied") + 1
