"""PeerAuthentication on the testbed (issue 13 point 5): resources applied with `nodemesh apply`
as users write them, judged by the destination node's tc filter for real connections; the mesh
path (eBPF capture, HBONE mTLS, the node proxy) keeps working in every mode.

The mesh: ``api`` (backend/api, n2-p1, ports 8080 and 9090) and ``old`` (legacy/old, n2-p2, port
8080) on node n2; the mesh client is n1-p1 (frontend/web, enrolled: its connections are
captured and tunnelled). The plaintext client is a process in pod n1-p2's network namespace
but outside the intercepted cgroup (an unenrolled pod): its connections go straight to the pod
addresses, across the nodes, as any process outside the mesh would. The agents' agent.yaml sets
``mesh.root_namespace: mesh-root`` and ``peer_authentication`` PERMISSIVE with the ``legacy``
namespace STRICT: the default where no resource applies. One testbed for every case.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import yaml

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics

pytestmark = pytest.mark.root

API_VIP, OLD_VIP = "10.96.0.80", "10.96.0.81"
CONVERGE_S = 10.0  # registry poll, directory rebuild, apply_peer_auth on a worker thread

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: api, namespace: backend}}
spec:
  vip: {API_VIP}
  selector: {{app: api}}
  ports:
  - {{name: main, port: 80, targetPort: 8080, protocol: tcp}}
  - {{name: metrics, port: 90, targetPort: 9090, protocol: tcp}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: old, namespace: legacy}}
spec:
  vip: {OLD_VIP}
  selector: {{app: old}}
  ports: [{{name: main, port: 80, targetPort: 8080, protocol: tcp}}]
---
"""
ROLES = {"n1-p1": ("frontend", "web"), "n1-p2": ("default", "outsider"),
         "n2-p1": ("backend", "api"), "n2-p2": ("legacy", "old")}

# In a server pod: TCP on each port given, greeting every connection with "hello".
SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(port):
        s = socket.create_server(("0.0.0.0", port), backlog=64)
        while True:
            c, _ = s.accept()
            with c:
                try:
                    c.sendall(b"hello\\n")
                except OSError:
                    pass
    for p in sys.argv[3:]:
        threading.Thread(target=serve, args=(int(p),), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)

# One connection per "host:port" argument, all at once: "hello" (the server's greeting), or
# timeout (a dropped SYN), refused, reset, eof.
CLIENT = textwrap.dedent(
    """
    import json, socket, sys, threading
    out = {}
    def one(target):
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1.5) as s:
                out[target] = "hello" if s.recv(16) == b"hello\\n" else "eof"
        except TimeoutError:
            out[target] = "timeout"
        except ConnectionRefusedError:
            out[target] = "refused"
        except ConnectionResetError:
            out[target] = "reset"
    ts = [threading.Thread(target=one, args=(t,)) for t in sys.argv[1:]]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps(out))
    """
)


