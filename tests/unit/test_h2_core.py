"""The sans-I/O HTTP/2 core against the independent `h2` implementation, in memory.

Bytes are fed whole, one byte at a time, and with trailing data; every input
either yields events or raises our H2ProtocolError, nothing else.
"""

from __future__ import annotations

import contextlib

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto import hbone
from agent.proto.h2 import frames as fr
from agent.proto.h2.connection import (
    DataReceived,
    Event,
    H2Config,
    H2Connection,
    HeadersReceived,
    StreamReset,
)
from agent.proto.h2.frames import H2ProtocolError


def feed(conn: H2Connection, data: bytes, one_byte: bool) -> list[Event]:
    if not one_byte:
        return conn.receive_data(data)
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(conn.receive_data(data[i : i + 1]))
    return events


def ref_server() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def ref_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def pump_ref(
    ref: h2.connection.H2Connection, ours: H2Connection, one_byte: bool = False
) -> tuple[list, list]:
    """Exchange bytes until both are quiet; returns (ref events, our events)."""
    ref_events: list = []
    our_events: list[Event] = []
    for _ in range(50):
        a = ours.data_to_send()
        if a:
            ref_events.extend(ref.receive_data(a))
        b = ref.data_to_send()
        if b:
            our_events.extend(feed(ours, b, one_byte))
        if not a and not b:
            break
    return ref_events, our_events


@pytest.mark.parametrize("one_byte", [False, True])
def test_our_client_against_reference_server(one_byte: bool) -> None:
    ours = H2Connection(H2Config(client=True))
    ours.initiate()
    ref = ref_server()
    target = hbone.Target("10.244.2.2", 8080)
    sid = ours.send_headers(None, hbone.connect_headers(target, "10.244.1.2", 40000))
    ref_ev, _ = pump_ref(ref, ours, one_byte)
    req = next(e for e in ref_ev if isinstance(e, h2.events.RequestReceived))
    headers = dict(req.headers)
    assert headers[":method"] == "CONNECT" and headers[":authority"] == "10.244.2.2:8080"
    assert hbone.parse_connect(list(req.headers)).target == target
    ref.send_headers(sid, [(":status", "200")])
    ref.send_data(sid, b"hello from the reference")
    _, ev = pump_ref(ref, ours, one_byte)
    assert HeadersReceived(sid, [(":status", "200")], False) in ev
    got = b"".join(e.data for e in ev if isinstance(e, DataReceived))
    assert got == b"hello from the reference"
    # a payload larger than the reference's 64 KiB default window flows as credit arrives
    payload = bytes(range(256)) * 1024  # 256 KiB
    sent = 0
    received = b""
    for _ in range(100):
        n = min(ours.send_window(sid), len(payload) - sent)
        if n:
            ours.send_data(sid, payload[sent : sent + n], end_stream=sent + n == len(payload))
            sent += n
        ref_ev, _ = pump_ref(ref, ours, one_byte=False)
        for e in ref_ev:
            if isinstance(e, h2.events.DataReceived):
                received += e.data
                ref.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        if sent == len(payload) and any(isinstance(e, h2.events.StreamEnded) for e in ref_ev):
            break
    assert received == payload


@pytest.mark.parametrize("one_byte", [False, True])
def test_reference_client_against_our_server(one_byte: bool) -> None:
    ours = H2Connection(H2Config(client=False))
    ours.initiate()
    ref = ref_client()
    sid = ref.get_next_available_stream_id()
    ref.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.244.2.3:80")])
    ref.send_data(sid, b"ping", end_stream=True)
    our_ev = feed(ours, ref.data_to_send(), one_byte)
    req = next(e for e in our_ev if isinstance(e, HeadersReceived))
    assert hbone.parse_connect(req.headers).target == hbone.Target("10.244.2.3", 80)
    data = [e for e in our_ev if isinstance(e, DataReceived)]
    assert b"".join(d.data for d in data) == b"ping" and data[-1].end_stream
    ours.send_headers(sid, hbone.response_headers(200))
    ours.send_data(sid, b"pong", end_stream=True)
    ref_ev = ref.receive_data(ours.data_to_send())
    assert any(
        isinstance(e, h2.events.ResponseReceived) and dict(e.headers)[":status"] == "200" for e in ref_ev
    )
    assert b"".join(e.data for e in ref_ev if isinstance(e, h2.events.DataReceived)) == b"pong"
    assert any(isinstance(e, h2.events.StreamEnded) for e in ref_ev)


def test_trailing_data_after_a_frame_waits_for_the_rest() -> None:
    ours = H2Connection(H2Config(client=False))
    ref = ref_client()
    sid = ref.get_next_available_stream_id()
    ref.send_headers(sid, [(":method", "CONNECT"), (":authority", "1.2.3.4:5")])
    wire = ref.data_to_send()
    ref.send_data(sid, b"x" * 100)
    more = ref.data_to_send()
    ev = ours.receive_data(wire + more[:50])  # a DATA frame cut in the middle
    assert [type(e) for e in ev if not isinstance(e, HeadersReceived)].count(DataReceived) == 0
    ev = ours.receive_data(more[50:])
    assert b"".join(e.data for e in ev if isinstance(e, DataReceived)) == b"x" * 100


