#!/usr/bin/env python3
"""connect()+close() rate from a pod, eBPF data path attached vs detached.

Not a test: a benchmark, run by hand (as root) from the repository root:

    .venv/bin/python scripts/bench_connect.py [--rounds 5] [--seconds 2] [--json out.json]

It builds its own 1-node testbed (prefix ``bc<random>``), alternates rounds with
the programs attached (installed on the node cgroup, pod enrolled) and
detached (uninstalled), and measures two paths with a client inside the pod:

* ``bypass``: to a listener on 127.0.0.1 in the pod: every connect runs
  connect4 and sock_ops, decides "not captured", and goes on.
* ``captured``: attached, to a service VIP, rewritten onto the node listener
  at gateway:15001 (decision, record, sock_ops move); detached, straight to
  that same listener: the cost of capture itself.

Clients close with SO_LINGER 0 (no TIME_WAIT pile-up). Results: per-round
rates, medians, and the ratio attached/detached (target >= 0.9), as JSON.
Everything it creates is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchplot  # (scripts/, this script's own directory)

from bpf import loader
from bpf.config import CaptureConfig, RedirectTarget
from bpf.maps import Dataplane
from netns import kernel, testbed, topology

SERVER = r"""
import signal, socket, sys
signal.alarm(900)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

CLIENT = r"""
import json, socket, struct, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
linger = struct.pack("ii", 1, 0)
n, t0 = 0, time.perf_counter()
end = t0 + seconds
while time.perf_counter() < end:
    for _ in range(100):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.connect((host, port))
        s.close()
    n += 100
print(json.dumps({"connects": n, "seconds": time.perf_counter() - t0}))
"""

VIP = "10.96.0.10"


def _server(netns: str, host: str, port: int) -> subprocess.Popen[bytes]:
    p = testbed.popen_in(netns, None, [sys.executable, "-c", SERVER, host, str(port)],
                         stdout=subprocess.PIPE)
    assert p.stdout is not None
    if p.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"server in {netns} did not start")
    return p


def _client(pod: topology.Pod, host: str, port: int, seconds: float) -> float:
    p = testbed.popen_in_pod(pod, [sys.executable, "-c", CLIENT, host, str(port), str(seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"client failed: {err.decode()}")
    doc = json.loads(out)
    return float(doc["connects"]) / float(doc["seconds"])


def run(rounds: int, seconds: float) -> dict[str, Any]:
    prefix = f"bc{secrets.token_hex(2)}"
    root = f"/sys/fs/bpf/{prefix}-nodemesh"
    servers: list[subprocess.Popen[bytes]] = []
    rates: dict[str, dict[str, list[float]]] = {
        s: {"attached": [], "detached": []} for s in ("bypass", "captured")}
    try:
        topo = testbed.up(topology.plan(topology.default_spec(prefix, 1, 1)))
        node, pod = topo.nodes[0], topo.nodes[0].pods[0]
        servers.append(_server(pod.netns, "127.0.0.1", 9000))
        servers.append(_server(node.netns, node.gateway, 15001))
        for r in range(rounds):
            order = ("attached", "detached") if r % 2 == 0 else ("detached", "attached")
            for mode in order:
                if mode == "attached":
                    loader.install(node.cgroup, bpffs_root=root)
                    with Dataplane.open(root) as dp:
                        dp.set_capture(CaptureConfig(("10.96.0.0/16", "10.244.0.0/16")))
                        dp.enroll(kernel.netns_path(pod.netns), RedirectTarget(node.gateway))
                    dst = (VIP, 80)
                else:
                    loader.uninstall(root)
                    dst = (node.gateway, 15001)
                rates["bypass"][mode].append(_client(pod, "127.0.0.1", 9000, seconds))
                rates["captured"][mode].append(_client(pod, dst[0], dst[1], seconds))
            print(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{s} {m} {rates[s][m][-1]:.0f}/s" for s in rates for m in rates[s]),
                file=sys.stderr)
    finally:
        for p in servers:
            p.kill()
            p.wait()
        loader.uninstall(root)
        testbed.down(prefix)
    result: dict[str, Any] = {"rounds": rounds, "seconds_per_run": seconds,
                              "kernel": os.uname().release, "cpus": os.cpu_count()}
    for scenario, by_mode in rates.items():
        med = {m: statistics.median(v) for m, v in by_mode.items()}
        result[scenario] = {
            "connects_per_s": by_mode,
            "median_attached": round(med["attached"], 1),
            "median_detached": round(med["detached"], 1),
            "ratio": round(med["attached"] / med["detached"], 3),
        }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, choices=range(1, 51), metavar="1..50")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    if not 0.2 <= args.seconds <= 30:
        ap.error("--seconds must be between 0.2 and 30")
    if os.geteuid() != 0:
        ap.error("needs root (netns, cgroups, eBPF)")
    t0 = time.monotonic()
    result = run(args.rounds, args.seconds)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
        benchplot.bars(benchplot.png_next_to(args.json), "connect() per second, BPF attached vs not",
                       ["bypass", "captured"],
                       [result[s]["median_attached"] for s in ("bypass", "captured")], "connects/s (median)",
                       second=[result[s]["median_detached"] for s in ("bypass", "captured")],
                       legend=("attached", "detached"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
