"""Root tests: peer authentication enforced by the inbound tc filter (issue 5, item 6).

A 2-node testbed; the data path installed by the loader process on node 1's
cgroup with pins under /sys/fs/bpf/<prefix>-nodemesh; the pinned inbound
program attached at ingress of pod n1-p1's interface inside its netns. The
"plaintext peer" is a socket in node 2's netns (no pod cgroup, no proxy)
connecting straight to the pod IP; the "proxy" is a socket in node 1's netns
bound to the pod's gateway address, where the node proxy's connections come
from. Everything is removed in ``finally``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bpf import loader, peerauth, pins, syscall
from bpf.errors import BpfConfigError
from bpf.layout import INBOUND_TC
from bpf.maps import Dataplane
from netns import kernel, testbed, topology
from tests.integration.conftest_bpf import accept, listen_in, nothing_pending, prefix, run_loader

pytestmark = pytest.mark.root

PORT = 8080
REFUSE_TIMEOUT_S = 0.5  # a dropped SYN: connect() times out, one SYN sent


@dataclass
class Env:
    topo: topology.Topology
    pod: topology.Pod
    node: topology.Node  # the pod's node (where the proxy is)
    other: topology.Node  # another node
    root: str
    pin_dir: str
    dp: Dataplane
    listener: socket.socket  # in the pod, pod.address:PORT


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    p = prefix()
    root = f"/sys/fs/bpf/{p}-nodemesh"
    dp: Dataplane | None = None
    listener: socket.socket | None = None
    try:
        topo = testbed.up(topology.plan(topology.default_spec(p, 2, 1)))
        node, other = topo.nodes
        pod = node.pods[0]
        res = run_loader("install", "--cgroup", node.cgroup, "--bpffs-root", root,
                         "--max-records", "64", "--max-enrolled", "16")
        dp = Dataplane.open(root)
        dp.set_peer_auth(pod.address, "PERMISSIVE", pod.gateway)
        assert dp.attach_inbound_filter(pod.netns, pod.ifname) is True
        listener = listen_in(pod.netns, pod.address, PORT)
        yield Env(topo, pod, node, other, root, res["pin_dir"], dp, listener)
    finally:
        if listener is not None:
            listener.close()
        if dp is not None:
            dp.close()
        try:
            loader.uninstall(root)
            assert not os.path.exists(root)
        finally:
            testbed.down(p)


def connect_from(netns: str, dst: str, port: int = PORT, *, source: str | None = None,
                 timeout_s: float = 2.0) -> socket.socket | None:
    """A TCP connection opened from ``netns``; None if it was not accepted in time."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source is not None:
            s.bind((source, 0))
        return s

    s = kernel.run_in_netns(netns, make)
    s.settimeout(timeout_s)
    try:
        s.connect((dst, port))
    except (TimeoutError, OSError):
        s.close()
        return None
    return s


def roundtrip(client: socket.socket, server: socket.socket, data: bytes) -> None:
    client.sendall(data)
    assert server.recv(len(data)) == data
    server.sendall(data.upper())
    assert client.recv(len(data)) == data.upper()


def delivered(env: Env, **kw: object) -> bool:
    """Connect to the pod (kw: netns, source); True if the pod accepted and data flowed."""
    netns = str(kw.get("netns", env.other.netns))
    source = kw.get("source")
    c = connect_from(netns, env.pod.address, source=str(source) if source else None,
                     timeout_s=REFUSE_TIMEOUT_S)
    if c is None:
        assert nothing_pending(env.listener)
        return False
    with c, accept(env.listener) as conn:
        if source:
            assert conn.getpeername()[0] == source
        roundtrip(c, conn, b"hello")
    return True


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def test_loader_pins_the_inbound_program(env: Env) -> None:
    assert os.path.exists(pins.prog_pin(env.pin_dir, INBOUND_TC))
    assert pins.is_complete(env.pin_dir)
    [ours] = [f for f in peerauth.inbound_filters(env.pod.netns, env.pod.ifname)
              if f.prio == peerauth.FILTER_PRIO]
    assert ours.kind == "bpf" and ours.name == peerauth.filter_tag(env.dp.version)


def test_strict_refuses_plaintext_and_admits_the_proxy(env: Env) -> None:
    env.dp.set_peer_auth(env.pod.address, "STRICT", env.pod.gateway)
    c0 = env.dp.peer_auth_counters(env.pod.address)
    assert not delivered(env), "plaintext from another node reached a STRICT pod"
    c1 = env.dp.peer_auth_counters(env.pod.address)
    assert delta(c0, c1)["refused"] >= 1 and delta(c0, c1)["plaintext"] == 0
    # The node proxy's position: node 1's netns, source = the pod's gateway.
    assert delivered(env, netns=env.node.netns, source=env.pod.gateway)
    c2 = env.dp.peer_auth_counters(env.pod.address)
    assert delta(c1, c2) == {"proxied": 1, "plaintext": 0, "refused": 0}
    # Not a TCP SYN: UDP from the other node still arrives.
    u = kernel.run_in_netns(env.pod.netns, lambda: socket.socket(socket.AF_INET,
                                                                 socket.SOCK_DGRAM))
    with u:
        u.bind((env.pod.address, PORT))
        u.settimeout(2)
        s = kernel.run_in_netns(env.other.netns, lambda: socket.socket(socket.AF_INET,
                                                                       socket.SOCK_DGRAM))
        with s:
            s.sendto(b"ping", (env.pod.address, PORT))
            assert u.recvfrom(16)[0] == b"ping"


