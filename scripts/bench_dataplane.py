#!/usr/bin/env python3
"""Data-path benchmark: nodemesh (TCP and HTTP ports) vs HAProxy on the same two-hop mTLS path.

Not a test: a benchmark, run by hand (as root) from the repository root:

    .venv/bin/python scripts/bench_dataplane.py [--rounds 5] [--prefix bench]
    .venv/bin/python scripts/bench_dataplane.py --quick          # does it run? (numbers not for comparison)
    .venv/bin/python scripts/bench_dataplane.py --only nodemesh-http,haproxy-h2 --metrics rps,h2 --h2 on

One testbed (2 nodes, 20 mesh pods per node plus one un-enrolled pod per
node), one mesh (CA, registry, one agent per node), one HAProxy per node,
and the same servers for every path, in the server pod n2-p1:

* nginx (nginx-light, one worker, ``return 200`` of a 1 KiB body from memory,
  no access log), one server on three ports: 8080 and 8081 HTTP/1.1, 8082 h2c
  (``listen 8082 http2``: prior knowledge; nginx 1.22 then speaks only HTTP/2
  on that port, so HTTP/1.1 and h2c need a port each). Two HTTP/1.1 ports
  because the node-2 agent picks a connection's protocol by the *pod* port a
  service declares: the TCP-declared and the HTTP-declared service port need
  a target port each.
* ``iperf3 -s`` on 5201.
* scripts/bench/hold_server.py on 8090: ``GET /hold`` is answered only when
  the bench releases it (requests in flight, for the memory measurement).

The service ``web`` (VIP 10.96.0.10) declares 80 -> 8080 ``protocol: tcp``,
8000 -> 8081 ``protocol: http``, 8002 -> 8082 ``protocol: http`` (for HTTP/2
clients), 8090 -> 8090 ``protocol: http`` and 5201 -> 5201 ``protocol: tcp``.
Paths, all from node 1 to the server pod on node 2:

* ``direct``: client in n1-p21 (not enrolled) → 10.244.2.2 (pod IP). No proxy.
* ``nodemesh``: client in n1-p1 (enrolled) → VIP:80 (declared tcp), captured
  by eBPF → node-1 agent :15001 relays bytes → HBONE (HTTP/2 CONNECT over
  pooled mTLS) → node-2 agent :15008 → pod :8080.
* ``nodemesh-http``: client in n1-p1 → VIP:8000 (declared http) → the node-1
  agent parses HTTP/1.1, balances per request and sends each request on a
  pooled upstream (HBONE streams over pooled mTLS) → the node-2 agent parses
  again → pod :8081.
* ``haproxy``: client in n1-p21 → HAProxy in the node-1 netns (mode tcp,
  plain in) → TLS 1.3 with a client cert from the mesh CA, server cert
  verified against the mesh bundle → HAProxy in the node-2 netns (TLS 1.3
  in, client cert required and verified) → pod :8080. L4 like ``nodemesh``;
  tcp mode cannot pool, so every client connection is one TLS connection on
  the hop (HAProxy resumes TLS sessions by default, which we keep).
* ``haproxy-h2``: same hops in mode http, the hop is HTTP/2 over the same
  mTLS with ``http-reuse always`` — HAProxy's way to pool the hop, like
  HBONE — and HTTP/1.1 to pod :8080. The reference of ``nodemesh-http``.
* ``nodemesh-vs``: as ``nodemesh-http``, to the service ``webvs`` (VIP
  10.96.0.11, the same server) that has a 5-route VirtualService and a
  DestinationRule (issue 12's "with routing in force"): every request is
  matched against four routes that do not take it (a header, a uri regex, a
  method with a prefix, a query parameter) before the catch-all to a subset,
  which sets a header. Its reference is ``nodemesh-http`` in the same round.
* ``nodemesh-authz``: as ``nodemesh-http``, to the service ``webaz`` (VIP
  10.96.0.12, declared http, the same nginx) with 10 AuthorizationPolicies in
  force (issue 13's "with 10 policies"): 8 ALLOWs by principal + method + path
  that the request does not match (4 for other principals, 4 for the client's
  principal on other paths), a DENY by a header the request does not carry,
  and the ALLOW that takes it, tried last. Authorization applies per
  destination *workload*, not per service, so a policy selecting the server
  workload would be judged on every request of ``nodemesh-http`` too (ALLOWs
  narrowed by ``to.operation.hosts``/``ports`` still apply to the workload:
  each request is evaluated, and the ones no ALLOW matches are denied). So
  ``webaz`` has its own server workload, ``n2-p1-az``: a second address of the
  server pod (10.244.2.250, added inside the pod's netns, served by the same
  nginx) labelled ``app: webaz``, which the policies select. The check before
  the rounds asserts it: the node-2 agent's nodemesh_authz_decisions_total
  moves for ``nodemesh-authz`` only, and a request carrying the DENY's
  header is refused 403. Its reference is ``nodemesh-http`` in the same round.

HTTP/2 from the client (metric ``h2``): h2load with h2c prior knowledge,
``-c 16 -m 10 -t 1`` for ``--h2-seconds``; ``direct`` (h2c to nginx's 8082)
is the limit. The node proxy keeps the client's protocol upstream (as Istio's
``useClientProtocol``): an HTTP/2 client's requests reach the pod as h2c. So
that both proxies do the same work, HTTP/2 is HTTP/2 on every hop of both
paths and both end at nginx's h2c port: nodemesh-http through VIP:8002
(declared http, target 8082), haproxy-h2 through a second pair of HAProxy
proxies in mode http — node 1 ``bind ... proto h2`` (h2c prior knowledge),
the same pooled HTTP/2-over-mTLS hop, node 2 ``server ... proto h2`` to 8082.
h2load's counts are checked: any failed, errored or timed-out request or any
non-2xx status fails the measurement (no number). ``--h2 auto`` (the
default) first sends 20 requests through nodemesh-http with h2load; if any
fails, or the agents did not count them as requests (bytes relayed, not
parsed), the metric is skipped for every path with "not measured: <reason>".
``--h2 on`` makes that an error, ``--h2 off`` skips.

Each round runs every metric for every path, path order rotated per round;
figures are medians over rounds (added latency: median of per-round
differences to direct). Metrics: bulk single-stream throughput (iperf3; TCP
paths), 1 KiB keep-alive request rate over 16 connections (wrk), new
connections per second (wrk, ``Connection: close``), p50 latency at a fixed
1,000 rps (scripts/bench/fixed_rate.py, keep-alive, open loop), h2load
req/s, agent RSS after the load (psutil). Targets (see TARGETS): the TCP
path must not regress (nodemesh vs haproxy: bulk >= 0.6x, keep-alive >=
0.5x, new connections >= 1.0x, added p50 <= 2x); the HTTP path (nodemesh-http
vs haproxy-h2): keep-alive >= 0.6x, added p50 <= 2x, h2load >= 0.6x; agent
RSS <= 80 MB.

Agent memory per connection, after the rounds (``--hold-conns N``, default
1,000; 0 skips): psutil RSS of the node-1 and node-2 agents, three samples,
each ``--mem-settle-seconds`` after the previous step (long enough by default
for the agent's memory trim to have run after the last growth):

1. baseline;
2. idle: scripts/bench/hold_conns.py in n1-p1 has opened N keep-alive
   connections to VIP:8090 (declared http: the nodemesh-http path, to the
   hold server), each made one request (``GET /now``, answered at once;
   both agents must have counted N requests) and then stays open and silent;
3. in flight: each of those connections sends ``GET /hold``, and the sample
   is taken once the hold server holds all N (its ``/count``, asked on
   127.0.0.1 inside the pod: neither captured nor counted). Then the bench
   releases them and checks that all N responses arrive.

Reported per connection, in KiB: idle (2 - 1), a request in flight beyond
its idle connection (3 - 2), and both (3 - 1). The same connections go from
idle to busy, so memory freed by an earlier step cannot be reused and hide a
later one's cost. Both helpers raise their RLIMIT_NOFILE to the hard limit
(so does this script, for the clients it starts; the agent raises its own).
A test with any error (a connection not made, a response missing, RSS
falling because a trim returned older garbage) is reported as "not measured:
<error>", never as a number.

Before the rounds each path is checked once to run what it claims: the peer
address seen by the server and the body; agent counters (``nodemesh``: TCP
connections opened on both agents and no request counted; ``nodemesh-http``:
requests counted with reporter=source on node 1 and reporter=destination on
node 2; other paths: no agent counter moves); HAProxy counters; a client
without a cert is refused by the node-2 HAProxy; the h2 paths with a short
h2load; the hold server through the mesh.

Output: JSON in bench-results/dataplane-<timestamp>.json, markdown tables
on stdout, and a PNG next to the JSON when matplotlib is importable.
Everything (testbed netns/cgroups, bpffs pins, HAProxy/nginx/iperf3/helper
processes, run dirs) carries the prefix and is removed at the end, also on
failure or Ctrl-C. Processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchplot  # noqa: E402  (scripts/, this script's own directory)

from agent import meshbed  # noqa: E402
from agent.identity.ca import MeshCA  # noqa: E402
from agent.identity.spiffe import SpiffeId  # noqa: E402
from netns import errors as netns_errors  # noqa: E402
from netns import kernel, testbed, topology  # noqa: E402
from netns.topology import Node, Pod, Topology  # noqa: E402

FIXED_RATE = os.path.join(ROOT, "scripts", "bench", "fixed_rate.py")
HOLD_SERVER = os.path.join(ROOT, "scripts", "bench", "hold_server.py")
HOLD_CONNS = os.path.join(ROOT, "scripts", "bench", "hold_conns.py")
VIP = "10.96.0.10"
# VIP ports: declared tcp (the byte relay), declared http (the L7 proxy), the hold server (http)
TCP_SVC_PORT, HTTP_SVC_PORT, H2_SVC_PORT, SLOW_SVC_PORT = 80, 8000, 8002, 8090
# server pod: nginx HTTP/1.1 on two ports (the tcp- and the http-declared target), h2c on a third
# (nginx 1.22 speaks only HTTP/2 on a plain `http2` port; the agent keeps the client's protocol)
HTTP_PORT, HTTP_L7_PORT, H2C_PORT = 8080, 8081, 8082
SLOW_PORT = 8090
IPERF_PORT = 5201
# HAProxy: node-1 plain frontends (on the pod gateway), node-2 TLS frontends (on the fabric)
HA_TCP_HTTP, HA_TCP_IPERF, HA_H2_HTTP, HA_H2C_HTTP = 18080, 18201, 18081, 18082
HA_TLS_HTTP, HA_TLS_IPERF, HA_TLS_H2, HA_TLS_H2C = 18443, 18444, 18445, 18446
BODY_BYTES = 1024
WRK_CONNS = 16
H2_STREAMS = 10  # h2load -m: concurrent streams per connection
H2_CHECK_REQUESTS = 20
PATHS = ("direct", "nodemesh", "nodemesh-http", "haproxy", "haproxy-h2", "nodemesh-vs", "nodemesh-authz")
VS_VIP = "10.96.0.11"  # service webvs: the same server, with a 5-route VirtualService and a rule
AZ_VIP = "10.96.0.12"  # service webaz: the same server at a second address, 10 AuthorizationPolicies
AZ_ADDRESS = "10.244.2.250"  # (workload n2-p1-az; out of the testbed's range of pod addresses)
AZ_DENY_HEADER = "x-bench-deny"  # the DENY policy's header: absent from the benchmark's requests
METRICS = ("bulk", "rps", "cps", "latency", "h2")
METRIC_PATHS = {
    "bulk": ("direct", "nodemesh", "haproxy"),
    "rps": PATHS,
    "cps": PATHS[:-2],
    "latency": PATHS,
    "h2": ("direct", "nodemesh-http", "haproxy-h2"),
}
MB = 1_000_000
KIB = 1024


@dataclass(frozen=True, slots=True)
class Target:
    """``path`` against ``ref`` on ``metric``: ratio >= need, or for latency added p50 <= need x ref's."""

    key: str  # the verdict's key in the JSON
    metric: str
    path: str
    ref: str
    need: float
    text: str


