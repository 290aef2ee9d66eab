"""Istio AuthorizationPolicy on the testbed (issue 13, "Must show"): policies applied with
`nodemesh apply` as users write them, enforced by the destination node for real clients (curl,
raw sockets, Python TCP clients) through real eBPF capture and HBONE mTLS; outcomes checked in
the destination agents' metrics.

The mesh: ``api`` (backend/api, an HTTP port and a declared TCP port) on n2; ``ledger``
(backend/ledger, HTTP) on n1. Callers of different namespaces and service accounts: n1-p1
(frontend/web) and n1-p2 (default/intruder) cross nodes to ``api`` through the tunnel; n2-p2
(ops/tool) is on api's node, so its requests are judged by n2's agent on the way out. Each test
applies its policies and deletes them again; counts are differences of the agents' counters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import yaml

from agent import meshbed
from agent.control.embedded import EmbeddedBackend
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics
from tests.integration.scrape import requests_total as requests
from tests.integration.test_traffic_management import Bed
from tests.unit.test_authz_validate import REFUSED, line_of
from tests.unit.test_normalize import CORPUS

API_VIP = "10.96.0.70"
LEDGER_VIP = "10.96.0.71"
TD = "cluster.local"
WEB = f"{TD}/ns/frontend/sa/web"  # n1-p1
INTRUDER = f"{TD}/ns/default/sa/intruder"  # n1-p2: a valid certificate, not an allowed identity
TOOL = f"{TD}/ns/ops/sa/tool"  # n2-p2, on api's node
DIRECTORY_LAG_S = 0.5  # 0.2 s poll of the registry's snapshot, and the rebuild
MODES = ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: api, namespace: backend}}
spec:
  vip: {API_VIP}
  selector: {{app: api}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: http}}
  - {{name: stream, port: 9000, targetPort: 9000, protocol: tcp}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: ledger, namespace: backend}}
spec:
  vip: {LEDGER_VIP}
  selector: {{app: ledger}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
---
"""
# pod -> (namespace, service account, labels)
ROLES: dict[str, tuple[str, str, dict[str, str]]] = {
    "n1-p1": ("frontend", "web", {"app": "web"}),
    "n1-p2": ("default", "intruder", {"app": "intruder"}),
    "n1-p3": ("backend", "ledger", {"app": "ledger"}),
    "n2-p1": ("backend", "api", {"app": "api"}),
    "n2-p2": ("ops", "tool", {"app": "tool"}),
}

# In a server pod: HTTP on :8080 answering "<pod> <request target as received>" to any method,
# and (with a third argument) TCP on :9000 greeting with "hello" and echoing.
SERVER = textwrap.dedent(
    """
    import http.server, socket, sys, threading
    NAME, ADDR = sys.argv[1], sys.argv[2]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def answer(self):
            line = self.requestline  # (self.path is altered by http.server for '//' paths)
            target = line[len(self.command) + 1 : line.rindex(" ")]
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            body = f"{NAME} {target}".encode("latin-1")
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = do_DELETE = answer
        def log_message(self, *a):
            pass
    class Srv(http.server.ThreadingHTTPServer):
        def handle_error(self, *a):  # (a connection the mesh reset: nothing to say)
            pass
    def echo(c):
        with c:
            try:
                c.sendall(b"hello\\n")
                while data := c.recv(65536):
                    c.sendall(data)
            except ConnectionResetError:
                pass
    def tcp():
        s = socket.create_server((ADDR, 9000))
        while True:
            c, _ = s.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()
    if len(sys.argv) > 3:
        threading.Thread(target=tcp, daemon=True).start()
    srv = Srv((ADDR, 8080), H)
    print("ready", flush=True)
    srv.serve_forever()
    """
)

