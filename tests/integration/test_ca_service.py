"""Several hosts: node agents get their workload certificates from the CA service, which
signs only identities the registry places on the asking node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent import meshbed
from agent.identity.bundle import TrustBundle
from agent.identity.ca import make_csr
from agent.identity.certs import new_key
from agent.identity.clock import SystemClock
from agent.identity.service import CaClient
from agent.identity.spiffe import SpiffeId
from netns import kernel, testbed, topology
from tests.integration.conftest import run_prefix

MANIFEST = """apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  vip: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n2-p1": ("web", {"app": "web"}, {}),
}
CA_ADDR = "10.250.0.1:15012"  # on node 1's fabric address, reachable from every node


@pytest.fixture(scope="module")
def bed() -> Iterator[meshbed.MeshBed]:
    prefix = run_prefix("c")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 1)))
    try:
        with meshbed.running(
            topo, MANIFEST + meshbed.workload_manifest(topo, ROLES), start_agents=False
        ) as b:
            for node in topo.nodes:
                out = os.path.join(b.run_dir, f"node-{node.name}")
                b.cli("ca", "issue-node", "--dir", b.ca_dir, "--node", node.name, "--out", out)
                b.node_extra[node.name] = {"ca": {"service": CA_ADDR, "node_dir": out}}
            n1 = topo.node("n1")
            assert n1 is not None
            service = testbed.popen_in(
                n1.netns,
                None,
                [
                    *meshbed.NODEMESH,
                    "ca",
                    "serve",
                    "--dir",
                    b.ca_dir,
                    "--listen",
                    CA_ADDR,
                    "--registry-dir",
                    b.registry_dir,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert service.stdout is not None and service.stdout.readline() == b"ready\n"
                for node in topo.nodes:
                    b.start_agent(node)
                yield b
            finally:
                service.terminate()
                service.wait(timeout=10)
    finally:
        testbed.down(prefix)


def test_agents_get_certificates_from_the_ca_service_and_traffic_flows(bed: meshbed.MeshBed) -> None:
    pod = bed.topo.pod("n2-p1")
    assert pod is not None
    server = testbed.popen_in_pod(
        pod,
        [sys.executable, "-m", "http.server", "8080", "--bind", pod.address, "--directory", "/etc"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            r = bed.exec(
                "n1-p1",
                [
                    "curl",
                    "-sS",
                    "-m",
                    "3",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://10.96.0.10/hostname",
                ],
            )
            if r.stdout == "200":
                break
        assert r.stdout == "200", r.stderr
    finally:
        server.kill()
        server.wait()
    # no agent holds the CA key: only the CA service's directory has it
    for node in bed.topo.nodes:
        assert not os.path.exists(os.path.join(bed.run_dir, f"node-{node.name}", "ca.key"))


def test_the_ca_service_refuses_an_identity_not_placed_on_the_asking_node(bed: meshbed.MeshBed) -> None:
    node_dir = os.path.join(bed.run_dir, "node-n2")

    async def ask(sa: str) -> object:
        with open(os.path.join(node_dir, "node.crt"), "rb") as f:
            cert = f.read()
        with open(os.path.join(node_dir, "node.key"), "rb") as f:
            key = f.read()
        client = CaClient(
            "10.250.0.2",
            0,
            node_cert_pem=cert,
            node_key_pem=key,
            bundle=TrustBundle.load(os.path.join(node_dir, "bundle.pem")),
            trust_domain="cluster.local",
            clock=SystemClock(),
        )
        host, port = CA_ADDR.split(":")
        client.host, client.port = host, int(port)
        csr = make_csr(SpiffeId("cluster.local", "default", sa), new_key())
        try:
            return await client.sign(csr)
        except Exception as e:
            return e

    n2 = bed.topo.node("n2")
    assert n2 is not None
    # node 2 runs the web workload (sa "web") but not the client (sa "client", on node 1)
    placed = kernel.run_in_netns(n2.netns, lambda: asyncio.run(ask("web")))
    refused = kernel.run_in_netns(n2.netns, lambda: asyncio.run(ask("client")))
    assert not isinstance(placed, Exception), placed
    assert isinstance(refused, Exception), refused
    assert "registry places no such workload on it" in str(refused)
