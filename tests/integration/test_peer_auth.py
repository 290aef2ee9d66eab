"""Root tests: peer authentication enforced by tc filters on the pods' host-side veths.

A 2-node testbed with two pods on node 1; the data path installed by the
loader process on node 1's cgroup with pins under /sys/fs/bpf/<prefix>-nodemesh;
both pods bound (policy, own addresses, the two host-side programs on their
veth ends in node 1's netns). The "plaintext peer" is a socket in node 2's
netns connecting straight to the pod IP; the "proxy" is a socket in node 1's
netns bound to the pod's gateway address *and marked with the proxy's
SO_MARK* (what :func:`agent.dataplane.podsock.dial_pod` does); an unmarked
socket there is a plain node process. The attacker is the other pod of node 1.
Everything is removed in ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.dataplane.podsock import SO_MARK, dial_pod
from bpf import loader, peerauth, pins, syscall
from bpf.errors import BpfConfigError
from bpf.layout import INBOUND_TC, SOURCE_TC
from bpf.maps import Dataplane
from netns import kernel, testbed, topology
from tests.integration.conftest_bpf import accept, nothing_pending, prefix, run_loader

pytestmark = pytest.mark.root

PORT = 8080
MARK = 0x4D
REFUSE_TIMEOUT_S = 0.5  # a dropped SYN: connect() times out, one SYN sent


@dataclass
class Env:
    topo: topology.Topology
    pod: topology.Pod
    attacker: topology.Pod  # another pod on the same node
    node: topology.Node  # the pod's node (where the proxy is)
    other: topology.Node  # another node
    root: str
    pin_dir: str
    dp: Dataplane
    listener: socket.socket  # in the pod, [::]:PORT (IPv4 and IPv6)
    pod_ll: str  # the pod's IPv6 link-local address
    attacker_ll: str


def _settled_link_local(netns: str, ifname: str, timeout_s: float = 5.0) -> str:
    """The interface's fe80 address once duplicate address detection is over."""
    def read() -> str | None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            for a in ipr.get_addr(family=socket.AF_INET6, index=idx):
                addr = str(a.get_attr("IFA_ADDRESS"))
                flags = a.get_attr("IFA_FLAGS") or a["flags"]
                if addr.startswith("fe80:") and not flags & 0x40:  # IFA_F_TENTATIVE
                    return addr
        return None

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = kernel.run_in_netns(netns, read)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{netns}:{ifname} has no settled IPv6 link-local address")


def bind_pod(dp: Dataplane, node: topology.Node, pod: topology.Pod) -> None:
    [link] = peerauth.pod_links(pod.netns)
    assert peerauth.host_peer(node.netns, pod.netns, link) == pod.host_ifname
    dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, [*link.ip4, *link.ip6])


def dual_listener(netns: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(64)
        return s

    return kernel.run_in_netns(netns, make)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    p = prefix()
    root = f"/sys/fs/bpf/{p}-nodemesh"
    dp: Dataplane | None = None
    listener: socket.socket | None = None
    try:
        topo = testbed.up(topology.plan(topology.default_spec(p, 2, 2)))
        node, other = topo.nodes
        pod, attacker = node.pods
        res = run_loader("install", "--cgroup", node.cgroup, "--bpffs-root", root,
                         "--max-records", "64", "--max-enrolled", "16")
        dp = Dataplane.open(root)
        pod_ll = _settled_link_local(pod.netns, pod.ifname)
        attacker_ll = _settled_link_local(attacker.netns, attacker.ifname)
        _settled_link_local(node.netns, node.bridge)
        for q in (pod, attacker):
            dp.set_peer_auth(q.address, "PERMISSIVE", q.gateway, proxy_mark=MARK)
            bind_pod(dp, node, q)
        listener = dual_listener(pod.netns, PORT)
        yield Env(topo, pod, attacker, node, other, root, res["pin_dir"], dp, listener,
                  pod_ll, attacker_ll)
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
                 timeout_s: float = 2.0, mark: int | None = None,
                 scope: str | None = None) -> socket.socket | None:
    """A TCP connection opened from ``netns``; None if it was not accepted in time.

    ``scope``: the interface (in ``netns``) of an IPv6 link-local ``dst``.
    """
    v6 = ":" in dst

    def make() -> tuple[socket.socket, tuple[object, ...]]:
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source is not None:
            s.bind((source, 0))
        addr: tuple[object, ...] = (dst, port)
        if v6:
            addr = (dst, port, 0, socket.if_nametoindex(scope) if scope else 0)
        return s, addr

    s, addr = kernel.run_in_netns(netns, make)
    s.settimeout(timeout_s)
    try:
        s.connect(addr)
    except (TimeoutError, OSError):
        s.close()
        return None
    return s


