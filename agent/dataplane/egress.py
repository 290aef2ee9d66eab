"""Egress: dialling a ServiceEntry's MESH_EXTERNAL endpoints, straight from the node.

How this works: a MESH_EXTERNAL endpoint has no agent in front of it, so the
outbound dials it itself, in plain TCP (no HBONE), from the node's network
namespace. An endpoint's address is an IP (STATIC, NONE) or a host name
(resolution DNS: the entry's endpoints or its host); names are resolved by
:class:`Resolver` with A queries to the agent's ``dns_upstream`` — never the
mesh DNS (which answers a ServiceEntry host with its VIP) — and cached for the
answer's TTL (clamped to ``[MIN_TTL_S, MAX_TTL_S]``; a failure for
``NEGATIVE_TTL_S``). Concurrent lookups of one name share one query. Each new
connection takes the next address of the answer (Envoy's STRICT_DNS balances
over them; nodemesh rotates, per name). Addresses the proxy must never dial
(loopback, link-local, multicast, unspecified, this node's and its peers')
are refused whatever the registry or the DNS says.

Which destinations reach the proxy at all is :func:`capture_cidrs` (pure): agent.yaml's
``capture_cidrs`` plus, under ``outbound_traffic_policy`` ALLOW_ANY, each ServiceEntry
address outside them, or under REGISTRY_ONLY every IPv4 destination (the outbound then
refuses what the registry does not know). The agent writes it to the eBPF capture map
(``agent.node.apply_capture``) at start and on every snapshot.

The cache bookkeeping (:class:`DnsCache`) is pure, time an input; the query and
the connect are the only I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.control import dns_wire as w
from agent.control.dns import udp_exchange
from agent.control.screening import address_problem
from agent.control.snapshot import Endpoint, Snapshot
from agent.dataplane.tcp import SOCKET_READ_LIMIT, SocketEnd

MIN_TTL_S = 1.0
MAX_TTL_S = 300.0
NEGATIVE_TTL_S = 2.0
QUERY_TIMEOUT_S = 2.0
MAX_NAMES = 4096


class EgressError(OSError):
    """An external endpoint cannot be dialled (no address, a refused address)."""


@dataclass(slots=True)
class _Entry:
    addresses: tuple[str, ...]  # empty: the name did not resolve
    expires_s: float
    error: str = ""
    turn: int = 0  # the next address to dial


class DnsCache:
    """Names -> addresses until their TTL runs out. Pure: time is an argument."""

    def __init__(self, max_names: int = MAX_NAMES) -> None:
        self._max = max_names
        self._names: dict[str, _Entry] = {}

    def get(self, name: str, now_s: float) -> _Entry | None:
        e = self._names.get(name)
        return e if e is not None and e.expires_s > now_s else None

    def put(self, name: str, addresses: tuple[str, ...], ttl_s: float, now_s: float, error: str = "",
            ) -> _Entry:
        if name not in self._names and len(self._names) >= self._max:
            self._names = {k: v for k, v in self._names.items() if v.expires_s > now_s}
            if len(self._names) >= self._max:
                self._names.clear()
        ttl = NEGATIVE_TTL_S if not addresses else min(MAX_TTL_S, max(MIN_TTL_S, ttl_s))
        old = self._names.get(name)
        e = self._names[name] = _Entry(addresses, now_s + ttl, error, old.turn if old else 0)
        return e

    @staticmethod
    def next_address(e: _Entry) -> str:
        a = e.addresses[e.turn % len(e.addresses)]
        e.turn += 1
        return a


def a_query(name: str, qid: int) -> bytes:
    return w.encode(w.Message(id=qid, rd=True, questions=(w.Question(name, w.A),)))


def parse_answer(data: bytes, qid: int) -> tuple[tuple[str, ...], float, str]:
    """(IPv4 addresses, their TTL, error) from the upstream's answer to :func:`a_query`."""
    try:
        m = w.decode(data)
    except w.DnsFormatError as e:
        return (), 0.0, f"malformed answer: {e}"
    if m.id != qid or not m.qr:
        return (), 0.0, "answer does not match the query"
    if m.rcode != w.NOERROR:
        return (), 0.0, f"rcode {m.rcode}"
    recs = [r for r in m.answers if r.rtype == w.A and isinstance(r.data, str)]
    if not recs:
        return (), 0.0, "no A record"
    return tuple(dict.fromkeys(str(r.data) for r in recs)), float(min(r.ttl_s for r in recs)), ""


