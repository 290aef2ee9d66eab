"""The Vagrant setup without VMs: `vagrant validate`, and a node's provisioning run in a netns.

The VMs cannot boot here. `vagrant validate -p` checks the Vagrantfile offline (no
box is downloaded; -p skips provider-specific checks, as no hypervisor is here).
scripts/provision/node.sh runs in a network namespace this test creates — the
simulated node VM — with its test knobs: install and /etc below a temp DESTDIR,
pod namespaces and the pods' cgroup named with the run prefix, not started. The
host's own addresses, routes and links are compared before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from tests.integration.conftest import run_prefix

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODEMESH = os.path.join(os.path.dirname(sys.executable), "nodemesh")


def vagrant_validate(directory: str, scratch: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAGRANT_HOME": os.path.join(scratch, "home"),
           "VAGRANT_DOTFILE_PATH": os.path.join(scratch, "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    return subprocess.run(["vagrant", "validate", "-p"], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates(tmp_path: str) -> None:
    r = vagrant_validate(ROOT, str(tmp_path))
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    for vm in ("control", "node1", "node2"):
        assert f"==> {vm}:" in r.stdout, r.stdout


def test_vagrant_validate_catches_a_missing_provisioning_script(tmp_path: str) -> None:
    lone = os.path.join(str(tmp_path), "lone")
    os.makedirs(lone)
    shutil.copy(os.path.join(ROOT, "Vagrantfile"), lone)
    r = vagrant_validate(lone, str(tmp_path))
    assert r.returncode != 0 and "scripts/provision/control.sh" in r.stderr, r.stdout + r.stderr


def host_network() -> str:
    out = []
    for argv in (["ip", "-o", "link"], ["ip", "-o", "addr"], ["ip", "route"], ["ip", "-6", "route"]):
        out.append(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return "\n".join(out)


@dataclass
class SimNode:
    prefix: str
    netns: str
    tmp: str
    cgroup: str

    @property
    def destdir(self) -> str:
        return os.path.join(self.tmp, "root")

    @property
    def share(self) -> str:
        return os.path.join(self.tmp, "share")

    def provision(self) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "NODE_NAME": "node1", "NODE_INDEX": "1", "NODE_IP": "192.168.56.11",
            "ETCD_URL": "http://192.168.56.10:2379", "CA_ADDR": "192.168.56.10:15012",
            "PEERS": "node2=192.168.56.12",
            "SHARE": self.share, "DESTDIR": self.destdir, "POD_PREFIX": f"{self.prefix}-",
            "CGROUP": self.cgroup, "BPFFS_ROOT": f"/sys/fs/bpf/{self.prefix}-nodemesh",
            "NODEMESH_SKIP_INSTALL": "1", "NODEMESH_BIN": NODEMESH, "NODEMESH_NO_START": "1",
        }
        # nsenter joins only the network namespace (ip netns exec would also remount /sys)
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", "bash",
             os.path.join(ROOT, "scripts/provision/node.sh")],
            env=env, capture_output=True, text=True, timeout=120,
        )


@pytest.fixture
def sim_node() -> Iterator[SimNode]:
    prefix = run_prefix("v")
    with open("/run/nodemesh/cgroup2") as f:
        cg2 = f.read().strip()
    node = SimNode(prefix, f"{prefix}-node1", tempfile.mkdtemp(prefix=f"nodemesh-{prefix}-"),
                   os.path.join(cg2, f"{prefix}-pods"))
    before = host_network()
    subprocess.run(["ip", "netns", "add", node.netns], check=True)
    try:
        yield node
    finally:
        for ns in (f"{prefix}-node1-web", f"{prefix}-node1-client", node.netns):
            if os.path.exists(f"/run/netns/{ns}"):
                subprocess.run(["ip", "netns", "del", ns], check=False)
        if os.path.isdir(node.cgroup):
            os.rmdir(node.cgroup)
        shutil.rmtree(node.tmp, ignore_errors=True)
        assert host_network() == before, "the host's links, addresses or routes changed"


def test_node_provisioning_in_a_simulated_node(sim_node: SimNode) -> None:
    r = sim_node.provision()
    assert r.returncode != 0 and "no node credential" in r.stderr, r.stdout + r.stderr  # control first
    # what control.sh does: the CA on the control VM, only node credentials in the share
    ca_dir = os.path.join(sim_node.tmp, "control-ca")
    subprocess.run([NODEMESH, "ca", "init", "--dir", ca_dir, "--trust-domain", "cluster.local"],
                   check=True, capture_output=True)
    subprocess.run([NODEMESH, "ca", "issue-node", "--dir", ca_dir, "--node", "node1",
                    "--out", os.path.join(sim_node.share, "nodes", "node1")], check=True, capture_output=True)
    r = sim_node.provision()
    assert r.returncode == 0, r.stdout + r.stderr
    cfg_path = os.path.join(sim_node.destdir, "etc/nodemesh/agent.yaml")
    check = subprocess.run([NODEMESH, "agent", "--check-config", "-c", cfg_path],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    assert cfg["registry"] == {"backend": "etcd", "endpoints": ["http://192.168.56.10:2379"]}
    assert cfg["peers"] == {"node2": "192.168.56.12"}
    assert cfg["addresses"] == {"proxy": "10.244.1.1", "hbone": "192.168.56.11", "metrics": "192.168.56.11"}
    pods = [f"/run/netns/{sim_node.prefix}-node1-web", f"/run/netns/{sim_node.prefix}-node1-client"]
    assert cfg["interception"]["enroll"] == pods and cfg["interception"]["cgroup"] == sim_node.cgroup
    node_dir = os.path.join(sim_node.destdir, "etc/nodemesh/node")
    assert cfg["ca"] == {"service": "192.168.56.10:15012", "node_dir": node_dir}
    assert sorted(os.listdir(node_dir)) == ["bundle.pem", "node.crt", "node.key"]
    assert os.stat(os.path.join(node_dir, "node.key")).st_mode & 0o077 == 0
    keys = [os.path.join(d, f) for d, _, fs in os.walk(sim_node.destdir) for f in fs if f == "ca.key"]
    assert keys == [], f"the CA key reached the node: {keys}"
    assert os.path.isdir(sim_node.cgroup)
    # the pods are wired to the node's bridge: the client pod reaches its gateway (the proxy address)
    ping = subprocess.run(
        ["ip", "netns", "exec", f"{sim_node.prefix}-node1-client", sys.executable, "-c",
         "import socket; s = socket.socket(); s.settimeout(2); print(s.connect_ex(('10.244.1.1', 15001)))"],
        capture_output=True, text=True, timeout=10,
    )
    # nothing listens on the gateway yet: refused (111) proves the route and the link, a timeout would not
    assert ping.stdout.strip() == "111", ping.stdout + ping.stderr
    # a second run (vagrant provision again) changes nothing and succeeds
    r = sim_node.provision()
    assert r.returncode == 0, r.stdout + r.stderr