def roundtrip(client: socket.socket, server: socket.socket, data: bytes) -> None:
    client.sendall(data)
    assert server.recv(len(data)) == data
    server.sendall(data.upper())
    assert client.recv(len(data)) == data.upper()


def delivered(env: Env, listener: socket.socket | None = None, port: int = PORT, **kw: object) -> bool:
    """Connect to the pod's ``port`` (``listener`` in the pod; kw: netns, source, mark, dst,
    scope); True if the pod accepted and data flowed."""
    listener = listener or env.listener
    netns = str(kw.get("netns", env.other.netns))
    source = kw.get("source")
    mark = kw.get("mark")
    scope = kw.get("scope")
    c = connect_from(netns, str(kw.get("dst", env.pod.address)), port,
                     source=str(source) if source else None, timeout_s=REFUSE_TIMEOUT_S,
                     mark=int(str(mark)) if mark is not None else None,
                     scope=str(scope) if scope else None)
    if c is None:
        assert nothing_pending(listener)
        return False
    with c, accept(listener) as conn:
        if source:
            assert conn.getpeername()[0].removeprefix("::ffff:") == source
        roundtrip(c, conn, b"hello")
    return True


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def strict(env: Env, **kw: object) -> None:
    env.dp.set_peer_auth(env.pod.address, "STRICT", env.pod.gateway, proxy_mark=MARK, **kw)  # type: ignore[arg-type]


def permissive(env: Env) -> None:
    env.dp.set_peer_auth(env.pod.address, "PERMISSIVE", env.pod.gateway, proxy_mark=MARK)


def _host_filters(env: Env, pod: topology.Pod | None = None) -> list[tuple[int, str | None]]:
    q = pod or env.pod
    return sorted((f.parent, f.name) for f in peerauth.host_filters(env.node.netns, q.host_ifname)
                  if f.prio == peerauth.FILTER_PRIO)


def test_loader_pins_both_programs_and_they_run_on_the_host_side_veth(env: Env) -> None:
    for prog in (INBOUND_TC, SOURCE_TC):
        assert os.path.exists(pins.prog_pin(env.pin_dir, prog))
    assert pins.is_complete(env.pin_dir)
    v = env.dp.version
    assert _host_filters(env) == [(peerauth.INGRESS_PARENT, peerauth.filter_tag(v, SOURCE_TC.func)),
                                  (peerauth.EGRESS_PARENT, peerauth.filter_tag(v, INBOUND_TC.func))]


def test_strict_refuses_plaintext_and_admits_the_marked_proxy(env: Env) -> None:
    strict(env)
    try:
        c0 = env.dp.peer_auth_counters(env.pod.address)
        assert not delivered(env), "plaintext from another node reached a STRICT pod"
        c1 = env.dp.peer_auth_counters(env.pod.address)
        assert delta(c0, c1)["refused"] >= 1 and delta(c0, c1)["plaintext"] == 0
        # The node proxy: node 1's netns, source = the pod's gateway, the proxy's mark.
        assert delivered(env, netns=env.node.netns, source=env.pod.gateway, mark=MARK)
        c2 = env.dp.peer_auth_counters(env.pod.address)
        assert delta(c1, c2) == {"proxied": 1, "plaintext": 0, "refused": 0}
    finally:
        permissive(env)


def test_a_plain_node_process_on_the_gateway_address_is_not_the_proxy(env: Env) -> None:
    """Finding 7: any process in the node's netns used to count as the proxy."""
    strict(env)
    try:
        before, c0 = env.dp.counters()["proxy_unproven"], env.dp.peer_auth_counters(env.pod.address)
        assert not delivered(env, netns=env.node.netns, source=env.pod.gateway), \
            "an unmarked node process on the gateway address reached a STRICT pod"
        assert not delivered(env, netns=env.node.netns, source=env.pod.gateway, mark=MARK + 1)
        assert not delivered(env, netns=env.node.netns)  # the kernel picks the gateway too
        assert env.dp.counters()["proxy_unproven"] >= before + 3
        c1 = env.dp.peer_auth_counters(env.pod.address)
        assert delta(c0, c1)["proxied"] == 0 and delta(c0, c1)["refused"] >= 3
        # A root process with CAP_NET_ADMIN can set the mark: it is trusted (the README says so).
        assert delivered(env, netns=env.node.netns, mark=MARK)
    finally:
        permissive(env)


