"""Host services (issue 14) on the testbed: a service in node 1's own network namespace,
in a cgroup of its own, registered from the seed's Consul definition verbatim; its check run
by node 1's agent; a pod on node 2 reaching it by name over HBONE; it reaching pods by name
through its own enrolled cgroup; and the agent's own connections never captured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import yaml

from agent import meshbed
from bpf.maps import Dataplane
from netns import cgroup, testbed, topology
from netns.topology import Node
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics

SEED = os.path.join(os.path.dirname(__file__), "..", "fixtures", "seed", "my-service.hcl")
WEB_VIP = "10.96.0.20"
SINK_VIP = "10.96.0.21"
LOAD_CONNECTIONS = 2000

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web}}
spec:
  vip: {WEB_VIP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: sink}}
spec:
  vip: {SINK_VIP}
  selector: {{app: sink}}
  ports: [{{name: tcp, port: 9000, targetPort: 9000, protocol: tcp}}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("sink", {"app": "sink"}, {"tcp": 9000}),
    "n2-p1": ("web", {"app": "web"}, {"http": 8080}),
    "n2-p2": ("client", {"app": "client"}, {}),
}

# Pod servers (pod_servers: argv = pod name, pod address): n2-p1 answers HTTP with its name,
# n1-p1 answers each TCP connection with "<connections so far> <peer address>".
POD_SERVER = textwrap.dedent("""
    import http.server, socket, sys
    name, addr = sys.argv[1], sys.argv[2]
    if name == "n2-p1":
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = f"{name} saw {self.client_address[0]}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *a):
                pass
        s = http.server.ThreadingHTTPServer((addr, 8080), H)
        print("ready", flush=True)
        s.serve_forever()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 9000))
    s.listen(1024)
    print("ready", flush=True)
    n = 0
    while True:
        c, peer = s.accept()
        n += 1
        c.recv(16)
        c.sendall(f"{n} {peer[0]}".encode())
        c.close()
""")
# The host service as a client: LOAD new connections to the sink's VIP, one after another
# (at most 60 s); prints how many completed and the last answer.
LOAD_CLIENT = textwrap.dedent("""
    import socket, sys, time
    vip, count = sys.argv[1], int(sys.argv[2])
    deadline = time.monotonic() + 60
    done, last = 0, ""
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        with socket.create_connection((vip, 9000), timeout=5) as c:
            c.sendall(b"x")
            last = c.recv(64).decode()
        done += 1
    print(done, last, flush=True)
""")


def series(text: str, name: str, **labels: str) -> float:
    """The sum of metric ``name`` over the series that carry ``labels``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " "))
               and all(f'{k}="{v}"' in line for k, v in labels.items()))


