"""Root tests: pods' connections captured by eBPF onto the node proxy (issue 3).

Real kernel, real testbed (netns + cgroups), real programs attached to the
node's cgroup only. See conftest_bpf.py for the shared environment.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from bpf import loader, pins
from bpf.config import BuildConfig, CaptureConfig, RedirectTarget
from bpf.errors import BpfConfigError
from bpf.layout import HOOKS, MAPS
from bpf.maps import Dataplane, netns_cookie
from netns import cgroup, kernel
from tests.integration.conftest_bpf import (
    EXCLUDED_PORT,
    MAX_RECORDS,
    Interception,
    accept,
    bpftool_cgroup,
    interception,
    listen_in,
    nothing_pending,
    run_loader,
    start_client,
)

pytestmark = pytest.mark.root
__all__ = ["interception"]  # the fixture, imported for pytest

VIP = "10.96.0.10"


def _captured_roundtrip(env: Interception, dst: str, port: int, family: int = 4) -> None:
    pod = env.pods["n1-p1"]
    client = start_client(pod.netns, pod.cgroup, dst=dst, port=port, family=family, hello=True)
    try:
        assert client.results[0]["ok"], client.results
        conn = accept(env.proxy)
        with conn:
            peer, local = conn.getpeername(), conn.getsockname()
            assert peer[0] == pod.address
            assert local == (env.node.gateway, 15001)
            orig = env.dp.lookup_original_dst(peer, local)
            assert orig is not None
            assert (orig.ip, orig.port) == (dst.removeprefix("::ffff:"), port)
            assert orig.netns_cookie == netns_cookie(kernel.netns_path(pod.netns))
            assert env.dp.original_dst_of(conn) == orig
            assert conn.recv(64).startswith(b"hello 0")
        # The app sees the service as its peer, not the proxy.
        assert client.results[0]["peer"] == [dst, port]
    finally:
        client.finish()


def test_vip_connection_lands_on_node_proxy_with_original_destination(
        interception: Interception) -> None:
    before = interception.dp.counters()
    _captured_roundtrip(interception, VIP, 80)
    after = interception.dp.counters()
    assert after["captured"] == before["captured"] + 1
    assert after["record_moved"] == before["record_moved"] + 1
    assert after["peer_rewritten"] > before["peer_rewritten"]


def test_v4_mapped_connect6_is_captured(interception: Interception) -> None:
    _captured_roundtrip(interception, "::ffff:10.96.3.4", 8443, family=6)


def test_pod_cidr_destination_is_captured(interception: Interception) -> None:
    _captured_roundtrip(interception, interception.pods["n1-p4"].address, 9000)


def _direct(env: Interception, netns: str, cgroup_rel: str | None, listener: socket.socket,
            dst: str, port: int, want_peer: str) -> None:
    client = start_client(netns, cgroup_rel, dst=dst, port=port)
    try:
        assert client.results[0]["ok"], client.results
        conn = accept(listener)
        with conn:
            assert conn.getpeername()[0] == want_peer
        assert client.results[0]["peer"] == [dst, port]
        assert nothing_pending(env.proxy), "the proxy got a connection it should not"
    finally:
        client.finish()


def test_not_captured(interception: Interception) -> None:
    env = interception
    p1, p2, p3 = env.pods["n1-p1"], env.pods["n1-p2"], env.pods["n1-p3"]
    direct = listen_in(p3.netns, p3.address, 7000)
    excluded = listen_in(p3.netns, p3.address, EXCLUDED_PORT)
    outside = listen_in(env.node.netns, env.node.fabric_address, 7100)
    try:
        c0 = env.dp.counters()
        # An unenrolled pod in the same cgroup tree reaches the pod directly.
        _direct(env, p2.netns, p2.cgroup, direct, p3.address, 7000, p2.address)
        # An excluded port.
        _direct(env, p1.netns, p1.cgroup, excluded, p3.address, EXCLUDED_PORT, p1.address)
        # A destination outside the capture CIDRs (the node's fabric address).
        _direct(env, p1.netns, p1.cgroup, outside, env.node.fabric_address, 7100, p1.address)
        # A process in the enrolled netns but outside the attach cgroup.
        _direct(env, p1.netns, None, direct, p3.address, 7000, p1.address)
        c1 = env.dp.counters()
        assert c1["captured"] == c0["captured"]
        assert c1["bypass_not_enrolled"] > c0["bypass_not_enrolled"]
        assert c1["bypass_excluded_port"] == c0["bypass_excluded_port"] + 1
        assert c1["bypass_not_captured"] == c0["bypass_not_captured"] + 1
    finally:
        for s in (direct, excluded, outside):
            s.close()


def _one_attachment_per_hook(path: str) -> None:
    progs = bpftool_cgroup(path)
    for hook in HOOKS:
        ours = [p for p in progs if p.get("name") == hook.func]
        assert len(ours) == 1, (hook.name, progs)
    assert len(progs) == len(HOOKS), progs


def test_restart_readopts_while_a_stream_flows(interception: Interception) -> None:
    env = interception
    pod = env.pods["n1-p1"]
    client = start_client(pod.netns, pod.cgroup, dst=VIP, port=5001, stream=True)
    try:
        conn = accept(env.proxy)
        with conn:
            key = (conn.getpeername(), conn.getsockname())
            assert env.dp.lookup_original_dst(*key) is not None
            got = 0
            while got < 8 * 1024:
                got += len(conn.recv(65536))
            # The loader process is gone already; a new one starts and adopts.
            res = run_loader("install", "--cgroup", env.cgroup, "--bpffs-root", env.root,
                             "--max-records", str(MAX_RECORDS))
            assert res["adopted"] is True
            assert res["pin_dir"] == env.pin_dir
            _one_attachment_per_hook(env.cgroup)
            # The stream keeps flowing and its record is still there.
            more = 0
            while more < 8 * 1024:
                chunk = conn.recv(65536)
                assert chunk, "stream ended during restart"
                more += len(chunk)
            with Dataplane.open(env.root) as dp2:
                orig = dp2.lookup_original_dst(*key)
                assert orig is not None and (orig.ip, orig.port) == (VIP, 5001)
        # New connections are still captured.
        _captured_roundtrip(env, VIP, 80)
    finally:
        sent = client.finish()
    assert sent["sent"] > 16 * 1024


DNS_ANSWER = "10.96.7.7"


def _dns_reply(query: bytes) -> bytes:
    """A minimal answer: the question, one A record for it."""
    i = 12
    while query[i] != 0:
        i += 1 + query[i]
    question = query[12:i + 5]
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0)
    answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(DNS_ANSWER)
    return header + question + answer


def test_dns_query_reaches_node_dns_port_and_reply_is_accepted(
        interception: Interception) -> None:
    env = interception
    pod = env.pods["n1-p1"]
    resolver = "10.96.0.53"
    udp = listen_in(env.node.netns, env.node.gateway, env.target.dns_port, udp=True)
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def serve() -> None:
        udp.settimeout(0.2)
        while not stop.is_set():
            try:
                data, src = udp.recvfrom(4096)
            except TimeoutError:
                continue
            seen.append(src)
            udp.sendto(_dns_reply(data), src)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        c0 = env.dp.counters()
        # Python's socket API, unconnected: sendmsg4 + recvmsg4.
        code = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3)\n"
            "q=bytes.fromhex('abcd01000001000000000000')+b'\\x03web\\x04mesh\\x00\\x00\\x01\\x00\\x01'\n"
            f"s.sendto(q,('{resolver}',53)); d,src=s.recvfrom(512)\n"
            "print(src[0], src[1], d[:2].hex(), socket.inet_ntoa(d[-4:]))\n"
        )
        out = _run_in_pod(pod, [sys.executable, "-c", code])
        assert out.split() == [resolver, "53", "abcd", DNS_ANSWER]
        # dig, an unmodified resolver client.
        out = _run_in_pod(pod, ["dig", f"@{resolver}", "web.mesh", "A", "+short", "+tries=1",
                                "+time=3", "+notcp"])
        assert out.strip() == DNS_ANSWER
        assert seen and all(src[0] == pod.address for src in seen)
        c1 = env.dp.counters()
        assert c1["dns_captured"] >= c0["dns_captured"] + 2
    finally:
        stop.set()
        t.join(5)
        udp.close()


def _run_in_pod(pod: object, argv: list[str]) -> str:
    from netns import testbed
    proc = testbed.popen_in_pod(pod, argv, stdout=subprocess.PIPE,  # type: ignore[arg-type]
                                stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, (argv, out, err)
    return out.decode()


def test_map_pressure_evicts_oldest_records_and_counts_misses(
        interception: Interception) -> None:
    env = interception
    pod = env.pods["n1-p1"]
    n = MAX_RECORDS * 2
    c0 = env.dp.counters()
    misses0 = env.dp.lookup_misses
    client = start_client(pod.netns, pod.cgroup, dst=VIP, port=6000, count=n)
    accepted: list[socket.socket] = []
    try:
        assert all(r["ok"] for r in client.results), client.results
        for _ in range(n):
            accepted.append(accept(env.proxy))
        by_port = {c.getpeername()[1]: c for c in accepted}
        order = [r["local"][1] for r in client.results]  # connect order
        hits = [env.dp.lookup_original_dst((pod.address, port), by_port[port].getsockname())
                for port in order]
        found = [h is not None for h in hits]
        assert sum(found) <= MAX_RECORDS
        assert not any(found[: n - MAX_RECORDS]), "a record older than the map size survived"
        assert all(found[-MAX_RECORDS // 4:]), "the newest records were evicted"
        assert all(h.port == 6000 for h in hits if h is not None)
        # Misses are counted: by the proxy lookups, and by the app's getpeername.
        assert env.dp.lookup_misses - misses0 == n - sum(found)
        c1 = env.dp.counters()
        late = [tuple(r["late_peer"]) for r in client.results]
        proxy = (env.node.gateway, 15001)
        assert [p == proxy for p in late] == [not f for f in found]
        assert c1["peer_miss"] - c0["peer_miss"] == n - sum(found)
        assert c1["captured"] - c0["captured"] == n
        # Evicted or not, every connection still carries data ...
        for c in accepted:
            c.sendall(b"ok")
        # ... and unrelated connections are unaffected.
        _captured_roundtrip(env, VIP, 80)
    finally:
        for c in accepted:
            c.close()
        client.finish()


def test_bad_input_changes_nothing(interception: Interception) -> None:
    dp = interception.dp
    before = (dp.enrolled(), dp.capture(), dp.fill())
    prefix = interception.topo.prefix
    with pytest.raises(BpfConfigError) as e:
        dp.enroll(f"/run/netns/{prefix}-no-such-pod", interception.target)
    assert "cannot be opened" in e.value.message and e.value.errno != 0
    with pytest.raises(BpfConfigError):
        dp.enroll("/etc/hostname", interception.target)  # a file, not a netns
    with pytest.raises(BpfConfigError):
        dp.enroll(os.getpid(), interception.target)  # our own netns: the proxy's
    with pytest.raises(BpfConfigError) as e2:
        RedirectTarget(interception.node.gateway, proxy_port=70000)
    assert "proxy_port" in e2.value.message
    with pytest.raises(BpfConfigError) as e3:
        CaptureConfig(("10.96.0.1/16",))
    assert "not a network" in e3.value.message
    with pytest.raises(BpfConfigError):
        dp.set_capture(CaptureConfig(tuple(f"10.{i}.0.0/16" for i in range(300))))
    assert (dp.enrolled(), dp.capture(), dp.fill()) == before


def test_enroll_by_pid_and_unenroll(interception: Interception) -> None:
    env = interception
    pod = env.pods["n1-p4"]
    client = start_client(pod.netns, pod.cgroup, dst=pod.address, port=1, timeout=0.5)
    try:
        cookie = env.dp.enroll(client.proc.pid, env.target)
        assert cookie == netns_cookie(kernel.netns_path(pod.netns))
        assert cookie in env.dp.enrolled()
        assert env.dp.unenroll(client.proc.pid) is True
        assert cookie not in env.dp.enrolled()
        assert env.dp.unenroll_cookie(cookie) is False
    finally:
        client.finish()


def test_ctypes_mirrors_match_bcc_types() -> None:
    module = loader.compile_programs(BuildConfig(max_records=16, max_enrolled=1))
    try:
        for name, key, value in MAPS:
            table = module[name.encode()]
            leaf = table.Leaf
            if name == "nm_counters":  # per-CPU: BCC's Leaf is one value per CPU
                leaf = leaf._type_
            for mine, theirs in ((key, table.Key), (value, leaf)):
                assert ctypes.sizeof(mine) == ctypes.sizeof(theirs), name
                if hasattr(theirs, "_fields_"):
                    assert [(f[0], getattr(theirs, f[0]).offset) for f in theirs._fields_] == [
                        (f[0], getattr(mine, f[0]).offset) for f in mine._fields_], name
    finally:
        module.cleanup()


def test_status_and_uninstall_cli(interception: Interception) -> None:
    """Its own install on its own cgroup and bpffs root: uninstall leaves nothing."""
    import json

    from click.testing import CliRunner

    from agent.cli.main import cli

    env = interception
    prefix = env.topo.prefix
    cg_rel = f"{env.topo.cgroup}/uninst"
    root = f"/sys/fs/bpf/{prefix}-uninst"
    cgroup.create(cg_rel)
    try:
        res = run_loader("install", "--cgroup", cg_rel, "--bpffs-root", root)
        path = res["cgroup"]
        prog_ids = [h.prog_id for h in pins.hook_states(res["pin_dir"])]
        runner = CliRunner()
        ok = runner.invoke(cli, ["status", "--bpffs-root", root, "--output", "json"])
        assert ok.exit_code == 0, ok.output
        doc = json.loads(ok.output)
        assert doc["ok"] is True
        assert {h["hook"] for h in doc["hooks"]} == {h.name for h in HOOKS}
        assert all(h["attached"] and h["cgroup"] == path for h in doc["hooks"])
        assert doc["enrolled"] == 0 and "captured" in doc["counters"]

        out = runner.invoke(cli, ["uninstall", "--bpffs-root", root, "--output", "json"])
        assert out.exit_code == 0, out.output
        assert not os.path.exists(root)
        assert bpftool_cgroup(path) == []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # programs are freed asynchronously
            shown = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True,
                                   text=True, check=True).stdout
            if not any(f'"id":{i},' in shown for i in prog_ids):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"programs {prog_ids} still loaded after uninstall")
        bad = runner.invoke(cli, ["status", "--bpffs-root", root])
        assert bad.exit_code != 0
        # And the shared install next door is untouched.
        _one_attachment_per_hook(env.cgroup)
    finally:
        loader.uninstall(root)
        cgroup.remove_tree(cgroup.cgroup_path(cg_rel))
