"""scripts/setup.sh: idempotent on a ready machine, one clear sentence when it cannot run."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"


def test_second_run_has_nothing_to_do() -> None:
    res = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "Debian packages already installed" in out
    assert "nodemesh already installed" in out
    assert "installing" not in out
    assert "modules already compiled" in out  # scripts/build_native.py: nothing changed, no rebuild
    # BCC from Debian is importable from the project's virtualenv
    subprocess.run([str(ROOT / ".venv/bin/python"), "-c", "import bcc, pyroute2"], check=True)


def _copy_setup(tmp_path: Path) -> Path:
    d = tmp_path / "scripts"
    d.mkdir()
    shutil.copy(SETUP, d / "setup.sh")
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    return d / "setup.sh"


def test_not_root_stops_with_one_sentence() -> None:
    # pytest's tmp_path is private to root; the unprivileged user needs to read the script
    pub = Path(tempfile.mkdtemp(prefix="nodemesh-setup-test-"))
    try:
        script = _copy_setup(pub)
        res = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(script)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        shutil.rmtree(pub)
    assert res.returncode == 1
    assert res.stderr.startswith("setup: error: run as root")
    assert len(res.stderr.strip().splitlines()) == 1


def test_not_linux_stops_with_one_sentence(tmp_path: Path) -> None:
    script = _copy_setup(tmp_path)
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "uname").write_text("#!/bin/sh\necho Darwin\n")
    (shim / "uname").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 1
    assert res.stderr.strip() == "setup: error: nodemesh needs Linux (this is Darwin)."


def test_kernel_without_bpf_stops_with_one_sentence(tmp_path: Path) -> None:
    script = _copy_setup(tmp_path)
    config = tmp_path / "config.gz"
    with gzip.open(config, "wt") as f:
        f.write("CONFIG_NET=y\n# CONFIG_BPF_SYSCALL is not set\n")
    env = {**os.environ, "NODEMESH_KCONFIG": str(config)}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 1
    assert "built without CONFIG_BPF_SYSCALL" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_check_passes_on_this_machine() -> None:
    res = subprocess.run(
        [str(ROOT / ".venv/bin/nodemesh"), "check"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for item in (
        "cgroup v2",
        "bpffs",
        "kernel headers",
        "BCC compile",
        "BPF hook cgroup/connect4",
        "BPF hook sock_ops",
        "BPF hook cgroup/getpeername4",
    ):
        assert f"[ok  ] {item}" in res.stdout
