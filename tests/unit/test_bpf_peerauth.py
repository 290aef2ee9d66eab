"""Pure tests of peer authentication: validation, mode resolution, layouts (no root)."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import socket
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpf import loader, peerauth
from bpf.config import SOURCES_DIR
from bpf.errors import BpfConfigError, BpfError
from bpf.layout import (
    COUNTERS,
    MAPS,
    PEER_AUTH_MODES,
    PEER_AUTH_UDP,
    PORTS_PER_POD,
    SRC_PER_POD,
    TC_PROGRAMS,
    PeerAuth,
    PeerStats,
    PodIf,
    PortKey,
    SrcKey,
    ip4_to_map,
    port_from_map,
)
from bpf.maps import Dataplane
from bpf.peerauth import PeerAuthPolicy

POD, GW = "10.244.1.2", "10.244.1.1"


def _read(name: str) -> str:
    with open(os.path.join(SOURCES_DIR, name)) as f:
        return f.read()


def test_policy_is_normalised_and_packed() -> None:
    p = PeerAuthPolicy(POD, "strict", GW)
    assert p.mode == "STRICT"
    assert p.key() == ip4_to_map(POD)
    v = p.value()
    assert (v.mode, v.allowed_ip4) == (2, ip4_to_map(GW))
    assert PeerAuthPolicy(POD, "Permissive", GW).value().mode == 1
    assert PeerAuthPolicy(POD, "DISABLE", GW).value().mode == 0


@pytest.mark.parametrize(("args", "field"), [
    (("10.244.1", "STRICT", GW), "pod_ip"),
    (("::1", "STRICT", GW), "pod_ip"),
    ((0x0AF40102, "STRICT", GW), "pod_ip"),
    (("0.0.0.0", "STRICT", GW), "pod_ip"),
    ((POD, "MUTUAL", GW), "mode"),
    ((POD, "", GW), "mode"),
    ((POD, None, GW), "mode"),
    ((POD, "STRICT", "gw"), "allowed_source"),
    ((POD, "STRICT", "127.0.0.1"), "allowed_source"),
    ((POD, "STRICT", "255.255.255.255"), "allowed_source"),
    ((POD, "STRICT", POD), "allowed_source"),
])
def test_policy_rejects_bad_input_naming_the_field(args: tuple[object, ...], field: str) -> None:
    with pytest.raises(BpfConfigError, match=field) as e:
        PeerAuthPolicy(*args)  # type: ignore[arg-type]
    assert e.value.where == field


@given(st.text(max_size=20), st.text(max_size=12), st.text(max_size=20))
def test_policy_parses_or_raises_our_error(pod: str, mode: str, src: str) -> None:
    try:
        p = PeerAuthPolicy(pod, mode, src)
    except BpfConfigError:
        return
    assert p.mode in PEER_AUTH_MODES


def test_netns_and_ifname_validation() -> None:
    for bad in ("", "a b", "../x", "relative/path", "-x", 3):
        with pytest.raises(BpfConfigError, match="netns"):
            peerauth.netns_path(bad)
    with pytest.raises(BpfConfigError, match="does not exist"):
        peerauth.netns_path("nodemesh-no-such-netns-xyz")
    with pytest.raises(BpfConfigError, match="does not exist"):
        peerauth.netns_path("/nonexistent/netns")
    with pytest.raises(BpfConfigError, match="does not exist"):
        peerauth.netns_path("/tmp")  # a directory, not a namespace
    assert peerauth.check_ifname("t1-eth0") == "t1-eth0"
    for bad_if in ("", "x" * 16, "a/b", "a b", "a:1", None):
        with pytest.raises(BpfConfigError, match="ifname"):
            peerauth.check_ifname(bad_if)


def test_dataplane_validates_before_touching_a_map() -> None:
    dp = Dataplane.__new__(Dataplane)  # no maps open: any map call would fail differently
    dp.pin_dir, dp._fds, dp._max = "/nonexistent/v1-x", {}, {}
    with pytest.raises(BpfConfigError, match="mode"):
        dp.set_peer_auth(POD, "MUTUAL", GW)
    with pytest.raises(BpfConfigError, match="pod_ip"):
        dp.peer_auth_counters("10.0.0.256")
    with pytest.raises(BpfConfigError, match="netns"):
        dp.attach_pod_filters("nodemesh-no-such-netns-xyz", "eth0", POD, [POD])
    with pytest.raises(BpfConfigError, match="udp"):
        dp.set_peer_auth(POD, "STRICT", GW, udp="drop")
    with pytest.raises(BpfError, match="closed"):  # valid input does reach the map
        dp.set_peer_auth(POD, "STRICT", GW)


def test_c_constants_and_layouts_match_python() -> None:
    header = _read("nodemesh.h")
    for name, value in PEER_AUTH_MODES.items():
        c_name = {"DISABLE": "OFF"}.get(name, name)
        assert re.search(rf"#define NM_PA_{c_name} {value}\b", header), name
    for name, value in PEER_AUTH_UDP.items():
        assert re.search(rf"#define NM_PA_UDP_{name.upper()} {value}\b", header), name
    assert re.search(rf"#define NM_PA_SRC_PER_POD {SRC_PER_POD}\b", header)
    assert re.search(rf"#define NM_PA_PORTS_PER_POD {PORTS_PER_POD}\b", header)
    assert ctypes.sizeof(PeerAuth) == 20 and ctypes.sizeof(PeerStats) == 24
    assert ctypes.sizeof(PortKey) == 8
    assert {m[0]: m for m in MAPS}["nm_peer_port"][1:] == (PortKey, ctypes.c_uint32)
    assert re.search(r"BPF_F_TABLE\(\"hash\", struct nm_port_key, __u32, nm_peer_port, "
                     r"NM_MAX_ENROLLED \* NM_PA_PORTS_PER_POD,\s+BPF_F_NO_PREALLOC\)", header)
    assert ctypes.sizeof(PodIf) == 4 and ctypes.sizeof(SrcKey) == 24
    maps = {m[0]: m for m in MAPS}
    assert maps["nm_peer_auth"][1:] == (ctypes.c_uint32, PeerAuth)
    assert maps["nm_peer_stats"][1:] == (ctypes.c_uint32, PeerStats)
    assert maps["nm_pod_if"][1:] == (ctypes.c_uint32, PodIf)
    assert maps["nm_pod_src"][1:] == (SrcKey, ctypes.c_uint8)
    for name in ("nm_peer_auth", "nm_peer_stats", "nm_pod_if"):
        assert re.search(rf"BPF_HASH\({name}, __u32, struct {name}, NM_MAX_ENROLLED\)", header)
    # Counter slots: the C enum and COUNTERS in the same order.
    enum = re.findall(r"^\s+NM_C_([A-Z_0-9]+)", header.split("enum nm_counter")[1].split("};")[0], re.M)
    assert [e.lower() for e in enum if e != "MAX"] == list(COUNTERS)


def test_tc_program_is_part_of_the_one_module() -> None:
    src = loader.sources()
    for prog in TC_PROGRAMS:
        assert f"---- {prog.name}.c ----" in src
        assert f"int {prog.func}(struct __sk_buff *skb)" in _read(f"{prog.name}.c")
    # The header comes first: every map exists once for all programs.
    assert src.index("---- nodemesh.h ----") < src.index("---- inbound_tc.c ----")
    assert src.index("---- nodemesh.h ----") < src.index("---- source_tc.c ----")


def test_filter_tag_carries_the_version() -> None:
    assert peerauth.filter_tag("v1-0123456789ab") == "nm_inbound_tc:v1-0123456789ab"
    assert peerauth.filter_tag("v1-0", "nm_source_tc") == "nm_source_tc:v1-0"
    assert 0 < peerauth.FILTER_PRIO < 0x10000


def test_policy_carries_mark_udp_and_dns_port() -> None:
    p = PeerAuthPolicy(POD, "STRICT", GW, 0x4D, "DENY", 15053)
    v = p.value()
    assert (p.udp, v.udp, v.proxy_mark) == ("deny", 1, 0x4D)
    assert v.dns_port == socket.htons(15053)
    assert PeerAuthPolicy(POD, "STRICT", GW).value().udp == 0  # allow by default, as Istio
    for kw, field in (({"proxy_mark": 0}, "proxy_mark"), ({"proxy_mark": 1 << 32}, "proxy_mark"),
                      ({"proxy_mark": True}, "proxy_mark"), ({"udp": "drop"}, "udp"),
                      ({"dns_port": 70000}, "dns_port")):
        with pytest.raises(BpfConfigError, match=field):
            PeerAuthPolicy(POD, "STRICT", GW, **kw)  # type: ignore[arg-type]


def test_source_keys_cover_ipv4_and_ipv6_link_local() -> None:
    keys = peerauth.source_keys(7, [POD, "fe80::1%eth0", "fd00::2"])
    assert [(k.ifindex, k.family) for k in keys] == [(7, 2), (7, 10), (7, 10)]
    assert bytes(keys[0].addr)[:4] == bytes([10, 244, 1, 2])
    assert bytes(keys[1].addr) == ipaddress.IPv6Address("fe80::1").packed
    for bad, field in ((["0.0.0.0"], "sources"), (["::"], "sources"), (["ff02::1"], "sources"),
                       (["127.0.0.1"], "sources"), ([], "sources"), ([POD] * 9, "sources"),
                       ("10.0.0.1", "sources"), ([3], "sources")):
        with pytest.raises(BpfConfigError, match=field):
            peerauth.source_keys(7, bad)  # type: ignore[arg-type]
    with pytest.raises(BpfConfigError, match="ifindex"):
        peerauth.source_keys(0, [POD])


def test_port_modes_are_validated_packed_and_the_strictest_kept() -> None:
    p = PeerAuthPolicy(POD, "PERMISSIVE", GW, ports=((9090, "strict"), (8080, "DISABLE")))
    assert p.ports == ((8080, "DISABLE"), (9090, "STRICT"))
    v = p.value()
    assert (v.mode, v.ports, v.strictest) == (1, 1, 2)
    assert [(port_from_map(k.port), k.pod_ip4, m) for k, m in p.port_entries()] == \
        [(8080, ip4_to_map(POD), 0), (9090, ip4_to_map(POD), 2)]
    # a STRICT pod with a PERMISSIVE port: an unreadable port is judged STRICT
    assert PeerAuthPolicy(POD, "STRICT", GW, ports=((80, "PERMISSIVE"),)).value().strictest == 2
    # no port modes: the filter's one-lookup path
    plain = PeerAuthPolicy(POD, "STRICT", GW).value()
    assert (plain.ports, plain.strictest) == (0, 0)
    for bad in (((0, "STRICT"),), ((65536, "STRICT"),), ((80, "MUTUAL"),), ((80, "STRICT"), (80, "DISABLE")),
                ((True, "STRICT"),), "80", tuple((p, "STRICT") for p in range(1, PORTS_PER_POD + 2))):
        with pytest.raises(BpfConfigError) as e:
            PeerAuthPolicy(POD, "STRICT", GW, ports=bad)  # type: ignore[arg-type]
        assert (e.value.where or "").startswith("ports"), bad


class _FakeMaps:
    """In-memory stand-in for the bpf(2) map calls of :class:`Dataplane`, logging each write."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.maps: dict[int, dict[bytes, bytes]] = {}
        self.log: list[tuple[str, int, bytes]] = []
        self.fail_on = fail_on
        self.walks = 0

    def update(self, fd: int, key: Any, value: Any, flags: int = 0) -> None:
        k = bytes(key)
        m = self.maps.setdefault(fd, {})
        if flags == 1 and k in m:
            raise BpfError("exists", errno=errno.EEXIST)
        if k == self.fail_on:
            raise BpfError("map full", errno=errno.E2BIG)
        m[k] = bytes(value)
        self.log.append(("update", fd, k))

    def lookup(self, fd: int, key: Any, size: int) -> bytes | None:
        return self.maps.get(fd, {}).get(bytes(key))

    def delete(self, fd: int, key: Any) -> bool:
        self.log.append(("delete", fd, bytes(key)))
        return self.maps.get(fd, {}).pop(bytes(key), None) is not None

    def keys(self, fd: int, size: int, limit: int) -> list[bytes]:
        self.walks += 1
        return list(self.maps.get(fd, {}))[:limit]


