#!/usr/bin/env python3
"""Cost of the peer-authentication tc filter per packet, with and without port modes.

Not a test: a benchmark, run by hand (as root) from the repository root:

    .venv/bin/python scripts/bench_peerauth.py [--rounds 5] [--repeat 1000000] [--json out.json]

It builds its own 1-node testbed with one pod (prefix ``bp<random>``), installs the data path
on the node's cgroup with the loader process, binds the pod's host-side veth as the agent does,
and runs the pinned ``inbound_tc`` program with BPF_PROG_TEST_RUN on real packets, as the
kernel would on that veth (``__sk_buff.ifindex`` = the veth, in the node's netns): the run's
average time per packet, medians over the rounds. Cases:

* ``established``: a TCP ACK (not connection-opening): passes before any mode is looked at;
* ``syn, no port modes``: a SYN to a STRICT pod without port modes (refused: one lookup);
* ``syn, port modes (1 / 32)``: the same pod with 1 or 32 port modes, none for this port
  (refused by the pod's mode after the port lookup);
* ``syn, port mode hit``: a SYN to a port the pod has PERMISSIVE (passes);
* ``syn ipv6, port modes``: the same over IPv6 link-local addresses.

The verdict of every case is checked (TC_ACT_SHOT 2 / TC_ACT_OK 0). Everything it creates is
removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import ipaddress
import json
import os
import secrets
import statistics
import struct
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchplot  # (scripts/, this script's own directory)

from bpf import loader, peerauth, pins, syscall
from bpf.layout import INBOUND_TC
from bpf.maps import Dataplane
from netns import kernel, testbed, topology

PROG_TEST_RUN = 10
SKB_IFINDEX_OFF = 40  # struct __sk_buff: ifindex
SKB_CTX_BYTES = 48
PORT, OPEN_PORT = 8080, 9090
SOURCE4 = "10.250.0.77"  # a peer on another node (not the proxy)
SOURCE6 = "fe80::77"
ACT_OK, ACT_SHOT = 0, 2


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int(x) for x in struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def packet(src: str, dst: str, dport: int, flags: int) -> bytes:
    """Ethernet + IPv4 or IPv6 + a 20-byte TCP header."""
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if ":" in dst:
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + ipaddress.IPv6Address(src).packed \
            + ipaddress.IPv6Address(dst).packed
        eth_type = 0x86DD
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                          ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
        ip = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        eth_type = 0x0800
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + struct.pack("!H", eth_type) + ip + tcp


def test_run(prog_fd: int, data: bytes, ifindex: int, repeat: int) -> tuple[int, int]:
    """(verdict, average ns per run) of the program on ``data`` arriving at ``ifindex``."""
    buf = ctypes.create_string_buffer(data, len(data))
    ctx = ctypes.create_string_buffer(SKB_CTX_BYTES)
    struct.pack_into("=I", ctx, SKB_IFINDEX_OFF, ifindex)
    attr = syscall._attr("=IIIIQQIIIIQQIII", prog_fd, 0, len(data), 0, ctypes.addressof(buf), 0, repeat, 0,
                         SKB_CTX_BYTES, 0, ctypes.addressof(ctx), 0, 0, 0, 0)
    syscall.bpf(PROG_TEST_RUN, attr, "test-run inbound_tc")
    retval = struct.unpack_from("=I", attr, 4)[0]
    duration = struct.unpack_from("=I", attr, 36)[0]
    return retval, duration


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--without-port-modes", action="store_true",
                    help="only the cases without port modes (runs on a tree from before them, to compare)")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 50 or not 1000 <= args.repeat <= 10_000_000:
        ap.error("--rounds 1-50, --repeat 1000-10000000")
    prefix = f"bp{secrets.token_hex(3)[:5]}"
    root = f"/sys/fs/bpf/{prefix}-nodemesh"
    dp: Dataplane | None = None
    try:
        topo = testbed.up(topology.plan(topology.default_spec(prefix, 1, 1)))
        node = topo.nodes[0]
        pod = node.pods[0]
        subprocess.run([sys.executable, "-m", "bpf.loader", "install", "--cgroup", node.cgroup,
                        "--bpffs-root", root, "--max-enrolled", "16", "--max-records", "64"],
                       check=True, capture_output=True, timeout=120)
        dp = Dataplane.open(root)
        [link] = peerauth.pod_links(pod.netns)
        dp.set_peer_auth(pod.address, "STRICT", pod.gateway)
        dp.attach_pod_filters(node.netns, pod.host_ifname, pod.address, [*link.ip4, *link.ip6])
        ifindex = peerauth.host_ifindex(node.netns, pod.host_ifname)
        pod6 = next(a for a in link.ip6 if a.startswith("fe80"))
        prog_fd = syscall.obj_get(pins.prog_pin(dp.pin_dir, INBOUND_TC))
        syn, ack = 0x02, 0x10
        many = (*((p, "PERMISSIVE") for p in range(20000, 20000 + 31)), (OPEN_PORT, "PERMISSIVE"))
        cases: list[tuple[str, tuple[tuple[int, str], ...], bytes, int]] = [
            ("established (ACK)", (), packet(SOURCE4, pod.address, PORT, ack), ACT_OK),
            ("syn, no port modes", (), packet(SOURCE4, pod.address, PORT, syn), ACT_SHOT),
            ("syn, 1 port mode, miss", ((OPEN_PORT, "PERMISSIVE"),), packet(SOURCE4, pod.address, PORT, syn),
             ACT_SHOT),
            ("syn, 32 port modes, miss", many, packet(SOURCE4, pod.address, PORT, syn), ACT_SHOT),
            ("syn, port mode hit", many, packet(SOURCE4, pod.address, OPEN_PORT, syn), ACT_OK),
            ("syn ipv6, no port modes", (), packet(SOURCE6, pod6, PORT, syn), ACT_SHOT),
            ("syn ipv6, 32 port modes", many, packet(SOURCE6, pod6, PORT, syn), ACT_SHOT),
        ]
        if args.without_port_modes:
            cases = [c for c in cases if not c[1]]
        results: dict[str, list[int]] = {name: [] for name, *_ in cases}
        try:
            for _ in range(args.rounds):
                for name, ports, data, want in cases:  # alternating, so drift hits every case alike
                    if ports:
                        dp.set_peer_auth(pod.address, "STRICT", pod.gateway, ports=ports)
                    else:  # (also on a tree from before port modes)
                        dp.set_peer_auth(pod.address, "STRICT", pod.gateway)
                    verdict, ns = kernel.run_in_netns(  # the ifindex is the node netns's
                        node.netns, functools.partial(test_run, prog_fd, data, ifindex, args.repeat))
                    if verdict != want:
                        raise SystemExit(f"{name}: verdict {verdict}, expected {want}")
                    results[name].append(ns)
        finally:
            os.close(prog_fd)
        doc: dict[str, Any] = {"repeat": args.repeat, "rounds": args.rounds, "kernel": os.uname().release,
                               "ns_per_packet": {k: {"median": statistics.median(v), "runs": v}
                                                 for k, v in results.items()}}
        base = statistics.median(results["syn, no port modes"])
        print(f"inbound_tc per packet, median of {args.rounds} rounds x {args.repeat} runs "
              f"(BPF_PROG_TEST_RUN, kernel {os.uname().release})")
        for name, v in results.items():
            m = statistics.median(v)
            print(f"  {name:<28} {m:>5} ns   ({m - base:+d} ns vs a SYN without port modes)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
            benchplot.bars(benchplot.png_next_to(args.json), "inbound_tc per packet (BPF_PROG_TEST_RUN)",
                           list(results), [statistics.median(v) for v in results.values()], "ns",
                           rotate=30)
        return 0
    finally:
        if dp is not None:
            dp.close()
        loader.uninstall(root)
        testbed.down(prefix)


if __name__ == "__main__":
    raise SystemExit(main())
