"""HTTP/2 core against hostile peers: RFC 9113 stream states, REFUSED_STREAM, flood limits.

Rules are checked with frames fed whole, one byte at a time, and followed by
the start of another frame; attacks are replayed with the `h2` library as the
peer, on a simulated clock (``now_s``), as the CVE-2023-44487 tools send them.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hpack
import pytest

from agent.proto.h2 import frames as fr
from agent.proto.h2.connection import (
    DataReceived,
    Event,
    H2Config,
    H2Connection,
    HeadersReceived,
    StreamReset,
)
from agent.proto.h2.frames import ErrorCode, Flag, FrameType, H2ProtocolError

MODES = ["whole", "bytewise", "trailing"]
REQ = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


def feed(conn: H2Connection, data: bytes, mode: str, now_s: float | None = None) -> list[Event]:
    kw = {} if now_s is None else {"now_s": now_s}
    if mode == "whole":
        return conn.receive_data(data, **kw)
    # bytewise: one byte per call; trailing: whole frames followed by the start of the last one
    cuts = range(len(data)) if mode == "bytewise" else (0, max(0, len(data) - 3))
    events: list[Event] = []
    for a, b in zip(cuts, [*cuts[1:], len(data)], strict=True):
        events.extend(conn.receive_data(data[a:b], **kw))
    return events


def frames_out(wire: bytes) -> list[fr.Frame]:
    frames, used = fr.split(bytearray(wire), fr.MAX_ALLOWED_FRAME_BYTES)
    assert used == len(wire)
    return frames


def rst(sid: int, code: int) -> bytes:
    return fr.encode(FrameType.RST_STREAM, 0, sid, int(code).to_bytes(4, "big"))


def goaway_code(wire: bytes) -> int:
    ga = [f for f in frames_out(wire) if f.type == FrameType.GOAWAY]
    assert ga, "no GOAWAY was queued"
    return int.from_bytes(ga[-1].payload[4:8], "big")


class Peer:
    """A hand-driven client: frames we choose, header blocks from its own HPACK encoder."""

    def __init__(self, config: H2Config | None = None) -> None:
        self.ours = H2Connection(config or H2Config(client=False))
        self.ours.initiate()
        self.enc = hpack.Encoder()
        self.ours.receive_data(fr.PREFACE + fr.encode(FrameType.SETTINGS, 0, 0))
        self.ours.data_to_send()

    def headers(self, sid: int, end_stream: bool = False, headers: list[tuple[str, str]] = REQ) -> bytes:
        flags = Flag.END_HEADERS | (Flag.END_STREAM if end_stream else 0)
        return fr.encode(FrameType.HEADERS, flags, sid, self.enc.encode(headers))


# -- RFC 9113 stream states ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "frame",
    [
        fr.encode(FrameType.DATA, 0, 5, b"hello"),
        fr.encode(FrameType.WINDOW_UPDATE, 0, 5, (100).to_bytes(4, "big")),
        rst(5, ErrorCode.CANCEL),
        fr.encode(FrameType.DATA, 0, 2, b"x"),  # the server's parity: it never opened one
    ],
    ids=["data", "window_update", "rst_stream", "data_even"],
)
def test_frame_on_an_idle_stream_is_a_connection_error(frame: bytes, mode: str) -> None:
    p = Peer()
    p.ours.receive_data(p.headers(1))  # stream 1 open; 5 was never opened
    with pytest.raises(H2ProtocolError, match="idle stream") as e:
        feed(p.ours, frame, mode)
    assert e.value.code == ErrorCode.PROTOCOL_ERROR
    assert goaway_code(p.ours.data_to_send()) == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("mode", MODES)
def test_data_on_an_idle_stream_of_a_client(mode: str) -> None:
    ours = H2Connection(H2Config(client=True))
    ours.initiate()
    ours.receive_data(fr.encode(FrameType.SETTINGS, 0, 0))
    sid = ours.send_headers(None, REQ)
    with pytest.raises(H2ProtocolError, match="idle stream 3"):
        feed(ours, fr.encode(FrameType.DATA, 0, sid + 2, b"x"), mode)


@pytest.mark.parametrize("mode", MODES)
def test_data_on_a_closed_stream_is_a_stream_error_and_credits_the_connection(mode: str) -> None:
    p = Peer(H2Config(client=False, connection_window_bytes=65_535))
    p.ours.receive_data(p.headers(1, end_stream=True))
    p.ours.send_headers(1, [(":status", "200")], end_stream=True)  # closed both ways
    p.ours.data_to_send()
    ev = feed(p.ours, fr.encode(FrameType.DATA, 0, 1, b"z" * 16_384) + p.headers(3), mode)
    out = frames_out(p.ours.data_to_send())
    assert rst(1, ErrorCode.STREAM_CLOSED) in [
        fr.encode(f.type, f.flags, f.stream_id, f.payload) for f in out
    ]
    # the 16 KiB were credited back on the connection window (batched at a quarter of 64 KiB)
    assert any(f.type == FrameType.WINDOW_UPDATE and f.stream_id == 0 for f in out)
    assert [e.stream_id for e in ev if isinstance(e, HeadersReceived)] == [3]  # the connection goes on
    assert p.ours.stats["stream_error"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_second_headers_without_end_stream_resets_the_stream(mode: str) -> None:
    p = Peer()
    p.ours.receive_data(p.headers(1))
    ev = feed(p.ours, p.headers(1, headers=[*REQ, ("x-again", "1")]) + p.headers(3), mode)
    assert rst(1, ErrorCode.PROTOCOL_ERROR) in p.ours.data_to_send()
    assert not p.ours.is_open(1)
    # HPACK stayed in step: stream 3's block (encoded after the refused one) decodes
    assert [(e.stream_id, e.headers) for e in ev if isinstance(e, HeadersReceived)] == [(3, REQ)]


def test_trailers_with_end_stream_are_allowed() -> None:
    p = Peer()
    p.ours.receive_data(p.headers(1))
    ev = p.ours.receive_data(p.headers(1, end_stream=True, headers=[("x-trailer", "t")]))
    assert ev == [HeadersReceived(1, [("x-trailer", "t")], True)]


@pytest.mark.parametrize("mode", MODES)
def test_headers_on_a_closed_stream_is_a_connection_error(mode: str) -> None:
    p = Peer()
    p.ours.receive_data(p.headers(1) + rst(1, ErrorCode.CANCEL) + p.headers(3))
    with pytest.raises(H2ProtocolError, match="closed stream 1") as e:
        feed(p.ours, p.headers(1), mode)
    assert e.value.code == ErrorCode.STREAM_CLOSED


@pytest.mark.parametrize("mode", MODES)
def test_frames_in_flight_on_a_stream_we_reset_are_ignored(mode: str) -> None:
    p = Peer()
    p.ours.receive_data(p.headers(1))
    p.ours.reset_stream(1)
    p.ours.data_to_send()
    late = fr.encode(FrameType.DATA, 0, 1, b"late") + p.headers(1, True, [("x-t", "1")]) + p.headers(3)
    ev = feed(p.ours, late, mode)
    assert [e.stream_id for e in ev] == [3]  # stream 3 decodes: the ignored block was decoded too
    assert FrameType.RST_STREAM not in [f.type for f in frames_out(p.ours.data_to_send())]


# -- REFUSED_STREAM ----------------------------------------------------------------------------


def ref_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


@pytest.mark.parametrize("mode", MODES)
def test_streams_above_the_limit_are_refused_with_rst_stream(mode: str) -> None:
    ours = H2Connection(H2Config(client=False, max_concurrent_streams=2, max_header_list_bytes=65_536))
    ours.initiate()
    ref = ref_client()
    # the reference sends before it has seen our SETTINGS, as a racing or hostile client would
    big = [*REQ, ("x-big", "v" * 20_000)]  # the refused stream's block spans CONTINUATION frames
    for i in range(3):
        ref.send_headers(ref.get_next_available_stream_id(), big if i == 2 else REQ)
    ev = feed(ours, ref.data_to_send(), mode)
    assert sorted(e.stream_id for e in ev if isinstance(e, HeadersReceived)) == [1, 3]
    ref_ev = ref.receive_data(ours.data_to_send())
    refused = [e for e in ref_ev if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in refused] == [(5, ErrorCode.REFUSED_STREAM)]
    assert ours.stats["refused_stream"] == 1
    # HPACK stayed in step: a later stream, once one ended, is accepted with its headers
    ref.reset_stream(1)
    ref.send_headers(7, [*REQ, ("x-big", "v" * 20_000)])
    ev = feed(ours, ref.data_to_send(), mode)
    assert [(e.stream_id, dict(e.headers)["x-big"][:1]) for e in ev if isinstance(e, HeadersReceived)] == [
        (7, "v")
    ]


# -- flood limits, with the reference library as the attacker --------------------------------


def goaway_seen_by(ref: h2.connection.H2Connection, wire: bytes) -> int | None:
    ended = [x for x in ref.receive_data(wire) if isinstance(x, h2.events.ConnectionTerminated)]
    return ended[0].error_code if ended else None


def test_rapid_reset_ends_in_goaway_enhance_your_calm() -> None:
    """CVE-2023-44487 at the rate seen in the issue: 68,600 HEADERS+RST_STREAM pairs per second."""
    ours = H2Connection(H2Config(client=False))
    ours.initiate()
    ref = ref_client()
    ref.receive_data(ours.data_to_send())
    now_s, sent = 0.0, 0
    with pytest.raises(H2ProtocolError, match="max_peer_resets_per_s") as e:
        for _ in range(200):  # batches of 100 pairs, as one read would bring them
            for _ in range(100):
                sid = ref.get_next_available_stream_id()
                ref.send_headers(sid, REQ)
                ref.reset_stream(sid)
                sent += 1
            now_s = sent / 68_600
            ours.receive_data(ref.data_to_send(), now_s=now_s)
            ours.data_to_send()
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert now_s < 0.05  # tripped within a fraction of a second of attack
    assert goaway_seen_by(ref, ours.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM
    assert ours.stats["flood"] == 1 and ours.stats["peer_reset"] > 1000
    assert ours.open_streams == 0


def test_ping_flood_ends_in_goaway_enhance_your_calm() -> None:
    ours = H2Connection(H2Config(client=False))
    ours.initiate()
    ref = ref_client()
    with pytest.raises(H2ProtocolError, match="max_control_frames_per_s") as e:
        for i in range(100):
            for j in range(50):
                ref.ping((i * 50 + j).to_bytes(8, "big"))
            ours.receive_data(ref.data_to_send(), now_s=i * 0.01)  # 5,000 PINGs/s
            ref.receive_data(ours.data_to_send())
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert goaway_seen_by(ref, ours.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


def test_legit_heavy_use_does_not_trip_the_limits() -> None:
    """5,000 short streams in one second, 500 of them ended by a reset (app connections that
    ended abnormally), a PING every 10 ms for a minute: no limit trips."""
    ours = H2Connection(H2Config(client=False))
    ours.initiate()
    ref = ref_client()
    ref.receive_data(ours.data_to_send())
    done = 0
    for batch in range(100):
        sids = []
        for i in range(50):
            sid = ref.get_next_available_stream_id()
            ref.send_headers(sid, REQ, end_stream=i % 10 != 0)
            sids.append(sid)
        ev = ours.receive_data(ref.data_to_send(), now_s=batch / 100)
        for e in ev:
            if isinstance(e, HeadersReceived):
                ours.send_headers(e.stream_id, [(":status", "200")], end_stream=e.end_stream)
        for sid in sids[::10]:
            ref.reset_stream(sid)
        ours.receive_data(ref.data_to_send(), now_s=batch / 100)
        done += sum(isinstance(e, StreamReset) for e in ref.receive_data(ours.data_to_send()))
    # the reference also answers our responses on the streams it reset with RST_STREAM STREAM_CLOSED
    assert done == 0 and ours.open_streams == 0 and ours.stats["peer_reset"] == 995
    for i in range(6000):
        ref.ping(i.to_bytes(8, "big"))
        ours.receive_data(ref.data_to_send(), now_s=1.0 + i / 100)
        ref.receive_data(ours.data_to_send())
    assert ours.stats == {k: 0 for k in ours.stats} | {"peer_reset": 1000}  # (the last 5 answers)


# -- memory stays bounded under floods ----------------------------------------------------------


def test_continuation_flood_is_bounded() -> None:
    """CVE-2024-27316: an endless header block ends the connection at 4 x max_header_list_bytes."""
    p = Peer()
    p.ours.receive_data(fr.encode(FrameType.HEADERS, 0, 1, p.enc.encode(REQ)))
    fed = 0
    with pytest.raises(H2ProtocolError, match="header block too large") as e:
        for _ in range(10_000):
            chunk = fr.encode(FrameType.CONTINUATION, 0, 1, b"\x40" * 1000)
            p.ours.receive_data(chunk)
            fed += len(chunk)
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert fed < 5 * 16_384 + 2_000


@pytest.mark.parametrize(
    ("frame", "limit"),
    [
        (fr.encode(FrameType.CONTINUATION, 0, 1), "max_peer_errors_per_s"),  # zero-length CONTINUATION
        (fr.encode(FrameType.DATA, 0, 1), "max_peer_errors_per_s"),  # empty DATA, no END_STREAM
        (fr.encode(FrameType.SETTINGS, 0, 0), "max_control_frames_per_s"),
    ],
    ids=["empty_continuation", "empty_data", "settings"],
)
def test_empty_frame_and_settings_floods_end_the_connection(frame: bytes, limit: str) -> None:
    p = Peer()
    opener = fr.encode(FrameType.HEADERS, 0 if frame[3] == FrameType.CONTINUATION else Flag.END_HEADERS, 1,
                       p.enc.encode(REQ))
    p.ours.receive_data(opener)
    with pytest.raises(H2ProtocolError, match=limit) as e:
        for i in range(100):
            p.ours.receive_data(frame * 100, now_s=i * 0.001)  # 100,000 frames/s; nobody reads
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert p.ours.pending_bytes < 1001 * 9 + 500  # at most one SETTINGS ACK per token, and the GOAWAY
    assert len(p.ours._in) < 9 * 100


def test_unread_acknowledgements_are_capped() -> None:
    """A caller that stops taking data_to_send() while PINGs keep coming within the rate limit."""
    p = Peer(H2Config(client=False, max_control_frames_per_s=1000, max_queued_control_frames=2000))
    with pytest.raises(H2ProtocolError, match="max_queued_control_frames"):
        for i in range(3000):
            p.ours.receive_data(fr.encode(FrameType.PING, 0, 0, b"12345678"), now_s=i * 0.01)
    assert p.ours.pending_bytes <= 2001 * 17 + 200


def test_settings_with_too_many_entries() -> None:
    p = Peer()
    many = fr.encode_settings({0x100 + i: 1 for i in range(33)})
    with pytest.raises(H2ProtocolError, match="max_settings_entries"):
        p.ours.receive_data(fr.encode(FrameType.SETTINGS, 0, 0, many))


def test_data_on_a_refused_stream_after_the_reset_is_ignored() -> None:
    p = Peer(H2Config(client=False, max_concurrent_streams=1))
    ev = p.ours.receive_data(p.headers(1) + p.headers(3) + fr.encode(FrameType.DATA, 0, 3, b"in flight"))
    assert [type(e) for e in ev] == [HeadersReceived]
    out = [fr.encode(f.type, f.flags, f.stream_id, f.payload) for f in frames_out(p.ours.data_to_send())]
    assert out.count(rst(3, ErrorCode.REFUSED_STREAM)) == 1
    assert not any(isinstance(e, DataReceived) for e in ev)


# -- frames that cost us parsing and give nothing: PRIORITY and WINDOW_UPDATE floods -----------


def window_update(sid: int, inc: int = 1) -> bytes:
    return fr.encode(FrameType.WINDOW_UPDATE, 0, sid, inc.to_bytes(4, "big"))


def test_priority_flood_ends_the_connection() -> None:
    """Envoy's max_inbound_priority_frames_per_stream: 100 per stream the peer opened, plus 100."""
    p = Peer()
    p.ours.receive_data(p.headers(1))
    prio = fr.encode(FrameType.PRIORITY, 0, 1, (0).to_bytes(4, "big") + b"\x10")
    p.ours.receive_data(prio * 200)  # 2 x 100: allowed
    with pytest.raises(H2ProtocolError, match="max_priority_frames_per_stream") as e:
        for _ in range(1000):
            p.ours.receive_data(prio * 100)
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert p.ours.stats["flood"] == 1
    assert goaway_code(p.ours.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("sid", [0, 1])
def test_window_update_flood_ends_the_connection(sid: int) -> None:
    """Envoy's max_inbound_window_update_frames_per_data_frame_sent: a peer may send about 20
    WINDOW_UPDATEs per DATA frame we sent it; an endless stream of them is a flood."""
    p = Peer()
    p.ours.receive_data(p.headers(1))
    p.ours.send_headers(1, [(":status", "200")])
    p.ours.send_data(1, b"x" * 100)
    p.ours.data_to_send()
    p.ours.receive_data(window_update(sid) * 20)  # 5 + 2 x (1 stream + 10 x 1 DATA frame) = 27
    with pytest.raises(H2ProtocolError, match="max_window_updates_per_data_frame") as e:
        for _ in range(1000):
            p.ours.receive_data(window_update(sid) * 100)
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_a_reader_crediting_every_frame_is_no_flood() -> None:
    """The h2 library as a client that credits both windows for every DATA frame it reads, over
    a 64 MB download in 16 KiB frames: never near the limit."""
    ours = H2Connection(H2Config(client=False))
    ours.initiate()
    ref = ref_client()
    ref.receive_data(ours.data_to_send())
    ours.receive_data(ref.data_to_send())
    sid = ref.get_next_available_stream_id()
    ref.send_headers(sid, REQ)
    ours.receive_data(ref.data_to_send())
    ours.send_headers(sid, [(":status", "200")])
    got = 0
    for _ in range(4096):
        ours.send_data(sid, b"d" * 16_384)
        for ev in ref.receive_data(ours.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                got += len(ev.data)
                ref.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        ref.increment_flow_control_window(1)  # and a spare one on the connection
        ours.receive_data(ref.data_to_send())
    assert got == 64 << 20
    assert ours.stats["flood"] == 0