def test_dial_pod_marks_its_socket_and_reaches_a_strict_pod(env: Env) -> None:
    strict(env)

    async def dial() -> bytes:
        r, w = await dial_pod(env.pod.address, PORT, mark=MARK, timeout_s=2.0)
        try:
            w.write(b"via dial_pod")
            await w.drain()
            return await asyncio.wait_for(r.readexactly(12), 2.0)
        finally:
            w.close()

    def run() -> bytes:
        return asyncio.run(dial())

    try:
        c0 = env.dp.peer_auth_counters(env.pod.address)
        import threading

        out: list[bytes] = []
        t = threading.Thread(target=lambda: out.append(kernel.run_in_netns(env.node.netns, run)))
        t.start()
        with accept(env.listener) as conn:
            assert conn.recv(12) == b"via dial_pod"
            conn.sendall(b"VIA DIAL_POD")
        t.join(5)
        assert out == [b"VIA DIAL_POD"]
        assert delta(c0, env.dp.peer_auth_counters(env.pod.address))["proxied"] == 1
    finally:
        permissive(env)


def test_strict_covers_ipv6_link_local_from_the_node_and_a_same_node_pod(env: Env) -> None:
    """Finding 7: IPv6 (link-local) reached a STRICT pod in clear."""
    from_node = {"netns": env.node.netns, "dst": env.pod_ll, "scope": env.node.bridge}
    from_pod = {"netns": env.attacker.netns, "dst": env.pod_ll, "scope": env.attacker.ifname}
    assert delivered(env, **from_node) and delivered(env, **from_pod)  # PERMISSIVE: both arrive
    strict(env)
    try:
        c0 = env.dp.peer_auth_counters(env.pod.address)
        assert not delivered(env, **from_node), "IPv6 from the node reached a STRICT pod"
        assert not delivered(env, **from_pod), "IPv6 from a same-node pod reached a STRICT pod"
        assert not delivered(env, **from_node, mark=MARK)  # the proxy never dials over IPv6
        assert delta(c0, env.dp.peer_auth_counters(env.pod.address))["refused"] >= 3
        # Neighbour discovery still works in STRICT: with the caches emptied, a neighbour
        # resolves the pod's link-local address again and reaches it (UDP is allowed).
        for q in (env.attacker, env.pod):
            kernel.run_in_netns(q.netns, lambda q=q: _forget_neighbours(q.ifname))  # type: ignore[misc]
        assert _udp_arrives(env, env.attacker.netns, env.pod_ll, scope=env.attacker.ifname)
    finally:
        permissive(env)


