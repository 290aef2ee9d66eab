"""The host install as users get it: scripts/install.sh, the systemd unit, its capabilities.

systemd is not the init on CI machines, so the unit is never started here (and
nothing is written to the real /etc): install.sh runs with DESTDIR set to a temp
dir, `systemd-analyze verify` checks the installed unit with its paths pointed
into that dir, and the unit's privileges are exercised for real by running the
installed agent under setpriv with exactly the unit's CapabilityBoundingSet and
NoNewPrivileges, on the testbed.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import yaml

from agent import meshbed, node
from netns import testbed, topology
from tests.integration.conftest import run_prefix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "deploy", "nodemesh-agent.service")


def unit_settings(path: str = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                k, v = line.split("=", 1)
                out.setdefault(k, []).append(v)
    return out


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    """scripts/install.sh into a temp DESTDIR (removed after)."""
    dest = tempfile.mkdtemp(prefix=f"nodemesh-{run_prefix('i')}-destdir-")
    try:
        env = {**os.environ, "DESTDIR": dest, "NODEMESH_SKIP_APT": "1", "NODEMESH_NODE": "n1"}
        r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_install_lays_out_venv_config_and_unit(installed: str) -> None:
    nodemesh = os.path.join(installed, "opt/nodemesh/venv/bin/nodemesh")
    cfg = os.path.join(installed, "etc/nodemesh/agent.yaml")
    r = subprocess.run([nodemesh, "agent", "--check-config", "-c", cfg], capture_output=True, text=True)
    assert r.returncode == 0 and "ok (node n1)" in r.stdout, r.stdout + r.stderr
    # the installed package imports BCC the loader compiles with, and is not the checkout (not editable)
    python = os.path.join(installed, "opt/nodemesh/venv/bin/python")
    r = subprocess.run([python, "-c", "import bcc, agent; print(agent.__file__)"],
                       capture_output=True, text=True, cwd=installed)
    assert r.returncode == 0 and r.stdout.startswith(installed), r.stdout + r.stderr
    # ... and runs its data path compiled (scripts/build_native.py --root), as the checkout's tests do
    code = ("import importlib, agent.native as n\nfor m in n.MODULES: importlib.import_module(m)\n"
            "print(sorted(m for m, c in n.loaded().items() if not c))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=installed)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    with open(os.path.join(installed, "etc/systemd/system/nodemesh-agent.service")) as a, open(UNIT) as b:
        assert a.read() == b.read()


def test_install_again_keeps_the_config(installed: str) -> None:
    cfg = os.path.join(installed, "etc/nodemesh/agent.yaml")
    with open(cfg, "a") as f:
        f.write("# edited by the operator\n")
    env = {**os.environ, "DESTDIR": installed, "NODEMESH_SKIP_APT": "1", "NODEMESH_NODE": "other"}
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keeping the existing" in r.stdout, r.stdout
    with open(cfg) as f:
        text = f.read()
    assert "node: n1" in text and text.endswith("# edited by the operator\n")


@pytest.mark.parametrize("unit", ["nodemesh-agent.service", "nodemesh-ca.service"])
def test_unit_passes_systemd_analyze_verify(installed: str, tmp_path: str, unit: str) -> None:
    with open(os.path.join(installed, "etc/systemd/system", unit)) as a, \
            open(os.path.join(ROOT, "deploy", unit)) as b:
        assert a.read() == b.read()  # install.sh installs it as it is
    # verify resolves ExecStart= and EnvironmentFile=: check a copy whose paths point
    # into the DESTDIR install
    with open(os.path.join(ROOT, "deploy", unit)) as f:
        text = f.read()
    default = os.path.join(str(tmp_path), "default-nodemesh-ca")
    with open(default, "w") as f:
        f.write("NODEMESH_CA_LISTEN=127.0.0.1:15012\n")
    rendered = text.replace("/opt/nodemesh/", f"{installed}/opt/nodemesh/").replace(
        "/etc/nodemesh/", f"{installed}/etc/nodemesh/"
    ).replace("/etc/default/nodemesh-ca", default)
    path = os.path.join(str(tmp_path), unit)
    with open(path, "w") as f:
        f.write(rendered)
    r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)
    # unknown keys and bad values are only warnings: any output at all fails the check
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_unit_verify_fails_on_a_mistake(tmp_path: str) -> None:
    # the check above can fail: a misspelt key and a missing binary are reported
    path = os.path.join(str(tmp_path), "nodemesh-agent.service")
    with open(UNIT) as f, open(path, "w") as out:
        text = f.read().replace("RestartSec=", "RestartSecs=")
        out.write(text.replace("/opt/nodemesh/", f"{tmp_path}/absent/"))
    r = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)
    assert "RestartSecs" in r.stderr and f"{tmp_path}/absent/venv/bin/nodemesh" in r.stderr, r.stderr


def drain_deadline_s() -> float:
    """The agent's drain deadline, wherever the agent keeps it."""
    try:
        from agent import lifecycle  # type: ignore[attr-defined]

        return float(lifecycle.DRAIN_S)
    except ImportError:
        return float(inspect.signature(node.serve).parameters["drain_s"].default)  # type: ignore[attr-defined]