def _fake_dataplane(monkeypatch: pytest.MonkeyPatch, fake: _FakeMaps) -> Dataplane:
    from bpf import maps as maps_mod

    for name, fn in (("map_update", fake.update), ("map_lookup", fake.lookup),
                     ("map_delete", fake.delete), ("map_keys", fake.keys)):
        monkeypatch.setattr(maps_mod.syscall, name, fn)
    dp = object.__new__(Dataplane)
    dp._fds = {name: i for i, (name, *_) in enumerate(MAPS)}
    dp._max = dict.fromkeys(dp._fds, 1024)
    dp._ports_of = None
    dp._ports_read = threading.Lock()
    return dp


def test_port_modes_are_written_before_the_pod_entry_and_never_half_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeMaps()
    dp = _fake_dataplane(monkeypatch, fake)
    pa_fd, port_fd = dp._fds["nm_peer_auth"], dp._fds["nm_peer_port"]

    def ports() -> dict[int, int]:
        return {port_from_map(PortKey.from_buffer_copy(k).port): int.from_bytes(v, "little")
                for k, v in fake.maps.get(port_fd, {}).items()}

    dp.set_peer_auth(POD, "STRICT", GW, ports=((8080, "PERMISSIVE"), (9090, "DISABLE")))
    writes = [(op, fd) for op, fd, _ in fake.log if fd in (pa_fd, port_fd)]
    assert writes == [("update", port_fd), ("update", port_fd), ("update", pa_fd)]
    assert ports() == {8080: 1, 9090: 0}
    # another set: the new modes first, the pod entry, then the one no longer wanted goes
    fake.log.clear()
    dp.set_peer_auth(POD, "PERMISSIVE", GW, ports=((9090, "STRICT"), (7070, "STRICT")))
    assert [(op, fd) for op, fd, _ in fake.log if fd in (pa_fd, port_fd)] == [
        ("update", port_fd), ("update", port_fd), ("update", pa_fd), ("delete", port_fd)]
    assert ports() == {7070: 2, 9090: 2}
    pod_before, ports_before = dict(fake.maps[pa_fd]), ports()
    # a write that fails half-way (the port map full): the pod's modes are what they were
    fake.fail_on = bytes(peerauth.port_key(ip4_to_map(POD), 9443))
    with pytest.raises(BpfError, match="map full"):
        dp.set_peer_auth(POD, "STRICT", GW,
                         ports=((7070, "DISABLE"), (9090, "PERMISSIVE"), (9443, "DISABLE")))
    assert fake.maps[pa_fd] == pod_before and ports() == ports_before
    # the pod entry itself refused: the port modes written for it are taken back too
    fake.fail_on = bytes(ctypes.c_uint32(ip4_to_map(POD)))
    with pytest.raises(BpfError):
        dp.set_peer_auth(POD, "STRICT", GW, ports=((7070, "DISABLE"), (1234, "DISABLE")))
    assert fake.maps[pa_fd] == pod_before and ports() == ports_before
    # no port modes any more: the pod entry first says so, then they go; the policy reads back
    fake.fail_on = None
    dp.set_peer_auth(POD, "STRICT", GW)
    assert ports() == {} and dp.peer_auth(POD) == PeerAuthPolicy(POD, "STRICT", GW)
    # entries an interrupted run left for a pod without port modes are dropped, by the next agent
    # process, before new ones count
    fake.maps[port_fd][bytes(peerauth.port_key(ip4_to_map(POD), 22))] = bytes(ctypes.c_uint32(1))
    dp._ports_of = None  # a new process: it reads the map once
    dp.set_peer_auth(POD, "STRICT", GW, ports=((80, "PERMISSIVE"),))
    assert ports() == {80: 1}
    assert dp.peer_auth(POD) == PeerAuthPolicy(POD, "STRICT", GW, ports=((80, "PERMISSIVE"),))
    assert dp.remove_peer_auth(POD) and ports() == {} and pa_fd in fake.maps and not fake.maps[pa_fd]
    # the map is walked once per process, not once per pod update
    for i in range(20):
        dp.set_peer_auth(f"10.244.1.{10 + i}", "STRICT", GW, ports=((80 + i, "PERMISSIVE"),))
        dp.set_peer_auth(f"10.244.1.{10 + i}", "STRICT", GW, ports=((90 + i, "PERMISSIVE"),))
    assert fake.walks == 2 and len(fake.maps[port_fd]) == 20