# In a client pod: one TCP connection per "addr:port" argument; what each got first:
# hello (the server's greeting), reset, eof, refused or timeout.
TCP_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    out = []
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                data = s.recv(64)
                out.append("hello" if data == b"hello\\n" else "eof" if not data else repr(data))
        except ConnectionResetError:
            out.append("reset")
        except ConnectionRefusedError:
            out.append("refused")
        except TimeoutError:
            out.append("timeout")
    print(json.dumps(out))
    """
)

# In a client pod: a long-lived TCP connection; "up" once it echoed, then "closed <how> <t>"
# (t: CLOCK_MONOTONIC, the same clock as the test's) when the proxy ends it.
HOLD = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    assert s.recv(64) == b"hello\\n"
    s.sendall(b"ping\\n")
    assert s.recv(64) == b"ping\\n"
    s.settimeout(30)
    print("up", flush=True)
    try:
        how = "eof" if s.recv(64) == b"" else "data"
    except ConnectionResetError:
        how = "reset"
    except TimeoutError:
        how = "timeout"
    print("closed", how, time.monotonic(), flush=True)
    """
)

# In a client pod: requests curl will not send as written (fragments, backslashes, bytes over
# 0x7f), each on its own connection, as raw bytes; prints [[status, body], ...] as JSON.
RAW = textwrap.dedent(
    """
    import json, socket, sys
    host, targets = sys.argv[1], json.loads(sys.argv[2])
    out = []
    for t in targets:
        with socket.create_connection((host, 80), timeout=10) as s:
            head = f"GET {t} HTTP/1.1\\r\\nhost: {host}\\r\\nconnection: close\\r\\n\\r\\n"
            s.sendall(head.encode("latin-1"))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        out.append([int(head.split(b" ", 2)[1]), body.decode("latin-1")])
    print(json.dumps(out))
    """
)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` over the series that carry ``labels``."""
    total = 0.0
    for line in text.splitlines():
        series = line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        if series or (not labels and line.startswith(name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Mesh(Bed):
    def __init__(self, bed: meshbed.MeshBed, work: str) -> None:
        super().__init__(bed)
        self.work = work

    def text(self, node: str) -> str:
        return node_metrics(self.bed.topo, node)

    def decisions(self, node: str) -> Counter[tuple[str, str, str]]:
        """nodemesh_authz_decisions_total by (policy, action, result) at ``node``'s agent."""
        got: Counter[tuple[str, str, str]] = Counter()
        pat = re.compile(r'^nodemesh_authz_decisions_total\{(.*)\} (\S+)$')
        for line in self.text(node).splitlines():
            m = pat.match(line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                got[(labels["policy"], labels["action"], labels["result"])] += int(float(m.group(2)))
        return got

    def decisions_delta(
        self, node: str, before: Counter[tuple[str, str, str]]
    ) -> dict[tuple[str, str, str], int]:
        now = self.decisions(node)
        return {k: now[k] - before[k] for k in now if now[k] != before[k]}

    def address(self, pod: str) -> str:
        p = self.bed.topo.pod(pod)
        assert p is not None
        return p.address

    def registry_revision(self) -> int:
        return EmbeddedBackend(self.bed.registry_dir, create=False).read().revision

    def agent_revision(self, node: str) -> float:
        text = self.text(node)
        assert "nodemesh_registry_revision " in text, "the agent exports no registry revision"
        return metric(text, "nodemesh_registry_revision")

    def wait_propagated(self, revision: int, timeout_s: float = 10) -> float:
        """Wait until both agents' registries hold ``revision``; the time they did (monotonic)."""
        deadline = time.monotonic() + timeout_s
        for node in ("n1", "n2"):
            while self.agent_revision(node) < revision:
                assert time.monotonic() < deadline, f"{node} did not see registry revision {revision}"
                time.sleep(0.01)
        return time.monotonic()

    def apply(self, manifest: str, *, wait: bool = True) -> float:
        """`nodemesh apply` on the testbed registry; returns when apply returned (monotonic)."""
        self.bed.apply(manifest)
        t = time.monotonic()
        if wait:
            self.settle()
        return t

    def settle(self) -> None:
        """Until the data path judges by the registry's current state: the agents' registries
        hold it, and their data path's directory follows the registry every 0.2 s
        (agent/node.py follow_snapshots), which no metric shows."""
        self.wait_propagated(self.registry_revision())
        time.sleep(DIRECTORY_LAG_S)

    def delete(self, *names: str) -> None:
        for ns_name in names:
            ns, name = ns_name.split("/")
            r = self.bed.cli("delete", "ap", name, "-n", ns, "--registry-dir", self.bed.registry_dir,
                             check=False)
            assert r.returncode in (0, 3), r.stdout + r.stderr  # (3: not found, never applied)
        self.settle()

    def policies(self) -> list[Any]:
        r = self.bed.cli("get", "ap", "-A", "-o", "json", "--registry-dir", self.bed.registry_dir,
                         check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        got: list[Any] = json.loads(r.stdout)
        return got

    def http(self, pod: str, reqs: Sequence[tuple[str, str, dict[str, str]]],
             *, path_as_is: bool = False) -> list[tuple[str, str]]:
        """(status, body) for each (method, url, headers), one curl process in ``pod``."""
        argv = ["curl"]
        for i, (method, url, headers) in enumerate(reqs):
            if i:
                argv.append("--next")
            argv += ["-sS", "-g", "--max-time", "20", "-X", method, "-w", "\x1f%{http_code}\x1e"]
            if path_as_is:
                argv.append("--path-as-is")
            for k, v in headers.items():
                argv += ["-H", f"{k}: {v}"]
            argv.append(url)
        r = self.bed.exec(pod, argv, timeout_s=120)
        rows = [item.rsplit("\x1f", 1) for item in r.stdout.split("\x1e") if "\x1f" in item]
        assert len(rows) == len(reqs), (r.stdout, r.stderr)
        return [(code, body) for body, code in rows]

    def tcp(self, pod: str, *targets: str) -> list[str]:
        r = self.bed.exec(pod, [sys.executable, "-c", TCP_CLIENT, *targets], timeout_s=60)
        assert r.returncode == 0, r.stderr
        got: list[str] = json.loads(r.stdout)
        return got

    def raw(self, pod: str, host: str, targets: Sequence[str]) -> list[tuple[int, str]]:
        r = self.bed.exec(pod, [sys.executable, "-c", RAW, host, json.dumps(targets)], timeout_s=120)
        assert r.returncode == 0, r.stderr
        return [(int(s), b) for s, b in json.loads(r.stdout)]

    def log(self, node: str) -> str:
        with open(self.bed.logs[node], encoding="utf-8", errors="replace") as f:
            return f.read()

    def restart_n2(self, mode: str) -> None:
        """n2's agent again, with ``http.path_normalization: mode``; back once a request passes."""
        node = self.bed.topo.node("n2")
        assert node is not None
        self.bed.stop_agent("n2")
        self.bed.node_extra["n2"] = {"http": {"path_normalization": mode}}
        self.bed.start_agent(node)
        deadline = time.monotonic() + 20
        while self.http("n1-p1", [("GET", f"http://{API_VIP}/public/ready", {})])[0][0] != "200":
            assert time.monotonic() < deadline, f"n2 does not serve after its restart ({mode})"
            time.sleep(0.2)


def workloads(topo: topology.Topology,
              roles_of: dict[str, tuple[str, str, dict[str, str]]] | None = None) -> str:
    """Workload documents with each pod's namespace, service account and labels (``roles_of``:
    pod -> (namespace, service account, labels); this module's ROLES by default)."""
    of = ROLES if roles_of is None else roles_of
    roles: dict[str, meshbed.Role] = {pod: (sa, labels, {}) for pod, (_, sa, labels) in of.items()}
    docs = list(yaml.safe_load_all(meshbed.workload_manifest(topo, roles)))
    for d in docs:
        d["metadata"]["namespace"] = of.get(d["metadata"]["name"], ("default",))[0]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    prefix = run_prefix("z")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 3)))
    work = f"/run/nodemesh/{prefix}-authz"
    os.makedirs(work, exist_ok=True)
    try:
        with meshbed.running(topo, SERVICES + workloads(topo)) as mb, \
                pod_servers(topo, SERVER, {"n2-p1": ("tcp",), "n1-p3": ()}):
            m = Mesh(mb, work)
            # no policy yet: everyone reaches everything
            for caller in ("n1-p1", "n1-p2", "n2-p2"):
                assert m.http(caller, [("GET", f"http://{API_VIP}/x", {})]) == [("200", "n2-p1 /x")]
                assert m.tcp(caller, f"{API_VIP}:9000") == ["hello"]
            assert m.policies() == []
            yield m
    finally:
        testbed.down(prefix)
        shutil.rmtree(work, ignore_errors=True)


def get(url: str, **headers: str) -> tuple[str, str, dict[str, str]]:
    return ("GET", url, {k.replace("_", "-"): v for k, v in headers.items()})


DENIED = ("403", "RBAC: access denied\n")


def test_http_principal_namespace_ip_method_path_header_rules_counted_at_the_destination(mesh: Mesh) -> None:
    api = f"http://{API_VIP}"
    intruder_ip, tool_ip = mesh.address("n1-p2"), mesh.address("n2-p2")
    mesh.apply(f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-allow, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{WEB}"]}}}}]
    to: [{{operation: {{methods: [GET], paths: ["/public/*", "/api/*"]}}}}]
  - from: [{{source: {{namespaces: [ops]}}}}]
    to: [{{operation: {{methods: [GET, POST], paths: ["/ops/*"]}}}}]
    when: [{{key: "request.headers[x-ops-token]", values: [s3cret]}}]
  - from: [{{source: {{ipBlocks: ["{intruder_ip}/32"]}}}}]
    to: [{{operation: {{paths: [/by-ip]}}}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {{name: api-deny, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/public/secret*"]}}}}]
  - when: [{{key: "request.headers[x-debug]", values: ["*"]}}]
  - from: [{{source: {{ipBlocks: ["{tool_ip}"]}}}}]
    to: [{{operation: {{methods: [DELETE]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-audit, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: AUDIT
  rules: [{{to: [{{operation: {{paths: ["/api/*"]}}}}]}}]
""")
    try:
        before, before_n1 = mesh.decisions("n2"), mesh.decisions("n1")
        text = mesh.text("n2")
        rbac0 = requests(text, reporter="destination", response_code="403", response_flags="RBAC")
        ok0 = requests(text, reporter="destination", response_code="200", destination_workload="n2-p1")
        # n1-p1, frontend/web, across nodes through the tunnel
        assert mesh.http("n1-p1", [
            get(f"{api}/public/a"),  # allowed: principal, GET, /public/*
            get(f"{api}/api/x"),  # allowed (and audited)
            ("POST", f"{api}/public/a", {}),  # only GET for web: no ALLOW rule matches
            get(f"{api}/public/secret-plans"),  # DENY by path before ALLOW
            get(f"{api}/public/a", x_debug="1"),  # DENY by header presence
            get(f"{api}/ops/x", x_ops_token="s3cret"),  # the right token, the wrong namespace
            get(f"{api}/by-ip"),  # the wrong address
        ]) == [("200", "n2-p1 /public/a"), ("200", "n2-p1 /api/x"), DENIED, DENIED, DENIED, DENIED, DENIED]
        # n1-p2, default/intruder: a valid certificate but not an allowed identity; allowed by IP
        assert mesh.http("n1-p2", [get(f"{api}/public/a"), get(f"{api}/by-ip"), get(f"{api}/by-ip/x")]) == [
            DENIED, ("200", "n2-p1 /by-ip"), DENIED]
        # n2-p2, ops/tool, on api's node: judged by n2's agent on the way out
        assert mesh.http("n2-p2", [
            get(f"{api}/ops/x", x_ops_token="s3cret"),
            ("POST", f"{api}/ops/y", {"x-ops-token": "s3cret"}),
            get(f"{api}/ops/x"),  # no token
            get(f"{api}/ops/x", x_ops_token="s3cret2"),  # exact is exact
            ("DELETE", f"{api}/ops/x", {"x-ops-token": "s3cret"}),  # DENY by source IP
            get(f"{api}/public/a"),  # not web
        ]) == [("200", "n2-p1 /ops/x"), ("200", "n2-p1 /ops/y"), DENIED, DENIED, DENIED, DENIED]

        assert mesh.decisions_delta("n2", before) == {
            ("backend/api-allow", "ALLOW", "allowed"): 5,
            ("backend/api-deny", "DENY", "denied"): 3,
            ("-", "ALLOW", "denied"): 8,
        }
        text = mesh.text("n2")
        rbac = requests(text, reporter="destination", response_code="403", response_flags="RBAC")
        assert rbac - rbac0 == 11
        assert requests(text, reporter="destination", response_code="200",
                        destination_workload="n2-p1") - ok0 == 5
        assert mesh.decisions_delta("n1", before_n1) == {}  # n1 judged nothing: api is not its workload
        # AUDIT logged the match, named, and decided nothing
        audit = r"authz: AUDIT backend/api-audit matched \S*frontend/sa/web GET /api/x"
        assert re.search(audit, mesh.log("n2")), mesh.log("n2")[-2000:]
    finally:
        mesh.delete("backend/api-allow", "backend/api-deny", "backend/api-audit")


def test_audit_only_logs_the_request_is_allowed_and_nothing_is_denied(mesh: Mesh) -> None:
    mesh.apply("""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-audit, namespace: backend}
spec:
  selector: {matchLabels: {app: ledger}}
  action: AUDIT
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
""")
    try:
        before = {n: mesh.decisions(n) for n in ("n1", "n2")}
        log_before = mesh.log("n1").count("authz: AUDIT backend/ledger-audit")
        ledger = f"http://{LEDGER_VIP}"
        # same node (n1-p1 -> ledger on n1) and across nodes (n2-p2 -> ledger on n1)
        assert mesh.http("n1-p1", [("DELETE", f"{ledger}/a", {}), get(f"{ledger}/b")]) == [
            ("200", "n1-p3 /a"), ("200", "n1-p3 /b")]
        assert mesh.http("n2-p2", [("DELETE", f"{ledger}/c", {})]) == [("200", "n1-p3 /c")]
        assert mesh.decisions_delta("n1", before["n1"]) == {("-", "-", "allowed"): 3}
        assert mesh.decisions_delta("n2", before["n2"]) == {}
        assert mesh.log("n1").count("authz: AUDIT backend/ledger-audit") - log_before == 2
    finally:
        mesh.delete("backend/ledger-audit")


def test_tcp_port_principal_namespace_ip_rules_and_ztunnels_l4_rule(mesh: Mesh) -> None:
    stream = f"{API_VIP}:9000"
    intruder_ip, tool_ip = mesh.address("n1-p2"), mesh.address("n2-p2")
    allow = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: stream-allow, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: ["{WEB}"]}}}}]
    to: [{{operation: {{ports: ["9000"]}}}}]
  - from: [{{source: {{namespaces: [ops]}}}}]
  # an HTTP-only field: on a TCP port this rule never matches (ztunnel's rule)
  - from: [{{source: {{principals: ["{INTRUDER}"]}}}}]
    to: [{{operation: {{paths: ["/*"]}}}}]
"""
    mesh.apply(allow)
    try:
        before = mesh.decisions("n2")
        rejected0 = metric(mesh.text("n2"), "nodemesh_tunnel_rejections_total", reason="authz_denied")
        assert mesh.tcp("n1-p1", stream) == ["hello"]  # principal, across nodes
        assert mesh.tcp("n2-p2", stream) == ["hello"]  # namespace, same node
        assert mesh.tcp("n1-p2", stream) == ["reset"]  # its only rule needs HTTP: never matches
        assert mesh.decisions_delta("n2", before) == {
            ("backend/stream-allow", "ALLOW", "allowed"): 2,
            ("-", "ALLOW", "denied"): 1,
        }
        # the CONNECT was refused at n2 before the pod was dialled
        rejected = metric(mesh.text("n2"), "nodemesh_tunnel_rejections_total", reason="authz_denied")
        assert rejected - rejected0 == 1

        # IP-based: an ALLOW for the intruder's address, a DENY for the tool's (DENY before ALLOW)
        before = mesh.decisions("n2")
        mesh.apply(allow + f"""  - from: [{{source: {{ipBlocks: ["{intruder_ip}/32"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: stream-deny, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: ["{tool_ip}/32"]}}}}]}}]
""")
        assert mesh.tcp("n1-p2", stream) == ["hello"]
        assert mesh.tcp("n2-p2", stream) == ["reset"]
        assert mesh.tcp("n1-p1", stream) == ["hello"]
        assert mesh.decisions_delta("n2", before) == {
            ("backend/stream-allow", "ALLOW", "allowed"): 2,
            ("backend/stream-deny", "DENY", "denied"): 1,
        }
    finally:
        mesh.delete("backend/stream-allow", "backend/stream-deny")


def test_a_valid_certificate_on_another_node_without_the_allowed_identity_is_denied(mesh: Mesh) -> None:
    mesh.apply(f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-web, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["{WEB}"]}}}}]}}]
""")
    try:
        before = mesh.decisions("n2")
        text = mesh.text("n2")
        sp = {"source_principal": f"spiffe://{INTRUDER}", "connection_security_policy": "mutual_tls"}
        denied0 = requests(text, reporter="destination", response_code="403", response_flags="RBAC", **sp)
        rejected0 = metric(text, "nodemesh_tunnel_rejections_total", reason="authz_denied")
        # n1-p2's tunnel carries its own valid certificate (default/intruder): verified, then denied
        assert mesh.http("n1-p2", [get(f"http://{API_VIP}/public/a")]) == [DENIED]
        assert mesh.tcp("n1-p2", f"{API_VIP}:9000") == ["reset"]
        # the allowed identity, from the same node, passes on both ports
        assert mesh.http("n1-p1", [get(f"http://{API_VIP}/public/a")]) == [("200", "n2-p1 /public/a")]
        assert mesh.tcp("n1-p1", f"{API_VIP}:9000") == ["hello"]
        text = mesh.text("n2")
        # the denial was made on the identity the mTLS handshake verified
        denied = requests(text, reporter="destination", response_code="403", response_flags="RBAC", **sp)
        assert denied - denied0 == 1
        assert metric(text, "nodemesh_tunnel_rejections_total", reason="authz_denied") - rejected0 == 1
        assert mesh.decisions_delta("n2", before) == {
            ("backend/only-web", "ALLOW", "allowed"): 2,
            ("-", "ALLOW", "denied"): 2,
        }
    finally:
        mesh.delete("backend/only-web")


def test_mesh_wide_deny_all_with_a_per_service_allow(mesh: Mesh) -> None:
    mesh.apply(f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all, namespace: istio-system}}
spec: {{}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-from-web, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules: [{{from: [{{source: {{principals: ["{WEB}"]}}}}]}}]
""")
    try:
        before = {n: mesh.decisions(n) for n in ("n1", "n2")}
        api, ledger = f"http://{API_VIP}/", f"http://{LEDGER_VIP}/"
        assert mesh.http("n1-p1", [get(api), get(ledger)]) == [("200", "n2-p1 /"), DENIED]
        assert mesh.http("n1-p2", [get(api), get(ledger)]) == [DENIED, DENIED]
        assert mesh.http("n2-p2", [get(api), get(ledger)]) == [DENIED, DENIED]
        assert mesh.tcp("n1-p1", f"{API_VIP}:9000") == ["hello"]
        assert mesh.tcp("n2-p2", f"{API_VIP}:9000") == ["reset"]
        assert mesh.decisions_delta("n2", before["n2"]) == {
            ("backend/api-from-web", "ALLOW", "allowed"): 2,
            ("-", "ALLOW", "denied"): 3,
        }
        assert mesh.decisions_delta("n1", before["n1"]) == {("-", "ALLOW", "denied"): 3}
    finally:
        mesh.delete("istio-system/deny-all", "backend/api-from-web")
    assert mesh.http("n1-p2", [get(f"http://{LEDGER_VIP}/")]) == [("200", "n1-p3 /")]


def test_a_new_policy_closes_denied_long_lived_tcp_streams_within_1s(mesh: Mesh) -> None:
    holders: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for pod in ("n1-p1", "n2-p2", "n1-p2"):  # across nodes, same node, and one that stays allowed
            p = mesh.bed.topo.pod(pod)
            assert p is not None
            holders[pod] = testbed.popen_in_pod(
                p, [sys.executable, "-c", HOLD, API_VIP, "9000"], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        for pod, h in holders.items():
            assert h.stdout is not None and h.stdout.readline() == b"up\n", (pod, h.communicate())
        before = mesh.decisions("n2")
        applied = mesh.apply(f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: cut, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["{WEB}", "{TOOL}"]}}}}]}}]
""", wait=False)
        propagated = mesh.wait_propagated(mesh.registry_revision())
        closed: dict[str, float] = {}
        for pod in ("n1-p1", "n2-p2"):
            out = holders[pod].communicate(timeout=10)[0].decode().split()
            assert out[:2] == ["closed", "reset"], (pod, out)
            closed[pod] = float(out[2])
        after = {pod: round(t - applied, 3) for pod, t in closed.items()}
        print(f"\nlive close: registry propagation {propagated - applied:.3f} s after apply returned; "
              f"connections closed {after} s after apply returned")
        assert all(0 < d < 1.0 for d in after.values()), after
        assert holders["n1-p2"].poll() is None  # still open: not denied
        # judged again once: the two denied, the third allowed (no ALLOW policy applies)
        assert mesh.decisions_delta("n2", before) == {
            ("backend/cut", "DENY", "denied"): 2,
            ("-", "-", "allowed"): 1,
        }
        # new connections are refused as well
        assert mesh.tcp("n1-p1", f"{API_VIP}:9000") == ["reset"]
    finally:
        for h in holders.values():  # by PID: the ones this test started
            if h.poll() is None:
                h.kill()
            h.communicate()
        mesh.delete("backend/cut")


def test_bad_input_is_refused_with_file_line_field_and_nothing_applied(mesh: Mesh) -> None:
    good = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: would-deny-all, namespace: istio-system}}
spec: {{}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: api, namespace: backend}}
spec:
  vip: {API_VIP}
  selector: {{app: api}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
---
"""
    policies, revision = mesh.policies(), mesh.registry_revision()
    for case in ("unknown action", "malformed CIDR", "unknown condition key", "path pattern Istio refuses"):
        text, on_line, field, reason = REFUSED[case]
        full = good + text
        path = os.path.join(mesh.work, f"bad-{case.replace(' ', '-')}.yaml")
        with open(path, "w") as f:
            f.write(full)
        r = mesh.bed.cli("apply", "-f", path, "--registry-dir", mesh.bed.registry_dir, check=False)
        out = r.stdout + r.stderr
        assert r.returncode == 2, (case, out)
        assert f"error: {path}:{line_of(full, on_line)} at {field}: " in out and reason in out, (case, out)
        assert mesh.policies() == policies and mesh.registry_revision() == revision, case
    # nothing applied: the agents still serve the old state, the mesh-wide deny-all is not in force
    assert mesh.agent_revision("n2") == revision
    assert mesh.http("n1-p2", [get(f"http://{API_VIP}/x")]) == [("200", "n2-p1 /x")]
    assert mesh.tcp("n1-p2", f"{API_VIP}:9000") == ["hello"]


# -- the normalisation corpus through the real path ---------------------------------------------

# What a real client can send beyond the unit corpus, against ALLOW /public/* + DENY /admin*:
# (target, (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)) — the path the server sees
EXTRA: list[tuple[str, tuple[str | int, ...]]] = [
    ("/public/a", ("/public/a",) * 4),
    ("/public/a?x=/../admin", ("/public/a?x=/../admin",) * 4),
    ("/admin/../public/a", ("/admin/../public/a", "/public/a", "/public/a", "/public/a")),
    ("/public//admin", ("/public//admin", "/public//admin", "/public/admin", "/public/admin")),
    ("/public/x/..//admin", ("/public/x/..//admin", "/public//admin", "/public/admin", "/public/admin")),
    ("/public%2F..%2Fadmin", ("/public%2F..%2Fadmin", "/public%2F..%2Fadmin", "/public%2F..%2Fadmin",
                              "/admin")),
    ("/%70ublic/a", ("/%70ublic/a", "/public/a", "/public/a", "/public/a")),
    ("/public/%2e%2e%5cadmin", ("/public/%2e%2e%5cadmin", "/public/..%5Cadmin", "/public/..%5Cadmin",
                                "/admin")),
    ("/PUBLIC/a", ("/PUBLIC/a",) * 4),
    ("/public", ("/public",) * 4),
    ("/admin", ("/admin",) * 4),
]
MAX_TARGET_BYTES = 8192  # http.max_request_line_bytes (agent.yaml's default)
CURL_UNSAFE = set('#\\"<>^`{|}')  # curl drops a fragment; the others go by raw socket


