"""DNS wire codec (property-tested) and the pure answer logic."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control import dns_wire as w
from agent.control.dns import answer, parse_name, resolve
from agent.control.model import Protocol, Service, ServicePort
from agent.control.snapshot import Snapshot, SnapshotBuilder


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_decode_parses_or_raises_our_error(data: bytes) -> None:
    with contextlib.suppress(w.DnsFormatError):
        w.decode(data)


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
names = st.lists(labels, min_size=0, max_size=5).map(".".join)
records = st.one_of(
    st.builds(lambda n, a: w.Record(n, w.A, w.CLASS_IN, 5, a), names, st.ip_addresses(v=4).map(str)),
    st.builds(lambda n, a: w.Record(n, w.AAAA, w.CLASS_IN, 5, a), names,
              st.ip_addresses(v=6).map(str)),
    st.builds(lambda n, p, t: w.Record(n, w.SRV, w.CLASS_IN, 5, w.Srv(0, 1, p, t)), names,
              st.integers(0, 65535), names),
    st.builds(lambda n, b: w.Record(n, w.TXT, w.CLASS_IN, 0, b), names, st.binary(max_size=40)),
)
messages = st.builds(
    w.Message, id=st.integers(0, 65535), qr=st.booleans(), rd=st.booleans(),
    rcode=st.integers(0, 15),
    questions=st.lists(st.builds(w.Question, names, st.sampled_from([w.A, w.AAAA, w.SRV])),
                       max_size=2).map(tuple),
    answers=st.lists(records, max_size=3).map(tuple),
    additional=st.lists(records, max_size=2).map(tuple),
)


@given(messages)
def test_encode_decode_roundtrip(m: w.Message) -> None:
    assert w.decode(w.encode(m)) == m


@given(messages, st.integers(0, 40))
def test_truncated_or_extended_messages_raise_our_error(m: w.Message, cut: int) -> None:
    data = w.encode(m)
    for bad in (data[:max(0, len(data) - 1 - cut)], data + b"\x00" * (cut + 1)):
        try:
            w.decode(bad)
        except w.DnsFormatError:
            continue
        raise AssertionError("malformed message decoded")


def test_compression_pointers_decode_and_loops_are_rejected() -> None:
    # header, question "a.b" at 12, answer name = pointer to 12
    q = b"\x01a\x01b\x00" + b"\x00\x01\x00\x01"
    ans = b"\xc0\x0c" + b"\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04" + bytes([10, 96, 0, 1])
    m = w.decode(b"\x00\x07\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + q + ans)
    assert m.answers[0] == w.Record("a.b", w.A, w.CLASS_IN, 5, "10.96.0.1")
    loop = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\xc0\x0c\x00\x01\x00\x01"
    try:
        w.decode(loop)
    except w.DnsFormatError as e:
        assert "pointer" in str(e)
    else:
        raise AssertionError("pointer loop accepted")


def snap() -> Snapshot:
    s = Service(name="web", namespace="shop", vip="10.96.0.7",
                ports=(ServicePort("http", 80, 8080, Protocol.HTTP),
                       ServicePort("grpc", 9090, 9090, Protocol.GRPC)))
    b = SnapshotBuilder()
    b.reset({s.key: json.dumps(s.to_doc())})
    return b.build(3)


def query(name: str, qtype: int) -> w.Message:
    return w.Message(id=42, rd=True, questions=(w.Question(name, qtype),))


def test_name_forms() -> None:
    assert parse_name("web.shop.svc.cluster.local").service == "web"  # type: ignore[union-attr]
    assert parse_name("web.service.consul").namespace == "default"  # type: ignore[union-attr]
    lk = parse_name("_http._tcp.web.shop.svc.cluster.local")
    assert lk is not None and lk.port_label == "http"
    assert parse_name("example.org.") is None or not parse_name("example.org").authoritative  # type: ignore[union-attr]
    assert parse_name("www.example.org") is None


def test_a_srv_nxdomain_and_forward() -> None:
    s = snap()
    for name in ("web.shop.svc.cluster.local", "web.shop"):
        r = resolve(query(name, w.A), s)
        assert r is not None and r.rcode == w.NOERROR and r.answers[0].data == "10.96.0.7"
    r = resolve(query("web.shop.svc.cluster.local", w.AAAA), s)
    assert r is not None and r.rcode == w.NOERROR and r.answers == ()
    r = resolve(query("web.shop.svc.cluster.local", w.SRV), s)
    assert r is not None and sorted(a.data.port for a in r.answers) == [80, 9090]  # type: ignore[union-attr]
    r = resolve(query("_grpc._tcp.web.shop.svc.cluster.local", w.SRV), s)
    assert r is not None and [a.data.port for a in r.answers] == [9090]  # type: ignore[union-attr]
    r = resolve(query("nope.shop.svc.cluster.local", w.A), s)
    assert r is not None and r.rcode == w.NXDOMAIN and r.aa
    assert resolve(query("nope.shop", w.A), s) is None  # not ours: forward
    assert resolve(query("www.example.org", w.A), s) is None


def test_answer_bytes_and_garbage() -> None:
    out = answer(w.encode(query("web.shop", w.A)), snap(), udp=True)
    assert out is not None and w.decode(out).id == 42
    out = answer(b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6, snap(), udp=True)
    assert out is not None and w.decode(out).rcode == w.FORMERR
    assert answer(b"\x01", snap(), udp=True) == b""
