"""The accept side of a listener: limits, back-off and log bookkeeping without sockets, then
the loop itself on uvloop with a real descriptor shortage (RLIMIT_NOFILE in a child)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import config
from agent.dataplane.listener import (
    MAX_BACKOFF_S,
    ConnectionTable,
    FdReserve,
    ListenerHealth,
    ListenerLimits,
    backoff_s,
)
from agent.ratelog import LogLimiter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_limits_per_listener_and_per_peer() -> None:
    t = ConnectionTable(ListenerLimits(max_connections=3, max_connections_per_peer=2))
    assert t.admit("10.0.0.1") is None and t.admit("10.0.0.1") is None
    assert t.admit("10.0.0.1") == "peer_limit"  # a third from the same address
    assert t.admit("10.0.0.2") is None
    assert t.admit("10.0.0.3") == "listener_limit"
    t.release("10.0.0.1")
    assert t.open == 2 and t.of_peer("10.0.0.1") == 1
    assert t.admit("10.0.0.3") is None
    with pytest.raises(ValueError, match="not admitted"):
        t.release("10.9.9.9")


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c"])), max_size=200))
def test_table_never_exceeds_its_limits_and_counts_back_to_zero(ops: list[tuple[bool, str]]) -> None:
    lim = ListenerLimits(max_connections=5, max_connections_per_peer=3)
    t = ConnectionTable(lim)
    held: list[str] = []
    for admit, peer in ops:
        if admit:
            if t.admit(peer) is None:
                held.append(peer)
        elif peer in held:
            held.remove(peer)
            t.release(peer)
        assert t.open == len(held) <= lim.max_connections
        assert all(t.of_peer(p) == held.count(p) <= lim.max_connections_per_peer for p in "abc")
    for p in held:
        t.release(p)
    assert t.open == 0


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ListenerLimits(0, 1)
    with pytest.raises(ValueError, match="above max_connections"):
        ListenerLimits(2, 3)


def test_backoff_is_brief_and_bounded() -> None:
    assert backoff_s(0) == 0.0
    steps = [backoff_s(n) for n in range(1, 40)]
    assert steps[0] <= 0.01 and steps == sorted(steps) and max(steps) == MAX_BACKOFF_S <= 0.25


def test_log_limiter_one_line_per_interval_counting_what_it_held() -> None:
    lim = LogLimiter(interval_s=10.0)
    assert lim.tick("hbone:fail", 100.0) == 1
    assert [lim.tick("hbone:fail", 100.0 + i / 10) for i in range(1, 50)] == [None] * 49
    assert lim.tick("dns_tcp:fail", 101.0) == 1  # per key
    assert lim.tick("hbone:fail", 110.0) == 50  # this line and the 49 held back


def test_health_names_the_listener_and_the_errno() -> None:
    h = ListenerHealth("hbone", False, 2.04, "EMFILE (Too many open files)", 7, 0, 200)
    assert h.problem() == "listener hbone cannot accept for 2.0s: EMFILE (Too many open files)"
    assert ListenerHealth("hbone", True, None, None, 7, 0, 3).problem() is None


def test_reserve_hands_back_descriptors_one_at_a_time() -> None:
    r = FdReserve(size=3)
    try:
        assert r.held == 3
        assert r.release() and r.release() and r.release() and not r.release()
        r.refill()
        assert r.held == 3
    finally:
        r.close()


def test_config_limits_section() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.0.0.1"}}
    d = config.from_mapping(base).limits
    assert d.hbone_handshake_timeout_s == 3.0 and d.of("dns_tcp").max_connections_per_peer == 64
    c = config.from_mapping(
        {**base, "limits": {"hbone_handshake_timeout_s": 1.5,
                            "listeners": {"hbone": {"max_connections_per_peer": 10}}}}
    ).limits
    assert c.hbone_handshake_timeout_s == 1.5
    assert c.of("hbone") == ListenerLimits(16384, 10) and c.of("outbound") == d.of("outbound")
    for bad, where in (
        ({"listeners": {"hbone": {"max_connections": 0}}}, "limits.listeners.hbone.max_connections"),
        ({"listeners": {"hbone": {"max_connections": 5}}}, "limits.listeners.hbone.max_connections_per_peer"),
        ({"listeners": {"ssh": {}}}, "limits.listeners.ssh"),
        ({"hbone_handshake_timeout_s": 0}, "limits.hbone_handshake_timeout_s"),
    ):
        with pytest.raises(config.ConfigError, match=where.replace(".", r"\.")):
            config.from_mapping({**base, "limits": bad})


# A listener on uvloop in a child whose RLIMIT_NOFILE is tiny; this test holds 80 connections
# open to it, its handler first keeps every accepted socket, so accept() fails with EMFILE. The
# loop must say so, keep going, and accept all the rest once descriptors are free again.
CHILD = textwrap.dedent(
    """
    import asyncio, resource, sys, uvloop
    from agent.dataplane.listener import Listener, ListenerLimits
    from agent.admin import listen_tcp

    async def main():
        srv = listen_tcp("127.0.0.1", 0)
        lst = Listener("test", ListenerLimits(10000, 10000))
        held, served = [], []
        async def handle(conn, addr):
            if served:
                conn.close()
                served.append(conn)
            else:
                held.append(conn)
        task = asyncio.create_task(lst.serve(srv, handle))
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        print(srv.getsockname()[1], flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the parent's connections are open
        await asyncio.sleep(0.3)
        h = lst.health()
        print("exhausted", h.accepting, h.last_error.split()[0], task.done(), len(held) < 80, flush=True)
        served.append(None)  # from now on the handler closes what it gets
        for s in held:
            s.close()
        await asyncio.sleep(0.5)
        h = lst.health()
        print("recovered", h.accepting, task.done(), h.accept_errors > 0, len(held) + len(served) - 1,
              flush=True)

    uvloop.run(main())
    """
)


def test_accept_loop_survives_emfile_reports_it_and_recovers() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    clients: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=20)
    finally:
        for c in clients:
            c.close()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert lines == ["exhausted False EMFILE False True", "recovered True False True 80"], (lines, err)
    assert err.count("cannot accept") == 1, err  # one line, however many retries
