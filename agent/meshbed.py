"""A whole mesh on the single-host testbed: CA, registry, one agent per node.

How this works: :func:`start` takes a running testbed, creates the mesh CA and
an embedded registry under a run directory, applies the given YAML, writes one
agent config per node (proxy on the node's pod gateway, HBONE on its fabric
address, interception attached to the node's cgroup with pins under a
prefixed bpffs root, every pod of the node enrolled) and starts each agent
*inside its node's network namespace*, as a real host would run it. Used by
the demo, the end-to-end tests and the benchmarks. :meth:`MeshBed.stop` stops
the agents (by PID), detaches the eBPF programs and removes the pins and the
run directory — also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from netns import cgroup, testbed
from netns.topology import Node, Topology

EXCLUDED_PORTS = (15000, 15001, 15008, 15020, 15021, 15053)

# A service on a node itself (a "host service", README: Host services): HTTP on 0.0.0.0:8080 of
# the node's netns, /health for the seed's Consul check; prints "ready" once listening.
HOST_SERVICE = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok" if self.path == "/health" else b"my-service on the host"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H)
print("ready", flush=True)
s.serve_forever()
"""
NODEMESH = [sys.executable, "-m", "agent.cli.main"]


@dataclass
class MeshBed:
    topo: Topology
    run_dir: str
    extra: dict[str, object] = field(default_factory=dict)  # top-level keys merged into every agent config
    node_extra: dict[str, dict[str, object]] = field(default_factory=dict)  # node name -> more keys
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agent_cgroups: dict[str, str] = field(default_factory=dict)  # node name -> cgroup its agent runs in
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def ca_dir(self) -> str:
        return os.path.join(self.run_dir, "ca")

    @property
    def registry_dir(self) -> str:
        return os.path.join(self.run_dir, "registry")

    def bpffs_root(self, node: Node) -> str:
        return f"/sys/fs/bpf/{self.topo.prefix}-{node.name}-nodemesh"

    def config_path(self, node: Node) -> str:
        return os.path.join(self.run_dir, f"agent-{node.name}.yaml")

    def agent_config(self, node: Node) -> dict[str, object]:
        return {**self._base_config(node), **self.extra, **self.node_extra.get(node.name, {})}

    def _base_config(self, node: Node) -> dict[str, object]:
        return {
            "node": node.name,
            "trust_domain": "cluster.local",
            "addresses": {"proxy": node.gateway, "hbone": node.fabric_address},
            "registry": {"backend": "embedded", "dir": self.registry_dir},
            "ca": {"dir": self.ca_dir},
            "interception": {
                "cgroup": cgroup.cgroup_path(node.cgroup),
                "bpffs_root": self.bpffs_root(node),
                "capture_cidrs": ["10.96.0.0/16", "10.244.0.0/16"],
                "excluded_ports": list(EXCLUDED_PORTS),
                "enroll": [f"/run/netns/{p.netns}" for p in node.pods],
            },
            "peers": {n.name: n.fabric_address for n in self.topo.nodes if n is not node},
            "log_level": "info",
            "runtime_dir": self.run_dir,
            "drain_s": 5,
        }

    def with_host_cgroups(self, node: Node, cgroups: list[str]) -> None:
        """``node``'s agent (started next) enrolls these host cgroups (interception.host_cgroups)."""
        interception = dict(self._base_config(node)["interception"])  # type: ignore[call-overload]
        self.node_extra.setdefault(node.name, {})["interception"] = {**interception,
                                                                     "host_cgroups": cgroups}

    def start_host_service(self, node: Node, cgroup_rel: str) -> subprocess.Popen[bytes]:
        """HOST_SERVICE in ``node``'s own netns, in cgroup ``cgroup_rel``, once it listens."""
        proc = testbed.popen_in(node.netns, cgroup_rel, [sys.executable, "-c", HOST_SERVICE],
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the host service on {node.name} did not start")
        return proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*NODEMESH, *args], capture_output=True, text=True, check=check)

    def apply(self, manifest: str) -> str:
        path = os.path.join(self.run_dir, f"apply-{time.monotonic_ns()}.yaml")
        with open(path, "w") as f:
            f.write(manifest)
        return self.cli("apply", "-f", path, "--registry-dir", self.registry_dir).stdout

    def spawn_agent(self, node: Node) -> subprocess.Popen[bytes]:
        """Start the agent of ``node`` in its netns (not waiting for it); stdout is a pipe."""
        with open(self.config_path(node), "w") as f:
            yaml.safe_dump(self.agent_config(node), f)
        log_path = os.path.join(self.run_dir, f"agent-{node.name}.log")
        self.logs[node.name] = log_path
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            proc = testbed.popen_in(
                node.netns,
                self.agent_cgroups.get(node.name),
                [*NODEMESH, "agent", "-c", self.config_path(node)],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self.agents[node.name] = proc
        return proc

    def start_agent(self, node: Node, timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
        proc = self.spawn_agent(node)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.strip() == b"ready" or not line:
                break
        if line.strip() != b"ready":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"agent {node.name} did not become ready:\n{self.log_text(node.name)}")
        return proc

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        proc = self.agents.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def log_text(self, name: str) -> str:
        try:
            with open(self.logs[name]) as f:
                return f.read()[-4000:]
        except (KeyError, OSError):
            return ""

    def exec(
        self, pod: str, argv: Sequence[str], timeout_s: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        p = self.topo.pod(pod)
        if p is None:
            raise KeyError(pod)
        proc = testbed.popen_in_pod(p, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(), err.decode())

    def stop(self) -> None:
        for name in list(self.agents):
            self.stop_agent(name)
        for node in self.topo.nodes:
            subprocess.run(
                [*NODEMESH, "uninstall", "--bpffs-root", self.bpffs_root(node)],
                capture_output=True,
                check=False,
            )
            with contextlib.suppress(OSError):
                if os.path.isdir(self.bpffs_root(node)):
                    os.rmdir(self.bpffs_root(node))
        shutil.rmtree(self.run_dir, ignore_errors=True)


class Prometheus:
    """A real Prometheus (Debian's package) in the first node's netns, scraping every agent's
    /metrics each second; asked through its HTTP API from the same netns. Stop it by PID."""

    def __init__(self, topo: Topology, data_dir: str, port: int = 9090) -> None:
        self.topo, self.data_dir, self.port = topo, data_dir, port
        cfg = os.path.join(data_dir, "prometheus.yml")
        with open(cfg, "w") as f:  # YAML is a superset of JSON
            json.dump({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                       "scrape_configs": [{"job_name": "nodemesh", "static_configs": [
                           {"targets": [f"{n.fabric_address}:15020" for n in topo.nodes]}]}]}, f)
        with open(os.path.join(data_dir, "prometheus.log"), "ab") as log:
            self.proc = testbed.popen_in(
                topo.nodes[0].netns, None,
                ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={data_dir}/tsdb",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.parse.quote(promql, safe='')}"
        proc = testbed.popen_in(self.topo.nodes[0].netns, None, ["curl", "-sS", "--max-time", "5", url],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = proc.communicate(timeout=10)[0]
        doc = json.loads(out) if proc.returncode == 0 and out else {}
        return list(doc["data"]["result"]) if doc.get("status") == "success" else []

    def wait_scraping(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            up = self.query('sum(up{job="nodemesh"})')
            if up and float(up[0]["value"][1]) == len(self.topo.nodes):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus does not scrape every agent (see {self.data_dir})")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


Role = tuple[str, dict[str, str], dict[str, int]] | tuple[str, dict[str, str], dict[str, int], int]


def workload_manifest(topo: Topology, roles: dict[str, Role]) -> str:
    """Workload documents for pods: roles maps pod name -> (service account, labels, ports[, weight])."""
    docs = []
    for pod in topo.pods():
        role = roles.get(pod.name, ("default", {}, {}))
        spec: dict[str, object] = {
            "address": pod.address,
            "node": pod.node,
            "serviceAccount": role[0],
            "ports": role[2],
        }
        if len(role) == 4:
            spec["weight"] = role[3]
        docs.append(
            {
                "apiVersion": "nodemesh.io/v1",
                "kind": "Workload",
                "metadata": {"name": pod.name, "namespace": "default", "labels": role[1]},
                "spec": spec,
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


@contextlib.contextmanager
def running(
    topo: Topology, manifest: str, *, start_agents: bool = True, extra: dict[str, object] | None = None
) -> Iterator[MeshBed]:
    run_dir = os.path.join("/run/nodemesh", f"{topo.prefix}-mesh")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    bed = MeshBed(topo, run_dir, extra=dict(extra or {}))
    try:
        bed.cli("ca", "init", "--dir", bed.ca_dir, "--trust-domain", "cluster.local")
        bed.apply(manifest)
        if start_agents:
            for node in topo.nodes:
                bed.start_agent(node)
        yield bed
    finally:
        bed.stop()