TARGETS = (
    Target("bulk", "bulk", "nodemesh", "haproxy", 0.6, "TCP bulk: nodemesh >= 0.6x haproxy"),
    Target("rps", "rps", "nodemesh", "haproxy", 0.5, "TCP keep-alive: nodemesh >= 0.5x haproxy"),
    Target("cps", "cps", "nodemesh", "haproxy", 1.0, "TCP new conns: nodemesh >= 1.0x haproxy"),
    Target("latency", "latency", "nodemesh", "haproxy", 2.0, "TCP added p50 <= 2x haproxy's"),
    Target(
        "http_rps",
        "rps",
        "nodemesh-http",
        "haproxy-h2",
        0.6,
        "HTTP/1.1 keep-alive: nodemesh-http >= 0.6x haproxy (mode http)",
    ),
    Target(
        "http_latency",
        "latency",
        "nodemesh-http",
        "haproxy-h2",
        2.0,
        "HTTP/1.1 added p50 <= 2x haproxy (mode http)'s",
    ),
    Target(
        "h2_rps",
        "h2",
        "nodemesh-http",
        "haproxy-h2",
        0.6,
        "HTTP/2 h2load: nodemesh-http >= 0.6x haproxy (h2 frontend)",
    ),
    Target("vs_rps", "rps", "nodemesh-vs", "nodemesh-http", 0.9,
           "HTTP/1.1 keep-alive with a 5-route VirtualService and a DestinationRule >= 0.9x without"),
    Target("vs_latency", "latency", "nodemesh-vs", "nodemesh-http", 1.1,
           "HTTP/1.1 added p50 with them <= 1.1x without"),
    Target("authz_rps", "rps", "nodemesh-authz", "nodemesh-http", 0.9,
           "HTTP/1.1 keep-alive with 10 AuthorizationPolicies in force >= 0.9x without"),
    Target("authz_latency", "latency", "nodemesh-authz", "nodemesh-http", 1.1,
           "HTTP/1.1 added p50 with them <= 1.1x without"),
)
RSS_TARGET = "agent RSS <= 80 MB (2 nodes x 20 pods)"
RSS_LIMIT_BYTES = 80 * MB


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


# path nodemesh-vs (service webvs): what a user's canary setup looks like; the benchmark's requests
# take the last route, so each is matched against the four before it
VIRTUAL_SERVICE = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: webvs, namespace: default}
spec:
  host: webvs
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: webvs, namespace: default}
spec:
  hosts: [webvs]
  http:
  - name: canary-header
    match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: webvs, subset: v1}}]
  - name: admin
    match: [{uri: {regex: "/admin/[a-z0-9]+"}}]
    route: [{destination: {host: webvs, subset: v1}}]
  - name: writes
    match: [{method: {exact: POST}, uri: {prefix: /api/}}]
    route: [{destination: {host: webvs, subset: v1}}]
  - name: debug
    match: [{queryParams: {debug: {exact: "1"}}}]
    route: [{destination: {host: webvs, subset: v1}}]
  - name: default
    route: [{destination: {host: webvs, subset: v1}}]
    headers: {request: {set: {x-route: default}}}
