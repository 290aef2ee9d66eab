"""The hand-written etcd protobuf messages: what we write is what etcd's schema says,
what we read survives fields we do not know, and broken bytes fail cleanly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.control import etcd_wire as w


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(min_value=1, max_value=2**29 - 1))
def test_varint_fields_round_trip(value: int, field: int) -> None:
    [(f, wire, v)] = list(w.fields(w.f_int(field, value) or w.f_int(field, 1)))
    assert (f, wire) == (field, 0)
    assert v == (value or 1)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=2000))
def test_bytes_fields_round_trip(value: bytes, field: int) -> None:
    [(f, wire, v)] = list(w.fields(w.f_bytes(field, value)))
    assert (f, wire, bytes(v)) == (field, 2, value)  # type: ignore[arg-type]


def _kv(key: bytes, value: bytes, mod: int) -> bytes:
    return (w.f_bytes(1, key) + w.f_int(2, 7) + w.f_int(3, mod) + w.f_int(4, 1)
            + w.f_bytes(5, value))


def test_range_response_reads_kvs_and_skips_unknown_fields() -> None:
    header = w.f_int(1, 99) + w.f_int(3, 42) + w.f_int(4, 2)
    # fixed64, fixed32 and LEN fields etcd might add one day
    unknown = b"\x49" + b"\x01" * 8 + b"\x55" + b"\x02" * 4 + w.f_bytes(77, b"future")
    raw = (w.f_bytes(1, header) + unknown + w.f_bytes(2, _kv(b"/nodemesh/a", b"{}", 40))
           + w.f_bytes(2, _kv(b"/nodemesh/b", b'{"x":1}', 42)) + w.f_int(4, 2))
    rev, kvs = w.range_response(raw)
    assert rev == 42
    assert [(kv.key, kv.value, kv.mod_revision) for kv in kvs] == [
        (b"/nodemesh/a", b"{}", 40), (b"/nodemesh/b", b'{"x":1}', 42)]


def test_watch_response_events_and_flags() -> None:
    put = w.f_bytes(2, _kv(b"/nodemesh/a", b"1", 5))
    delete = w.f_int(1, w.EVENT_DELETE) + w.f_bytes(2, _kv(b"/nodemesh/b", b"", 5))
    raw = (w.f_bytes(1, w.f_int(3, 5)) + w.f_int(2, 1) + w.f_bool(3, True)
           + w.f_bytes(11, put) + w.f_bytes(11, delete))
    r = w.watch_response(raw)
    assert r.revision == 5 and r.created and not r.canceled and r.compact_revision == 0
    assert [(t, kv.key) for t, kv in r.events] == [(w.EVENT_PUT, b"/nodemesh/a"),
                                                   (w.EVENT_DELETE, b"/nodemesh/b")]
    c = w.watch_response(w.f_bool(4, True) + w.f_int(5, 17) + w.f_bytes(6, b"compacted"))
    assert c.canceled and c.compact_revision == 17 and c.cancel_reason == "compacted"


def test_txn_request_layout_matches_etcds_schema() -> None:
    # TxnRequest{compare=1, success=2}; RequestOp{request_put=2{key=1, value=2}}
    # Compare{result=1 LESS=2, target=2 MOD=2, key=3, mod_revision=6}
    req = w.txn_request([w.compare_mod_less(b"g", 8)], [w.request_op_put(b"k", b"v"),
                                                          w.request_op_delete(b"d")])
    assert req == (b"\x0a\x09" + b"\x08\x02\x10\x02\x1a\x01g\x30\x08"
                   + b"\x12\x08" + b"\x12\x06\x0a\x01k\x12\x01v"
                   + b"\x12\x05" + b"\x1a\x03\x0a\x01d")


@pytest.mark.parametrize("raw", [
    b"\x0a\x05abc",          # LEN field longer than the buffer
    b"\x08\x80",             # varint cut short
    b"\x80",                 # tag cut short
    b"\x0b",                 # wire type 3 (groups) is not supported
    b"\x49\x01\x02",         # fixed64 cut short
])
def test_broken_bytes_raise_wire_error(raw: bytes) -> None:
    with pytest.raises(w.WireError):
        w.range_response(raw)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_wire_error(raw: bytes) -> None:
    try:
        w.watch_response(raw)
        w.range_response(raw)
        w.txn_response(raw)
    except w.WireError:
        pass


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.binary(max_size=400),
                          st.integers(min_value=1, max_value=2**62),
                          st.sampled_from([w.EVENT_PUT, w.EVENT_DELETE])), max_size=20),
       st.integers(min_value=1, max_value=2**62))
def test_watch_events_round_trip_with_multibyte_lengths_and_revisions(
        events: list[tuple[bytes, bytes, int, int]], revision: int) -> None:
    raw = w.f_bytes(1, w.f_int(3, revision)) + b"".join(
        w.f_bytes(11, w.f_int(1, t) + w.f_bytes(2, _kv(k, v, mod)) + w.f_bytes(3, _kv(k, b"old", 1)))
        for k, v, mod, t in events)
    r = w.watch_response(raw)
    assert r.revision == revision
    assert [(t, kv.key, kv.value, kv.mod_revision) for t, kv in r.events] == [
        (t, k, v, mod) for k, v, mod, t in events]
    rev, kvs = w.range_response(w.f_bytes(1, w.f_int(3, revision))
                                + b"".join(w.f_bytes(2, _kv(k, v, mod)) for k, v, mod, _ in events))
    assert rev == revision and [(kv.key, kv.value, kv.mod_revision) for kv in kvs] == [
        (k, v, mod) for k, v, mod, _ in events]


def test_a_watch_answer_becomes_the_net_effect_per_key() -> None:
    from agent.control.etcd import _events
    kv = w.KeyValue
    resp = w.WatchResponse(9, False, False, 0, "", (
        (w.EVENT_PUT, kv(b"/a", b"1", 5)), (w.EVENT_DELETE, kv(b"/a", b"", 6)),  # put, then gone
        (w.EVENT_DELETE, kv(b"/b", b"", 6)), (w.EVENT_PUT, kv(b"/b", b"2", 7)),  # gone, then back
        (w.EVENT_DELETE, kv(b"/c", b"", 7))))
    ev = _events(resp)
    assert (ev.revision, dict(ev.puts), ev.deletes) == (7, {"/b": "2"}, ("/a", "/c"))
