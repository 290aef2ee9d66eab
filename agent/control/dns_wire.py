"""DNS wire format (RFC 1035, 2782, 3596, 6891): bytes in, messages out. Sans-I/O.

How this works: :func:`decode` parses a whole message strictly (header counts,
label lengths, compression pointers that only point backwards, a bounded
number of jumps, names of at most 255 octets, RDATA lengths) and raises
:class:`DnsFormatError` for anything else, never another exception.
A, AAAA, SRV, CNAME/NS/PTR RDATA are decoded to values; other types keep their
raw bytes. :func:`encode` writes a message without name compression (answers
are small); :func:`rdata_a`, :func:`rdata_srv` build RDATA.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 16, 28, 33, 41, 255
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

MAX_NAME_OCTETS = 255
MAX_POINTER_JUMPS = 64


class DnsFormatError(ValueError):
    """A malformed DNS message; ``where`` is the byte offset of the problem."""

    def __init__(self, message: str, where: int):
        super().__init__(f"{message} (at byte {where})")
        self.where = where


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower-case, no trailing dot; "" is the root
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


RData = bytes | str | Srv  # raw, an address / a name, or SRV


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    rtype: int
    rclass: int
    ttl_s: int
    data: RData


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    qr: bool = False
    opcode: int = 0
    aa: bool = False
    tc: bool = False
    rd: bool = False
    ra: bool = False
    rcode: int = NOERROR
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    additional: tuple[Record, ...] = field(default_factory=tuple)


def _name(buf: bytes, off: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name at ``off``; return it and the offset after it."""
    labels: list[str] = []
    octets = 1
    end = -1
    jumps = 0
    pos = off
    while True:
        if pos >= len(buf):
            raise DnsFormatError("name runs past the end of the message", pos)
        n = buf[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(buf):
                raise DnsFormatError("truncated compression pointer", pos)
            target = ((n & 0x3F) << 8) | buf[pos + 1]
            if target >= pos:
                raise DnsFormatError("compression pointer does not point backwards", pos)
            jumps += 1
            if jumps > MAX_POINTER_JUMPS:
                raise DnsFormatError("too many compression pointers", pos)
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise DnsFormatError(f"reserved label type 0x{n & 0xC0:02x}", pos)
        if n == 0:
            return ".".join(labels), (end if end >= 0 else pos + 1)
        if pos + 1 + n > len(buf):
            raise DnsFormatError("label runs past the end of the message", pos)
        octets += n + 1
        if octets > MAX_NAME_OCTETS:
            raise DnsFormatError("name longer than 255 octets", pos)
        raw = buf[pos + 1:pos + 1 + n]
        if b"." in raw:
            raise DnsFormatError("label contains a dot", pos)
        labels.append(raw.decode("latin-1").lower())
        pos += 1 + n


def _record(buf: bytes, off: int) -> tuple[Record, int]:
    name, off = _name(buf, off)
    if off + 10 > len(buf):
        raise DnsFormatError("truncated resource record header", off)
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", buf, off)
    off += 10
    if off + rdlen > len(buf):
        raise DnsFormatError("RDATA runs past the end of the message", off)
    raw = buf[off:off + rdlen]
    data: RData = raw
    if rtype == A and rclass == CLASS_IN:
        if rdlen != 4:
            raise DnsFormatError(f"A record with {rdlen} bytes of RDATA", off)
        data = str(ipaddress.IPv4Address(raw))
    elif rtype == AAAA and rclass == CLASS_IN:
        if rdlen != 16:
            raise DnsFormatError(f"AAAA record with {rdlen} bytes of RDATA", off)
        data = str(ipaddress.IPv6Address(raw))
    elif rtype in (CNAME, NS, PTR):
        target, after = _name(buf, off)
        if after != off + rdlen:
            raise DnsFormatError("name RDATA length mismatch", off)
        data = target
    elif rtype == SRV:
        if rdlen < 7:
            raise DnsFormatError("SRV RDATA too short", off)
        prio, weight, port = struct.unpack_from("!HHH", buf, off)
        target, after = _name(buf, off + 6)
        if after != off + rdlen:
            raise DnsFormatError("SRV RDATA length mismatch", off)
        data = Srv(prio, weight, port, target)
    return Record(name, rtype, rclass, ttl, data), off + rdlen


def decode(buf: bytes) -> Message:
    """One whole message; raises DnsFormatError (only) when it is malformed."""
    if len(buf) < 12:
        raise DnsFormatError("message shorter than the 12-byte header", len(buf))
    mid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", buf, 0)
    off = 12
    questions = []
    for _ in range(qd):
        name, off = _name(buf, off)
        if off + 4 > len(buf):
            raise DnsFormatError("truncated question", off)
        qtype, qclass = struct.unpack_from("!HH", buf, off)
        off += 4
        questions.append(Question(name, qtype, qclass))
    sections: list[list[Record]] = [[], [], []]
    for sec, count in zip(sections, (an, ns, ar), strict=True):
        for _ in range(count):
            rec, off = _record(buf, off)
            sec.append(rec)
    if off != len(buf):
        raise DnsFormatError(f"{len(buf) - off} bytes of trailing data", off)
    return Message(
        id=mid, qr=bool(flags & 0x8000), opcode=(flags >> 11) & 0xF, aa=bool(flags & 0x400),
        tc=bool(flags & 0x200), rd=bool(flags & 0x100), ra=bool(flags & 0x80),
        rcode=flags & 0xF, questions=tuple(questions), answers=tuple(sections[0]),
        authority=tuple(sections[1]), additional=tuple(sections[2]),
    )


def encode_name(name: str) -> bytes:
    out = bytearray()
    if name:
        for label in name.split("."):
            raw = label.encode("latin-1")
            if not 1 <= len(raw) <= 63:
                raise DnsFormatError(f"label {label!r} must be 1-63 octets", 0)
            out += bytes([len(raw)]) + raw
    out.append(0)
    if len(out) > MAX_NAME_OCTETS:
        raise DnsFormatError("name longer than 255 octets", 0)
    return bytes(out)


def _rdata(r: Record) -> bytes:
    d = r.data
    if isinstance(d, bytes):
        return d
    if isinstance(d, Srv):
        return struct.pack("!HHH", d.priority, d.weight, d.port) + encode_name(d.target)
    if r.rtype == A:
        return ipaddress.IPv4Address(d).packed
    if r.rtype == AAAA:
        return ipaddress.IPv6Address(d).packed
    return encode_name(d)


def encode(m: Message) -> bytes:
    flags = ((m.qr << 15) | ((m.opcode & 0xF) << 11) | (m.aa << 10) | (m.tc << 9) | (m.rd << 8)
             | (m.ra << 7) | (m.rcode & 0xF))
    out = bytearray(struct.pack("!HHHHHH", m.id, flags, len(m.questions), len(m.answers),
                                len(m.authority), len(m.additional)))
    for q in m.questions:
        out += encode_name(q.name) + struct.pack("!HH", q.qtype, q.qclass)
    for r in (*m.answers, *m.authority, *m.additional):
        rd = _rdata(r)
        out += encode_name(r.name) + struct.pack("!HHIH", r.rtype, r.rclass, r.ttl_s, len(rd))
        out += rd
    return bytes(out)