def _forget_neighbours(ifname: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        for n in ipr.get_neighbours(family=socket.AF_INET6, ifindex=idx):
            ipr.neigh("del", dst=n.get_attr("NDA_DST"), ifindex=idx, family=socket.AF_INET6)


def _udp_arrives(env: Env, netns: str, dst: str, *, scope: str | None = None,
                 source: tuple[str, int] | None = None) -> bool:
    v6 = ":" in dst

    def make() -> tuple[socket.socket, tuple[object, ...]]:
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        if source is not None:
            s.bind(source)
        addr: tuple[object, ...] = (dst, PORT, 0, socket.if_nametoindex(scope)) if v6 and scope \
            else (dst, PORT)
        return s, addr

    def server() -> socket.socket:
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        u.bind(("::", PORT))
        return u

    u = kernel.run_in_netns(env.pod.netns, server)
    s, addr = kernel.run_in_netns(netns, make)
    with u, s:
        u.settimeout(REFUSE_TIMEOUT_S)
        s.sendto(b"ping", addr)
        try:
            return u.recvfrom(16)[0] == b"ping"
        except TimeoutError:
            return False


def test_udp_to_a_strict_pod_follows_the_configured_choice(env: Env) -> None:
    """Finding 7: UDP reached a STRICT pod with no way to refuse it."""
    sources = [(env.other.netns, env.pod.address, None),
               (env.attacker.netns, env.pod_ll, env.attacker.ifname),
               (env.node.netns, env.pod_ll, env.node.bridge)]
    strict(env, udp="allow")
    try:
        for netns, dst, scope in sources:
            assert _udp_arrives(env, netns, dst, scope=scope), (netns, dst)
        strict(env, udp="deny")
        assert env.dp.peer_auth(env.pod.address).udp == "deny"  # type: ignore[union-attr]
        c0 = env.dp.peer_auth_counters(env.pod.address)
        for netns, dst, scope in sources:
            assert not _udp_arrives(env, netns, dst, scope=scope), (netns, dst)
        assert delta(c0, env.dp.peer_auth_counters(env.pod.address))["refused"] >= 3
        # The node DNS proxy's answers (gateway, DNS port) still arrive: mesh DNS works.
        assert _udp_arrives(env, env.node.netns, env.pod.address,
                            source=(env.pod.gateway, peerauth.DEFAULT_DNS_PORT))
        permissive(env)  # deny is about STRICT pods only
        assert _udp_arrives(env, env.other.netns, env.pod.address)
    finally:
        permissive(env)


def _tcp_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0x4E4D, 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    data = pseudo + tcp
    csum = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while csum >> 16:
        csum = (csum & 0xFFFF) + (csum >> 16)
    tcp = tcp[:16] + struct.pack("!H", ~csum & 0xFFFF) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def _seen_by_pod(env: Env, send: object, src: str, sport: int) -> bool:
    """Send (a callable) and report whether a TCP SYN from src:sport reached the pod's
    interface (an AF_PACKET tap inside the pod: it sees what crossed the veth)."""
    def tap() -> socket.socket:
        t = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        t.bind((env.pod.ifname, 0))
        return t

    t = kernel.run_in_netns(env.pod.netns, tap)
    with t:
        send()  # type: ignore[operator]
        t.settimeout(REFUSE_TIMEOUT_S)
        deadline = time.monotonic() + REFUSE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                pkt = t.recv(2048)
            except TimeoutError:
                return False
            if len(pkt) >= 24 and pkt[9] == 6 and socket.inet_ntoa(pkt[12:16]) == src and \
                    struct.unpack("!H", pkt[20:22])[0] == sport:
                return True
    return False


def test_a_same_node_pod_cannot_spoof_the_gateway(env: Env) -> None:
    """Finding 7: a same-node pod forging the gateway's source address passed the filter.

    The forged packets are sent while the pod is PERMISSIVE, so nothing but the
    source check on the attacker's veth can stop them."""
    permissive(env)
    try:
        def raw() -> socket.socket:
            return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

        r = kernel.run_in_netns(env.attacker.netns, raw)
        with r:
            def spoof(src: str, sport: int) -> object:
                return lambda: r.sendto(_tcp_syn(src, env.pod.address, sport, PORT),
                                        (env.pod.address, 0))

            before = env.dp.counters()["spoof_dropped"]
            assert not _seen_by_pod(env, spoof(env.pod.gateway, 40001), env.pod.gateway, 40001), \
                "a SYN forged with the gateway's address crossed into the pod"
            assert not _seen_by_pod(env, spoof(env.other.fabric_address, 40002),
                                    env.other.fabric_address, 40002)
            assert env.dp.counters()["spoof_dropped"] >= before + 2
            # The same raw socket with the attacker's own address: it arrives.
            assert _seen_by_pod(env, spoof(env.attacker.address, 40003), env.attacker.address, 40003)
        # The attacker claiming the gateway's address as its own cannot reach a STRICT pod.
        strict(env)

        def add_gw(add: bool) -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=env.attacker.ifname)[0]
                ipr.addr("add" if add else "del", index=idx, address=env.pod.gateway, prefixlen=32)

        kernel.run_in_netns(env.attacker.netns, lambda: add_gw(True))
        try:
            assert not delivered(env, netns=env.attacker.netns, source=env.pod.gateway)
        finally:
            kernel.run_in_netns(env.attacker.netns, lambda: add_gw(False))
        # The attacker's own traffic, IPv4 and IPv6 link-local, still flows (to a PERMISSIVE pod).
        permissive(env)
        assert delivered(env, netns=env.attacker.netns, source=env.attacker.address)
        assert delivered(env, netns=env.attacker.netns, dst=env.pod_ll, scope=env.attacker.ifname)
    finally:
        permissive(env)


