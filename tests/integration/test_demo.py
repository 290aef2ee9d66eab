"""The README's demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
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
    assert not [n for n in kernel.list_netns() if n.startswith("demo-")]
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("demo-")]
