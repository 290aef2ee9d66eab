"""nodemesh's own gRPC client against a real etcd: large calls cross HTTP/2 flow
control, etcd's refusals arrive as clear errors, a dead etcd is 'unreachable'."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.control import etcd_wire as wire
from agent.control.errors import BackendUnavailable, RegistryError
from agent.control.etcd import EtcdBackend
from agent.control.h2grpc import GrpcConnection, GrpcError
from agent.control.model import PREFIX
from tests.integration.etcd_fixture import Etcd, running_etcd


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    with running_etcd() as e:
        yield e


def test_a_commit_far_larger_than_one_flow_control_window_round_trips(etcd: Etcd) -> None:
    # 3,000 puts of ~300 bytes: ~1 MB, fifteen times HTTP/2's initial 64 KiB window
    puts = {f"{PREFIX}workload/big/w-{i:05d}": '{"pad":"' + "x" * 280 + f'","i":{i}}}'
                for i in range(3000)}
    b = EtcdBackend(etcd.url)
    watcher = EtcdBackend(etcd.url)
    try:
        start = b.read().revision
        assert watcher.changes(start, 2.0) is None  # watch established, nothing yet
        rev = b.commit(puts, expect_revision=start)
        items = b.read().items
        assert {k: items.get(k) for k in puts} == puts
        got: dict[str, str] = {}
        while len(got) < len(puts):
            ch = watcher.changes(start, 5.0)
            assert ch is not None, f"watch delivered {len(got)} of {len(puts)} puts"
            got.update({k: v for k, v in ch.puts.items() if k in puts})  # type: ignore[union-attr]
            start = ch.revision
        assert got == puts and start == rev
    finally:
        b.close()
        watcher.close()


def test_etcd_refusals_are_named(etcd: Etcd) -> None:
    host, port = etcd.url.removeprefix("http://").split(":")
    c = GrpcConnection(host, int(port))
    try:
        dup = wire.txn_request([], [wire.request_op_put(b"/nodemesh/x", b"1"),
                                    wire.request_op_put(b"/nodemesh/x", b"2")])
        with pytest.raises(GrpcError) as e:
            c.unary("/etcdserverpb.KV/Txn", dup)
        assert e.value.status == 3 and "duplicate key" in e.value.message
        with pytest.raises(GrpcError) as e:
            c.unary("/etcdserverpb.KV/NoSuchMethod", b"")
        assert e.value.status == 12
        # the connection is still good after refused calls
        rev, _ = wire.range_response(c.unary("/etcdserverpb.KV/Range",
                                             wire.range_request(b"/nodemesh/", b"/nodemesh0")))
        assert rev >= 1
    finally:
        c.close()
    b = EtcdBackend(etcd.url)
    try:
        with pytest.raises(RegistryError, match=r"rejected Compact: .*future revision"):
            b.compact(10_000)
    finally:
        b.close()


def test_dead_etcd_is_unreachable_and_a_restart_is_picked_up(etcd: Etcd) -> None:
    b = EtcdBackend(etcd.url, timeout_s=2.0)
    try:
        b.commit({f"{PREFIX}service/a/b": "{}"})
        etcd.kill()
        with pytest.raises(BackendUnavailable, match=f"etcd at {etcd.url} is unreachable"):
            b.read()
        etcd.start()
        assert f"{PREFIX}service/a/b" in b.read().items  # same backend object, new connection
    finally:
        b.close()
