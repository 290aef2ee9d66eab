#!/usr/bin/env python3
"""Data-path benchmark: nodemesh vs HAProxy on the same two-hop mTLS path, direct as the limit.

Not a test: a benchmark, run by hand (as root) from the repository root:

    .venv/bin/python scripts/bench_dataplane.py [--rounds 5] [--prefix bench]

One testbed (2 nodes, 20 mesh pods per node plus one un-enrolled pod per
node), one mesh (CA, registry, one agent per node), one HAProxy per node,
and the same servers for every path, in the server pod n2-p1: nginx
(nginx-light, one worker, ``return 200`` of a 1 KiB body from memory, no
access log) on 8080 and ``iperf3 -s`` on 5201. Paths, all from node 1 to the
server pod on node 2:

* ``direct``: client in n1-p21 (not enrolled) → 10.244.2.2 (pod IP). No proxy.
* ``nodemesh``: client in n1-p1 (enrolled) → VIP 10.96.0.10, captured by
  eBPF → node-1 agent :15001 → HBONE (HTTP/2 CONNECT over pooled mTLS) →
  node-2 agent :15008 → pod.
* ``haproxy``: client in n1-p21 → HAProxy in the node-1 netns (mode tcp,
  plain in) → TLS 1.3 with a client cert from the mesh CA, server cert
  verified against the mesh bundle → HAProxy in the node-2 netns (TLS 1.3
  in, client cert required and verified) → pod. L4 like nodemesh; tcp mode
  cannot pool, so every client connection is one TLS connection on the hop
  (HAProxy resumes TLS sessions by default, which we keep).
* ``haproxy-h2`` (HTTP metrics only): same hops in mode http, the hop is
  HTTP/2 over the same mTLS with ``http-reuse always`` — HAProxy's way to
  pool the hop, like HBONE, but only for HTTP. Informational.

Each round runs every metric for every path, path order rotated per round;
figures are medians over rounds (added latency: median of per-round
differences to direct). Metrics: bulk single-stream throughput (iperf3),
1 KiB keep-alive request rate over 16 connections (wrk), new connections per
second (wrk, ``Connection: close``), p50 latency at a fixed 1,000 rps
(scripts/bench/fixed_rate.py, keep-alive, open loop), agent RSS after the
load (psutil). Before the rounds each path is checked once to run what it
claims (peer address seen by the server, agent and HAProxy counters, a
client without cert is refused by the node-2 HAProxy).

Output: JSON in bench-results/dataplane-<timestamp>.json, a markdown table
on stdout, and a PNG next to the JSON when matplotlib is importable.
Everything (testbed netns/cgroups, bpffs pins, HAProxy/nginx/iperf3
processes, run dirs) carries the prefix and is removed at the end, also on
failure or Ctrl-C. Processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psutil
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agent import meshbed  # noqa: E402
from agent.identity.ca import MeshCA  # noqa: E402
from agent.identity.spiffe import SpiffeId  # noqa: E402
from netns import errors as netns_errors  # noqa: E402
from netns import testbed, topology  # noqa: E402
from netns.topology import Node, Pod, Topology  # noqa: E402

FIXED_RATE = os.path.join(ROOT, "scripts", "bench", "fixed_rate.py")
VIP = "10.96.0.10"
HTTP_PORT = 8080
IPERF_PORT = 5201
# HAProxy: node-1 plain frontends (on the pod gateway), node-2 TLS frontends (on the fabric)
HA_TCP_HTTP, HA_TCP_IPERF, HA_H2_HTTP = 18080, 18201, 18081
HA_TLS_HTTP, HA_TLS_IPERF, HA_TLS_H2 = 18443, 18444, 18445
BODY_BYTES = 1024
WRK_CONNS = 16
PATHS = ("direct", "nodemesh", "haproxy", "haproxy-h2")
METRICS = ("bulk", "rps", "cps", "latency")
MB = 1_000_000

TARGETS = {
    "bulk": "nodemesh >= 0.6x haproxy",
    "rps": "nodemesh >= 0.5x haproxy",
    "cps": "nodemesh >= 1.0x haproxy",
    "latency": "added p50 <= 2x haproxy's",
    "rss": "agent RSS <= 80 MB (2 nodes x 20 pods)",
}


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- mesh


class BenchBed(meshbed.MeshBed):
    """The testbed mesh, but the last pod of each node stays un-enrolled (the bypass client)."""

    bypass: frozenset[str] = frozenset()

    def agent_config(self, node: Node) -> dict[str, object]:
        cfg = super().agent_config(node)
        ic = cfg["interception"]
        assert isinstance(ic, dict)
        ic["enroll"] = [f"/run/netns/{p.netns}" for p in node.pods if p.name not in self.bypass]
        return cfg


def manifest(topo: Topology, server: Pod, bypass: frozenset[str]) -> str:
    svc = {
        "apiVersion": "nodemesh.io/v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "vip": VIP,
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "http"},
                {"name": "iperf", "port": IPERF_PORT, "targetPort": "iperf", "protocol": "tcp"},
            ],
        },
    }
    docs: list[dict[str, Any]] = [svc]
    for pod in topo.pods():
        if pod.name in bypass:
            continue
        is_server = pod.name == server.name
        docs.append(
            {
                "apiVersion": "nodemesh.io/v1",
                "kind": "Workload",
                "metadata": {
                    "name": pod.name,
                    "namespace": "default",
                    "labels": {"app": "web"} if is_server else {"app": "idle"},
                },
                "spec": {
                    "address": pod.address,
                    "node": pod.node,
                    "serviceAccount": "web" if is_server else "client",
                    "ports": {"http": HTTP_PORT, "iperf": IPERF_PORT} if is_server else {},
                },
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


# --------------------------------------------------------------------------- processes


class Procs:
    """Long-running processes this run started; stopped by PID, newest first."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[bytes]]] = []

    def add(self, name: str, p: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.items.append((name, p))
        return p

    def pid(self, name: str) -> int:
        return next(p.pid for n, p in self.items if n == name)

    def check(self) -> None:
        for name, p in self.items:
            if p.poll() is not None:
                raise BenchError(f"{name} (pid {p.pid}) exited with {p.returncode}")

    def stop(self) -> None:
        for _name, p in reversed(self.items):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.items.clear()


def run_in(
    netns: str, cgroup_rel: str | None, argv: Sequence[str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    p = testbed.popen_in(netns, cgroup_rel, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise BenchError(f"{argv[0]} in {netns} timed out after {timeout_s}s") from None
    return subprocess.CompletedProcess(list(argv), p.returncode, out.decode(), err.decode())


def run_in_pod(pod: Pod, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return run_in(pod.netns, pod.cgroup, argv, timeout_s)


def wait_port(netns: str, host: str, port: int, timeout_s: float = 10.0) -> None:
    code = (
        "import socket,sys,time\n"
        f"end=time.time()+{timeout_s}\n"
        "while time.time()<end:\n"
        "    try:\n"
        f"        socket.create_connection(({host!r},{port}),1).close(); sys.exit(0)\n"
        "    except OSError: time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    if run_in(netns, None, [sys.executable, "-c", code], timeout_s + 5).returncode != 0:
        raise BenchError(f"nothing listens on {host}:{port} in {netns}")


def nginx_conf(work: str) -> str:
    body = ("nodemesh-bench-" * 100)[:BODY_BYTES]
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/nginx-tmp;
    server {{
        listen {HTTP_PORT} backlog=4096;
        location = /1k {{ default_type text/plain; return 200 "{body}"; }}
        location = /peer {{ default_type text/plain; return 200 "$remote_addr\\n"; }}
    }}
}}
"""


def haproxy_confs(work: str, n1: Node, n2: Node, server: Pod, threads: int) -> tuple[str, str]:
    common = f"""global
    nbthread {threads}
    maxconn 8000
    stats socket {{sock}} mode 600 level admin
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    timeout connect 5s
    timeout client 300s
    timeout server 300s
"""
    tls_out = f"ssl crt {work}/haproxy-n1.pem ca-file {work}/bundle.pem verify required"
    tls_in = f"ssl crt {work}/haproxy-n2.pem ca-file {work}/bundle.pem verify required"
    c1 = (
        common.format(sock=f"{work}/haproxy-n1.sock")
        + f"""
frontend tcp_http
    mode tcp
    bind {n1.gateway}:{HA_TCP_HTTP}
    default_backend hop_tcp_http
backend hop_tcp_http
    mode tcp
    server n2 {n2.fabric_address}:{HA_TLS_HTTP} {tls_out}
frontend tcp_iperf
    mode tcp
    bind {n1.gateway}:{HA_TCP_IPERF}
    default_backend hop_tcp_iperf
backend hop_tcp_iperf
    mode tcp
    server n2 {n2.fabric_address}:{HA_TLS_IPERF} {tls_out}
frontend h2_http
    mode http
    bind {n1.gateway}:{HA_H2_HTTP}
    default_backend hop_h2
backend hop_h2
    mode http
    http-reuse always
    server n2 {n2.fabric_address}:{HA_TLS_H2} {tls_out} alpn h2
"""
    )
    c2 = (
        common.format(sock=f"{work}/haproxy-n2.sock")
        + f"""
frontend tls_http
    mode tcp
    bind {n2.fabric_address}:{HA_TLS_HTTP} {tls_in}
    default_backend pod_http
backend pod_http
    mode tcp
    server web {server.address}:{HTTP_PORT}
frontend tls_iperf
    mode tcp
    bind {n2.fabric_address}:{HA_TLS_IPERF} {tls_in}
    default_backend pod_iperf
backend pod_iperf
    mode tcp
    server web {server.address}:{IPERF_PORT}
frontend tls_h2
    mode http
    bind {n2.fabric_address}:{HA_TLS_H2} {tls_in} alpn h2
    default_backend pod_h2
backend pod_h2
    mode http
    http-reuse always
    server web {server.address}:{HTTP_PORT}
"""
    )
    return c1, c2


def haproxy_cmd(sock_path: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks).decode()


def haproxy_frontends(sock_path: str) -> dict[str, dict[str, str]]:
    """``show stat`` rows of the frontends, by proxy name."""
    lines = haproxy_cmd(sock_path, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("svname") == "FRONTEND":
            out[row["pxname"]] = row
    return out


def haproxy_info(sock_path: str) -> dict[str, str]:
    out = {}
    for line in haproxy_cmd(sock_path, "show info").splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def agent_metrics(node: Node) -> dict[str, float]:
    """Sums of the agent's connection counters (scraped inside the node netns)."""
    r = run_in(
        node.netns, None, ["curl", "-sS", "-m", "5", f"http://{node.fabric_address}:15020/metrics"], 10
    )
    if r.returncode != 0:
        raise BenchError(f"metrics of {node.name}: {r.stderr.strip()}")
    sums: dict[str, float] = {}
    for line in r.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:]+)(\{.*\})?\s+(\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "istio_tcp_connections_opened_total":
            policy = "mtls" if 'connection_security_policy="mutual_tls"' in labels else "plain"
            sums[f"opened_{policy}"] = sums.get(f"opened_{policy}", 0.0) + value
        elif name in ("nodemesh_tunnel_pool_connections", "nodemesh_outbound_failures_total"):
            sums[name] = sums.get(name, 0.0) + value
    return sums


# --------------------------------------------------------------------------- one bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix: str = args.prefix
        self.work = os.path.join("/run/nodemesh", f"{self.prefix}-bench")
        self.procs = Procs()
        self.topo: Topology | None = None
        self.bed: BenchBed | None = None
        self.checks: dict[str, Any] = {}

    # ---- set-up
    def up(self) -> None:
        a = self.args
        if self.prefix in testbed.list_testbeds():
            print(f"bench: removing a leftover testbed {self.prefix!r}", file=sys.stderr)
            testbed.down(self.prefix)
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(os.path.join(self.work, "nginx-tmp"))
        t0 = time.monotonic()
        spec = topology.default_spec(self.prefix, 2, a.pods_per_node + 1)
        try:
            self.topo = topo = testbed.up(topology.plan(spec))
        except netns_errors.KernelError as e:  # seen once while another testbed was being built: retry once
            print(f"bench: testbed up failed ({e}); retrying once", file=sys.stderr)
            self.topo = topo = testbed.up(topology.plan(spec))
        n1, n2 = topo.nodes
        self.client_mesh = n1.pods[0]  # n1-p1, enrolled
        self.client_bypass = n1.pods[-1]  # n1-p21, not enrolled
        self.server = n2.pods[0]  # n2-p1
        bypass = frozenset(n.pods[-1].name for n in topo.nodes)
        for ns in (n1.netns, n2.netns, self.client_mesh.netns, self.client_bypass.netns, self.server.netns):
            run_in(
                ns,
                None,
                ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000", "net.ipv4.tcp_tw_reuse=1"],
                10,
            )
        # servers in the server pod
        with open(os.path.join(self.work, "nginx.conf"), "w") as f:
            f.write(nginx_conf(self.work))
        log = open(os.path.join(self.work, "servers.log"), "ab")  # noqa: SIM115 - children keep it
        self.procs.add(
            "nginx",
            testbed.popen_in_pod(
                self.server,
                [
                    "nginx",
                    "-p",
                    self.work,
                    "-e",
                    f"{self.work}/nginx-error.log",
                    "-c",
                    f"{self.work}/nginx.conf",
                ],
                stdout=log,
                stderr=log,
            ),
        )
        self.procs.add(
            "iperf3-server",
            testbed.popen_in_pod(
                self.server, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=log
            ),
        )
        log.close()
        # the mesh (cf. meshbed.running, with our bed class)
        run_dir = os.path.join("/run/nodemesh", f"{self.prefix}-mesh")
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        bed = BenchBed(topo, run_dir)
        bed.bypass = bypass
        self.bed = bed
        bed.cli("ca", "init", "--dir", bed.ca_dir, "--trust-domain", "cluster.local")
        bed.apply(manifest(topo, self.server, bypass))
        for node in topo.nodes:
            bed.start_agent(node)
        # HAProxy: certs from the same CA, one process per node netns
        ca = MeshCA.load(bed.ca_dir)
        now = datetime.now(UTC)
        for node in topo.nodes:
            wc = ca.issue(SpiffeId("cluster.local", "bench", f"haproxy-{node.name}"), now=now)
            path = os.path.join(self.work, f"haproxy-{node.name}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(wc.cert_pem + b"".join(wc.chain_pem[:-1]) + wc.key_pem)
        with open(os.path.join(self.work, "bundle.pem"), "wb") as f:
            f.write(ca.bundle.to_pem())
        c1, c2 = haproxy_confs(self.work, n1, n2, self.server, a.haproxy_threads)
        for node, conf in ((n1, c1), (n2, c2)):
            cfg_path = os.path.join(self.work, f"haproxy-{node.name}.cfg")
            with open(cfg_path, "w") as f:
                f.write(conf)
            chk = subprocess.run(["haproxy", "-c", "-q", "-f", cfg_path], capture_output=True, text=True)
            if chk.returncode != 0:
                raise BenchError(f"haproxy config {cfg_path}: {chk.stdout}{chk.stderr}")
            hlog = open(os.path.join(self.work, f"haproxy-{node.name}.log"), "ab")  # noqa: SIM115
            self.procs.add(
                f"haproxy-{node.name}",
                testbed.popen_in(
                    node.netns, None, ["haproxy", "-db", "-f", cfg_path], stdout=hlog, stderr=hlog
                ),
            )
            hlog.close()
        wait_port(self.server.netns, "127.0.0.1", HTTP_PORT)
        wait_port(self.server.netns, "127.0.0.1", IPERF_PORT)
        try:
            wait_port(n1.netns, n1.gateway, HA_TCP_HTTP)
            wait_port(n2.netns, n2.fabric_address, HA_TLS_HTTP)
        except BenchError as e:
            logs = ""
            for node in topo.nodes:
                with open(os.path.join(self.work, f"haproxy-{node.name}.log"), errors="replace") as f:
                    logs += f"\n--- haproxy-{node.name}.log\n" + f.read()[-1500:]
            raise BenchError(f"{e}{logs}") from None
        self.procs.check()
        self.setup_s = time.monotonic() - t0

    def down(self) -> None:
        try:
            self.procs.stop()
        finally:
            try:
                if self.bed is not None:
                    self.bed.stop()
            finally:
                testbed.down(self.prefix)
                shutil.rmtree(self.work, ignore_errors=True)

    # ---- paths
    def endpoint(self, path: str, what: str) -> tuple[Pod, str, int]:
        """(client pod, host, port) of ``path`` for ``what`` in {"http", "iperf"}."""
        n1 = self.topo.nodes[0] if self.topo else None
        assert n1 is not None
        if path == "direct":
            return self.client_bypass, self.server.address, HTTP_PORT if what == "http" else IPERF_PORT
        if path == "nodemesh":
            return self.client_mesh, VIP, 80 if what == "http" else IPERF_PORT
        if path == "haproxy":
            return self.client_bypass, n1.gateway, HA_TCP_HTTP if what == "http" else HA_TCP_IPERF
        if path == "haproxy-h2" and what == "http":
            return self.client_bypass, n1.gateway, HA_H2_HTTP
        raise BenchError(f"path {path} has no {what} endpoint")

    def proxy_pids(self, path: str) -> list[int]:
        assert self.bed is not None
        if path == "nodemesh":
            return [p.pid for p in self.bed.agents.values()]
        if path.startswith("haproxy"):
            return [self.procs.pid("haproxy-n1"), self.procs.pid("haproxy-n2")]
        return []

    def curl(self, pod: Pod, url: str) -> str:
        r = run_in_pod(pod, ["curl", "-sS", "-m", "5", url], 10)
        if r.returncode != 0:
            raise BenchError(f"curl {url} from {pod.name}: {r.stderr.strip()}")
        return r.stdout.strip()

    def verify(self) -> None:
        """Each path runs what it claims: peer seen by the server, agent and HAProxy counters."""
        assert self.topo is not None
        n1, n2 = self.topo.nodes
        s2 = f"{self.work}/haproxy-n2.sock"

        def snap() -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, str]]]:
            return agent_metrics(n1), agent_metrics(n2), haproxy_frontends(s2)

        def delta(before: Any, after: Any) -> dict[str, Any]:
            m1 = after[0].get("opened_mtls", 0) - before[0].get("opened_mtls", 0)
            m2 = after[1].get("opened_mtls", 0) - before[1].get("opened_mtls", 0)
            fe = {k: int(after[2][k]["stot"]) - int(before[2][k]["stot"]) for k in after[2]}
            req = int(after[2]["tls_h2"]["req_tot"] or 0) - int(before[2]["tls_h2"]["req_tot"] or 0)
            return {
                "agent_n1_mtls_opened": m1,
                "agent_n2_mtls_opened": m2,
                "haproxy_n2_sessions": fe,
                "haproxy_n2_h2_requests": req,
            }

        checks: dict[str, Any] = {}
        problems = []
        for path in ("direct", "haproxy", "haproxy-h2", "nodemesh"):
            pod, host, port = self.endpoint(path, "http")
            before = snap()
            peer = self.curl(pod, f"http://{host}:{port}/peer")
            body = self.curl(pod, f"http://{host}:{port}/1k")
            d = delta(before, snap())
            want_peer = pod.address if path == "direct" else n2.gateway
            checks[path] = {
                "client_pod": pod.name,
                "url": f"http://{host}:{port}/",
                "server_saw_peer": peer,
                "body_bytes": len(body),
                **d,
            }
            if peer != want_peer:
                problems.append(f"{path}: server saw peer {peer}, expected {want_peer}")
            if len(body) != BODY_BYTES:
                problems.append(f"{path}: body of {len(body)} bytes, expected {BODY_BYTES}")
            mesh_used = d["agent_n1_mtls_opened"] >= 2 and d["agent_n2_mtls_opened"] >= 2
            if (path == "nodemesh") != mesh_used:
                problems.append(
                    f"{path}: agent mTLS connection counters moved by "
                    f"{d['agent_n1_mtls_opened']}/{d['agent_n2_mtls_opened']}"
                )
            tcp_sessions = d["haproxy_n2_sessions"].get("tls_http", 0)
            if (path == "haproxy") != (tcp_sessions >= 2):
                problems.append(f"{path}: node-2 HAProxy TLS sessions moved by {tcp_sessions}")
            if (path == "haproxy-h2") != (d["haproxy_n2_h2_requests"] >= 2):
                problems.append(f"{path}: node-2 HAProxy h2 requests moved by {d['haproxy_n2_h2_requests']}")
        # the node-2 HAProxy refuses a client without a cert; with ours it speaks TLS 1.3
        probe = (
            "import socket,ssl,sys\n"
            "def hs(cert):\n"
            "    c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname=False\n"
            f"    c.load_verify_locations({self.work + '/bundle.pem'!r})\n"
            f"    cert and c.load_cert_chain({self.work + '/haproxy-n1.pem'!r})\n"
            f"    s=c.wrap_socket(socket.create_connection(({n2.fabric_address!r},{HA_TLS_HTTP}),3))\n"
            "    s.sendall(b'GET /peer HTTP/1.0\\r\\n\\r\\n')\n"
            "    try: r=s.recv(100)\n"
            "    except (ssl.SSLError, OSError) as e: r=repr(e).encode()\n"
            "    return s.version(), s.cipher()[0], r[:12].decode(errors='replace')\n"
            "print(hs(False)); print(hs(True))\n"
        )
        r = run_in(n1.netns, None, [sys.executable, "-c", probe], 15)
        lines = r.stdout.strip().splitlines()
        checks["haproxy_hop_tls"] = {
            "without_client_cert": lines[0] if lines else r.stderr[-300:],
            "with_mesh_cert": lines[1] if len(lines) > 1 else "",
        }
        if (
            len(lines) < 2
            or "HTTP/1.1 200" in lines[0]
            or "HTTP/1.1 200" not in lines[1]
            or "TLSv1.3" not in lines[1]
        ):
            problems.append(f"haproxy hop TLS probe: {r.stdout.strip()} {r.stderr.strip()[-300:]}")
        self.checks = checks
        if problems:
            raise BenchError(
                "path verification failed:\n  " + "\n  ".join(problems) + "\n" + json.dumps(checks, indent=1)
            )

    # ---- measurements
    def _cpu(self, pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total

    def measure(self, path: str, metric: str) -> dict[str, Any]:
        a = self.args
        pids = self.proxy_pids(path)
        cpu0, t0 = self._cpu(pids), time.monotonic()
        if metric == "bulk":
            res = self.bulk(path, a.bulk_seconds)
        elif metric in ("rps", "cps"):
            res = self.wrk(path, a.rps_seconds if metric == "rps" else a.cps_seconds, close=metric == "cps")
        else:
            res = self.latency(path, a.lat_seconds)
        wall = time.monotonic() - t0
        res["proxy_cpu_cores"] = (self._cpu(pids) - cpu0) / wall if pids else 0.0
        if path == "haproxy" and metric == "cps":  # does the tcp-mode hop resume TLS sessions?
            info = haproxy_info(f"{self.work}/haproxy-n2.sock")
            res["haproxy_n2_ssl"] = {k: info.get(k) for k in ("SslFrontendSessionReuse_pct", "SslRate")}
        return res

    def bulk(self, path: str, seconds: float) -> dict[str, Any]:
        pod, host, port = self.endpoint(path, "iperf")
        r = run_in_pod(
            pod,
            ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "3000"],
            seconds + 20,
        )
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError:
            return {"value": None, "error": (r.stderr or r.stdout)[-300:]}
        if "error" in doc:
            return {"value": None, "error": doc["error"]}
        bps = doc["end"]["sum_received"]["bits_per_second"]
        return {"value": bps / 1e9, "unit": "Gbit/s", "bytes": doc["end"]["sum_received"]["bytes"]}

    def wrk(self, path: str, seconds: float, *, close: bool) -> dict[str, Any]:
        pod, host, port = self.endpoint(path, "http")
        argv = ["wrk", "-t1", f"-c{WRK_CONNS}", f"-d{seconds}s", "--timeout", "5s"]
        if close:
            argv += ["-H", "Connection: close"]
        r = run_in_pod(pod, [*argv, f"http://{host}:{port}/1k"], seconds + 20)
        m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
        if r.returncode != 0 or not m:
            return {"value": None, "error": (r.stderr or r.stdout)[-300:]}
        res: dict[str, Any] = {"value": float(m.group(1)), "unit": "req/s"}
        e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", r.stdout)
        if e:
            res["socket_errors"] = dict(
                zip(("connect", "read", "write", "timeout"), map(int, e.groups()), strict=True)
            )
        n = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
        if n:
            res["non_2xx"] = int(n.group(1))
        return res

    def latency(self, path: str, seconds: float) -> dict[str, Any]:
        pod, host, port = self.endpoint(path, "http")
        a = self.args
        r = run_in_pod(
            pod,
            [
                sys.executable,
                FIXED_RATE,
                host,
                str(port),
                "/1k",
                "--rate",
                str(a.lat_rate),
                "--seconds",
                str(seconds),
                "--conns",
                str(WRK_CONNS),
            ],
            seconds + 30,
        )
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError:
            return {"value": None, "error": (r.stderr or r.stdout)[-300:]}
        return {"value": doc["p50_us"], "unit": "us", **doc}

    def rss(self) -> dict[str, Any]:
        assert self.bed is not None
        out: dict[str, Any] = {}
        for name, p in self.bed.agents.items():
            mi = psutil.Process(p.pid).memory_info()
            out[f"agent-{name}"] = {"rss_bytes": mi.rss, "rss_mb": mi.rss / MB}
        for name in ("haproxy-n1", "haproxy-n2"):
            mi = psutil.Process(self.procs.pid(name)).memory_info()
            out[name] = {"rss_bytes": mi.rss, "rss_mb": mi.rss / MB}
        return out


# --------------------------------------------------------------------------- report


def paths_for(metric: str) -> tuple[str, ...]:
    return tuple(p for p in PATHS if not (metric == "bulk" and p == "haproxy-h2"))


def summarize(rounds: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    med: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        med[metric] = {}
        for path in paths_for(metric):
            vals = [
                r[metric][path]["value"]
                for r in rounds
                if path in r.get(metric, {}) and r[metric][path].get("value") is not None
            ]
            med[metric][path] = statistics.median(vals) if vals else None
    added: dict[str, float | None] = {}
    for path in ("nodemesh", "haproxy", "haproxy-h2"):
        diffs = []
        for r in rounds:
            lat = r.get("latency", {})
            if (
                path in lat
                and lat[path].get("value") is not None
                and lat.get("direct", {}).get("value") is not None
            ):
                diffs.append(lat[path]["value"] - lat["direct"]["value"])
        added[path] = statistics.median(diffs) if diffs else None
    cpu: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        cpu[metric] = {}
        for path in paths_for(metric):
            vals = [r[metric][path].get("proxy_cpu_cores", 0.0) for r in rounds if path in r.get(metric, {})]
            cpu[metric][path] = statistics.median(vals) if vals else None
    return {"median": med, "added_p50_us": added, "proxy_cpu_cores": cpu}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdicts(summary: dict[str, Any], rss: dict[str, Any]) -> dict[str, Any]:
    med, added = summary["median"], summary["added_p50_us"]
    out: dict[str, Any] = {}
    for metric, need in (("bulk", 0.6), ("rps", 0.5), ("cps", 1.0)):
        r = _ratio(med[metric]["nodemesh"], med[metric]["haproxy"])
        out[metric] = {"target": TARGETS[metric], "ratio": r, "met": r is not None and r >= need}
    nm, ha = added["nodemesh"], added["haproxy"]
    r = _ratio(nm, ha)
    out["latency"] = {
        "target": TARGETS["latency"],
        "ratio": r,
        "met": nm is not None and ha is not None and nm <= 2 * max(ha, 0.0),
    }
    worst = max(v["rss_bytes"] for k, v in rss.items() if k.startswith("agent-"))
    out["rss"] = {"target": TARGETS["rss"], "max_agent_rss_mb": worst / MB, "met": worst <= 80 * MB}
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def table(summary: dict[str, Any], verdict: dict[str, Any], rss: dict[str, Any]) -> str:
    med, added = summary["median"], summary["added_p50_us"]
    rows = [
        "| metric | direct | nodemesh | haproxy (tcp) | haproxy (h2) | nodemesh / haproxy "
        "| nodemesh / direct "
        "| haproxy / direct | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    names = {
        "bulk": "bulk 1-stream (Gbit/s)",
        "rps": "1 KiB keep-alive, 16 conns (req/s)",
        "cps": "new connections (conn/s)",
        "latency": "p50 at 1,000 rps (µs)",
    }
    for metric in METRICS:
        m = med[metric]
        v = verdict[metric]
        met = "**met**" if v["met"] else "**not met**"
        if metric == "latency":
            rows.append(
                f"| {names[metric]} | {_fmt(m['direct'], 0)} | {_fmt(m['nodemesh'], 0)} | "
                f"{_fmt(m['haproxy'], 0)} | {_fmt(m['haproxy-h2'], 0)} | "
                f"{_fmt(_ratio(m['nodemesh'], m['haproxy']))} | {_fmt(_ratio(m['nodemesh'], m['direct']))} | "
                f"{_fmt(_ratio(m['haproxy'], m['direct']))} | | |"
            )
            rows.append(
                f"| added p50 vs direct (µs) | 0 | {_fmt(added['nodemesh'], 0)} | "
                f"{_fmt(added['haproxy'], 0)} | {_fmt(added['haproxy-h2'], 0)} | {_fmt(v['ratio'])} | | | "
                f"{v['target']} | {met} |"
            )
            continue
        rows.append(
            f"| {names[metric]} | {_fmt(m['direct'])} | {_fmt(m['nodemesh'])} | {_fmt(m['haproxy'])} | "
            f"{_fmt(m.get('haproxy-h2'))} | {_fmt(v['ratio'])} | "
            f"{_fmt(_ratio(m['nodemesh'], m['direct']))} | "
            f"{_fmt(_ratio(m['haproxy'], m['direct']))} | {v['target']} | {met} |"
        )
    agents = ", ".join(f"{k[6:]} {v['rss_mb']:.1f}" for k, v in rss.items() if k.startswith("agent-"))
    has = ", ".join(f"{k[8:]} {v['rss_mb']:.1f}" for k, v in rss.items() if k.startswith("haproxy-"))
    v = verdict["rss"]
    rows.append(
        f"| RSS after load (MB) | | {agents} | {has} | (same processes) | | | | {v['target']} | "
        f"{'**met**' if v['met'] else '**not met**'} |"
    )
    cpu = summary["proxy_cpu_cores"]
    rows += [
        "",
        "Proxy CPU during each test (both nodes' proxies, cores busy on average; the VM has 2):",
        "",
        "| metric | nodemesh | haproxy (tcp) | haproxy (h2) |",
        "|---|---:|---:|---:|",
    ]
    for metric in METRICS:
        c = cpu[metric]
        rows.append(
            f"| {metric} | {_fmt(c.get('nodemesh'))} | {_fmt(c.get('haproxy'))} | "
            f"{_fmt(c.get('haproxy-h2'))} |"
        )
    return "\n".join(rows)


def plot(summary: dict[str, Any], png: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    med = summary["median"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, metric in zip(axes, ("bulk", "rps", "cps"), strict=True):
        paths = [p for p in paths_for(metric) if med[metric][p] is not None]
        ax.bar(paths, [med[metric][p] for p in paths], color=["#999", "#2a7", "#37c", "#8ad"][: len(paths)])
        ax.set_title({"bulk": "bulk Gbit/s", "rps": "keep-alive req/s", "cps": "new conn/s"}[metric])
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- main


def revision() -> str:
    """The code measured: git commit (+dirty) of ROOT, or $NODEMESH_BENCH_REV for an exported tree."""
    r = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    if r.returncode == 0:
        return r.stdout.strip()
    return os.environ.get("NODEMESH_BENCH_REV", "unknown")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    load_before = os.getloadavg()
    deadline = started + args.max_seconds
    bench = Bench(args)

    main_pid = os.getpid()

    def on_term(signum: int, frame: Any) -> None:
        # pyroute2 forks children (netns create) that inherit this handler and are
        # stopped with SIGTERM: they must just exit, never unwind our stack (and tear down)
        if os.getpid() != main_pid:
            os._exit(143)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    rounds: list[dict[str, dict[str, dict[str, Any]]]] = []
    try:
        print(
            f"bench: setting up testbed {args.prefix!r} (2 nodes x {args.pods_per_node}+1 pods), mesh, "
            f"HAProxy, servers",
            file=sys.stderr,
        )
        bench.up()
        print(f"bench: set up in {bench.setup_s:.1f}s; verifying paths", file=sys.stderr)
        bench.verify()
        for path in PATHS:  # warm-up (pool dial, caches): not recorded
            bench.wrk(path, 1, close=False)
        rss_idle = bench.rss()
        for i in range(args.rounds):
            if time.monotonic() > deadline - 60:
                print(f"bench: time budget reached, stopping after {i} rounds", file=sys.stderr)
                break
            order = PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]
            rnd: dict[str, dict[str, dict[str, Any]]] = {}
            for metric in METRICS:
                rnd[metric] = {}
                for path in order:
                    if path not in paths_for(metric):
                        continue
                    rnd[metric][path] = res = bench.measure(path, metric)
                    if res.get("value") is None:
                        print(f"bench: round {i + 1} {metric} {path}: {res.get('error')}", file=sys.stderr)
            bench.procs.check()
            rnd["loadavg"] = {"1min": {"value": os.getloadavg()[0]}}
            rounds.append(rnd)
            brief = "  ".join(
                f"{m}:" + "/".join(_fmt(rnd[m][p].get("value")) for p in PATHS if p in rnd[m])
                for m in METRICS
            )
            print(f"bench: round {i + 1}/{args.rounds} ({'/'.join(PATHS)})  {brief}", file=sys.stderr)
        if not rounds:
            raise BenchError("no round completed")
        rss = bench.rss()
        n1, n2 = bench.topo.nodes if bench.topo else ((), ())
        pool = {n.name: agent_metrics(n) for n in (n1, n2)}  # type: ignore[union-attr]
        ha_info = {
            name: {
                k: haproxy_info(f"{bench.work}/haproxy-{name}.sock").get(k)
                for k in (
                    "CumConns",
                    "CumSslConns",
                    "SslFrontendSessionReuse_pct",
                    "SslBackendKeyRate",
                    "SslFrontendKeyRate",
                )
            }
            for name in ("n1", "n2")
        }
    finally:
        bench.down()
    summary = summarize(rounds)
    verdict = verdicts(summary, rss)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"dataplane-{stamp}.json")
    png = plot(summary, os.path.join(out_dir, f"dataplane-{stamp}.png"))
    doc = {
        "benchmark": "dataplane",
        "when": stamp,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[
                0
            ],
        },
        "config": {k: v for k, v in vars(args).items()},
        "revision": revision(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "setup_seconds": bench.setup_s,
        "total_seconds": time.monotonic() - started,
        "paths": {
            "direct": "n1-p21 (not enrolled) -> server pod IP:port",
            "nodemesh": "n1-p1 (enrolled) -> VIP, eBPF capture -> agent n1 :15001 -> HBONE mTLS "
            "-> agent n2 :15008 -> pod",
            "haproxy": "n1-p21 -> HAProxy n1 (mode tcp) -> TLS1.3 mTLS (mesh CA, verify required both ways) "
            "-> HAProxy n2 (mode tcp) -> pod; one hop TLS connection per client connection",
            "haproxy-h2": "as haproxy, mode http, hop is HTTP/2 over the same mTLS "
            "with http-reuse always (pooled)",
        },
        "servers": "nginx-light 1 worker, return 200 with a 1024-byte body, keep-alive; iperf3 -s",
        "clients": {
            "bulk": "iperf3 -c, 1 stream",
            "rps": f"wrk -t1 -c{WRK_CONNS}",
            "cps": f"wrk -t1 -c{WRK_CONNS} -H 'Connection: close'",
            "latency": f"scripts/bench/fixed_rate.py, {args.lat_rate} rps open loop, "
            f"{WRK_CONNS} keep-alive conns",
        },
        "checks": bench.checks,
        "rounds": rounds,
        "summary": summary,
        "rss": rss,
        "rss_after_setup": rss_idle,
        "agent_metrics_after": pool,
        "haproxy_info_after": ha_info,
        "verdict": verdict,
        "plot": png,
    }
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(
        f"\n## nodemesh data path vs HAProxy (2 nodes, {len(rounds)} rounds, medians; "
        f"{os.cpu_count()} CPUs)\n"
    )
    print(table(summary, verdict, rss))
    grow = ", ".join(
        f"{k[6:]} {rss_idle[k]['rss_mb']:.1f} -> {v['rss_mb']:.1f}"
        for k, v in rss.items()
        if k.startswith("agent-")
    )
    pools = ", ".join(f"{n} {m.get('nodemesh_tunnel_pool_connections', 0):.0f}" for n, m in pool.items())
    print(
        f"\nAgent RSS (MB) after set-up -> after the load: {grow}; "
        f"pooled HBONE connections at the end: {pools}"
    )
    print(
        f"\nJSON: {os.path.relpath(json_path, ROOT)}"
        + (f"; plot: {os.path.relpath(png, ROOT)}" if png else "; no plot (matplotlib not installed)")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="bench", help="testbed prefix (default bench)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--pods-per-node",
        type=int,
        default=20,
        help="mesh pods per node (one more, un-enrolled, "
        "is added per node for the direct and HAProxy clients)",
    )
    ap.add_argument("--bulk-seconds", type=int, default=3)
    ap.add_argument("--rps-seconds", type=int, default=3)
    ap.add_argument("--cps-seconds", type=int, default=3)
    ap.add_argument("--lat-seconds", type=float, default=2.0)
    ap.add_argument("--lat-rate", type=float, default=1000.0)
    ap.add_argument(
        "--haproxy-threads",
        type=int,
        default=1,
        help="nbthread of each HAProxy (default 1: one core per node proxy, like the agent's one loop)",
    )
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench-results"), help="where the JSON goes")
    ap.add_argument("--max-seconds", type=float, default=420.0, help="stop starting rounds after this")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root (netns, cgroups, eBPF)")
    if not (
        1 <= a.rounds <= 50
        and 1 <= a.pods_per_node <= 100
        and 1 <= a.bulk_seconds <= 60
        and 1 <= a.rps_seconds <= 60
        and 1 <= a.cps_seconds <= 60
        and 0 < a.lat_seconds <= 30
    ):
        ap.error("rounds 1-50, pods-per-node 1-100, durations 1-60 s")
    for tool in ("haproxy", "nginx", "wrk", "iperf3", "curl"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed: run scripts/setup.sh")
    try:
        return run(a)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