def test_bad_preface_is_a_connection_error_with_goaway() -> None:
    ours = H2Connection(H2Config(client=False))
    with pytest.raises(H2ProtocolError, match="preface"):
        ours.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    out = ours.data_to_send()
    assert out[3] == fr.FrameType.GOAWAY


def test_oversized_frame_is_refused_before_its_payload() -> None:
    ours = H2Connection(H2Config(client=True, max_frame_bytes=16_384))
    with pytest.raises(H2ProtocolError) as e:
        ours.receive_data(fr.header(fr.FrameType.DATA, 0, 1, 20_000))
    assert e.value.code == fr.ErrorCode.FRAME_SIZE_ERROR


def test_flow_control_overrun_resets_the_stream() -> None:
    ours = H2Connection(H2Config(client=False, stream_window_bytes=65_535))
    ours.initiate()  # the connection window grows to 64 MiB; the stream's stays at 64 KiB
    ref = ref_client()
    sid = ref.get_next_available_stream_id()
    ref.send_headers(sid, [(":method", "CONNECT"), (":authority", "1.2.3.4:5")])
    ours.receive_data(ref.data_to_send())
    # hand-made DATA beyond the window (the reference would refuse to send it)
    too_much = b"".join(fr.encode(fr.FrameType.DATA, 0, sid, b"z" * 16_000) for _ in range(5))
    ours.data_to_send()
    ours.receive_data(too_much)
    out = ours.data_to_send()
    assert (
        fr.encode(fr.FrameType.RST_STREAM, 0, sid, int(fr.ErrorCode.FLOW_CONTROL_ERROR).to_bytes(4, "big"))
        in out
    )


def test_reset_by_peer_is_an_event() -> None:
    ours = H2Connection(H2Config(client=True))
    ours.initiate()
    ref = ref_server()
    sid = ours.send_headers(None, hbone.connect_headers(hbone.Target("10.0.0.1", 1), "10.0.0.2", 3))
    pump_ref(ref, ours)
    ref.reset_stream(sid, 8)
    _, ev = pump_ref(ref, ours)
    assert StreamReset(sid, 8) in ev


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_events_or_our_protocol_error(data: bytes) -> None:
    ours = H2Connection(H2Config(client=False))
    with contextlib.suppress(H2ProtocolError):
        ours.receive_data(fr.PREFACE + data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10), st.integers(0, 255), st.integers(0, 5), st.binary(max_size=40)),
        max_size=8,
    )
)
def test_arbitrary_frames_give_events_or_our_protocol_error(
    frames_: list[tuple[int, int, int, bytes]],
) -> None:
    ours = H2Connection(H2Config(client=False))
    wire = fr.PREFACE + b"".join(fr.encode(t, f, s, p) for t, f, s, p in frames_)
    with contextlib.suppress(H2ProtocolError):
        ours.receive_data(wire)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(":method", "GET"), (":authority", "1.2.3.4:5")], 405),
        ([(":method", "CONNECT")], 400),
        ([(":method", "CONNECT"), (":authority", "example.com:80")], 400),
        ([(":method", "CONNECT"), (":authority", "1.2.3.4:99999")], 400),
        ([(":method", "CONNECT"), (":authority", "1.2.3.4")], 400),
        ([(":method", "CONNECT"), (":authority", "1.2.3.4:5"), (":path", "/")], 400),
    ],
)
def test_bad_connect_requests(headers: list[tuple[str, str]], status: int) -> None:
    with pytest.raises(hbone.HboneRequestError) as e:
        hbone.parse_connect(headers)
    assert e.value.status == status


def test_connect_round_trip_v6_and_forwarded() -> None:
    t = hbone.Target("fd00::5", 443)
    req = hbone.parse_connect(hbone.connect_headers(t, "fd00::9", 1234))
    assert req.target == t and req.client_address == "fd00::9"


def test_our_hpack_encoder_round_trips_through_the_hpack_decoder() -> None:
    """Header blocks we send (static table and plain literals, no dynamic table) decode to the
    same headers with an independent decoder, also after the peer shrinks its table."""
    import random
    import string

    import hpack
    from hpack.table import HeaderTable

    from agent.proto.h2.hpack_out import Encoder

    enc, dec, rng = Encoder(), hpack.Decoder(), random.Random(3)
    for i in range(2000):
        hs: list[tuple[str, str]] = []
        for _ in range(rng.randint(0, 12)):
            c = rng.random()
            name, value = (x.decode() for x in rng.choice(HeaderTable.STATIC_TABLE))
            if c < 0.3:
                hs.append((name, value))
            elif c < 0.6:
                hs.append((name, "".join(rng.choices(string.printable, k=rng.randint(0, 300)))))
            else:
                long_name = "x-" + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 200)))
                hs.append((long_name, "".join(rng.choices(string.printable + "é€", k=rng.randint(0, 200)))))
        if i == 1000:
            enc.header_table_size = 0  # the peer lowered SETTINGS_HEADER_TABLE_SIZE
        assert dec.decode(enc.encode(hs), raw=False) == hs
