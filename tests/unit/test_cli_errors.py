"""Exit codes and messages through the real `nodemesh` command, whose subcommands load
lazily: an error of a package the command did not import itself still gets its code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def nodemesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, code, says", [
    (["get", "services", "--etcd", "foo"], 2, "etcd URL must look like"),
    (["get", "services", "--etcd", "https://127.0.0.1:1", "--etcd-ca", "/nonexistent.pem"], 2,
     "cannot use /nonexistent.pem as the etcd CA"),
    (["get", "services", "--etcd", "http://127.0.0.1:1"], 4, "etcd at http://127.0.0.1:1 is unreachable"),
    (["describe", "service", "nope", "--registry-dir", "{tmp}/reg"], 3, "not found"),
    (["ca", "serve", "--dir", "{tmp}/ca", "--listen", "127.0.0.1:0", "--etcd", "foo"], 2,
     "etcd URL must look like"),
    (["ca", "inspect", "--dir", "{tmp}/empty"], 3, "{tmp}/empty"),  # a directory with no CA in it
    (["agent", "--check-config", "-c", "{tmp}/agent.yaml"], 2, "portz"),
])
def test_each_command_maps_errors_to_their_codes(
        tmp_path: Path, args: list[str], code: int, says: str) -> None:
    assert nodemesh("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", "cluster.local"
                    ).returncode == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "agent.yaml").write_text("node: n1\naddresses: {proxy: 10.244.0.1}\nportz: {}\n")
    r = nodemesh(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert r.returncode == code and says.replace("{tmp}", str(tmp_path)) in r.stderr, (r.returncode, r.stderr)
    assert "internal error" not in r.stderr
