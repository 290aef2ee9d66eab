"""Hypothesis fuzzing of the sans-I/O HTTP/2 core, from both ends.

Properties, for the server core (fed what a client sends) and the client core
(fed what a server sends): any input yields events or raises our
H2ProtocolError — nothing else — and the core's buffers stay bounded whatever
arrives. Inputs are arbitrary bytes and real conversations produced by the
`h2` library, mutated frame by frame (dropped, duplicated, swapped, retyped,
re-flagged, moved to another stream, bit-flipped, truncated) and cut into
arbitrary reads. CI runs a fixed seed and few examples; ``scripts/fuzz.py``
runs the same properties for minutes with random seeds.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proto.h2 import frames as fr
from agent.proto.h2.connection import (
    RECENT_RESETS,
    ConnectionTerminated,
    DataReceived,
    H2Config,
    H2Connection,
    HeadersReceived,
    PingAcked,
    SettingsReceived,
    StreamReset,
    WindowUpdated,
)
from agent.proto.h2.frames import H2ProtocolError

EVENT_TYPES = (
    HeadersReceived, DataReceived, StreamReset, WindowUpdated, ConnectionTerminated, SettingsReceived,
    PingAcked,
)
REQ = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
CONFIG = {"max_concurrent_streams": 8, "max_frame_bytes": 16_384, "max_header_list_bytes": 4096}
CI = settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def drive(ours: H2Connection, chunks: list[bytes], steps_s: list[float]) -> None:
    """Feed the chunks; check the contract after each one. Stops at the first connection error."""
    c = ours.config
    fed = 0
    now_s = 0.0
    for i, chunk in enumerate(chunks):
        now_s += steps_s[i % len(steps_s)] if steps_s else 0.0
        fed += len(chunk)
        try:
            events = ours.receive_data(chunk, now_s=now_s)
        except H2ProtocolError as e:
            assert e.stream_id == 0, "a stream error escaped as an exception"
            assert ours.goaway_sent, "a connection error without GOAWAY"
            try:
                ours.receive_data(b"more")
            except H2ProtocolError:
                pass
            else:
                raise AssertionError("a failed connection accepted more input") from None
            return
        for ev in events:
            assert isinstance(ev, EVENT_TYPES), ev
        # bounded, whatever the peer sends
        assert len(ours._in) < fr.FRAME_HEADER_BYTES + c.max_frame_bytes + len(fr.PREFACE)
        assert ours.open_streams <= max(c.max_concurrent_streams, 16)
        assert len(ours._reset_by_us) <= RECENT_RESETS
        p = ours._pending_headers
        assert p is None or len(p.block) <= 4 * c.max_header_list_bytes + c.max_frame_bytes
        assert ours.pending_bytes <= 2 * fed + 4096, "replies grow faster than the input"
        if i % 3 == 0:
            ours.data_to_send()


def server_core() -> H2Connection:
    ours = H2Connection(H2Config(client=False, **CONFIG))  # type: ignore[arg-type]
    ours.initiate()
    return ours


def client_core(streams: int) -> H2Connection:
    ours = H2Connection(H2Config(client=True, **CONFIG))  # type: ignore[arg-type]
    ours.initiate()
    for _ in range(streams):
        ours.send_headers(None, REQ)
    return ours


# -- conversations from the reference implementation ------------------------------------------

ACTIONS = st.lists(
    st.tuples(st.sampled_from(["headers", "data", "end", "reset", "ping", "window", "settings", "trailers",
                               "priority", "goaway"]),
              st.integers(0, 3), st.integers(0, 40_000)),
    max_size=25,
)


def client_conversation(actions: list[tuple[str, int, int]]) -> list[bytes]:
    """Frames a reference client sends to a server, one bytes object per frame."""
    ref = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    ref.initiate_connection()
    out = [ref.data_to_send()]
    sids: list[int] = []
    for kind, which, n in actions:
        try:
            if kind == "headers" or not sids:
                sids.append(ref.get_next_available_stream_id())
                ref.send_headers(sids[-1], [*REQ, ("x-n", str(n))], end_stream=kind == "end")
            else:
                sid = sids[which % len(sids)]
                _act(ref, kind, sid, n)
        except (h2.exceptions.H2Error, ValueError, KeyError):  # (KeyError: h2 on a closed stream)
            pass  # the reference refuses what makes no sense in its state: skip the action
        out.append(ref.data_to_send())
    return [b for b in out if b]


def server_conversation(actions: list[tuple[str, int, int]], streams: int) -> list[bytes]:
    """Frames a reference server sends to a client that opened ``streams`` streams."""
    client = client_core(streams)
    ref = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    ref.initiate_connection()
    ref.receive_data(client.data_to_send())
    out = [ref.data_to_send()]
    sids = [1 + 2 * i for i in range(streams)]
    for kind, which, n in actions:
        sid = sids[which % len(sids)]
        try:
            if kind == "headers":
                ref.send_headers(sid, [(":status", str(100 + n % 500))])
            else:
                _act(ref, kind, sid, n)
        except (h2.exceptions.H2Error, ValueError, KeyError):  # (KeyError: h2 on a closed stream)
            pass
        out.append(ref.data_to_send())
    return [b for b in out if b]


def _act(ref: h2.connection.H2Connection, kind: str, sid: int, n: int) -> None:
    if kind == "data":
        ref.send_data(sid, b"d" * min(n, ref.local_flow_control_window(sid), 16_384))
    elif kind == "end":
        ref.end_stream(sid)
    elif kind == "reset":
        ref.reset_stream(sid, n % 14)
    elif kind == "ping":
        ref.ping(n.to_bytes(8, "big"))
    elif kind == "window":
        ref.increment_flow_control_window(1 + n, stream_id=sid if n % 2 else None)
    elif kind == "settings":
        ref.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535 + n})
    elif kind == "trailers":
        ref.send_headers(sid, [("x-trailer", str(n))], end_stream=True)
    elif kind == "priority":
        ref.prioritize(sid, weight=1 + n % 256)
    elif kind == "goaway":
        ref.close_connection(n % 14)


def split_frames(wire: list[bytes]) -> list[bytes]:
    """Each frame as bytes (the client preface stays a unit of its own)."""
    out: list[bytes] = []
    for blob in wire:
        if blob.startswith(fr.PREFACE):
            out.append(fr.PREFACE)
            blob = blob[len(fr.PREFACE):]
        frames, used = fr.split(bytearray(blob), fr.MAX_ALLOWED_FRAME_BYTES)
        assert used == len(blob)
        out.extend(fr.encode(f.type, f.flags, f.stream_id, f.payload) for f in frames)
    return out


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["drop", "dup", "swap", "type", "flags", "stream", "flip", "cut", "length"]),
              st.integers(0, 1 << 16), st.integers(0, 255)),
    max_size=6,
)


def mutate(frames: list[bytes], mutations: list[tuple[str, int, int]]) -> list[bytes]:
    frames = list(frames)
    for op, where, value in mutations:
        if not frames:
            break
        i = where % len(frames)
        f = bytearray(frames[i])
        if op == "drop":
            del frames[i]
            continue
        if op == "dup":
            frames.insert(i, bytes(f))
            continue
        if op == "swap" and len(frames) > 1:
            j = (i + 1) % len(frames)
            frames[i], frames[j] = frames[j], frames[i]
            continue
        if len(f) < fr.FRAME_HEADER_BYTES:
            continue
        if op == "type":
            f[3] = value % 12
        elif op == "flags":
            f[4] = value
        elif op == "stream":
            f[5:9] = (value % 12).to_bytes(4, "big")
        elif op == "flip":
            k = where % len(f)
            f[k] ^= 1 << (value % 8)
        elif op == "cut":
            del f[where % len(f):]
        elif op == "length":
            f[0:3] = (value * 97).to_bytes(3, "big")
        frames[i] = bytes(f)
    return frames


def rechunk(wire: bytes, cuts: list[int]) -> list[bytes]:
    """The same bytes in reads of arbitrary sizes."""
    chunks, pos = [], 0
    for c in cuts:
        if pos >= len(wire):
            break
        chunks.append(wire[pos:pos + 1 + c])
        pos += 1 + c
    if pos < len(wire):
        chunks.append(wire[pos:])
    return chunks


CUTS = st.lists(st.integers(0, 300), max_size=30)
STEPS = st.lists(st.sampled_from([0.0, 0.0001, 0.01, 1.0]), max_size=5)


# -- properties (scripts/fuzz.py runs these too) ---------------------------------------------------


def prop_server_arbitrary_bytes(data: bytes, cuts: list[int], steps_s: list[float]) -> None:
    drive(server_core(), rechunk(fr.PREFACE + data, cuts), steps_s)


def prop_client_arbitrary_bytes(data: bytes, cuts: list[int], steps_s: list[float]) -> None:
    drive(client_core(3), rechunk(data, cuts), steps_s)


def prop_server_mutated_conversation(
    actions: list[tuple[str, int, int]], mutations: list[tuple[str, int, int]], cuts: list[int],
    steps_s: list[float],
) -> None:
    wire = b"".join(mutate(split_frames(client_conversation(actions)), mutations))
    drive(server_core(), rechunk(wire, cuts), steps_s)


def prop_client_mutated_conversation(
    actions: list[tuple[str, int, int]], mutations: list[tuple[str, int, int]], streams: int,
    cuts: list[int], steps_s: list[float],
) -> None:
    wire = b"".join(mutate(split_frames(server_conversation(actions, streams)), mutations))
    drive(client_core(streams), rechunk(wire, cuts), steps_s)


STRATEGIES = {
    prop_server_arbitrary_bytes: dict(data=st.binary(max_size=2000), cuts=CUTS, steps_s=STEPS),
    prop_client_arbitrary_bytes: dict(data=st.binary(max_size=2000), cuts=CUTS, steps_s=STEPS),
    prop_server_mutated_conversation: dict(actions=ACTIONS, mutations=MUTATIONS, cuts=CUTS, steps_s=STEPS),
    prop_client_mutated_conversation: dict(
        actions=ACTIONS, mutations=MUTATIONS, streams=st.integers(1, 4), cuts=CUTS, steps_s=STEPS
    ),
}


@CI
@given(**STRATEGIES[prop_server_arbitrary_bytes])
def test_server_core_arbitrary_bytes(data: bytes, cuts: list[int], steps_s: list[float]) -> None:
    prop_server_arbitrary_bytes(data, cuts, steps_s)


@CI
@given(**STRATEGIES[prop_client_arbitrary_bytes])
def test_client_core_arbitrary_bytes(data: bytes, cuts: list[int], steps_s: list[float]) -> None:
    prop_client_arbitrary_bytes(data, cuts, steps_s)


@CI
@given(**STRATEGIES[prop_server_mutated_conversation])
def test_server_core_mutated_conversations(
    actions: list[tuple[str, int, int]], mutations: list[tuple[str, int, int]], cuts: list[int],
    steps_s: list[float],
) -> None:
    prop_server_mutated_conversation(actions, mutations, cuts, steps_s)


@CI
@given(**STRATEGIES[prop_client_mutated_conversation])
def test_client_core_mutated_conversations(
    actions: list[tuple[str, int, int]], mutations: list[tuple[str, int, int]], streams: int,
    cuts: list[int], steps_s: list[float],
) -> None:
    prop_client_mutated_conversation(actions, mutations, streams, cuts, steps_s)


def test_unmutated_conversations_are_accepted() -> None:
    """The generator is sound: what the reference sends, unmutated, is no error to us."""
    acts = [("headers", 0, 1), ("data", 0, 5000), ("ping", 0, 7), ("window", 0, 3), ("settings", 0, 9),
            ("priority", 0, 3), ("trailers", 0, 1), ("headers", 0, 2), ("reset", 1, 8)]
    ours = server_core()
    for chunk in client_conversation(acts):
        ours.receive_data(chunk)
    assert ours.stats["protocol_error"] == 0 and ours.stats["stream_error"] == 0
    client_acts = [("headers", 0, 100), ("data", 0, 9000), ("ping", 1, 1), ("end", 0, 0), ("reset", 1, 8)]
    client = client_core(2)
    for chunk in server_conversation(client_acts, 2):
        client.receive_data(chunk)
    assert client.stats["protocol_error"] == 0 and client.stats["stream_error"] == 0
