"""The README's demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from netns import kernel

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_cleans_up() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    # six calls by service name, round robin over pods on both nodes
    for pod, node in (("n1-p2", "n1"), ("n2-p1", "n2"), ("n2-p2", "n2")):
        assert out.count(f"hello from {pod} on node {node}") == 2, out
    assert "agent n1: ok" in out and "interception: ok  7/7 hooks" in out  # nodemesh status
    assert 'connection_security_policy="mutual_tls"' in out and 'source_workload="n1-p1"' in out
    assert 'istio_requests_total{' in out and 'response_code="200"' in out and 'reporter="source"' in out
    # the seed's story: registered verbatim on n1's address, served through n2's gateway
    assert "Workload default/my-service created" in out and "Gateway default/my-gateway created" in out
    assert "VirtualService default/my-service created" in out
    assert re.search(r"default +my-service +10\.250\.0\.1 +n1 +passing", out), out
    assert out.count("my-service on the host [HTTP 200]") == 4, out  # 3 calls, 1 after the restart
    gw_id = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    assert re.search(rf'connection_security_policy="mutual_tls",[^}}]*destination_workload="my-service",'
                     rf'[^}}]*source_principal="{gw_id}"', out), out  # n1 saw the gateway, over mTLS
    assert out.index("my-service is critical") < out.index("[HTTP 503]") < out.rindex("my-service is passing")
    # Prometheus: 4 requests answered 200 and 1 answered 503, reported by the gateway
    assert re.search(r'reporter="source",response_code="200",source_workload="istio-ingressgateway"\} 4$',
                     out, re.M), out
    assert re.search(r'reporter="source",response_code="503",source_workload="istio-ingressgateway"\} 1$',
                     out, re.M), out
    assert not [n for n in kernel.list_netns() if n.startswith("demo-")]
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("demo-")]