Query = Callable[[bytes], Awaitable[bytes]]


class Resolver:
    """Resolves host names of external endpoints through ``upstream`` (host, port), cached."""

    def __init__(self, upstream: tuple[str, int] | None, *, query: Query | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.cache = DnsCache()
        self._query = query or self._udp
        self._now = now
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self.queries = 0

    async def resolve(self, name: str) -> _Entry:
        e = self.cache.get(name, self._now())
        if e is not None:
            return e
        task = self._inflight.get(name)
        if task is None:  # one query per name at a time, whoever asks (and even if they go away)
            task = self._inflight[name] = asyncio.ensure_future(self._lookup(name))
            task.add_done_callback(lambda _t: self._inflight.pop(name, None))
        return await asyncio.shield(task)

    async def _lookup(self, name: str) -> _Entry:
        if self.upstream is None:
            return self.cache.put(name, (), 0, self._now(), "no dns_upstream to resolve it")
        qid = secrets.randbelow(65536)
        self.queries += 1
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                data = await self._query(a_query(name, qid))
            addresses, ttl, error = parse_answer(data, qid)
        except Exception as e:  # (no answer, a refused socket...): a failure, cached for a while
            where = f"{self.upstream[0]}:{self.upstream[1]}"
            addresses, ttl, error = (), 0.0, f"upstream {where}: {e or type(e).__name__}"
        return self.cache.put(name, addresses, ttl, self._now(), error)

    async def _udp(self, data: bytes) -> bytes:
        assert self.upstream is not None
        return await udp_exchange(self.upstream, data)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class Egress:
    """Dials external endpoints; refuses addresses the proxy must never reach."""

    def __init__(self, resolver: Resolver, reserved: frozenset[str] = frozenset(), *,
                 allow_loopback: bool = False) -> None:
        self.resolver = resolver
        self.reserved = reserved  # this node's and its peers' addresses
        self.allow_loopback = allow_loopback  # component tests: "external" servers on 127.0.0.x

    async def address_of(self, ep: Endpoint) -> str:
        if _is_ip(ep.address):
            address = ep.address
        else:
            e = await self.resolver.resolve(ep.address)
            if not e.addresses:
                raise EgressError(f"cannot resolve {ep.address}: {e.error}")
            address = DnsCache.next_address(e)
        problem = address_problem(address)
        if problem is not None and not (self.allow_loopback and problem.reason == "loopback"):
            raise EgressError(f"refusing to dial {ep.address}: {problem.detail}")
        if address in self.reserved:
            raise EgressError(f"refusing to dial {ep.address}: {address} is a mesh node's address")
        return address

    async def dial(self, ep: Endpoint, timeout_s: float) -> SocketEnd:
        async with asyncio.timeout(timeout_s):
            address = await self.address_of(ep)
            r, wr = await asyncio.open_connection(address, ep.port, limit=SOCKET_READ_LIMIT)
        return SocketEnd(r, wr)


ALL_IPV4 = "0.0.0.0/0"
MAX_ENTRY_CIDRS = 192  # ServiceEntry addresses captured one by one (the eBPF trie holds 256 CIDRs)


def capture_cidrs(base: tuple[str, ...], registry_only: bool, snapshot: Snapshot,
                  ) -> tuple[tuple[str, ...], int]:
    """What the eBPF programs capture: agent.yaml's ``capture_cidrs``, and either every IPv4
    destination (REGISTRY_ONLY: the proxy decides, and refuses the unknown) or, under
    ALLOW_ANY, each ServiceEntry address outside them (so mesh policies apply to it; other
    destinations keep today's fast path: not captured at all). Also returns how many entry
    addresses did not fit (MAX_ENTRY_CIDRS). Pure."""
    if registry_only:
        return (*base, ALL_IPV4) if ALL_IPV4 not in base else base, 0
    nets = [ipaddress.IPv4Network(c) for c in base]
    extra: list[str] = []
    for a in sorted(snapshot.entry_by_address):
        ip = ipaddress.ip_address(a)
        if isinstance(ip, ipaddress.IPv4Address) and not any(ip in n for n in nets):
            extra.append(f"{a}/32")
    return (*base, *extra[:MAX_ENTRY_CIDRS]), max(0, len(extra) - MAX_ENTRY_CIDRS)
