"""Shared helpers for the interception tests (imported by test_interception*.py).

One module-scoped :func:`interception` environment: a 1-node testbed with
four pods, the data path installed on the node's cgroup by a short-lived
``python -m bpf.loader`` process (as the agent would), its pins under
``/sys/fs/bpf/<prefix>-nodemesh``, pod n1-p1 enrolled, and a "proxy"
listener on the node bridge address :15001. Everything carries the run prefix
and is removed in ``finally`` (uninstall, then the testbed), also on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bpf import loader
from bpf.config import CaptureConfig, RedirectTarget
from bpf.maps import Dataplane
from netns import kernel, testbed, topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VIP_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
EXCLUDED_PORT = 7022
MAX_RECORDS = 64  # small, so the map-pressure test can overflow it

# Runs inside a pod: connects `count` sockets to (dst, port), prints one JSON
# line with what each connect saw, optionally streams 1 KiB every 20 ms, and
# exits when stdin closes (or after 60 s at most).
CLIENT = r"""
import json, signal, socket, sys, threading, time
signal.alarm(60)
spec = json.loads(sys.argv[1])
fam = socket.AF_INET6 if spec.get("family") == 6 else socket.AF_INET
socks, out = [], []
for i in range(spec.get("count", 1)):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(spec.get("timeout", 3))
    try:
        s.connect((spec["dst"], spec["port"]))
        out.append({"ok": True, "peer": list(s.getpeername()[:2]),
                    "local": list(s.getsockname()[:2])})
        if spec.get("hello"):
            s.sendall(b"hello %d\n" % i)
    except OSError as e:
        out.append({"ok": False, "errno": e.errno, "err": str(e)})
    socks.append(s)
for s, r in zip(socks, out):  # getpeername again, once every socket is connected
    if r["ok"]:
        r["late_peer"] = list(s.getpeername()[:2])
print(json.dumps(out), flush=True)
sent = [0]
stop = threading.Event()
def stream():
    while not stop.is_set():
        try:
            socks[0].sendall(b"x" * 1024)
        except OSError:
            return
        sent[0] += 1024
        time.sleep(0.02)
if spec.get("stream"):
    threading.Thread(target=stream, daemon=True).start()
sys.stdin.read()
stop.set()
print(json.dumps({"sent": sent[0]}), flush=True)
"""


def prefix() -> str:
    return f"b{secrets.token_hex(3)[:5]}"


@dataclass
class Client:
    proc: subprocess.Popen[bytes]
    results: list[dict[str, Any]]

    def finish(self) -> dict[str, Any]:
        """Close stdin, wait, return the final JSON line."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=10)
        return dict(json.loads(line)) if line else {}


def start_client(netns: str, cgroup_rel: str | None, **spec: Any) -> Client:
    proc = testbed.popen_in(netns, cgroup_rel, [sys.executable, "-c", CLIENT, json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        raise AssertionError(f"client in {netns} printed nothing (exit {proc.returncode})")
    return Client(proc, list(json.loads(line)))


def listen_in(netns: str, ip: str, port: int, *, udp: bool = False) -> socket.socket:
    """A listening (or bound UDP) socket that lives in ``netns``."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        if not udp:
            s.listen(1024)
        return s

    return kernel.run_in_netns(netns, make)


def accept(lsock: socket.socket, timeout_s: float = 3.0) -> socket.socket:
    lsock.settimeout(timeout_s)
    conn, _ = lsock.accept()
    conn.settimeout(timeout_s)
    return conn


def nothing_pending(lsock: socket.socket) -> bool:
    lsock.setblocking(False)
    try:
        conn, _ = lsock.accept()
    except BlockingIOError:
        return True
    finally:
        lsock.setblocking(True)
    conn.close()
    return False


def run_loader(*args: str) -> dict[str, Any]:
    """The loader as the short-lived process it is meant to be."""
    res = subprocess.run([sys.executable, "-m", "bpf.loader", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"loader {args} failed ({res.returncode}): {res.stderr}")
    return dict(json.loads(res.stdout))


def bpftool_cgroup(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", path], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return list(json.loads(out)) if out.strip() else []


@dataclass
class Interception:
    topo: topology.Topology
    node: topology.Node
    pods: dict[str, topology.Pod]
    root: str  # bpffs root of this run
    pin_dir: str
    cgroup: str  # absolute path of the attach cgroup (the node's)
    dp: Dataplane
    proxy: socket.socket  # listener on node gateway :15001
    target: RedirectTarget


@pytest.fixture(scope="module")
def interception() -> Iterator[Interception]:
    p = prefix()
    root = f"/sys/fs/bpf/{p}-nodemesh"
    dp: Dataplane | None = None
    proxy: socket.socket | None = None
    try:
        topo = testbed.up(topology.plan(topology.default_spec(p, 1, 4)))
        node = topo.nodes[0]
        res = run_loader("install", "--cgroup", node.cgroup, "--bpffs-root", root,
                         "--max-records", str(MAX_RECORDS))
        dp = Dataplane.open(root)
        dp.set_capture(CaptureConfig((VIP_CIDR, POD_CIDR), (EXCLUDED_PORT,)))
        target = RedirectTarget(node.gateway)
        pods = {pod.name: pod for pod in node.pods}
        dp.enroll(kernel.netns_path(pods["n1-p1"].netns), target)
        proxy = listen_in(node.netns, node.gateway, target.proxy_port)
        yield Interception(topo, node, pods, root, res["pin_dir"], res["cgroup"], dp, proxy,
                           target)
    finally:
        if proxy is not None:
            proxy.close()
        if dp is not None:
            dp.close()
        try:
            loader.uninstall(root)
        finally:
            testbed.down(p)