def corpus() -> list[tuple[str, str, tuple[str | int, ...]]]:
    """(id, target, expected per mode) for every corpus target an HTTP/1.1 client can send."""
    out: list[tuple[str, str, tuple[str | int, ...]]] = []
    for param in CORPUS:
        target, want = param.values  # type: ignore[attr-defined]
        assert isinstance(target, str) and isinstance(want, tuple)
        if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
            continue  # not a request line at all (the source proxy's parser refuses it)
        if len(target) > MAX_TARGET_BYTES:
            want = (414,) * 4  # the proxy's request-line limit comes first
        elif not target.isascii():
            want = (400,) * 4  # the HTTP/1.1 parser refuses bytes over 0x7f in the target
        out.append((str(param.id), target, want))  # type: ignore[attr-defined]
    out += [(f"extra-{i}", t, w) for i, (t, w) in enumerate(EXTRA)]
    return out


def expected_status(want: str | int) -> int:
    if isinstance(want, int):
        return want
    path = want.partition("?")[0]
    if path.startswith("/admin"):
        return 403  # DENY first
    return 200 if path.startswith("/public/") else 403


def test_normalisation_corpus_through_the_real_path_in_each_mode(mesh: Mesh) -> None:
    cases = corpus()
    assert len(cases) >= 40, len(cases)
    mesh.apply("""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-only, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules: [{to: [{operation: {paths: ["/public/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
""")
    by_curl = [c for c in cases if c[1].isascii() and not CURL_UNSAFE & set(c[1])]
    by_raw = [c for c in cases if c not in by_curl]
    summary: dict[str, Counter[int]] = {}
    failures: list[str] = []
    try:
        for mode in ("BASE", "NONE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
            i = MODES.index(mode)
            if mode != "BASE":  # (the agent starts in BASE, the default)
                mesh.restart_n2(mode)
            got: list[tuple[int, str]] = [
                (int(s), b) for s, b in mesh.http(
                    "n1-p1", [get(f"http://{API_VIP}{t}") for _, t, _ in by_curl], path_as_is=True)
            ]
            got += mesh.raw("n1-p1", API_VIP, [t for _, t, _ in by_raw])
            summary[mode] = Counter(s for s, _ in got)
            for (cid, target, want), (status, body) in zip(by_curl + by_raw, got, strict=True):
                w = want[i]
                ok = status == expected_status(w)
                if ok and status == 200:
                    ok = body == f"n2-p1 {w}"  # the normalised path is what the pod saw
                if ok and status == 403:
                    ok = body == DENIED[1]
                if not ok:
                    failures.append(f"{mode} {cid} {target[:60]!r}: want {expected_status(w)} "
                                    f"{str(w)[:60]!r}, got {status} {body[:80]!r}")
        print(f"\ncorpus: {len(cases)} targets ({len(by_curl)} by curl --path-as-is, {len(by_raw)} raw); "
              + "; ".join(f"{m}: {dict(sorted(c.items()))}" for m, c in summary.items()))
        assert not failures, "\n".join(failures)
    finally:
        if mesh.bed.node_extra.get("n2", {}) not in ({}, {"http": {"path_normalization": "BASE"}}):
            mesh.restart_n2("BASE")
        mesh.delete("backend/public-only", "backend/no-admin")
