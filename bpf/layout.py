"""Python mirrors of bpf/nodemesh.h: structs, maps, counters, hooks.

The ctypes structs below must match the C header byte for byte; an
integration test compares them with the types BCC generates from the header.
Addresses and ports inside these structs are in network byte order, as the
kernel hands them to the programs; :func:`ip4_to_map` and :func:`port_to_map`
convert.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass


class Target(ctypes.Structure):
    _fields_ = [
        ("proxy_ip4", ctypes.c_uint32),
        ("proxy_port", ctypes.c_uint16),
        ("dns_port", ctypes.c_uint16),
    ]


class Orig(ctypes.Structure):
    _fields_ = [
        ("ip4", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("host", ctypes.c_uint16),
        ("netns_cookie", ctypes.c_uint64),
    ]


class Tuple(ctypes.Structure):
    _fields_ = [
        ("peer_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("peer_port", ctypes.c_uint16),
        ("local_port", ctypes.c_uint16),
    ]


class Cidr(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ip4", ctypes.c_uint32),
    ]


class PeerAuth(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("allowed_ip4", ctypes.c_uint32),
        ("proxy_mark", ctypes.c_uint32),
        ("dns_port", ctypes.c_uint16),
        ("udp", ctypes.c_uint8),
        ("ports", ctypes.c_uint8),
        ("strictest", ctypes.c_uint32),
    ]


class PortKey(ctypes.Structure):
    _fields_ = [
        ("pod_ip4", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


class PeerStats(ctypes.Structure):
    _fields_ = [
        ("proxied", ctypes.c_uint64),
        ("plaintext", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
    ]


class PodIf(ctypes.Structure):
    _fields_ = [("pod_ip4", ctypes.c_uint32)]


class SrcKey(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


# (map name, key type, value type); value sizes of per-CPU maps are per CPU.
MAPS: tuple[tuple[str, type[ctypes._SimpleCData[int]] | type[ctypes.Structure],
                  type[ctypes._SimpleCData[int]] | type[ctypes.Structure]], ...] = (
    ("nm_enrolled", ctypes.c_uint64, Target),
    ("nm_host_cg", ctypes.c_uint64, Target),
    ("nm_capture", Cidr, ctypes.c_uint8),
    ("nm_excl_ports", ctypes.c_uint16, ctypes.c_uint8),
    ("nm_orig_cookie", ctypes.c_uint64, Orig),
    ("nm_orig_tuple", Tuple, Orig),
    ("nm_dns_cookie", ctypes.c_uint64, Orig),
    ("nm_counters", ctypes.c_uint32, ctypes.c_uint64),
    ("nm_peer_auth", ctypes.c_uint32, PeerAuth),
    ("nm_peer_stats", ctypes.c_uint32, PeerStats),
    ("nm_pod_if", ctypes.c_uint32, PodIf),
    ("nm_pod_src", SrcKey, ctypes.c_uint8),
    ("nm_peer_port", PortKey, ctypes.c_uint32),
)
MAP_NAMES: tuple[str, ...] = tuple(m[0] for m in MAPS)

# Same order as enum nm_counter in nodemesh.h.
COUNTERS: tuple[str, ...] = (
    "captured",
    "dns_captured",
    "bypass_not_enrolled",
    "bypass_excluded_port",
    "bypass_not_captured",
    "bypass_proxy",
    "bypass_other",
    "record_failed",
    "record_moved",
    "record_miss",
    "peer_rewritten",
    "peer_miss",
    "dns_reply_rewritten",
    "dns_reply_miss",
    "spoof_dropped",
    "proxy_unproven",
)

PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_CGROUP_SOCK_ADDR = 18


@dataclass(frozen=True, slots=True)
class Hook:
    name: str  # the .c file and the pin name
    func: str  # the C function
    prog_type: int
    attach_type: int  # enum bpf_attach_type
    bpftool_name: str  # how bpftool cgroup show names the attach type


HOOKS: tuple[Hook, ...] = (
    Hook("connect4", "nm_connect4", PROG_TYPE_CGROUP_SOCK_ADDR, 10, "cgroup_inet4_connect"),
    Hook("connect6", "nm_connect6", PROG_TYPE_CGROUP_SOCK_ADDR, 11, "cgroup_inet6_connect"),
    Hook("sockops", "nm_sockops", PROG_TYPE_SOCK_OPS, 3, "sock_ops"),
    Hook("getpeername4", "nm_getpeername4", PROG_TYPE_CGROUP_SOCK_ADDR, 29,
         "cgroup_inet4_getpeername"),
    Hook("getpeername6", "nm_getpeername6", PROG_TYPE_CGROUP_SOCK_ADDR, 30,
         "cgroup_inet6_getpeername"),
    Hook("sendmsg4", "nm_sendmsg4", PROG_TYPE_CGROUP_SOCK_ADDR, 14, "cgroup_udp4_sendmsg"),
    Hook("recvmsg4", "nm_recvmsg4", PROG_TYPE_CGROUP_SOCK_ADDR, 19, "cgroup_udp4_recvmsg"),
)


@dataclass(frozen=True, slots=True)
class TcProgram:
    """A program the loader pins (``prog_<name>``) for the agent to attach with tc."""

    name: str  # the .c file and the pin name
    func: str
    prog_type: int


# Both run on the host side of a pod's veth (bpf/peerauth.py attaches them).
INBOUND_TC = TcProgram("inbound_tc", "nm_inbound_tc", PROG_TYPE_SCHED_CLS)  # egress
SOURCE_TC = TcProgram("source_tc", "nm_source_tc", PROG_TYPE_SCHED_CLS)  # ingress
TC_PROGRAMS: tuple[TcProgram, ...] = (INBOUND_TC, SOURCE_TC)

# Same values as NM_PA_* / NM_PA_UDP_* in nodemesh.h.
PEER_AUTH_MODES: dict[str, int] = {"DISABLE": 0, "PERMISSIVE": 1, "STRICT": 2}
PEER_AUTH_UDP: dict[str, int] = {"allow": 0, "deny": 1}
SRC_PER_POD = 8  # NM_PA_SRC_PER_POD
PORTS_PER_POD = 32  # NM_PA_PORTS_PER_POD
AF_INET, AF_INET6 = 2, 10


def ip4_to_map(address: str) -> int:
    """The u32 a program sees for ``address`` (network byte order in memory)."""
    return int(struct.unpack("=I", ipaddress.IPv4Address(address).packed)[0])


def ip4_from_map(value: int) -> str:
    return str(ipaddress.IPv4Address(struct.pack("=I", value)))


def port_to_map(port: int) -> int:
    return socket.htons(port)


def port_from_map(value: int) -> int:
    return socket.ntohs(value)


def as_buffer(obj: ctypes.Structure | ctypes._SimpleCData[int]) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(bytes(obj), ctypes.sizeof(obj))
