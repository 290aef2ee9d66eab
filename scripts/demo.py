"""The demo: a two-node mesh on this host, traffic by service name, the seed's story, and what
the mesh saw.

Run through scripts/demo.sh (which runs setup first). It builds a testbed of
two nodes with two pods each, starts one nodemesh agent per node (eBPF
interception, registry, CA, node proxy, DNS, metrics; n1's also enrolls the
host service's cgroup, n2's is also the ingress gateway), registers a service
`web` with pods on both nodes, has a client pod call it by name, shows
`nodemesh status` and the Istio metrics. Then the seed's story, with the seed's
three files applied verbatim: `my-service` runs on node n1 itself (its netns,
its own cgroup, as systemd runs a unit) and is registered from its Consul
definition; the Gateway and VirtualService expose it on n2's gateway; a client
outside the mesh calls the gateway with `Host: my-service` and the request
crosses to n1 over HBONE mTLS; the service stops and its check flips the
gateway to 503, and back; a real Prometheus shows the request metrics. Then it
removes everything (also on Ctrl-C or error). Everything is named with the
prefix ``demo``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from agent import meshbed
from netns import cgroup, testbed, topology

PREFIX = "demo"
WWW = f"/run/nodemesh/{PREFIX}-www"
SEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "seed")
# where n1's "systemd" runs my-service: its own cgroup, outside the pods' (removed with the testbed)
HOST_CGROUP = f"{topology.testbed_cgroup(PREFIX)}/hosts-n1/my-service.service"
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


def gateway_workload(node: topology.Node) -> str:
    """The gateway as a workload of its own node (its identity's place, which peers check)."""
    return f"""---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: istio-ingressgateway, namespace: istio-system, labels: {{istio: ingressgateway}}}}
spec:
  address: {node.fabric_address}
  node: {node.name}
  serviceAccount: istio-ingressgateway-service-account
  ports: {{http: 80}}
---
"""


def health(bed: meshbed.MeshBed) -> tuple[str, int]:
    """my-service's health in the registry, and the registry revision it was read at."""
    r = bed.cli("describe", "workload", "my-service", "-o", "json", "--registry-dir", bed.registry_dir)
    doc = json.loads(r.stdout)
    return str(doc["effectiveHealth"]), int(doc["revision"])


def wait_health(bed: meshbed.MeshBed, want: str, gateway: topology.Node, timeout_s: float = 30.0) -> None:
    """Until my-service is ``want`` in the registry and the gateway's data path routes by it."""
    start = time.monotonic()
    while (got := health(bed))[0] != want:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"my-service did not become {want} within {timeout_s:.0f}s")
        time.sleep(0.3)
    print(f"my-service is {want} (after {time.monotonic() - start:.1f}s)")
    while dataplane_revision(gateway) < got[1]:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the gateway's agent did not reach registry revision {got[1]}")
        time.sleep(0.1)


def dataplane_revision(node: topology.Node) -> int:
    """The registry revision ``node``'s data path decides with (its metric)."""
    for line in node_metrics(node).splitlines():
        if line.startswith("nodemesh_registry_dataplane_revision "):
            return int(float(line.split()[1]))
    return -1


def call_gateway(gw: topology.Node, client: topology.Node) -> str:
    """curl the gateway with Host: my-service from ``client``'s host netns, outside the mesh."""
    argv = ["curl", "-sS", "--max-time", "10", "-H", "Host: my-service", "-w", " [HTTP %{http_code}]\n",
            f"http://{gw.fabric_address}/"]
    proc = testbed.popen_in(client.netns, None, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=20)[0].decode()
    print("$ " + " ".join(a if " " not in a else repr(a) for a in argv))
    sys.stdout.write(out)
    return out