class Mesh:
    def __init__(self, bed: meshbed.MeshBed) -> None:
        self.bed = bed
        self.topo = bed.topo

    def address(self, pod: str) -> str:
        p = self.topo.pod(pod)
        assert p is not None
        return p.address

    def _run(self, proc: subprocess.Popen[bytes]) -> dict[str, str]:
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        got: dict[str, str] = json.loads(out)
        return got

    def plaintext(self) -> dict[str, str]:
        """From the unenrolled client straight to the pods: api:8080, api:9090, old:8080."""
        pod = self.topo.pod("n1-p2")
        assert pod is not None
        targets = self.plain_targets()
        proc = testbed.popen_in(pod.netns, None, [sys.executable, "-c", CLIENT, *targets.values()],
                                stdout=subprocess.PIPE)  # no cgroup: outside the interception
        got = self._run(proc)
        return {name: got[t] for name, t in targets.items()}

    def plain_targets(self) -> dict[str, str]:
        api, old = self.address("n2-p1"), self.address("n2-p2")
        return {"api:8080": f"{api}:8080", "api:9090": f"{api}:9090", "old:8080": f"{old}:8080"}

    def mesh(self) -> dict[str, str]:
        """From the enrolled client n1-p1 through the services: captured, tunnelled, delivered."""
        targets = {"api:8080": f"{API_VIP}:80", "api:9090": f"{API_VIP}:90", "old:8080": f"{OLD_VIP}:80"}
        pod = self.topo.pod("n1-p1")
        assert pod is not None
        got = self._run(testbed.popen_in_pod(pod, [sys.executable, "-c", CLIENT, *targets.values()],
                                             stdout=subprocess.PIPE))
        return {name: got[t] for name, t in targets.items()}

    def expect(self, plaintext: dict[str, str], what: str) -> None:
        """Until the plaintext outcomes are ``plaintext`` (the agents follow the registry within
        ``CONVERGE_S``); the mesh path delivers to every port all along."""
        deadline = time.monotonic() + CONVERGE_S
        while (got := self.plaintext()) != plaintext:
            assert time.monotonic() < deadline, f"{what}: plaintext {got}, expected {plaintext}"
            time.sleep(0.2)
        assert self.mesh() == dict.fromkeys(plaintext, "hello"), what

    def counters(self, workload: str) -> dict[str, float]:
        """nodemesh_peer_auth_connections_total of ``workload`` at n2, by verdict."""
        out = {"proxied": 0.0, "plaintext": 0.0, "refused": 0.0}
        pat = re.compile(r'^nodemesh_peer_auth_connections_total\{(.*)\} (\S+)$', re.M)
        for labels, value in pat.findall(node_metrics(self.topo, "n2")):
            d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if d.get("workload") == workload:
                out[d["verdict"]] = float(value)
        return out

    def modes(self, workload: str) -> dict[str, str]:
        """What n2's tc filter holds for ``workload``: port ("*": the pod's) -> mode, as exported
        in nodemesh_peer_auth_mode."""
        pat = re.compile(r'^nodemesh_peer_auth_mode\{(.*)\} 1\.0$', re.M)
        out: dict[str, str] = {}
        for labels in pat.findall(node_metrics(self.topo, "n2")):
            d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if d.get("workload") == workload:
                out[d["port"]] = d["mode"]
        return out

    def delete(self, ns: str, name: str) -> None:
        r = self.bed.cli("delete", "pa", name, "-n", ns, "--registry-dir", self.bed.registry_dir, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"PeerAuthentication {ns}/{name} deleted" in r.stdout, r.stdout

    def explain(self, url: str) -> dict[str, str]:
        n2 = self.topo.node("n2")
        assert n2 is not None
        r = self.bed.cli("explain", "--from", "frontend/n1-p1", "GET", url, "--registry-dir",
                         self.bed.registry_dir, "--agent-config", self.bed.config_path(n2), "-o", "json",
                         check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        got: dict[str, str] = json.loads(r.stdout)["peer_authentication"]
        return got


def workloads(topo: topology.Topology) -> str:
    roles: dict[str, meshbed.Role] = {pod: (sa, {"app": sa}, {}) for pod, (_, sa) in ROLES.items()}
    docs = list(yaml.safe_load_all(meshbed.workload_manifest(topo, roles)))
    for d in docs:
        d["metadata"]["namespace"] = ROLES[d["metadata"]["name"]][0]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    prefix = run_prefix("q")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    agent_yaml = {"mesh": {"root_namespace": "mesh-root"},
                  "peer_authentication": {"mode": "PERMISSIVE", "namespaces": {"legacy": "STRICT"}}}
    try:
        with meshbed.running(topo, SERVICES + workloads(topo), extra=agent_yaml) as mb, \
                pod_servers(topo, SERVER, {"n2-p1": ("8080", "9090"), "n2-p2": ("8080",)}):
            yield Mesh(mb)
    finally:
        testbed.down(prefix)


def doc(name: str, ns: str, spec: str) -> str:
    return f"apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n" \
           f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{textwrap.indent(spec, '  ')}---\n"


AGENT_YAML = {"api:8080": "hello", "api:9090": "hello", "old:8080": "timeout"}


def test_mesh_wide_strict_port_level_exception_namespace_override_and_back_to_agent_yaml(mesh: Mesh) -> None:
    # no resource: agent.yaml's modes (PERMISSIVE; the legacy namespace STRICT)
    mesh.expect(AGENT_YAML, "agent.yaml's default")
    assert (mesh.modes("n2-p1"), mesh.modes("n2-p2")) == ({"*": "PERMISSIVE"}, {"*": "STRICT"})
    before = mesh.counters("n2-p1")

    # mesh-wide STRICT in the configured root namespace; istio-system is an ordinary namespace here
    mesh.bed.apply(doc("default", "mesh-root", "mtls: {mode: STRICT}\n")
                   + doc("default", "istio-system", "mtls: {mode: DISABLE}\n"))
    mesh.expect({"api:8080": "timeout", "api:9090": "timeout", "old:8080": "timeout"}, "mesh-wide STRICT")
    after = mesh.counters("n2-p1")
    assert after["refused"] >= before["refused"] + 2, (before, after)  # the plaintext SYNs, dropped
    assert after["proxied"] >= before["proxied"] + 2, (before, after)  # the mesh's, delivered

    # a workload's portLevelMtls exception: plaintext reaches api's port 9090 only
    mesh.bed.apply(doc("api-ports", "backend", "selector: {matchLabels: {app: api}}\nmtls: {mode: UNSET}\n"
                       "portLevelMtls:\n  9090: {mode: PERMISSIVE}\n"))
    mesh.expect({"api:8080": "timeout", "api:9090": "hello", "old:8080": "timeout"}, "portLevelMtls 9090")
    assert mesh.modes("n2-p1") == {"*": "STRICT", "9090": "PERMISSIVE"}
    m = mesh.explain(f"http://{API_VIP}:90/")
    assert (m["port"], m["mode"], m["set_by"]) == (9090, "PERMISSIVE",
                                                   "PeerAuthentication backend/api-ports portLevelMtls 9090")
    m = mesh.explain(f"http://{API_VIP}/")
    assert (m["port"], m["mode"], m["set_by"]) == (8080, "STRICT", "PeerAuthentication mesh-root/default")

    # a namespace-level policy overrides the mesh-wide one (and agent.yaml's STRICT for legacy)
    mesh.bed.apply(doc("default", "legacy", "mtls: {mode: PERMISSIVE}\n"))
    mesh.expect({"api:8080": "timeout", "api:9090": "hello", "old:8080": "hello"}, "namespace PERMISSIVE")

    # every resource deleted: agent.yaml's default again, port modes gone with the policy
    for ns, name in (("backend", "api-ports"), ("legacy", "default"), ("mesh-root", "default"),
                     ("istio-system", "default")):
        mesh.delete(ns, name)
    mesh.expect(AGENT_YAML, "back to agent.yaml's default")
    assert (mesh.modes("n2-p1"), mesh.modes("n2-p2")) == ({"*": "PERMISSIVE"}, {"*": "STRICT"})
    m = mesh.explain(f"http://{OLD_VIP}/")
    assert (m["mode"], m["set_by"]) == ("STRICT", "agent.yaml peer_authentication.namespaces[legacy]")