def test_unit_stop_timeout_covers_the_drain_and_config_errors_do_not_restart() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["KillSignal"] == ["SIGTERM"]
    drain_s = drain_deadline_s()
    assert float(s["TimeoutStopSec"][0]) >= drain_s + 10, (s["TimeoutStopSec"], drain_s)
    assert s["Restart"] == ["on-failure"] and "2" in s["RestartPreventExitStatus"][0].split()
    assert float(s["RestartSec"][0]) >= 1
    burst, interval = int(s["StartLimitBurst"][0]), float(s["StartLimitIntervalSec"][0])
    assert interval / burst >= float(s["RestartSec"][0]), "the start limit must trip before a tight loop"


def test_unit_gives_the_agent_enough_descriptors() -> None:
    # 1024 (systemd's default soft limit) ran out after ~1,000 half-open connections to 15008
    s = unit_settings()
    assert "LimitNOFILE" in s, "the unit sets no LimitNOFILE"
    soft, _, hard = s["LimitNOFILE"][0].partition(":")
    assert int(soft) >= 65536 and int(hard or soft) >= int(soft), s["LimitNOFILE"]


def test_a_config_error_exits_2_naming_the_key(tmp_path: str) -> None:
    # RestartPreventExitStatus=2 relies on this exit code
    path = os.path.join(str(tmp_path), "agent.yaml")
    with open(path, "w") as f:
        f.write("node: n1\naddresses: {proxy: 10.244.0.1}\nportz: {}\n")
    r = subprocess.run([*meshbed.NODEMESH, "agent", "--check-config", "-c", path],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "portz" in r.stderr and path in r.stderr, r.stderr
    # every etcd member is checked, and the bad one is named by its index
    with open(path, "w") as f:
        f.write("node: n1\naddresses: {proxy: 10.244.0.1}\nregistry: {backend: etcd, endpoints: "
                "[http://10.0.0.5:2379, '10.0.0.6:2379']}\n")
    r = subprocess.run([*meshbed.NODEMESH, "agent", "--check-config", "-c", path],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "registry.endpoints[1]" in r.stderr and "10.0.0.6:2379" in r.stderr, \
        r.stderr
    for tls, eps, key in (("{ca: /c.pem, cert: /n.pem}", "https://10.0.0.5:2379", "registry.tls.key"),
                          ("{ca: /c.pem}", "http://10.0.0.5:2379", "registry.tls")):
        with open(path, "w") as f:
            f.write(f"node: n1\naddresses: {{proxy: 10.244.0.1}}\nregistry: {{backend: etcd, "
                    f"endpoints: [{eps}], tls: {tls}}}\n")
        r = subprocess.run([*meshbed.NODEMESH, "agent", "--check-config", "-c", path],
                           capture_output=True, text=True)
        assert r.returncode == 2 and key in r.stderr, r.stderr


# --- the unit's capabilities, for real ------------------------------------------------

WEB_VIP = "10.96.0.10"
SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  vip: {WEB_VIP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http, protocol: http}}]
---
"""
ROLES = {"n1-p1": ("client", {"app": "client"}, {}), "n2-p1": ("web", {"app": "web"}, {"http": 8080})}
# STRICT on the server pod: the agent must install its tc filter there (CAP_NET_ADMIN)
EXTRA: dict[str, object] = {
    "peer_authentication": {"mode": "PERMISSIVE", "workloads": {"default/n2-p1": "STRICT"}}
}


def setpriv_argv(caps: list[str]) -> list[str]:
    """What systemd does for CapabilityBoundingSet= + NoNewPrivileges= with User=root."""
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--"]


def start_agent(
    bed: meshbed.MeshBed, name: str, argv_prefix: list[str], nodemesh: list[str], tag: str
) -> str:
    n = bed.topo.node(name)
    assert n is not None
    with open(bed.config_path(n), "w") as f:
        yaml.safe_dump(bed.agent_config(n), f)
    log_path = os.path.join(bed.run_dir, f"agent-{name}-{tag}.log")
    with open(log_path, "ab") as log:
        proc = testbed.popen_in(n.netns, None, [*argv_prefix, *nodemesh, "agent", "-c", bed.config_path(n)],
                                stdout=subprocess.PIPE, stderr=log)
    bed.agents[name] = proc  # bed.stop() stops it by PID, also on failure
    assert proc.stdout is not None
    line = proc.stdout.readline()
    with open(log_path) as f:
        text = f.read()
    assert line.strip() == b"ready", f"agent {name} ({tag}) did not become ready:\n{text[-3000:]}"
    return log_path


def test_the_installed_agent_serves_with_exactly_the_units_capabilities(installed: str) -> None:
    caps = unit_settings()["CapabilityBoundingSet"][0].split()
    assert set(caps) == {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"}, caps
    assert unit_settings()["NoNewPrivileges"] == ["yes"]
    nodemesh = [os.path.join(installed, "opt/nodemesh/venv/bin/nodemesh")]
    prefix = run_prefix("u")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 1)))
    server: subprocess.Popen[bytes] | None = None
    try:
        with meshbed.running(topo, SERVICES + meshbed.workload_manifest(topo, ROLES),
                             start_agents=False, extra=EXTRA) as bed:
            # control: one capability less (CAP_NET_ADMIN) and the STRICT filter cannot be installed
            log = start_agent(bed, "n2", setpriv_argv(["CAP_SYS_ADMIN"]), nodemesh, "fewer-caps")
            bed.stop_agent("n2")
            with open(log) as f:
                assert "Operation not permitted" in f.read()
            # the unit's set: both agents serve, capture, tunnel and enforce with nothing more
            logs = [start_agent(bed, n, setpriv_argv(caps), nodemesh, "unit-caps") for n in ("n1", "n2")]
            pod = topo.pod("n2-p1")
            assert pod is not None
            server = testbed.popen_in_pod(
                pod, [sys.executable, "-m", "http.server", "8080", "--bind", pod.address],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while True:
                r = bed.exec("n1-p1", ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                       "--max-time", "5", f"http://{WEB_VIP}/"])
                if r.stdout == "200" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.stdout == "200", (r.stdout, r.stderr)
            for path in logs:
                with open(path) as f:
                    text = f.read()
                assert not re.search(r"not permitted|WARNING|ERROR", text), text[-3000:]
    finally:
        if server is not None:
            server.kill()
            server.wait()
        testbed.down(prefix)