class HostBed:
    def __init__(self, bed: meshbed.MeshBed, host_cg: str) -> None:
        self.bed = bed
        self.host_cg = host_cg  # relative to the cgroup v2 mount
        self.server: subprocess.Popen[bytes] | None = None

    @property
    def n1(self) -> Node:
        n = self.bed.topo.node("n1")
        assert n is not None
        return n

    def in_host_cgroup(self, argv: list[str], cg: str | None = "") -> subprocess.Popen[bytes]:
        return testbed.popen_in(self.n1.netns, self.host_cg if cg == "" else cg, argv,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run_on_host(self, argv: list[str], cg: str | None = "", timeout_s: float = 90
                    ) -> tuple[int, str, str]:
        p = self.in_host_cgroup(argv, cg)
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        return p.returncode, out.decode(), err.decode()

    def start_host_service(self) -> None:
        self.server = self.bed.start_host_service(self.n1, self.host_cg)

    def stop_host_service(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            self.server = None

    def health(self) -> str:
        return self._health()[0]

    def _health(self) -> tuple[str, int]:
        r = self.bed.cli("describe", "workload", "my-service", "-o", "json",
                         "--registry-dir", self.bed.registry_dir)
        doc = json.loads(r.stdout)
        return str(doc["effectiveHealth"]), int(doc["revision"])

    def wait_health(self, want: str, timeout_s: float = 25) -> float:
        """Until my-service is ``want`` in the registry (returns how long that took) and both
        agents' data paths route by that revision."""
        start = time.monotonic()
        seen = ("", 0)
        while time.monotonic() - start < timeout_s:
            seen = self._health()
            if seen[0] == want:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"my-service stayed {seen[0]!r}, not {want!r}, for {timeout_s}s")
        took = time.monotonic() - start
        for node in ("n1", "n2"):
            while series(node_metrics(self.bed.topo, node), "nodemesh_registry_dataplane_revision") < seen[1]:
                assert time.monotonic() - start < timeout_s + 5, f"{node} did not reach revision {seen[1]}"
                time.sleep(0.1)
        return took


@pytest.fixture(scope="module")
def bed() -> Iterator[meshbed.MeshBed]:
    """The testbed, registry and CA; agents not started yet. Node 1's agent will run in a cgroup
    *below* the one its capture programs are attached to, so they run for its own sockets too."""
    prefix = run_prefix("h")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    try:
        with meshbed.running(topo, SERVICES + meshbed.workload_manifest(topo, ROLES),
                             start_agents=False) as b:
            n1 = topo.node("n1")
            assert n1 is not None
            b.agent_cgroups["n1"] = f"{n1.cgroup}/agent"
            cgroup.create(b.agent_cgroups["n1"])
            yield b
    finally:
        testbed.down(prefix)  # the host cgroup lives below the testbed's cgroup: removed too


def test_agent_refuses_its_own_cgroup_and_its_ancestors(bed: meshbed.MeshBed) -> None:
    n1 = bed.topo.node("n1")
    assert n1 is not None
    own = cgroup.cgroup_path(bed.agent_cgroups["n1"])
    # its own, its parent (the interception cgroup, the pods' parent) and the root cgroup
    for path in (own, os.path.dirname(own), cgroup.cgroup2_mount()):
        bed.with_host_cgroups(n1, [path])
        proc = bed.spawn_agent(n1)
        assert proc.wait(timeout=120) != 0
        bed.agents.pop(n1.name)
        assert proc.stdout is not None
        proc.stdout.close()
        log = bed.log_text(n1.name)
        assert "interception.host_cgroups" in log and (
            "the agent's own cgroup" in log or "an ancestor of the agent's cgroup" in log), log
    with Dataplane.open(bed.bpffs_root(n1)) as dp:
        assert dp.host_cgroups() == []  # refused before anything was enrolled


@pytest.fixture(scope="module")
def host(bed: meshbed.MeshBed) -> Iterator[HostBed]:
    """Agents running, node 1 with the host cgroup enrolled, the host service started in it
    and registered from the seed's definition; pod servers up."""
    n1 = bed.topo.node("n1")
    assert n1 is not None
    rel = f"{os.path.dirname(n1.cgroup)}/hosts-n1/my-service.service"  # not below the pods' cgroup
    cgroup.create(rel)
    bed.with_host_cgroups(n1, [rel])
    hb = HostBed(bed, rel)
    for node in bed.topo.nodes:
        bed.start_agent(node)
    with pod_servers(bed.topo, POD_SERVER, {"n1-p1": [], "n2-p1": []}):
        hb.start_host_service()
        try:
            r = bed.cli("register", SEED, "--registry-dir", bed.registry_dir,
                        "--config", bed.config_path(n1), check=False)
            assert r.returncode == 0, r.stderr
            yield hb
        finally:
            hb.stop_host_service()


def test_seed_registers_on_the_node_address_and_its_check_flips(host: HostBed) -> None:
    r = host.bed.cli("describe", "workload", "my-service", "-o", "json",
                     "--registry-dir", host.bed.registry_dir)
    doc = json.loads(r.stdout)
    assert (doc["address"], doc["node"]) == (host.n1.fabric_address, "n1")
    assert doc["checks"][0]["target"] == "http://127.0.0.1:8080/health"
    host.wait_health("passing")  # node 1's agent probes the node's own loopback
    host.stop_host_service()
    took = host.wait_health("critical")  # interval 10s: within one interval and the timeout
    assert took < 12.5, took
    r2 = host.bed.exec("n2-p2", ["curl", "-sS", "--max-time", "5", "http://my-service.service.consul:8080/"])
    assert r2.returncode != 0  # no healthy endpoint
    host.start_host_service()
    host.wait_health("passing")


def test_pod_on_node_2_reaches_the_host_service_by_name(host: HostBed) -> None:
    host.wait_health("passing")
    r = host.bed.exec("n2-p2", ["curl", "-sS", "--max-time", "10", "http://my-service.service.consul:8080/"])
    assert r.returncode == 0 and r.stdout == "my-service on the host", r.stderr
    m = node_metrics(host.bed.topo, "n1")  # the destination: node 1's inbound, mTLS
    assert series(m, "istio_tcp_connections_opened_total", reporter="destination",
                  destination_workload="my-service", connection_security_policy="mutual_tls") >= 1, m


def test_host_service_reaches_a_pod_service_by_name_and_unenrolled_processes_do_not(
        host: HostBed) -> None:
    code, out, err = host.run_on_host(
        ["curl", "-sS", "--max-time", "10", "http://web.default.svc.cluster.local/"])
    assert code == 0 and out == f"n2-p1 saw {host.bed.topo.node('n2').gateway}", (out, err)  # type: ignore[union-attr]
    m = node_metrics(host.bed.topo, "n2")  # node 2 knows the caller by its verified identity
    assert series(m, "istio_requests_total", reporter="destination", source_workload="my-service",
                  source_principal="spiffe://cluster.local/ns/default/sa/default") >= 1, m
    # the same client in the node's netns but outside the enrolled cgroup: not captured, so
    # the VIP is routed nowhere and the mesh name is not resolved
    n1 = host.n1
    code, out, err = host.run_on_host(["curl", "-sS", "--max-time", "5", f"http://{WEB_VIP}/"],
                                      cg=os.path.dirname(n1.cgroup))
    assert code == 7, (code, err)  # curl: could not connect


def test_agent_connections_are_never_captured_under_load(host: HostBed) -> None:
    """2000 connections from the host service to a pod on the same node: each is captured
    once (the kernel counter moves by exactly that), and each is carried by exactly one
    agent connection to the pod (its counter says so). The agent runs below the cgroup the
    programs are attached to, so they see each of its dials to the pod (an address in the
    capture CIDRs) and let it pass as not enrolled: none loops back into the proxy."""
    n1 = host.n1
    r = host.bed.cli("status", "--netns", n1.netns, check=False)
    assert f"host cgroups: {cgroup.cgroup_path(host.host_cg)}" in r.stdout, r.stdout + r.stderr
    with Dataplane.open(host.bed.bpffs_root(n1)) as dp:
        assert len(dp.host_cgroups()) == 1
        before = dp.counters()
        start = time.monotonic()
        code, out, err = host.run_on_host([sys.executable, "-c", LOAD_CLIENT, SINK_VIP,
                                           str(LOAD_CONNECTIONS)])
        took = time.monotonic() - start
        after = dp.counters()
    assert code == 0, err
    done, count, peer = out.split()
    assert int(done) == LOAD_CONNECTIONS, out
    assert peer == n1.gateway  # the pod saw the node proxy, not the host service
    assert int(count) == LOAD_CONNECTIONS  # one agent connection per client connection
    assert after["captured"] - before["captured"] == LOAD_CONNECTIONS, (before, after)
    assert after["bypass_not_enrolled"] - before["bypass_not_enrolled"] >= LOAD_CONNECTIONS, (before, after)
    assert after["record_miss"] == before["record_miss"]
    m = node_metrics(host.bed.topo, "n1")
    assert series(m, "istio_tcp_connections_opened_total", reporter="source",
                  source_workload="my-service", destination_workload="n1-p1") == LOAD_CONNECTIONS, m
    assert series(m, "nodemesh_outbound_failures_total") == 0, m
    # the agent's own traffic kept working: its check still passes and reaches the registry
    assert host.health() == "passing"
    # the same load from a pod on the node, for comparison (printed: the cost of host capture)
    start = time.monotonic()
    r = host.bed.exec("n1-p2", [sys.executable, "-c", LOAD_CLIENT, SINK_VIP, str(LOAD_CONNECTIONS)], 90)
    pod_took = time.monotonic() - start
    assert r.returncode == 0 and r.stdout.split()[0] == str(LOAD_CONNECTIONS), r.stdout + r.stderr
    print(f"{LOAD_CONNECTIONS} new connections through the proxy to a same-node pod: from the host "
          f"service {took:.2f}s, from a pod {pod_took:.2f}s; counters: captured "
          f"+{after['captured'] - before['captured']}, bypass_not_enrolled "
          f"+{after['bypass_not_enrolled'] - before['bypass_not_enrolled']}")


def test_host_cgroups_follow_a_reload(host: HostBed) -> None:
    """interception.host_cgroups changes live (SIGHUP): a cgroup taken out of the list is
    detached (its processes reach VIPs no more), put back it is captured again; the agent's own
    cgroup is refused on reload too, and the running list stays."""
    n1 = host.n1
    bed = host.bed

    def reload_with(cgroups: list[str]) -> None:
        bed.with_host_cgroups(n1, cgroups)
        with open(bed.config_path(n1), "w") as f:
            yaml.safe_dump(bed.agent_config(n1), f)
        bed.agents["n1"].send_signal(signal.SIGHUP)

    def enrolled(want: int) -> None:
        deadline = time.monotonic() + 10
        with Dataplane.open(bed.bpffs_root(n1)) as dp:
            while len(dp.host_cgroups()) != want:
                assert time.monotonic() < deadline, (dp.host_cgroups(), bed.log_text("n1"))
                time.sleep(0.1)

    curl_web = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", f"http://{WEB_VIP}/"]
    try:
        reload_with([])
        enrolled(0)
        code, out, err = host.run_on_host(curl_web)
        assert code == 7, (code, out, err)  # not captured: the VIP is routed nowhere
        reload_with([bed.agent_cgroups["n1"]])  # the agent's own: refused, nothing changes
        time.sleep(1.5)
        enrolled(0)
        assert "interception.host_cgroups refused" in bed.log_text("n1")
    finally:
        reload_with([host.host_cg])
    enrolled(1)
    code, out, err = host.run_on_host(curl_web)
    assert (code, out) == (0, "200"), (code, out, err)


def test_a_host_cgroup_made_again_is_enrolled_again(host: HostBed) -> None:
    """systemd removes a unit's cgroup when it stops and makes a new one (a new id) when it
    starts: the agent forgets the old id and enrolls the new cgroup within about a second."""
    n1 = host.n1
    path = cgroup.cgroup_path(host.host_cg)
    curl_web = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", f"http://{WEB_VIP}/"]

    def enrolled_ids(want: int) -> list[int]:
        deadline = time.monotonic() + 10
        with Dataplane.open(host.bed.bpffs_root(n1)) as dp:
            while len(ids := dp.host_cgroups()) != want:
                assert time.monotonic() < deadline, (ids, host.bed.log_text("n1"))
                time.sleep(0.1)
        return ids

    (old_id,) = enrolled_ids(1)
    host.stop_host_service()  # "systemctl stop": the unit's cgroup goes
    cgroup.remove_tree(path)
    enrolled_ids(0)
    cgroup.create(host.host_cg)  # "systemctl start": a new cgroup of the same name
    start = time.monotonic()
    (new_id,) = enrolled_ids(1)
    took = time.monotonic() - start
    assert new_id == os.stat(path).st_ino != old_id
    host.start_host_service()
    code, out, err = host.run_on_host(curl_web)
    assert (code, out) == (0, "200"), (code, out, err)
    print(f"host cgroup made again: enrolled after {took:.2f}s")