def test_permissive_delivers_plaintext_and_counts_it(env: Env) -> None:
    permissive(env)
    c0 = env.dp.peer_auth_counters(env.pod.address)
    assert delivered(env)
    assert delivered(env, netns=env.node.netns, source=env.pod.gateway, mark=MARK)
    assert delivered(env, netns=env.node.netns, source=env.pod.gateway)  # no mark: plaintext
    assert delta(c0, env.dp.peer_auth_counters(env.pod.address)) == {
        "proxied": 1, "plaintext": 2, "refused": 0}


def test_mode_switch_applies_to_new_connections_only(env: Env) -> None:
    permissive(env)
    c = connect_from(env.other.netns, env.pod.address)
    assert c is not None
    with c, accept(env.listener) as conn:
        strict(env)
        roundtrip(c, conn, b"still open after STRICT")  # established: not cut
        assert not delivered(env)  # but a new one is refused
        roundtrip(c, conn, b"and still open")
        permissive(env)
        assert delivered(env)
    # No re-attach happened: the filters are still this version's.
    [link] = peerauth.pod_links(env.pod.netns)
    assert env.dp.attach_pod_filters(env.node.netns, env.pod.host_ifname, env.pod.address,
                                     [*link.ip4, *link.ip6]) is False
    policy = env.dp.peer_auth(env.pod.address)
    assert policy == peerauth.PeerAuthPolicy(env.pod.address, "PERMISSIVE", env.pod.gateway, MARK)


def test_disable_passes_without_counting(env: Env) -> None:
    env.dp.set_peer_auth(env.pod.address, "DISABLE", env.pod.gateway, proxy_mark=MARK)
    try:
        c0 = env.dp.peer_auth_counters(env.pod.address)
        assert delivered(env)
        assert env.dp.peer_auth_counters(env.pod.address) == c0
    finally:
        permissive(env)


def test_attach_is_idempotent_and_detach_removes_the_filters(env: Env) -> None:
    pod, node = env.pod, env.node
    [link] = peerauth.pod_links(pod.netns)
    sources = [*link.ip4, *link.ip6]
    assert env.dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, sources) is False
    assert env.dp.attach_pod_filters(kernel.netns_path(node.netns), pod.host_ifname,
                                     pod.address, sources) is False
    assert len(_host_filters(env)) == 2
    # Filters left by another data path version are replaced in place, not doubled.
    fd = syscall.obj_get(pins.prog_pin(env.pin_dir, INBOUND_TC))
    try:
        old = [peerauth.HostFilter(INBOUND_TC, peerauth.EGRESS_PARENT, fd)]
        assert peerauth.attach_host_filters(node.netns, pod.host_ifname, old, "v1-older") is True
    finally:
        os.close(fd)
    assert env.dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, sources) is True
    assert len(_host_filters(env)) == 2
    strict(env)
    try:
        assert env.dp.detach_pod_filters(node.netns, pod.host_ifname) is True
        assert _host_filters(env) == []
        assert env.dp.detach_pod_filters(node.netns, pod.host_ifname) is False
        c0 = env.dp.peer_auth_counters(pod.address)
        assert delivered(env), "no filter: STRICT cannot be enforced, plaintext arrives"
        assert env.dp.peer_auth_counters(pod.address) == c0
        assert env.dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, sources)
        assert not delivered(env)
    finally:
        permissive(env)
        env.dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, sources)


def test_bad_input_changes_nothing(env: Env) -> None:
    pod, node = env.pod, env.node
    before = env.dp.peer_auth(pod.address)
    for args, kw, field in (((f"{pod.address}.1", "STRICT", pod.gateway), {}, "pod_ip"),
                            ((pod.address, "MUTUAL", pod.gateway), {}, "mode"),
                            ((pod.address, "STRICT", "gateway"), {}, "allowed_source"),
                            ((pod.address, "STRICT", pod.address), {}, "allowed_source"),
                            ((pod.address, "STRICT", pod.gateway), {"udp": "drop"}, "udp"),
                            ((pod.address, "STRICT", pod.gateway), {"proxy_mark": 0}, "proxy_mark")):
        with pytest.raises(BpfConfigError, match=field):
            env.dp.set_peer_auth(*args, **kw)  # type: ignore[arg-type]
    assert env.dp.peer_auth(pod.address) == before
    missing = f"{env.topo.prefix}-nonexistent"
    with pytest.raises(BpfConfigError, match="netns"):
        env.dp.attach_pod_filters(missing, pod.host_ifname, pod.address, [pod.address])
    assert not kernel.netns_exists(missing)  # never created as a side effect
    with pytest.raises(BpfConfigError, match="ifname"):
        env.dp.attach_pod_filters(node.netns, f"{env.topo.prefix}-nope", pod.address, [pod.address])
    with pytest.raises(BpfConfigError, match="sources"):
        env.dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, ["0.0.0.0"])
    with pytest.raises(BpfConfigError, match="netns"):
        env.dp.detach_pod_filters(missing, pod.host_ifname)
    with pytest.raises(BpfConfigError, match="pod_ip"):
        env.dp.peer_auth_counters("not-an-ip")
    [link] = peerauth.pod_links(pod.netns)
    with pytest.raises(BpfConfigError, match="not a veth"):
        peerauth.host_peer(node.netns, pod.netns, peerauth.PodLink(link.ifname, 0, (), ()))
    assert len(_host_filters(env)) == 2


