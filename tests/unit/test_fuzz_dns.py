"""Hypothesis fuzzing of the DNS wire parser (agent/control/dns_wire.py), queries and responses.

Properties: any bytes decode to a Message or raise DnsFormatError, nothing
else; valid messages survive encode -> decode unchanged, and mutations of them
(bit flips, truncation, insertion, deletion, pointers aimed anywhere, counts
out of step with the sections) still decode or raise DnsFormatError. CI runs a
fixed seed and few examples; ``scripts/fuzz.py`` runs the same properties longer.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control import dns_wire as dw

CI = settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
NAME = st.lists(LABEL, max_size=5).map(".".join)
IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
IPV6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
SRV = st.builds(dw.Srv, st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535), NAME)


@st.composite
def records(draw: st.DrawFn) -> dw.Record:
    kind = draw(st.sampled_from(["a", "aaaa", "srv", "cname", "ptr", "txt"]))
    name = draw(NAME)
    ttl = draw(st.integers(0, 2**32 - 1))
    if kind == "a":
        return dw.Record(name, dw.A, dw.CLASS_IN, ttl, draw(IPV4))
    if kind == "aaaa":
        return dw.Record(name, dw.AAAA, dw.CLASS_IN, ttl, draw(IPV6))
    if kind == "srv":
        return dw.Record(name, dw.SRV, dw.CLASS_IN, ttl, draw(SRV))
    if kind in ("cname", "ptr"):
        return dw.Record(name, dw.CNAME if kind == "cname" else dw.PTR, dw.CLASS_IN, ttl, draw(NAME))
    return dw.Record(name, dw.TXT, dw.CLASS_IN, ttl, draw(st.binary(max_size=60)))


MESSAGES = st.builds(
    dw.Message,
    id=st.integers(0, 65535),
    qr=st.booleans(),
    opcode=st.integers(0, 15),
    aa=st.booleans(),
    tc=st.booleans(),
    rd=st.booleans(),
    ra=st.booleans(),
    rcode=st.integers(0, 15),
    questions=st.lists(st.builds(dw.Question, NAME, st.sampled_from([dw.A, dw.AAAA, dw.SRV, dw.ANY, 99]),
                                 st.just(dw.CLASS_IN)), max_size=3).map(tuple),
    answers=st.lists(records(), max_size=4).map(tuple),
    authority=st.lists(records(), max_size=2).map(tuple),
    additional=st.lists(records(), max_size=2).map(tuple),
)

MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "delete", "pointer", "count"]),
              st.integers(0, 1 << 16), st.integers(0, 255)),
    min_size=1, max_size=5,
)


def mutate(wire: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(wire)
    for op, where, value in mutations:
        i = where % (len(b) + 1)
        if op == "flip" and b:
            b[i % len(b)] ^= 1 << (value % 8)
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = bytes([value])
        elif op == "delete" and b:
            del b[i % len(b)]
        elif op == "pointer":  # a compression pointer aimed anywhere, forwards or at itself
            b[i:i + 2] = bytes([0xC0 | (value & 0x3F), where & 0xFF])
        elif op == "count" and len(b) >= 12:  # a section count out of step with the sections
            k = 4 + 2 * (value % 4)
            b[k:k + 2] = (where % 70).to_bytes(2, "big")
    return bytes(b)


def decodes_or_format_error(wire: bytes) -> dw.Message | None:
    try:
        return dw.decode(wire)
    except dw.DnsFormatError as e:
        assert 0 <= e.where <= len(wire) + 2, f"error position {e.where} outside a {len(wire)}-byte message"
        return None


# -- properties (scripts/fuzz.py runs these too) ---------------------------------------------------


def prop_arbitrary_bytes(data: bytes) -> None:
    decodes_or_format_error(data)


def prop_round_trip(m: dw.Message) -> None:
    assert dw.decode(dw.encode(m)) == m


def prop_mutated_messages(m: dw.Message, mutations: list[tuple[str, int, int]]) -> None:
    got = decodes_or_format_error(mutate(dw.encode(m), mutations))
    if got is not None:  # what decodes encodes again to something that decodes the same
        assert dw.decode(dw.encode(got)) == got


STRATEGIES = {
    prop_arbitrary_bytes: dict(data=st.binary(max_size=600)),
    prop_round_trip: dict(m=MESSAGES),
    prop_mutated_messages: dict(m=MESSAGES, mutations=MUTATIONS),
}


@CI
@given(**STRATEGIES[prop_arbitrary_bytes])
def test_arbitrary_bytes_decode_or_raise_format_error(data: bytes) -> None:
    prop_arbitrary_bytes(data)


@CI
@given(**STRATEGIES[prop_round_trip])
def test_valid_messages_round_trip(m: dw.Message) -> None:
    prop_round_trip(m)


@CI
@given(**STRATEGIES[prop_mutated_messages])
def test_mutated_queries_and_responses_decode_or_raise_format_error(
    m: dw.Message, mutations: list[tuple[str, int, int]]
) -> None:
    prop_mutated_messages(m, mutations)
