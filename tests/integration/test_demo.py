"""The README's demo runs end to end and leaves nothing behind."""

from __future__ import annotations

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
    assert "hello n1-p1 (10.244.1.2), this is n2-p1" in res.stdout  # across nodes
    assert "hello n2-p2 (10.244.2.3), this is n2-p1" in res.stdout  # same node
    assert not [n for n in kernel.list_netns() if n.startswith("demo-")]
