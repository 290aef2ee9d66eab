"""HBONE request and response headers (DESIGN §6): pure construction and validation.

A tunnelled app connection is one HTTP/2 CONNECT stream whose ``:authority`` is
the destination pod's ``ip:port``; ``forwarded`` carries the original client
address. The server answers ``200`` to accept, or a 4xx/5xx with a reason.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agent.proto.h2.connection import Headers

_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)
_FOR_RE = re.compile(r'for="?(\[[0-9a-fA-F:.]+\]|[0-9.]+)(?::([0-9]{1,5}))?"?', re.ASCII)


class HboneRequestError(ValueError):
    """A CONNECT request we refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    target: Target
    client_address: str | None  # from `forwarded`, informational only (identity comes from TLS)


def connect_headers(target: Target, client_address: str, client_port: int) -> Headers:
    fwd = f"[{client_address}]" if ":" in client_address else client_address
    return [
        (":method", "CONNECT"),
        (":authority", target.authority),
        ("forwarded", f'for="{fwd}:{client_port}"'),
    ]


def parse_authority(authority: str) -> Target:
    if authority.startswith("["):
        host, sep, port = authority[1:].partition("]:")
    else:
        host, sep, port = authority.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port):
        raise HboneRequestError(f":authority {authority!r} is not ip:port")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise HboneRequestError(f":authority {authority!r} does not name an IP address") from None
    p = int(port)
    if not 1 <= p <= 65535:
        raise HboneRequestError(f":authority port {p} out of range")
    return Target(str(addr), p)


def parse_connect(headers: Headers) -> ConnectRequest:
    """Validate a CONNECT request header block (RFC 9113 §8.5)."""
    pseudo: dict[str, str] = {}
    forwarded = None
    for name, value in headers:
        if name.startswith(":"):
            if name in pseudo:
                raise HboneRequestError(f"duplicate pseudo-header {name}")
            pseudo[name] = value
        elif name == "forwarded":
            forwarded = value
    method = pseudo.get(":method")
    if method != "CONNECT":
        raise HboneRequestError(f"expected method CONNECT, got {method!r}", status=405)
    extra = set(pseudo) - {":method", ":authority"}
    if extra:
        raise HboneRequestError(f"CONNECT must not carry {sorted(extra)}")
    authority = pseudo.get(":authority")
    if not authority:
        raise HboneRequestError("CONNECT without :authority")
    client = None
    if forwarded:
        m = _FOR_RE.search(forwarded)
        if m:
            client = m.group(1).strip("[]")
    return ConnectRequest(parse_authority(authority), client)


def response_headers(status: int, reason: str = "") -> Headers:
    h: Headers = [(":status", str(status))]
    if reason:
        h.append(("x-nodemesh-reason", reason[:200].encode("ascii", "replace").decode()))
    return h


def response_status(headers: Headers) -> int:
    for name, value in headers:
        if name == ":status" and _PORT_RE.fullmatch(value) and len(value) == 3:
            return int(value)
    raise HboneRequestError("response without a valid :status")