def seed_story(bed: meshbed.MeshBed, n1: topology.Node, n2: topology.Node) -> None:
    say(f"the seed's my-service runs on node n1 itself: its netns, cgroup {HOST_CGROUP}")
    service = bed.start_host_service(n1, HOST_CGROUP)
    prom: meshbed.Prometheus | None = None
    data = tempfile.mkdtemp(prefix=f"nodemesh-{PREFIX}-prometheus-")
    try:
        say("nodemesh register tests/fixtures/seed/my-service.hcl  (the seed's file: no address, "
            "an HTTP check on http://127.0.0.1:8080/health)")
        show(["nodemesh", "register", "tests/fixtures/seed/my-service.hcl", "-c", "agent-n1.yaml"],
             bed.cli("register", os.path.join(SEED, "my-service.hcl"), "-c", bed.config_path(n1),
                     "--registry-dir", bed.registry_dir, check=False))
        for name in ("gateway.yaml", "virtualservice.yaml"):
            show(["nodemesh", "apply", "-f", f"tests/fixtures/seed/{name}"],
                 bed.cli("apply", "-f", os.path.join(SEED, name), "--registry-dir", bed.registry_dir,
                         check=False))
        print("(n1's agent runs the check from n1's own namespace: 127.0.0.1 is n1's loopback)")
        wait_health(bed, "passing", n2)
        show(["nodemesh", "get", "workloads"], bed.cli("get", "workloads", "-A", "--registry-dir",
                                                       bed.registry_dir))
        say(f"a client outside the mesh (n1's host, no enrolled cgroup) calls the gateway on n2 "
            f"({n2.fabric_address}:80) with Host: my-service")
        for _ in range(3):
            call_gateway(n2, n1)
        say("the requests crossed from n2's gateway to n1 over HBONE mTLS; n1's agent saw:")
        for line in node_metrics(n1).splitlines():
            if line.startswith("istio_tcp_connections_opened_total{") and '"my-service"' in line:
                print(line)
        say("my-service stops: its check (every 10s) goes critical, the gateway has no endpoint")
        service.kill()
        service.wait()
        wait_health(bed, "critical", n2)
        call_gateway(n2, n1)
        say("my-service starts again")
        service = bed.start_host_service(n1, HOST_CGROUP)
        wait_health(bed, "passing", n2)
        call_gateway(n2, n1)
        say("a real Prometheus (in n1's netns) scrapes both agents: the gateway's requests by code")
        prom = meshbed.Prometheus(bed.topo, data)
        prom.wait_scraping()
        promql = ('sum by (reporter, source_workload, destination_service, response_code) '
                  '(istio_requests_total{destination_service="my-service.default.svc.cluster.local"})')
        print(f"PromQL: {promql}")
        for row in prom.query(promql):
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(row["metric"].items()))
            print(f"  {{{labels}}} {row['value'][1]}")
    finally:
        if prom is not None:
            prom.stop()
        shutil.rmtree(data, ignore_errors=True)
        service.kill()
        service.wait()


def node_metrics(node: topology.Node) -> str:
    scrape = testbed.popen_in(node.netns, None, ["curl", "-sS", f"http://{node.fabric_address}:15020/metrics"],
                              stdout=subprocess.PIPE)
    return scrape.communicate(timeout=10)[0].decode()


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
        say("the mesh: CA, registry (service `web` on n1-p2, n2-p1, n2-p2), one agent per node "
            "(n1's also captures the host service's cgroup, n2's is also the ingress gateway)")
        n1, n2 = topo.nodes
        manifest = SERVICE + meshbed.workload_manifest(topo, ROLES) + gateway_workload(n2)
        with meshbed.running(topo, manifest, start_agents=False) as bed:
            cgroup.create(HOST_CGROUP)
            bed.with_host_cgroups(n1, [HOST_CGROUP])
            bed.node_extra.setdefault(n2.name, {})["gateway"] = {
                "labels": {"istio": "ingressgateway"}, "address": n2.fabric_address}
            for node in topo.nodes:
                bed.start_agent(node)
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
            say("nodemesh status (node n1)")
            show(["nodemesh", "status"], bed.cli("status", "--netns", n1.netns, check=False))
            say(f"Istio metrics from n1's agent (http://{n1.fabric_address}:15020/metrics)")
            for line in node_metrics(n1).splitlines():  # web's port is HTTP: counted per request
                if line.startswith("istio_requests_total{"):
                    print(line)
            seed_story(bed, n1, n2)
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
