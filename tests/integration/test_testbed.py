"""The testbed on the real kernel: lifecycle, connectivity, isolation, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from pyroute2 import IPRoute

from netns import cgroup, kernel, testbed, topology
from netns.topology import Pod, Topology
from tests.integration.conftest import run_prefix

NODEMESH = [sys.executable, "-m", "agent.cli.main"]

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
    print("listening", flush=True)
    for _ in range(int(sys.argv[2])):
        c, peer = s.accept()
        data = c.recv(65536)
        c.sendall(b"echo from " + sys.argv[3].encode() + b" to " + peer[0].encode() + b": " + data)
        c.close()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(sys.argv[3].encode()); c.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := c.recv(65536):
        out += chunk
    print(out.decode())
    """
)


def start_server(pod: Pod, port: int, count: int) -> subprocess.Popen[bytes]:
    proc = testbed.popen_in_pod(
        pod, [sys.executable, "-c", SERVER, str(port), str(count), pod.name], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n"
    return proc


def tcp_exchange(client: Pod, server_addr: str, port: int, msg: str) -> str:
    proc = testbed.popen_in_pod(
        client,
        [sys.executable, "-c", CLIENT, server_addr, str(port), msg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


def root_view() -> dict[str, Any]:
    """What the root namespace and host look like: links, addresses, routes, mounts, cgroups."""
    with IPRoute() as ipr:
        links = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
        addrs = sorted(str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr())
        routes = sorted(str(r.get_attr("RTA_DST")) + str(r.get_attr("RTA_GATEWAY")) for r in ipr.get_routes())
    with open("/proc/mounts") as f:
        mounts = sorted(line.split()[1] for line in f)
    cg_root = cgroup.cgroup2_mount()
    cgroups = sorted(d for d in os.listdir(cg_root) if os.path.isdir(os.path.join(cg_root, d)))
    return {
        "links": links,
        "addrs": addrs,
        "routes": routes,
        "mounts": mounts,
        "cgroups": cgroups,
        "netns": kernel.list_netns(),
    }


def netns_inodes_in_use() -> set[int]:
    """Inodes of every network namespace some process or bind mount still holds."""
    found: set[int] = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                found.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
    for name in kernel.list_netns():
        found.add(kernel.netns_inode(name))
    return found


def test_up_then_down_leaves_nothing_behind() -> None:
    before = root_view()
    prefix = run_prefix()
    topo = topology.plan(topology.default_spec(prefix, 2, 3))
    try:
        testbed.up(topo)
        during = root_view()
        assert set(during["netns"]) - set(before["netns"]) == set(topo.netns_names())
        assert f"nodemesh-{prefix}" in during["cgroups"]
        # the root namespace's links, addresses and routes are never touched
        for key in ("links", "addrs", "routes"):
            assert during[key] == before[key], key
        inodes = {kernel.netns_inode(n) for n in topo.netns_names()}
        # processes in pods are part of the testbed and go with it
        sleeper = testbed.popen_in_pod(topo.pods()[0], ["sleep", "60"])
    finally:
        report = testbed.down(prefix)
    assert sleeper.wait(timeout=5) == -9
    assert len(report.netns_removed) == len(topo.netns_names())
    assert root_view() == before
    assert not os.path.exists(os.path.join(testbed.STATE_DIR, f"{prefix}.json"))
    assert not inodes & netns_inodes_in_use(), "a testbed namespace is still held"
    # idempotent
    again = testbed.down(prefix)
    assert again.netns_removed == () and not again.cgroup_removed


def test_tcp_same_node_and_across_nodes(make_testbed: Callable[..., Topology]) -> None:
    topo = make_testbed(nodes=2, pods_per_node=2)
    server_pod = topo.pod("n2-p1")
    assert server_pod is not None
    server = start_server(server_pod, 8080, 2)
    try:
        across = topo.pod("n1-p1")
        same = topo.pod("n2-p2")
        assert across and same
        # the server sees each client's own pod address: routed, no NAT
        assert tcp_exchange(across, server_pod.address, 8080, "hi") == (
            f"echo from n2-p1 to {across.address}: hi"
        )
        assert tcp_exchange(same, server_pod.address, 8080, "yo") == (
            f"echo from n2-p1 to {same.address}: yo"
        )
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()


def test_exec_runs_in_the_pods_netns_and_cgroup(make_testbed: Callable[..., Topology]) -> None:
    topo = make_testbed(nodes=1, pods_per_node=2)
    pod = topo.pods()[1]
    # the cgroup v2 line of /proc/self/cgroup ("0::/path"; hybrid hosts list v1 lines too)
    script = "print([x for x in open('/proc/self/cgroup').read().splitlines() if x.startswith('0::')][0])"
    out = subprocess.run(
        [*NODEMESH, "testbed", "exec", "--prefix", topo.prefix, pod.name, "--", sys.executable, "-c", script],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.splitlines()
    assert out[0] == f"0::/{pod.cgroup}"
    # /sys/class/net shows the namespace of the process that mounted /sys, so ask netlink instead
    nets = subprocess.run(
        [
            *NODEMESH,
            "testbed",
            "exec",
            "-p",
            topo.prefix,
            pod.name,
            "--",
            sys.executable,
            "-c",
            "import socket; print(sorted(n for _, n in socket.if_nameindex()))",
        ],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.strip()
    assert nets == str(sorted(["lo", pod.ifname]))
    # the exit code of the command is the exit code of exec
    rc = subprocess.run(
        [*NODEMESH, "testbed", "exec", "-p", topo.prefix, pod.name, "--", "sh", "-c", "exit 7"]
    )
    assert rc.returncode == 7


def test_no_route_out_of_the_testbed(make_testbed: Callable[..., Topology]) -> None:
    topo = make_testbed(nodes=2, pods_per_node=1)
    for node in topo.nodes:
        with kernel.ipr(node.netns) as ipr:
            dsts = {r.get_attr("RTA_DST") for r in ipr.get_routes(family=2, table=254)}
        assert None not in dsts, f"{node.name} has a default route"
        with kernel.ipr(node.netns) as ipr:
            names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        assert names == {"lo", node.uplink, node.bridge, *(p.host_ifname for p in node.pods)}
    # a pod trying an address outside the testbed gets no route from its node
    pod = topo.pods()[0]
    proc = testbed.popen_in_pod(
        pod,
        [sys.executable, "-c", "import socket; socket.create_connection(('192.0.2.1', 80), timeout=3)"],
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=10)
    assert proc.returncode != 0
    assert b"unreachable" in err.lower() or b"timed out" in err.lower()


def test_two_testbeds_with_different_prefixes_coexist(make_testbed: Callable[..., Topology]) -> None:
    a = make_testbed(nodes=2, pods_per_node=1)
    b = make_testbed(nodes=2, pods_per_node=1)
    # same addresses inside, different kernel objects outside
    assert [p.address for p in a.pods()] == [p.address for p in b.pods()]
    assert not set(a.netns_names()) & set(b.netns_names())
    servers = [start_server(t.pods()[1], 9000, 1) for t in (a, b)]
    try:
        assert tcp_exchange(a.pods()[0], a.pods()[1].address, 9000, "a") == "echo from n2-p1 to 10.244.1.2: a"
        testbed.down(a.prefix)  # taking one down leaves the other intact
        assert tcp_exchange(b.pods()[0], b.pods()[1].address, 9000, "b") == "echo from n2-p1 to 10.244.1.2: b"
        assert set(b.netns_names()) <= set(kernel.list_netns())
    finally:
        for s in servers:
            s.kill()


def test_failure_midway_removes_what_was_made(monkeypatch: pytest.MonkeyPatch) -> None:
    before = root_view()
    prefix = run_prefix()
    real = testbed._build_pod
    calls = {"n": 0}

    def flaky(node: Any, pod: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        real(node, pod)

    monkeypatch.setattr(testbed, "_build_pod", flaky)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
        assert root_view() == before
    finally:
        testbed.down(prefix)


def test_down_cleans_leftovers_of_a_crashed_run() -> None:
    before = root_view()
    prefix = run_prefix()
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 1, 2)))
    try:
        os.unlink(os.path.join(testbed.STATE_DIR, f"{prefix}.json"))  # the crash lost its state
        out = subprocess.run(
            [*NODEMESH, "testbed", "down", "--prefix", prefix], capture_output=True, text=True, check=True
        ).stdout
        assert f"removed {len(topo.netns_names())} namespaces" in out
    finally:
        testbed.down(prefix)
    assert root_view() == before


def _cli_up_with_file(tmp_path: Any, doc: str, prefix: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "topo.yaml"
    f.write_text(doc)
    return subprocess.run(
        [*NODEMESH, "testbed", "up", "-f", str(f), "--prefix", prefix], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("nodes:\n - {name: a, pods: [web]}\n - {name: b, pods: [web]}\n", "duplicate name 'web'"),
        (
            "nodes:\n - {name: a, pod_cidr: 10.244.0.0/16}\n - {name: b, pod_cidr: 10.244.2.0/24}\n",
            "10.244.2.0/24 overlaps 10.244.0.0/16",
        ),
        (
            "nodes:\n - {name: a, pods: [a-very-long-pod-name]}\n",
            "-a-very-long-pod-name' is 27 bytes; Linux allows at most 15",
        ),
        ("nodes:\n - {name: a, pod_cidr: 10.244.1.0/29, pods: 6}\n", "6 pods do not fit in 10.244.1.0/29"),
        ("nodes:\n - {name: a, pod_cidr: 10.244.1.7/24}\n", "not a network CIDR"),
        ("nodes: [\n", "invalid YAML"),
    ],
)
def test_bad_input_is_refused_and_creates_nothing(tmp_path: Any, doc: str, message: str) -> None:
    before = root_view()
    prefix = run_prefix()
    res = _cli_up_with_file(tmp_path, doc, prefix)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert res.stderr.startswith(f"error: {tmp_path / 'topo.yaml'}")  # names the file
    assert "Traceback" not in res.stderr
    assert root_view() == before
    assert not os.path.exists(os.path.join(testbed.STATE_DIR, f"{prefix}.json"))


def test_unknown_pod_in_exec_is_a_clear_error(make_testbed: Callable[..., Topology]) -> None:
    topo = make_testbed(nodes=1, pods_per_node=1)
    res = subprocess.run(
        [*NODEMESH, "testbed", "exec", "-p", topo.prefix, "nope", "--", "true"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 3
    assert f"no pod named 'nope' in testbed '{topo.prefix}' (pods: n1-p1)" in res.stderr
    res = subprocess.run(
        [*NODEMESH, "testbed", "exec", "-p", "nosuchbed", "n1-p1", "--", "true"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 3 and "no testbed with prefix 'nosuchbed'" in res.stderr


def test_same_prefix_twice_is_refused(make_testbed: Callable[..., Topology]) -> None:
    topo = make_testbed(nodes=1, pods_per_node=1)
    res = subprocess.run(
        [*NODEMESH, "testbed", "up", "-p", topo.prefix, "-n", "1", "-m", "1"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "already up" in res.stderr
    assert set(topo.netns_names()) <= set(kernel.list_netns())  # the first one is untouched


def test_status_json_reflects_the_kernel(make_testbed: Callable[..., Topology]) -> None:
    topo = make_testbed(nodes=2, pods_per_node=2)
    res = subprocess.run(
        [*NODEMESH, "testbed", "status", "-p", topo.prefix, "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(res.stdout)
    assert [n["name"] for n in doc["nodes"]] == ["n1", "n2"]
    assert all(p["netns_present"] for n in doc["nodes"] for p in n["pods"])
    kernel.remove_netns(topo.pods()[0].netns)  # someone deleted a pod's netns by hand
    doc = json.loads(
        subprocess.run(
            [*NODEMESH, "testbed", "status", "-p", topo.prefix, "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert doc["nodes"][0]["pods"][0]["netns_present"] is False
    table = subprocess.run(
        [*NODEMESH, "testbed", "status", "-p", topo.prefix], capture_output=True, text=True, check=True
    ).stdout
    assert "MISSING" in table and "n2-p2" in table