"""


def authz_policies() -> str:
    """Path nodemesh-authz (workload n2-p1-az, labels app: webaz): 10 AuthorizationPolicies, all
    evaluated for each request; the one that allows it sorts last, so every ALLOW is tried."""
    client = "cluster.local/ns/default/sa/client"  # n1-p1's identity
    head = ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {{name: {}, namespace: default}}\n")
    sel = "  selector: {matchLabels: {app: webaz}}\n"
    docs = []
    for i in range(8):
        who, paths = (f"cluster.local/ns/default/sa/caller-{i}", "/api/*") if i % 2 else (client, f"/v{i}/*")
        docs.append(head.format(f"webaz-allow-{i}") + "spec:\n" + sel + "  action: ALLOW\n  rules:\n"
                    f"  - from: [{{source: {{principals: [{who}]}}}}]\n"
                    f"    to: [{{operation: {{methods: [GET, POST], paths: [\"{paths}\"]}}}}]\n")
    docs.append(head.format("webaz-deny-header") + "spec:\n" + sel + "  action: DENY\n  rules:\n"
                f"  - when: [{{key: \"request.headers[{AZ_DENY_HEADER}]\", values: [\"*\"]}}]\n")
    docs.append(head.format("webaz-allow-9-client") + "spec:\n" + sel + "  action: ALLOW\n  rules:\n"
                f"  - from: [{{source: {{principals: [{client}]}}}}]\n"
                "    to: [{operation: {methods: [GET, HEAD], paths: [/1k, /peer]}}]\n")
    return "---\n".join(docs)


def _service(name: str, vip: str, app: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "nodemesh.io/v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"vip": vip, "selector": {"app": app}, "ports": ports}}


def manifest(topo: Topology, server: Pod, bypass: frozenset[str]) -> str:
    svc = _service("web", VIP, "web", [
        {"name": "tcp-web", "port": TCP_SVC_PORT, "targetPort": "web", "protocol": "tcp"},
        {"name": "http-web", "port": HTTP_SVC_PORT, "targetPort": "web-http", "protocol": "http"},
        {"name": "http-h2c", "port": H2_SVC_PORT, "targetPort": "web-h2c", "protocol": "http"},
        {"name": "http-slow", "port": SLOW_SVC_PORT, "targetPort": "slow", "protocol": "http"},
        {"name": "iperf", "port": IPERF_PORT, "targetPort": "iperf", "protocol": "tcp"},
    ])
    server_ports = {
        "web": HTTP_PORT,
        "web-http": HTTP_L7_PORT,
        "web-h2c": H2C_PORT,
        "slow": SLOW_PORT,
        "iperf": IPERF_PORT,
    }
    http_only = [{"name": "http-web", "port": HTTP_SVC_PORT, "targetPort": "web-http", "protocol": "http"}]
    vs_svc = _service("webvs", VS_VIP, "web", http_only)
    az_svc = _service("webaz", AZ_VIP, "webaz", http_only)
    az_server = {  # the same server pod and nginx, at its second address (see nodemesh-authz)
        "apiVersion": "nodemesh.io/v1",
        "kind": "Workload",
        "metadata": {"name": f"{server.name}-az", "namespace": "default", "labels": {"app": "webaz"}},
        "spec": {"address": AZ_ADDRESS, "node": server.node, "serviceAccount": "web",
                 "ports": {"web-http": HTTP_L7_PORT}},
    }
    docs: list[dict[str, Any]] = [svc, vs_svc, az_svc, az_server]
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
                    "ports": server_ports if is_server else {},
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

    @staticmethod
    def _stop(p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def stop_one(self, name: str) -> None:
        for item in [i for i in self.items if i[0] == name]:
            self._stop(item[1])
            self.items.remove(item)

    def stop(self) -> None:
        for _name, p in reversed(self.items):
            self._stop(p)
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


def read_json_line(p: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any] | None:
    """The next JSON line of ``p``'s stdout, or None (nothing within ``timeout_s``, EOF, not JSON)."""
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout_s)
    if not ready:
        return None
    line = p.stdout.readline()
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def nginx_conf(work: str) -> str:
    body = ("nodemesh-bench-" * 100)[:BODY_BYTES]
    return f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 256;
    client_body_temp_path {work}/nginx-tmp;
    server {{
        listen {HTTP_PORT} backlog=4096;
        listen {HTTP_L7_PORT} backlog=4096;
        listen {H2C_PORT} http2 backlog=4096;
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
frontend h2c_http
    mode http
    bind {n1.gateway}:{HA_H2C_HTTP} proto h2
    default_backend hop_h2c
backend hop_h2c
    mode http
    http-reuse always
    server n2 {n2.fabric_address}:{HA_TLS_H2C} {tls_out} alpn h2
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
frontend tls_h2c
    mode http
    bind {n2.fabric_address}:{HA_TLS_H2C} {tls_in} alpn h2
    default_backend pod_h2c
backend pod_h2c
    mode http
    http-reuse always
    server web {server.address}:{H2C_PORT} proto h2
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
    """Sums of the agent's connection and request counters (scraped inside the node netns).

    ``opened_mtls``/``opened_plain``: istio_tcp_connections_opened_total by security policy;
    ``requests_source``/``requests_destination``: istio_requests_total by reporter."""
    r = run_in(
        node.netns, None, ["curl", "-sS", "-m", "5", f"http://{node.fabric_address}:15020/metrics"], 10
    )
    if r.returncode != 0:
        raise BenchError(f"metrics of {node.name}: {r.stderr.strip()}")
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value

    for line in r.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:]+)(\{.*\})?\s+(\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "istio_tcp_connections_opened_total":
            policy = "mtls" if 'connection_security_policy="mutual_tls"' in labels else "plain"
            add(f"opened_{policy}", value)
        elif name == "istio_requests_total":
            rm = re.search(r'reporter="([a-z]+)"', labels)
            add(f"requests_{rm.group(1) if rm else 'unknown'}", value)
        elif name == "nodemesh_authz_decisions_total":
            rm = re.search(r'result="([a-z]+)"', labels)
            add(f"authz_{rm.group(1) if rm else 'unknown'}", value)
        elif name in ("nodemesh_tunnel_pool_connections", "nodemesh_outbound_failures_total"):
            add(name, value)
    return sums


AGENT_COUNTERS = ("opened_mtls", "opened_plain", "requests_source", "requests_destination", "authz_allowed",
                  "authz_denied")


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0)) for k in AGENT_COUNTERS}


_H2_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_H2_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_H2_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")