def test_port_modes_override_the_pod_mode_per_destination_port(env: Env) -> None:
    """PeerAuthentication portLevelMtls: one port PERMISSIVE in a STRICT pod and the reverse,
    IPv4 and IPv6 alike; the marked proxy passes a STRICT port; dropping the port modes takes
    their map entries away."""
    other_port = PORT + 1
    second = dual_listener(env.pod.netns, other_port)
    v6 = {"netns": env.node.netns, "dst": env.pod_ll, "scope": env.node.bridge}
    try:
        strict(env, ports=((other_port, "PERMISSIVE"),))
        assert env.dp.peer_auth(env.pod.address) == peerauth.PeerAuthPolicy(
            env.pod.address, "STRICT", env.pod.gateway, MARK, ports=((other_port, "PERMISSIVE"),))
        c0 = env.dp.peer_auth_counters(env.pod.address)
        assert delivered(env, second, other_port), "plaintext to the PERMISSIVE port was refused"
        assert not delivered(env), "plaintext reached the pod's STRICT port"
        assert delivered(env, second, other_port, **v6) and not delivered(env, **v6)
        proxy = {"netns": env.node.netns, "source": env.pod.gateway, "mark": MARK}
        assert delivered(env, **proxy)
        assert delta(c0, env.dp.peer_auth_counters(env.pod.address)) == {
            "proxied": 1, "plaintext": 2, "refused": 2}
        # the reverse: a PERMISSIVE pod with one STRICT port
        env.dp.set_peer_auth(env.pod.address, "PERMISSIVE", env.pod.gateway, proxy_mark=MARK,
                             ports=((PORT, "STRICT"), (other_port, "DISABLE")))
        assert not delivered(env) and not delivered(env, **v6)
        assert delivered(env, second, other_port)
        # a DISABLE pod with a STRICT port is judged too (no fast path past its port)
        env.dp.set_peer_auth(env.pod.address, "DISABLE", env.pod.gateway, proxy_mark=MARK,
                             ports=((PORT, "STRICT"),))
        assert not delivered(env) and delivered(env, second, other_port)
        assert len(_port_entries(env)) == 1
    finally:
        permissive(env)
        second.close()
    assert _port_entries(env) == [] and delivered(env)
    assert env.dp.peer_auth(env.pod.address) == peerauth.PeerAuthPolicy(
        env.pod.address, "PERMISSIVE", env.pod.gateway, MARK)


def test_udp_to_a_strict_pod_follows_its_port_mode(env: Env) -> None:
    """udp: deny drops UDP to a STRICT pod, but a port the pod has PERMISSIVE takes it."""
    try:
        strict(env, udp="deny", ports=((PORT, "PERMISSIVE"),))
        assert _udp_arrives(env, env.other.netns, env.pod.address)
        assert _udp_arrives(env, env.node.netns, env.pod_ll, scope=env.node.bridge)
        strict(env, udp="deny", ports=((PORT + 1, "PERMISSIVE"),))
        assert not _udp_arrives(env, env.other.netns, env.pod.address)
    finally:
        permissive(env)


def _port_entries(env: Env) -> list[bytes]:
    from bpf.layout import PortKey, ip4_to_map

    fd = syscall.obj_get(pins.map_pin(env.pin_dir, "nm_peer_port"))
    try:
        keys = syscall.map_keys(fd, 8, 1 << 16)
    finally:
        os.close(fd)
    return [k for k in keys if PortKey.from_buffer_copy(k).pod_ip4 == ip4_to_map(env.pod.address)]
