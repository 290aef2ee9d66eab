"""The demo: a two-node mesh on this host, traffic by service name, and what the mesh saw.

Run through scripts/demo.sh (which runs setup first). It builds a testbed of
two nodes with two pods each, starts one nodemesh agent per node (eBPF
interception, registry, CA, node proxy, DNS, metrics), registers a service
`web` with pods on both nodes, has a client pod call it by name, shows
`nodemesh status` and the Istio metrics, then removes everything (also on
Ctrl-C or error). Everything is named with the prefix ``demo``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from agent import meshbed
from netns import testbed, topology

PREFIX = "demo"
WWW = f"/run/nodemesh/{PREFIX}-www"
SERVICE = """apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  loadBalancer: ROUND_ROBIN
  ports: [{name: http, port: 80, targetPort: http, protocol: http}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n1-p2": ("web", {"app": "web"}, {"http": 8080}),
    "n2-p1": ("web", {"app": "web"}, {"http": 8080}),
    "n2-p2": ("web", {"app": "web"}, {"http": 8080}),
}


def say(msg: str) -> None:
    print(f"\n\033[1m== {msg}\033[0m", flush=True)


def show(cmd: list[str], result: subprocess.CompletedProcess[str]) -> None:
    print("$ " + " ".join(cmd))
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stdout.write(result.stderr)


def main() -> int:
    testbed.down(PREFIX)  # leftovers of an interrupted demo
    topo = topology.plan(topology.default_spec(PREFIX, nodes=2, pods_per_node=2))
    say("nodemesh testbed up --nodes 2 --pods-per-node 2 --prefix demo")
    testbed.up(topo)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            [sys.executable, "-m", "agent.cli.main", "testbed", "status", "-p", PREFIX], check=True
        )
        say("the mesh: CA, registry (service `web` on n1-p2, n2-p1, n2-p2), one agent per node")
        with meshbed.running(topo, SERVICE + meshbed.workload_manifest(topo, ROLES)) as bed:
            show(
                ["nodemesh", "get", "services"],
                bed.cli("get", "services", "--registry-dir", bed.registry_dir),
            )
            for name, (_sa, labels, _ports, *_w) in ROLES.items():
                if labels.get("app") != "web":
                    continue
                pod = topo.pod(name)
                assert pod is not None
                os.makedirs(os.path.join(WWW, name), exist_ok=True)
                with open(os.path.join(WWW, name, "index.html"), "w") as f:
                    f.write(f"hello from {name} on node {pod.node}\n")
                servers.append(
                    testbed.popen_in_pod(
                        pod,
                        [
                            sys.executable,
                            "-m",
                            "http.server",
                            "8080",
                            "--bind",
                            pod.address,
                            "--directory",
                            os.path.join(WWW, name),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1.0)
            say("pod n1-p1 calls the service by name: http://web.default.svc.cluster.local/")
            print("(captured by eBPF in the kernel, resolved by the node's DNS, balanced round robin;")
            print(" n2's pods are reached through the HBONE mTLS tunnel, n1-p2 directly)")
            for _ in range(6):
                r = bed.exec(
                    "n1-p1", ["curl", "-sS", "--max-time", "5", "http://web.default.svc.cluster.local/"]
                )
                sys.stdout.write(r.stdout or r.stderr)
            n1 = topo.nodes[0]
            say("nodemesh status (node n1)")
            show(["nodemesh", "status"], bed.cli("status", "--netns", n1.netns, check=False))
            say(f"Istio metrics from n1's agent (http://{n1.fabric_address}:15020/metrics)")
            scrape = testbed.popen_in(
                n1.netns,
                None,
                ["curl", "-sS", f"http://{n1.fabric_address}:15020/metrics"],
                stdout=subprocess.PIPE,
            )
            text = scrape.communicate(timeout=10)[0].decode()
            for line in text.splitlines():  # web's port is HTTP: counted per request
                if line.startswith("istio_requests_total{"):
                    print(line)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        say("nodemesh testbed down --prefix demo")
        rep = testbed.down(PREFIX)
        shutil.rmtree(WWW, ignore_errors=True)
        print(
            f"removed the agents' eBPF programs and pins, {len(rep.netns_removed)} network namespaces "
            "and the testbed's cgroups"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