def parse_h2load(out: str) -> dict[str, Any]:
    """h2load's summary: {"value": req/s} only when every request succeeded with a 2xx,
    else {"value": None, "error": what went wrong} (h2load itself exits 0 either way)."""
    rq, st, fin = _H2_REQUESTS.search(out), _H2_STATUS.search(out), _H2_FINISHED.search(out)
    if not (rq and st and fin):
        return {"value": None, "error": "h2load printed no summary: " + out.strip()[-300:]}
    total, started, done, ok, failed, errored, timeout = map(int, rq.groups())
    s2xx, s3xx, s4xx, s5xx = map(int, st.groups())
    counts = {
        "total": total,
        "started": started,
        "done": done,
        "succeeded": ok,
        "failed": failed,
        "errored": errored,
        "timeout": timeout,
        "status": {"2xx": s2xx, "3xx": s3xx, "4xx": s4xx, "5xx": s5xx},
    }
    problems = [f"{n} {k}" for k, n in (("failed", failed), ("errored", errored), ("timeout", timeout)) if n]
    problems += [f"{n} {k}" for k, n in (("3xx", s3xx), ("4xx", s4xx), ("5xx", s5xx)) if n]
    if ok == 0:
        problems.append("no request succeeded")
    if problems:
        return {"value": None, "error": "h2load: " + ", ".join(problems), **counts}
    return {"value": float(fin.group(3)), "unit": "req/s", **counts}


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
        self.paths: tuple[str, ...] = tuple(p for p in PATHS if p in args.only)
        # metric -> the paths it runs on this time (--only, --metrics, --h2, what verify() found)
        self.plan: dict[str, tuple[str, ...]] = {
            m: tuple(p for p in METRIC_PATHS[m] if p in self.paths) for m in METRICS if m in args.metrics
        }
        self.skipped: dict[str, str] = {}  # metric -> "not measured: why"
        if "h2" in self.plan and args.h2 == "off":
            del self.plan["h2"]
            self.skipped["h2"] = "not measured: --h2 off"
        self.memory_on = "nodemesh-http" in self.paths and args.hold_conns > 0

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
        # the server pod's second address: workload n2-p1-az (path nodemesh-authz), the same nginx
        if any(p.address == AZ_ADDRESS for p in topo.pods()):
            raise BenchError(f"{AZ_ADDRESS} (workload {self.server.name}-az) is a testbed pod's address")
        with kernel.ipr(self.server.netns) as ipr:
            (eth,) = ipr.link_lookup(ifname=self.server.ifname)
            ipr.addr("add", index=eth, address=AZ_ADDRESS, prefixlen=self.server.prefix_len)
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
        self.procs.add(
            "hold-server",
            testbed.popen_in_pod(
                self.server,
                [sys.executable, HOLD_SERVER, str(SLOW_PORT), "--max-hold-seconds", "120"],
                stdout=log,
                stderr=log,
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
        bed.apply("---\n".join((manifest(topo, self.server, bypass), VIRTUAL_SERVICE, authz_policies())))
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
        for port in (HTTP_PORT, HTTP_L7_PORT, H2C_PORT, SLOW_PORT, IPERF_PORT):
            wait_port(self.server.netns, "127.0.0.1", port)
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
        """(client pod, host, port) of ``path`` for ``what`` in {"http", "iperf", "h2"}."""
        assert self.topo is not None
        gw = self.topo.nodes[0].gateway
        mesh, bypass, pod_ip = self.client_mesh, self.client_bypass, self.server.address
        table: dict[tuple[str, str], tuple[Pod, str, int]] = {
            ("direct", "http"): (bypass, pod_ip, HTTP_PORT),
            ("direct", "iperf"): (bypass, pod_ip, IPERF_PORT),
            ("direct", "h2"): (bypass, pod_ip, H2C_PORT),
            ("nodemesh", "http"): (mesh, VIP, TCP_SVC_PORT),
            ("nodemesh", "iperf"): (mesh, VIP, IPERF_PORT),
            ("nodemesh-http", "http"): (mesh, VIP, HTTP_SVC_PORT),
            ("nodemesh-http", "h2"): (mesh, VIP, H2_SVC_PORT),
            ("nodemesh-vs", "http"): (mesh, VS_VIP, HTTP_SVC_PORT),
            ("nodemesh-authz", "http"): (mesh, AZ_VIP, HTTP_SVC_PORT),
            ("haproxy", "http"): (bypass, gw, HA_TCP_HTTP),
            ("haproxy", "iperf"): (bypass, gw, HA_TCP_IPERF),
            ("haproxy-h2", "http"): (bypass, gw, HA_H2_HTTP),
            ("haproxy-h2", "h2"): (bypass, gw, HA_H2C_HTTP),
        }
        if (path, what) not in table:
            raise BenchError(f"path {path} has no {what} endpoint")
        return table[(path, what)]

    def proxy_pids(self, path: str) -> list[int]:
        assert self.bed is not None
        if path.startswith("nodemesh"):
            return [p.pid for p in self.bed.agents.values()]
        if path.startswith("haproxy"):
            return [self.procs.pid("haproxy-n1"), self.procs.pid("haproxy-n2")]
        return []

    def curl(self, pod: Pod, url: str) -> str:
        r = run_in_pod(pod, ["curl", "-sS", "-m", "5", url], 10)
        if r.returncode != 0:
            raise BenchError(f"curl {url} from {pod.name}: {r.stderr.strip()}")
        return r.stdout.strip()

    def agent_counters(self) -> tuple[dict[str, float], dict[str, float]]:
        assert self.topo is not None
        n1, n2 = self.topo.nodes
        return agent_metrics(n1), agent_metrics(n2)

    def verify(self) -> None:
        """Each path runs what it claims: peer seen by the server, agent and HAProxy counters."""
        assert self.topo is not None
        n2 = self.topo.nodes[1]
        s2 = f"{self.work}/haproxy-n2.sock"

        def snap() -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, str]]]:
            return (*self.agent_counters(), haproxy_frontends(s2))

        def delta(before: Any, after: Any) -> dict[str, Any]:
            fe = {k: int(after[2][k]["stot"]) - int(before[2][k]["stot"]) for k in after[2]}

            def req(name: str) -> int:
                return int(after[2][name]["req_tot"] or 0) - int(before[2][name]["req_tot"] or 0)

            return {
                "agent_n1": counters_delta(before[0], after[0]),
                "agent_n2": counters_delta(before[1], after[1]),
                "haproxy_n2_sessions": fe,
                "haproxy_n2_h2_requests": req("tls_h2"),
                "haproxy_n2_h2c_requests": req("tls_h2c"),
            }

        def agent_problems(path: str, d: dict[str, Any], requests: int) -> list[str]:
            """What the agents' counters say against what ``path`` should make them say."""
            a1, a2 = d["agent_n1"], d["agent_n2"]
            moved = f"agent counters moved by n1 {a1}, n2 {a2}"
            if path == "nodemesh":  # byte relay: connections, no requests
                ok = (
                    a1["opened_mtls"] >= requests
                    and a2["opened_mtls"] >= requests
                    and a1["requests_source"] == a1["requests_destination"] == 0
                    and a2["requests_source"] == a2["requests_destination"] == 0
                )
                return [] if ok else [f"{path} (declared tcp: relayed, not parsed): {moved}"]
            if path in ("nodemesh-http", "nodemesh-vs", "nodemesh-authz"):  # parsed on both nodes
                ok = a1["requests_source"] >= requests and a2["requests_destination"] >= requests
                found = [] if ok else [f"{path} (declared http: parsed on both nodes): {moved}"]
                # judged by the node-2 agent's policies for nodemesh-authz only, and allowed
                allowed = a2["authz_allowed"]
                other = a1["authz_allowed"] + a1["authz_denied"] + a2["authz_denied"]
                if path == "nodemesh-authz" and (allowed < requests or other):
                    found.append(f"{path}: expected {requests} requests allowed by node 2's policies: "
                                 f"{moved}")
                elif path != "nodemesh-authz" and (allowed or other):
                    found.append(f"{path}: expected no authorization decision: {moved}")
                return found
            if any(a1.values()) or any(a2.values()):
                return [f"{path} (no mesh): {moved}"]
            return []

        checks: dict[str, Any] = {}
        problems = []
        for path in self.paths:
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
            problems += agent_problems(path, d, 2)
            tcp_sessions = d["haproxy_n2_sessions"].get("tls_http", 0)
            if (path == "haproxy") != (tcp_sessions >= 2):
                problems.append(f"{path}: node-2 HAProxy TLS sessions moved by {tcp_sessions}")
            if (path == "haproxy-h2") != (d["haproxy_n2_h2_requests"] >= 2):
                problems.append(f"{path}: node-2 HAProxy h2 requests moved by {d['haproxy_n2_h2_requests']}")
        if "nodemesh-authz" in self.paths:
            problems += self.verify_authz_deny(checks)
        if any(p.startswith("haproxy") for p in self.paths):
            problems += self.verify_haproxy_tls(checks)
        if "h2" in self.plan:
            problems += self.verify_h2(checks, snap, delta, agent_problems)
        if self.memory_on:
            problems += self.verify_hold(checks)
        self.checks = checks
        if problems:
            raise BenchError(
                "path verification failed:\n  " + "\n  ".join(problems) + "\n" + json.dumps(checks, indent=1)
            )

    def verify_authz_deny(self, checks: dict[str, Any]) -> list[str]:
        """The nodemesh-authz policies are in force: a request with the DENY's header is refused
        403 by the node-2 agent (one denied decision)."""
        pod, host, port = self.endpoint("nodemesh-authz", "http")
        before = self.agent_counters()[1]
        r = run_in_pod(pod, ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                             "-H", f"{AZ_DENY_HEADER}: 1", f"http://{host}:{port}/1k"], 10)
        d = counters_delta(before, self.agent_counters()[1])
        checks["nodemesh-authz (deny header)"] = {"status": r.stdout.strip(), "agent_n2": d}
        if r.stdout.strip() != "403" or d["authz_denied"] != 1:
            got = r.stdout.strip() or r.stderr.strip()
            return [f"nodemesh-authz: a request with {AZ_DENY_HEADER} got {got}, node-2 authz counters "
                    f"moved by {d} (expected 403, one denied)"]
        return []

    def verify_haproxy_tls(self, checks: dict[str, Any]) -> list[str]:
        """The node-2 HAProxy refuses a client without a cert; with ours it speaks TLS 1.3."""
        assert self.topo is not None
        n1, n2 = self.topo.nodes
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
            return [f"haproxy hop TLS probe: {r.stdout.strip()} {r.stderr.strip()[-300:]}"]
        return []

    def verify_h2(self, checks: dict[str, Any], snap: Any, delta: Any, agent_problems: Any) -> list[str]:
        """A short h2load per h2 path. nodemesh-http failing (errors, or requests not counted by
        the agents) skips the metric under --h2 auto; any other failure is a problem."""
        problems: list[str] = []
        nodemesh_problem = ""
        for path in self.plan["h2"]:
            before = snap()
            res = self.h2load(path, requests=H2_CHECK_REQUESTS)
            d = delta(before, snap())
            checks[f"{path} (h2)"] = {"h2load": res, **d}
            found = [res["error"]] if res.get("value") is None else []
            found += agent_problems(path, d, H2_CHECK_REQUESTS)
            if path == "haproxy-h2" and d["haproxy_n2_h2c_requests"] < H2_CHECK_REQUESTS:
                found.append(f"node-2 HAProxy h2c requests moved by {d['haproxy_n2_h2c_requests']}")
            if not found:
                continue
            if path == "nodemesh-http":
                nodemesh_problem = "; ".join(found)
            else:
                problems += [f"{path} (h2): {p}" for p in found]
        if nodemesh_problem:
            if self.args.h2 == "on":
                problems.append(f"nodemesh-http (h2): {nodemesh_problem}")
            else:
                del self.plan["h2"]
                self.skipped["h2"] = f"not measured: HTTP/2 through nodemesh-http failed: {nodemesh_problem}"
                print(f"bench: h2 {self.skipped['h2']}", file=sys.stderr)
        return problems

    def hold_server(self, what: str) -> dict[str, Any]:
        """Ask the hold server (``count`` or ``release``) on 127.0.0.1 in the server pod."""
        r = run_in_pod(self.server, ["curl", "-sS", "-m", "5", f"http://127.0.0.1:{SLOW_PORT}/{what}"], 10)
        if r.returncode != 0:
            raise BenchError(f"hold server /{what}: {r.stderr.strip()}")
        return json.loads(r.stdout) if what == "count" else {"said": r.stdout.strip()}

    def verify_hold(self, checks: dict[str, Any]) -> list[str]:
        """The hold server answers through the mesh (VIP:8090, declared http) and is counted."""
        before = self.agent_counters()
        said = self.curl(self.client_mesh, f"http://{VIP}:{SLOW_SVC_PORT}/now")
        after = self.agent_counters()
        d1, d2 = counters_delta(before[0], after[0]), counters_delta(before[1], after[1])
        count = self.hold_server("count")
        checks["hold-server"] = {"said": said, "agent_n1": d1, "agent_n2": d2, "count": count}
        if said != "ok" or d1["requests_source"] < 1 or d2["requests_destination"] < 1:
            return [f"hold server via VIP:{SLOW_SVC_PORT}: said {said!r}, agent counters n1 {d1}, n2 {d2}"]
        return []

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
        elif metric == "h2":
            res = self.h2load(path, seconds=a.h2_seconds)
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

    def h2load(self, path: str, *, seconds: float = 0, requests: int = 0) -> dict[str, Any]:
        """h2load, h2c prior knowledge, for ``seconds`` (16 conns x 10 streams) or ``requests`` (a check)."""
        pod, host, port = self.endpoint(path, "h2")
        if requests:
            argv = ["h2load", "-n", str(requests), "-c", "2", "-m", "2", "-t", "1"]
        else:
            argv = ["h2load", "-D", str(seconds), "-c", str(WRK_CONNS), "-m", str(H2_STREAMS), "-t", "1"]
        argv += ["-N", "5", f"http://{host}:{port}/1k"]
        r = run_in_pod(pod, argv, (seconds or 10) + 30)
        res = parse_h2load(r.stdout + r.stderr)
        if r.returncode != 0 and res.get("value") is not None:
            res = {"value": None, "error": f"h2load exited with {r.returncode}: {r.stderr.strip()[-300:]}"}
        if res.get("value") is None and r.stderr.strip():
            res["stderr"] = r.stderr.strip()[-300:]
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

    # ---- agent memory per connection
    def agent_sample(self) -> dict[str, dict[str, int]]:
        """RSS and open descriptors of each agent."""
        assert self.bed is not None
        out = {}
        for name, p in self.bed.agents.items():
            proc = psutil.Process(p.pid)
            out[name] = {"rss_bytes": proc.memory_info().rss, "fds": proc.num_fds()}
        return out

    def memory(self, conns: int) -> dict[str, Any]:
        """Agent RSS: baseline, with ``conns`` idle keep-alive connections through nodemesh-http
        (one request each), then with a request held in flight on each of them."""
        settle = self.args.mem_settle_seconds
        res: dict[str, Any] = {
            "connections": conns,
            "client": f"scripts/bench/hold_conns.py in {self.client_mesh.name} -> {VIP}:{SLOW_SVC_PORT} "
            "(declared http): GET /now on each connection, then GET /hold on each",
            "settle_s": settle,
        }
        budget_s = 120 + 3 * settle
        log_path = os.path.join(self.work, "hold-conns.log")
        time.sleep(settle)
        samples = res["samples"] = {"baseline": self.agent_sample()}
        counters0 = self.agent_counters()
        with open(log_path, "ab") as log:
            argv = [sys.executable, HOLD_CONNS, VIP, str(SLOW_SVC_PORT), "--conns", str(conns)]
            p = self.procs.add(
                "hold-conns",
                testbed.popen_in_pod(
                    self.client_mesh,
                    [*argv, "--max-seconds", str(budget_s)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                ),
            )

        def go() -> None:
            assert p.stdin is not None
            with contextlib.suppress(OSError):
                p.stdin.write(b"go\n")
                p.stdin.flush()

        error = ""
        try:
            said = res["client_idle"] = read_json_line(p, budget_s)
            if said is None:
                error = "the client said nothing before its time ran out"
            elif said["open"] != conns or said["errors"]:
                error = (
                    f"{said['open']} of {conns} connections set up, "
                    f"{said['errors']} errors ({said['first_error']})"
                )
            if not error:
                time.sleep(settle)
                samples["idle"] = self.agent_sample()
                counters1 = self.agent_counters()
                d1 = res["agent_n1"] = counters_delta(counters0[0], counters1[0])
                d2 = res["agent_n2"] = counters_delta(counters0[1], counters1[1])
                if d1["requests_source"] < conns or d2["requests_destination"] < conns:
                    error = f"agents counted fewer requests than {conns}: n1 {d1}, n2 {d2}"
            if not error:
                go()
                said = res["client_inflight"] = read_json_line(p, 60)
                held, deadline = 0, time.monotonic() + 30
                while time.monotonic() < deadline:
                    held = self.hold_server("count")["holding"]
                    if held >= conns:
                        break
                    time.sleep(0.2)
                res["server_holding"] = held
                if said is None or said["sent"] != conns or said["errors"]:
                    error = f"the client, sending the held requests, said {said}"
                elif held != conns:
                    error = f"the hold server holds {held} of {conns} requests after 30 s"
            if not error:
                time.sleep(settle)
                samples["inflight"] = self.agent_sample()
            res["released"] = self.hold_server("release")
            go()
            said = res["client_done"] = read_json_line(p, budget_s)
            if not error and (said is None or said["completed"] != conns or said["errors"]):
                error = f"the client, reading the held responses, said {said}"
        finally:
            self.procs.stop_one("hold-conns")
        if error:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-300:].strip()
            res["error"] = error + (f"; client stderr: {tail}" if tail else "")
            return res
        # growth per connection: idle (idle - baseline), per in-flight request beyond its idle
        # connection (inflight - idle), and both (inflight - baseline)
        growth: dict[str, dict[str, float]] = {}
        fell = []
        for step, (a, b) in {
            "idle_conn": ("baseline", "idle"),
            "inflight_request": ("idle", "inflight"),
            "conn_with_request": ("baseline", "inflight"),
        }.items():
            grow = {n: samples[b][n]["rss_bytes"] - samples[a][n]["rss_bytes"] for n in samples[a]}
            grow["total"] = sum(grow.values())
            growth[step] = {f"{n}_kib": g / conns / KIB for n, g in grow.items()}
            growth[step].update({f"{n}_bytes": g for n, g in grow.items()})
            fell += [
                f"{n} by {-g / MB:.1f} MB from {a} to {b}" for n, g in grow.items() if g < 0 and n != "total"
            ]
        res["growth_per_conn"] = growth
        if fell:  # a memory trim in the agent gave back pages freed before the baseline: no figure
            res["error"] = (
                f"agent RSS fell during the test ({'; '.join(fell)}): a memory trim in the agent; "
                "rerun with a longer --mem-settle-seconds"
            )
        return res


