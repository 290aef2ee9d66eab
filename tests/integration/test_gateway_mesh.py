"""The ingress gateway on the testbed (issue 14): the seed's Gateway and VirtualService applied
verbatim, a gateway on node n1, a client outside the mesh (n1-p2, not enrolled) calling
``http://<gateway address>/`` with ``Host: my-service``; the request reaches ``my-service`` on
node n2 over HBONE with the gateway's own identity, and an AuthorizationPolicy at the
destination that denies that identity answers 403.

``my-service`` is an ordinary pod workload here (n2-p1 on 8080; the seed's Consul definition is
another engineer's host-service work). The gateway's address is a second address on n1's pod
bridge, inside the testbed's own network namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.scrape import node_metrics
from tests.integration.scrape import requests_total as requests
from tests.integration.test_authz_mesh import SERVER  # HTTP on 8080: '<pod> <target>'

SEED = os.path.join(os.path.dirname(__file__), "..", "fixtures", "seed")
GW_PRINCIPAL = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"

DENY = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-gateway, namespace: default}}
spec:
  selector: {{matchLabels: {{app: my-service}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["{GW_PRINCIPAL}"]}}}}]}}]
"""


def registry(gw_address: str) -> str:
    return f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: my-service}}
spec:
  ports: [{{name: http, port: 8080, targetPort: 8080, protocol: http}}]
  selector: {{app: my-service}}
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: istio-ingressgateway, namespace: istio-system, labels: {{istio: ingressgateway}}}}
spec: {{address: {gw_address}, node: n1, serviceAccount: istio-ingressgateway-service-account}}
---
"""


@dataclass
class Bed:
    mb: meshbed.MeshBed
    gw: str

    def curl(self, host: str, path: str = "/") -> tuple[str, str]:
        r = self.mb.exec("n1-p2", ["curl", "-sS", "--max-time", "10", "-H", f"Host: {host}",
                                   "-w", "\x1f%{http_code}", f"http://{self.gw}{path}"])
        body, _, code = r.stdout.rpartition("\x1f")
        return code, body


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    prefix = run_prefix("g")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    try:
        n1 = topo.nodes[0]
        gw = n1.gateway.rsplit(".", 1)[0] + ".250"  # a second address on n1's pod bridge
        subprocess.run(["ip", "-n", n1.netns, "addr", "add", f"{gw}/32", "dev", n1.bridge], check=True)
        roles: dict[str, meshbed.Role] = {"n2-p1": ("default", {"app": "my-service"}, {"http": 8080})}
        manifest = registry(gw) + meshbed.workload_manifest(topo, roles)
        with meshbed.running(topo, manifest, start_agents=False) as mb, \
                pod_servers(topo, SERVER, {"n2-p1": ()}):
            creds = os.path.join(mb.run_dir, "gateway-certs")
            os.makedirs(creds)
            base = mb.agent_config(n1)
            interception = dict(base["interception"])  # type: ignore[call-overload]
            # n1-p2 is outside the mesh: not enrolled, its connections are never captured
            outside = topo.pod("n1-p2")
            assert outside is not None
            interception["enroll"] = [e for e in interception["enroll"] if not e.endswith(outside.netns)]
            mb.node_extra["n1"] = {
                "interception": interception,
                "gateway": {"labels": {"istio": "ingressgateway"}, "address": gw, "credentials_dir": creds},
            }
            for node in topo.nodes:
                mb.start_agent(node)
            for name in ("gateway.yaml", "virtualservice.yaml"):  # the seed's files, byte for byte
                seed = os.path.join(SEED, name)
                out = mb.cli("apply", "-f", seed, "--registry-dir", mb.registry_dir).stdout
                assert "created" in out, out
            b = Bed(mb, gw)
            deadline = time.monotonic() + 15
            while b.curl("my-service")[0] != "200":
                assert time.monotonic() < deadline, (b.curl("my-service"), mb.log_text("n1"))
                time.sleep(0.2)
            yield b
    finally:
        testbed.down(prefix)


def test_seed_gateway_reaches_a_pod_on_another_node_with_the_gateway_identity(bed: Bed) -> None:
    code, body = bed.curl("my-service", "/hello")
    assert (code, body) == ("200", "n2-p1 /hello")
    # n2's inbound verified the gateway's certificate on the HBONE tunnel
    n2 = node_metrics(bed.mb.topo, "n2")
    assert requests(n2, reporter="destination", source_principal=f"spiffe://{GW_PRINCIPAL}",
                    source_workload="istio-ingressgateway", connection_security_policy="mutual_tls",
                    response_code="200") >= 1
    n1 = node_metrics(bed.mb.topo, "n1")
    assert requests(n1, reporter="source", source_workload="istio-ingressgateway",
                    destination_service="my-service.default.svc.cluster.local", response_code="200") >= 1
    # a host no server of the Gateway takes: 404, flagged NR
    code, body = bed.curl("other-service")
    assert code == "404" and "other-service" in body
    assert requests(node_metrics(bed.mb.topo, "n1"), reporter="source", response_code="404",
                    response_flags="NR") >= 1
    # the agent's status shows what the gateway serves
    n1_node = bed.mb.topo.node("n1")
    assert n1_node is not None
    r = bed.mb.cli("status", "--netns", n1_node.netns, "-o", "json", check=False)
    gw = json.loads(r.stdout)["gateway"]
    assert gw["ports"] == {"80": "http"} and gw["problems"] == {}
    assert gw["identity"] == f"spiffe://{GW_PRINCIPAL}"


def test_authorization_policy_at_the_destination_denies_the_gateway_identity(bed: Bed) -> None:
    bed.mb.apply(DENY)
    try:
        deadline = time.monotonic() + 10
        while (got := bed.curl("my-service"))[0] != "403":
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        assert "RBAC: access denied" in got[1]
    finally:
        bed.mb.cli("delete", "authorizationpolicy", "deny-gateway", "-n", "default",
                   "--registry-dir", bed.mb.registry_dir)
    deadline = time.monotonic() + 10
    while bed.curl("my-service")[0] != "200":
        assert time.monotonic() < deadline
        time.sleep(0.2)
