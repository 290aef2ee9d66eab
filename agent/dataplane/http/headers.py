"""What the proxy adds to a request on its way: tracing and forwarding headers. Pure.

Tracing: ``x-request-id`` is kept when the app sent a sane one, else generated
(a UUID4, as Envoy does). W3C ``traceparent`` (version 00): a valid one keeps
its trace id and gets a new span id (this hop is a span, its parent the
caller's); an absent or invalid one starts a new, sampled trace. So an app that
forwards these headers to its own calls gets one connected trace.

Forwarding: ``x-forwarded-for``, ``forwarded`` and ``x-forwarded-client-cert``
carry only what nodemesh verified (the calling pod's address as the proxy saw
its socket, the identity of the tunnel's client certificate); whatever the app
sent under those names is removed first, never trusted or appended to.

Route: ``x-nodemesh-route`` names the VirtualService route the source agent chose
(:data:`agent.control.ratelimit.ROUTE_HEADER`, for route-targeted rate limits). Every
proxy hop removes what arrived under that name (:func:`forwarding`); the outbound then
sets its own on requests it sends through HBONE (:func:`with_route`), on streams whose
CONNECT says the agent parsed their requests (:data:`PARSED`: an app's bytes relayed as TCP
never carry a trusted route), and the inbound reads it (:func:`route_of`) only from those
streams, before removing it for the pod.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterable

from agent.control.ratelimit import ROUTE_HEADER, ROUTE_ID_RE
from agent.proto.http1 import Header

ROUTE = ROUTE_HEADER.encode("ascii")
FORWARDING = frozenset({b"x-forwarded-for", b"forwarded", b"x-forwarded-client-cert"})
# on an HBONE CONNECT: the source agent parsed this stream's HTTP requests (its route header holds)
PARSED = ("x-nodemesh-parsed", "http")
_VOUCHED = FORWARDING | {ROUTE}  # what only a proxy writes: a sender's copy never passes
_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\Z")
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}\Z")
_ZERO_TRACE = b"0" * 32


def tracing(headers: list[Header], rng: random.Random) -> tuple[list[Header], str, str]:
    """``headers`` with x-request-id and traceparent set; returns (headers, request id, trace id)."""
    request_id = b""
    parent = b""
    out: list[Header] = []
    for k, v in headers:
        if k == b"x-request-id":
            if not request_id and _REQUEST_ID.match(v):
                request_id = v
            continue
        if k == b"traceparent":
            parent = v if not parent else b"-"  # two traceparent headers: invalid, start anew
            continue
        out.append((k, v))
    if not request_id:
        request_id = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
    m = _TRACEPARENT.match(parent.strip().lower()) if parent else None
    span = b"%016x" % (rng.getrandbits(64) or 1)
    if m is not None and m.group(1) != _ZERO_TRACE and m.group(2) != b"0" * 16:
        trace, flags = m.group(1), m.group(3)
    else:
        trace, flags = b"%032x" % (rng.getrandbits(128) or 1), b"01"
    out.append((b"x-request-id", request_id))
    out.append((b"traceparent", b"00-" + trace + b"-" + span + b"-" + flags))
    return out, request_id.decode("ascii"), trace.decode("ascii")


def trace_id_of(headers: list[Header]) -> tuple[str, str]:
    """(x-request-id, trace id) a request carries, as far as they are well formed."""
    rid, trace = "", ""
    for k, v in headers:
        if k == b"x-request-id" and _REQUEST_ID.match(v):
            rid = v.decode("ascii")
        elif k == b"traceparent":
            m = _TRACEPARENT.match(v.strip().lower())
            if m is not None:
                trace = m.group(1).decode("ascii")
    return rid, trace


def _for(address: str) -> bytes:
    return (f'"[{address}]"' if ":" in address else address).encode("ascii")


def forwarding(
    headers: list[Header], client_address: str | None, *, by: str = "", client_principal: str = ""
) -> list[Header]:
    """``headers`` without any forwarding (or route) header the sender wrote, plus ours: the
    verified client address (none when it is not known for sure) and, when the proxy verified
    a client certificate, Envoy's x-forwarded-client-cert ``By=<server id>;URI=<client id>``."""
    out = [(k, v) for k, v in headers if k not in _VOUCHED]
    if client_address:
        out.append((b"x-forwarded-for", client_address.encode("ascii")))
        out.append((b"forwarded", b"for=" + _for(client_address)))
    if client_principal:
        xfcc = f"By={by};URI={client_principal}" if by else f"URI={client_principal}"
        out.append((b"x-forwarded-client-cert", xfcc.encode("ascii")))
    return out


def with_route(headers: list[Header], route: str) -> list[Header]:
    """``headers`` (already without a sender's route header) plus the chosen route's ("": none)."""
    return [*headers, (ROUTE, route.encode("ascii"))] if route else headers


def without_route(headers: list[Header]) -> list[Header]:
    return [h for h in headers if h[0] != ROUTE]


def route_of(headers: Iterable[tuple[str | bytes, str | bytes]]) -> str:
    """The route header's value; "" when absent, repeated or malformed. Only for headers an
    agent sent (an HBONE stream's requests)."""
    found = ""
    for k, v in headers:
        if k in (ROUTE, ROUTE_HEADER):
            if found:
                return ""
            found = (v.decode("latin-1") if isinstance(v, bytes) else v) or " "
    return found if ROUTE_ID_RE.match(found) else ""


def split_h2(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[Header]]:
    """An HTTP/2 header block as (pseudo-headers, regular headers as bytes) for the helpers above."""
    pseudo = [(k, v) for k, v in headers if k.startswith(":")]
    regular = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers if not k.startswith(":")]
    return pseudo, regular


def join_h2(pseudo: list[tuple[str, str]], regular: list[Header]) -> list[tuple[str, str]]:
    return pseudo + [(k.decode("latin-1"), v.decode("latin-1")) for k, v in regular]