# --------------------------------------------------------------------------- report

COLUMNS = (
    ("direct", "direct"),
    ("nodemesh", "nodemesh (tcp)"),
    ("nodemesh-http", "nodemesh-http"),
    ("haproxy", "haproxy (tcp)"),
    ("haproxy-h2", "haproxy (http)"),
    ("nodemesh-vs", "nodemesh-http + VirtualService"),
    ("nodemesh-authz", "nodemesh-http + 10 AuthorizationPolicies"),
)
METRIC_NAMES = {
    "bulk": "bulk 1-stream (Gbit/s)",
    "rps": "1 KiB keep-alive, 16 conns (req/s)",
    "cps": "new connections (conn/s)",
    "latency": "p50 at 1,000 rps (µs)",
    "h2": f"h2load h2c, {WRK_CONNS} conns x {H2_STREAMS} streams (req/s)",
}
UNITS = {"bulk": "Gbit/s", "rps": "req/s", "cps": "conn/s", "latency": "µs", "h2": "req/s"}


def summarize(
    rounds: list[dict[str, dict[str, dict[str, Any]]]], plan: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    med: dict[str, dict[str, float | None]] = {}
    cpu: dict[str, dict[str, float | None]] = {}
    for metric, paths in plan.items():
        med[metric], cpu[metric] = {}, {}
        for path in paths:
            vals = [
                r[metric][path]["value"]
                for r in rounds
                if path in r.get(metric, {}) and r[metric][path].get("value") is not None
            ]
            med[metric][path] = statistics.median(vals) if vals else None
            cores = [r[metric][path].get("proxy_cpu_cores", 0.0) for r in rounds if path in r.get(metric, {})]
            cpu[metric][path] = statistics.median(cores) if cores else None
    added: dict[str, float | None] = {}
    for path in plan.get("latency", ()):
        if path == "direct":
            continue
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
    return {"median": med, "added_p50_us": added, "proxy_cpu_cores": cpu}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdicts(
    summary: dict[str, Any],
    rss: dict[str, Any],
    plan: dict[str, tuple[str, ...]],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """One verdict per target: ratio and met, or met None with ``not_measured`` saying why."""
    med, added = summary["median"], summary["added_p50_us"]
    out: dict[str, Any] = {}
    for t in TARGETS:
        paths = plan.get(t.metric, ())
        reason = ""
        if t.metric not in plan:
            reason = skipped.get(t.metric, f"not measured: metric {t.metric} not selected (--metrics)")
        else:
            missing = [p for p in (t.path, t.ref) if p not in paths]
            if t.metric == "latency" and "direct" not in paths:
                missing.append("direct (added latency is against it)")
            if missing:
                reason = f"not measured: {', '.join(missing)} not selected (--only)"
        if t.metric == "latency":
            value, ref = added.get(t.path), added.get(t.ref)
            ratio = _ratio(value, ref)
            met = value is not None and ref is not None and value <= t.need * max(ref, 0.0)
        else:
            value, ref = med.get(t.metric, {}).get(t.path), med.get(t.metric, {}).get(t.ref)
            ratio = _ratio(value, ref)
            met = ratio is not None and ratio >= t.need
        if not reason and (value is None or ref is None):
            reason = "not measured: no successful measurement of " + " and ".join(
                p for p, v in ((t.path, value), (t.ref, ref)) if v is None
            )
        out[t.key] = {
            "target": t.text,
            "path": t.path,
            "reference": t.ref,
            "value": value,
            "reference_value": ref,
            "unit": "µs added p50 vs direct" if t.metric == "latency" else UNITS[t.metric],
            "ratio": None if reason else ratio,
            "met": None if reason else met,
            "not_measured": reason or None,
        }
    agents = [v["rss_bytes"] for k, v in rss.items() if k.startswith("agent-")]
    worst = max(agents)
    out["rss"] = {"target": RSS_TARGET, "max_agent_rss_mb": worst / MB, "met": worst <= RSS_LIMIT_BYTES}
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _met(v: dict[str, Any]) -> str:
    if v.get("met") is None:
        return "not measured"
    return "**met**" if v["met"] else "**not met**"


def table(summary: dict[str, Any], plan: dict[str, tuple[str, ...]], skipped: dict[str, str]) -> str:
    """Medians per metric and path; blank: the metric does not apply, —: no successful measurement."""
    med, added = summary["median"], summary["added_p50_us"]
    rows = [
        "| metric | " + " | ".join(c for _, c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for metric in METRICS:
        if metric not in plan:
            if metric in skipped:
                rows.append(f"| {METRIC_NAMES[metric]} | {skipped[metric]} |" + " |" * (len(COLUMNS) - 1))
            continue
        digits = 0 if metric == "latency" else 2
        cells = [_fmt(med[metric][p], digits) if p in plan[metric] else "" for p, _ in COLUMNS]
        rows.append(f"| {METRIC_NAMES[metric]} | " + " | ".join(cells) + " |")
        if metric == "latency":
            cells = [
                "0" if p == "direct" and p in plan[metric] else (_fmt(added.get(p), 0) if p in added else "")
                for p, _ in COLUMNS
            ]
            rows.append("| added p50 vs direct (µs) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets_table(verdict: dict[str, Any], rss: dict[str, Any]) -> str:
    rows = ["| target | measured | reference | ratio | met |", "|---|---:|---:|---:|---|"]
    for t in TARGETS:
        v = verdict[t.key]
        if v["not_measured"]:
            rows.append(f"| {t.text} | {v['not_measured']} | | | not measured |")
            continue
        digits = 0 if t.metric == "latency" else 2
        unit = "µs added" if t.metric == "latency" else UNITS[t.metric]
        rows.append(
            f"| {t.text} | {_fmt(v['value'], digits)} {unit} | {_fmt(v['reference_value'], digits)} {unit} | "
            f"{_fmt(v['ratio'])} | {_met(v)} |"
        )
    agents = ", ".join(f"{k[6:]} {v['rss_mb']:.1f}" for k, v in rss.items() if k.startswith("agent-"))
    has = ", ".join(f"{k[8:]} {v['rss_mb']:.1f}" for k, v in rss.items() if k.startswith("haproxy-"))
    v = verdict["rss"]
    rows.append(f"| {v['target']}, after the load | {agents} MB | haproxy {has} MB | | {_met(v)} |")
    return "\n".join(rows)


def memory_table(memory: dict[str, Any]) -> str:
    if not memory:
        return "Not measured (--hold-conns 0, or nodemesh-http not selected)."
    n = memory["connections"]
    if memory.get("error"):
        return f"{n:,} connections: not measured: {memory['error']}"
    rows = ["| agent memory (RSS, psutil) | n1 | n2 | both |", "|---|---:|---:|---:|"]
    for step, label in (
        ("baseline", "before (MB)"),
        ("idle", f"with {n:,} idle keep-alive HTTP/1.1 connections (MB)"),
        ("inflight", "with a request in flight on each (MB)"),
    ):
        vals = [memory["samples"][step][node]["rss_bytes"] / MB for node in ("n1", "n2")]
        rows.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in [*vals, sum(vals)]) + " |")
    for step, label in (
        ("idle_conn", "per idle connection (KiB)"),
        ("inflight_request", "per in-flight request, beyond its idle connection (KiB)"),
        ("conn_with_request", "per connection with a request in flight (KiB)"),
    ):
        g = memory["growth_per_conn"][step]
        rows.append(f"| {label} | {g['n1_kib']:.1f} | {g['n2_kib']:.1f} | {g['total_kib']:.1f} |")
    return "\n".join(rows)


def cpu_table(summary: dict[str, Any], plan: dict[str, tuple[str, ...]]) -> str:
    cpu = summary["proxy_cpu_cores"]
    cols = [(p, c) for p, c in COLUMNS if p != "direct"]
    rows = [
        "Proxy CPU during each test (both nodes' proxies, cores busy on average; the VM has "
        f"{os.cpu_count()}):",
        "",
        "| metric | " + " | ".join(c for _, c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for metric in METRICS:
        if metric in plan:
            cells = [_fmt(cpu[metric].get(p)) if p in plan[metric] else "" for p, _ in cols]
            rows.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(summary: dict[str, Any], plan: dict[str, tuple[str, ...]], png: str) -> str | None:
    plt = benchplot.pyplot()
    if plt is None:
        return None
    med = summary["median"]
    panels = [m for m in ("bulk", "rps", "cps", "h2") if m in plan]
    if not panels:
        return None
    colors = dict(zip(PATHS, ("#999", "#2a7", "#7c5", "#37c", "#8ad", "#ac4", "#c84"), strict=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], panels, strict=True):
        paths = [p for p in plan[metric] if med[metric][p] is not None]
        ax.bar(paths, [med[metric][p] for p in paths], color=[colors[p] for p in paths])
        ax.set_title(f"{metric} {UNITS[metric]}")
        ax.tick_params(axis="x", labelrotation=25)
    return benchplot.save(fig, png)


# --------------------------------------------------------------------------- main


def revision() -> str:
    """The code measured: git commit (+dirty) of ROOT, or $NODEMESH_BENCH_REV for an exported tree."""
    r = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    if r.returncode == 0:
        return r.stdout.strip()
    return os.environ.get("NODEMESH_BENCH_REV", "unknown")


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the clients this script starts inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    load_before = os.getloadavg()
    deadline = started + args.max_seconds
    nofile = raise_nofile()
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
    memory: dict[str, Any] = {}
    try:
        print(
            f"bench: setting up testbed {args.prefix!r} (2 nodes x {args.pods_per_node}+1 pods), mesh, "
            f"HAProxy, servers",
            file=sys.stderr,
        )
        bench.up()
        print(f"bench: set up in {bench.setup_s:.1f}s; verifying paths", file=sys.stderr)
        bench.verify()
        plan = bench.plan
        for path in bench.paths:  # warm-up (pool dial, caches): not recorded
            bench.wrk(path, 1, close=False)
        for path in plan.get("h2", ()):
            bench.h2load(path, seconds=1)
        rss_idle = bench.rss()
        round_s = 0.0
        for i in range(args.rounds):
            if time.monotonic() + round_s > deadline:
                print(f"bench: time budget reached, stopping after {i} rounds", file=sys.stderr)
                break
            t_round = time.monotonic()
            k = i % len(bench.paths)
            order = bench.paths[k:] + bench.paths[:k]
            rnd: dict[str, dict[str, dict[str, Any]]] = {}
            for metric, paths in plan.items():
                rnd[metric] = {}
                for path in order:
                    if path not in paths:
                        continue
                    rnd[metric][path] = res = bench.measure(path, metric)
                    if res.get("value") is None:
                        print(f"bench: round {i + 1} {metric} {path}: {res.get('error')}", file=sys.stderr)
            bench.procs.check()
            rnd["loadavg"] = {"1min": {"value": os.getloadavg()[0]}}
            rounds.append(rnd)
            round_s = time.monotonic() - t_round
            brief = "  ".join(
                f"{m}:" + "/".join(f"{p}={_fmt(rnd[m][p].get('value'))}" for p in bench.paths if p in rnd[m])
                for m in plan
            )
            print(f"bench: round {i + 1}/{args.rounds} ({round_s:.0f}s)  {brief}", file=sys.stderr)
        if not rounds:
            raise BenchError("no round completed")
        rss = bench.rss()
        if bench.memory_on:
            print(f"bench: agent memory with {args.hold_conns} connections, idle then busy", file=sys.stderr)
            memory = bench.memory(args.hold_conns)
            if memory.get("error"):
                print(f"bench: memory: not measured: {memory['error']}", file=sys.stderr)
            bench.procs.check()
        assert bench.topo is not None
        pool = {n.name: agent_metrics(n) for n in bench.topo.nodes}
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
    summary = summarize(rounds, plan)
    verdict = verdicts(summary, rss, plan, bench.skipped)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"dataplane-{stamp}.json")
    png = plot(summary, plan, os.path.join(out_dir, f"dataplane-{stamp}.png"))
    doc = {
        "benchmark": "dataplane",
        "when": stamp,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[
                0
            ],
            "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip(),
            "rlimit_nofile": list(nofile),
        },
        "config": {k: v for k, v in vars(args).items()},
        "revision": revision(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "setup_seconds": bench.setup_s,
        "total_seconds": time.monotonic() - started,
        "plan": {m: list(p) for m, p in plan.items()},
        "skipped": bench.skipped,
        "paths": {
            "direct": "n1-p21 (not enrolled) -> server pod IP:port (h2: nginx h2c port)",
            "nodemesh": f"n1-p1 (enrolled) -> VIP:{TCP_SVC_PORT} (declared tcp), eBPF capture -> agent n1 "
            f":15001 byte relay -> HBONE mTLS -> agent n2 :15008 -> pod :{HTTP_PORT}",
            "nodemesh-http": f"n1-p1 (enrolled) -> VIP:{HTTP_SVC_PORT} (declared http), eBPF capture -> "
            "agent n1 :15001 parses HTTP, balances per request, pooled upstreams over HBONE mTLS -> "
            f"agent n2 :15008 parses again -> pod :{HTTP_L7_PORT} (HTTP/1.1); h2 clients: VIP:{H2_SVC_PORT} "
            f"(declared http), h2 on every hop, pod :{H2C_PORT} (h2c)",
            "nodemesh-vs": f"as nodemesh-http, to VIP {VS_VIP}:{HTTP_SVC_PORT} (service webvs): a 5-route "
            "VirtualService (the request takes the last) and a DestinationRule with a subset",
            "nodemesh-authz": f"as nodemesh-http, to VIP {AZ_VIP}:{HTTP_SVC_PORT} (service webaz, workload "
            f"n2-p1-az: the server pod's second address {AZ_ADDRESS}, the same nginx): 10 "
            "AuthorizationPolicies select it (8 ALLOWs and a DENY that do not match, the ALLOW that does, "
            "tried last)",
            "haproxy": "n1-p21 -> HAProxy n1 (mode tcp) -> TLS1.3 mTLS (mesh CA, verify required both ways) "
            "-> HAProxy n2 (mode tcp) -> pod; one hop TLS connection per client connection",
            "haproxy-h2": "as haproxy, mode http, hop is HTTP/2 over the same mTLS "
            "with http-reuse always (pooled), HTTP/1.1 to the pod; h2 clients: n1 `bind proto h2`, "
            f"the same kind of hop, n2 `server proto h2` to pod :{H2C_PORT}",
        },
        "servers": "nginx-light 1 worker, return 200 with a 1024-byte body, keep-alive, HTTP/1.1 on "
        f"{HTTP_PORT} and {HTTP_L7_PORT}, h2c on {H2C_PORT}; iperf3 -s; scripts/bench/hold_server.py on "
        f"{SLOW_PORT}",
        "clients": {
            "bulk": "iperf3 -c, 1 stream",
            "rps": f"wrk -t1 -c{WRK_CONNS}",
            "cps": f"wrk -t1 -c{WRK_CONNS} -H 'Connection: close'",
            "latency": f"scripts/bench/fixed_rate.py, {args.lat_rate} rps open loop, "
            f"{WRK_CONNS} keep-alive conns",
            "h2": f"h2load -D {args.h2_seconds} -c {WRK_CONNS} -m {H2_STREAMS} -t 1 (h2c prior knowledge); "
            "any failed/errored/timed-out request or non-2xx: no number",
            "memory": f"scripts/bench/hold_conns.py in n1-p1: {args.hold_conns} keep-alive conns to "
            f"VIP:{SLOW_SVC_PORT} (declared http), one GET /now each, idle; then GET /hold on each, held "
            "in flight by the hold server",
        },
        "checks": bench.checks,
        "rounds": rounds,
        "summary": summary,
        "rss": rss,
        "rss_after_setup": rss_idle,
        "memory": memory,
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
    print(table(summary, plan, bench.skipped))
    print("\n### Targets\n")
    print(targets_table(verdict, rss))
    print("\n### Agent memory per connection\n")
    print(memory_table(memory))
    print()
    print(cpu_table(summary, plan))
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


# flags whose default --quick changes: (normal, quick)
DEFAULTS: dict[str, tuple[float, float]] = {
    "rounds": (5, 1),
    "bulk_seconds": (3, 1),
    "rps_seconds": (3, 1),
    "cps_seconds": (3, 1),
    "h2_seconds": (3, 1),
    "lat_seconds": (2.0, 1.0),
    "mem_settle_seconds": (6.0, 2.0),
}


def _names(text: str, known: Sequence[str], flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{flag}: expected a comma list of {', '.join(known)}; got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="bench", help="testbed prefix (default bench)")
    ap.add_argument("--rounds", type=int, help="default 5 (--quick: 1)")
    ap.add_argument(
        "--pods-per-node",
        type=int,
        default=20,
        help="mesh pods per node (one more, un-enrolled, "
        "is added per node for the direct and HAProxy clients)",
    )
    ap.add_argument(
        "--only",
        type=lambda s: _names(s, PATHS, "--only"),
        default=PATHS,
        help=f"comma list of paths to run (default all: {','.join(PATHS)})",
    )
    ap.add_argument(
        "--metrics",
        type=lambda s: _names(s, METRICS, "--metrics"),
        default=METRICS,
        help=f"comma list of metrics to run (default all: {','.join(METRICS)})",
    )
    ap.add_argument(
        "--h2",
        choices=("auto", "on", "off"),
        default="auto",
        help="HTTP/2 (h2load) metric: auto = skipped with the reason if nodemesh-http fails a short h2 "
        "check; on = that failure is an error; off = skipped",
    )
    ap.add_argument("--bulk-seconds", type=int, help="default 3 (--quick: 1)")
    ap.add_argument("--rps-seconds", type=int, help="default 3 (--quick: 1)")
    ap.add_argument("--cps-seconds", type=int, help="default 3 (--quick: 1)")
    ap.add_argument("--h2-seconds", type=int, help="default 3 (--quick: 1)")
    ap.add_argument("--lat-seconds", type=float, help="default 2 (--quick: 1)")
    ap.add_argument("--lat-rate", type=float, default=1000.0)
    ap.add_argument(
        "--hold-conns",
        type=int,
        default=1000,
        help="keep-alive HTTP/1.1 connections through nodemesh-http, idle and then each with a request "
        "in flight: agent RSS per connection and per request (0: skip)",
    )
    ap.add_argument(
        "--mem-settle-seconds",
        type=float,
        help="wait before each agent RSS sample of the memory test (default 6: past the agent's memory "
        "trim; --quick: 2)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a check that everything runs: defaults of 1 round, 1 s per test, 2 s settle (numbers not "
        "for comparison); flags given explicitly still apply",
    )
    ap.add_argument(
        "--haproxy-threads",
        type=int,
        default=1,
        help="nbthread of each HAProxy (default 1: one core per node proxy, like the agent's one loop)",
    )
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench-results"), help="where the JSON goes")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop starting rounds after this")
    a = ap.parse_args(argv)
    for key, (normal, quick) in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else normal)
    if os.geteuid() != 0:
        ap.error("run as root (netns, cgroups, eBPF)")
    if not (
        1 <= a.rounds <= 50
        and 1 <= a.pods_per_node <= 100
        and 1 <= a.bulk_seconds <= 60
        and 1 <= a.rps_seconds <= 60
        and 1 <= a.cps_seconds <= 60
        and 1 <= a.h2_seconds <= 60
        and 0 < a.lat_seconds <= 30
        and 0 <= a.hold_conns <= 10000
        and 0 <= a.mem_settle_seconds <= 60
    ):
        ap.error("rounds 1-50, pods-per-node 1-100, durations 1-60 s, conns 0-10000, settle 0-60 s")
    tools = ["haproxy", "nginx", "wrk", "iperf3", "curl"]
    if "h2" in a.metrics and a.h2 != "off":
        tools.append("h2load")
    for tool in tools:
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