def test_permissive_delivers_plaintext_and_counts_it(env: Env) -> None:
    env.dp.set_peer_auth(env.pod.address, "PERMISSIVE", env.pod.gateway)
    c0 = env.dp.peer_auth_counters(env.pod.address)
    assert delivered(env)
    assert delivered(env, netns=env.node.netns, source=env.pod.gateway)
    assert delta(c0, env.dp.peer_auth_counters(env.pod.address)) == {
        "proxied": 1, "plaintext": 1, "refused": 0}


def test_mode_switch_applies_to_new_connections_only(env: Env) -> None:
    env.dp.set_peer_auth(env.pod.address, "PERMISSIVE", env.pod.gateway)
    c = connect_from(env.other.netns, env.pod.address)
    assert c is not None
    with c, accept(env.listener) as conn:
        env.dp.set_peer_auth(env.pod.address, "STRICT", env.pod.gateway)
        roundtrip(c, conn, b"still open after STRICT")  # established: not cut
        assert not delivered(env)  # but a new one is refused
        roundtrip(c, conn, b"and still open")
        env.dp.set_peer_auth(env.pod.address, "PERMISSIVE", env.pod.gateway)
        assert delivered(env)
    # No re-attach happened: the one filter is still this version's.
    assert env.dp.attach_inbound_filter(env.pod.netns, env.pod.ifname) is False
    policy = env.dp.peer_auth(env.pod.address)
    assert policy == peerauth.PeerAuthPolicy(env.pod.address, "PERMISSIVE", env.pod.gateway)


def test_disable_passes_without_counting(env: Env) -> None:
    env.dp.set_peer_auth(env.pod.address, "DISABLE", env.pod.gateway)
    try:
        c0 = env.dp.peer_auth_counters(env.pod.address)
        assert delivered(env)
        assert env.dp.peer_auth_counters(env.pod.address) == c0
    finally:
        env.dp.set_peer_auth(env.pod.address, "PERMISSIVE", env.pod.gateway)


def _filter_state(env: Env) -> tuple[list[object], bool]:
    def read() -> tuple[list[object], bool]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=env.pod.ifname)[0]
            qdiscs = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(idx) if q["index"] == idx]
            filters = [f.get_attr("TCA_KIND") for f in
                       ipr.get_filters(index=idx, parent=peerauth.INGRESS_PARENT)
                       if f.get_attr("TCA_OPTIONS")] if "clsact" in qdiscs else []
            return filters, "clsact" in qdiscs

    return kernel.run_in_netns(env.pod.netns, read)


def test_attach_is_idempotent_and_detach_removes_the_filter(env: Env) -> None:
    pod = env.pod
    assert env.dp.attach_inbound_filter(pod.netns, pod.ifname) is False
    assert env.dp.attach_inbound_filter(kernel.netns_path(pod.netns), pod.ifname) is False
    assert _filter_state(env) == (["bpf"], True)
    # A filter left by another data path version is replaced in place, not doubled.
    fd = syscall.obj_get(pins.prog_pin(env.pin_dir, INBOUND_TC))
    try:
        assert peerauth.attach_inbound_filter(pod.netns, pod.ifname, fd, "v1-older") is True
    finally:
        os.close(fd)
    assert env.dp.attach_inbound_filter(pod.netns, pod.ifname) is True
    assert _filter_state(env) == (["bpf"], True)
    env.dp.set_peer_auth(pod.address, "STRICT", pod.gateway)
    try:
        assert env.dp.detach_inbound_filter(pod.netns, pod.ifname) is True
        assert _filter_state(env) == ([], False)
        assert env.dp.detach_inbound_filter(pod.netns, pod.ifname) is False
        c0 = env.dp.peer_auth_counters(pod.address)
        assert delivered(env), "no filter: STRICT cannot be enforced, plaintext arrives"
        assert env.dp.peer_auth_counters(pod.address) == c0
        assert env.dp.attach_inbound_filter(pod.netns, pod.ifname) is True
        assert not delivered(env)
    finally:
        env.dp.set_peer_auth(pod.address, "PERMISSIVE", pod.gateway)
        env.dp.attach_inbound_filter(pod.netns, pod.ifname)


def test_bad_input_changes_nothing(env: Env) -> None:
    pod = env.pod
    before = env.dp.peer_auth(pod.address)
    for args, field in (((f"{pod.address}.1", "STRICT", pod.gateway), "pod_ip"),
                        ((pod.address, "MUTUAL", pod.gateway), "mode"),
                        ((pod.address, "STRICT", "gateway"), "allowed_source"),
                        ((pod.address, "STRICT", pod.address), "allowed_source")):
        with pytest.raises(BpfConfigError, match=field):
            env.dp.set_peer_auth(*args)
    assert env.dp.peer_auth(pod.address) == before
    missing = f"{env.topo.prefix}-nonexistent"
    with pytest.raises(BpfConfigError, match="netns"):
        env.dp.attach_inbound_filter(missing, pod.ifname)
    assert not kernel.netns_exists(missing)  # never created as a side effect
    with pytest.raises(BpfConfigError, match="ifname"):
        env.dp.attach_inbound_filter(pod.netns, f"{env.topo.prefix}-nope")
    with pytest.raises(BpfConfigError, match="netns"):
        env.dp.detach_inbound_filter(missing, pod.ifname)
    with pytest.raises(BpfConfigError, match="pod_ip"):
        env.dp.peer_auth_counters("not-an-ip")
    assert _filter_state(env) == (["bpf"], True)
