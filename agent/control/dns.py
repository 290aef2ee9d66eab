"""Mesh DNS: answers service names from the snapshot, forwards the rest (UDP and TCP).

How this works: :func:`answer` is pure: query bytes + snapshot -> response
bytes, or None when the name is not ours and should be forwarded. Names we own:

- ``<svc>.<ns>.svc.cluster.local`` and ``<svc>.service.consul`` (namespace
  ``default``): authoritative, NXDOMAIN when the service does not exist;
- ``<svc>.<ns>``: answered only when that service exists, else forwarded;
- a ServiceEntry host: A/AAAA with the entry's ``addresses``, or the VIP apply gave
  the host (Istio's DNS proxy auto-allocation), so apps' connections are captured;
- SRV on any of these (also ``_<port>._<proto>.<svc>.<ns>.svc.cluster.local``)
  returns one record per service port, target the service's cluster.local name,
  with its VIP as additional record.

In the agent, TCP connections are accepted by the agent's listener (limits,
EMFILE back-off) and handed to :meth:`MeshDns.serve_tcp`; :meth:`MeshDns.start`
serves on its own, for tests and tools.

A/AAAA answer the service VIP: traffic to it is captured by the mesh, which
balances over healthy endpoints. :class:`MeshDns` serves this on UDP and TCP
(bind any address, or pass sockets opened inside a netns), forwarding other
names to ``upstream`` under a timeout; without an upstream it answers REFUSED
at once, on upstream failure SERVFAIL: a client never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent.control import dns_wire as w
from agent.control.model import DEFAULT_NAMESPACE, Service
from agent.control.snapshot import Snapshot, healthy_endpoints

log = logging.getLogger(__name__)

TTL_S = 5
MAX_UDP_BYTES = 512
FORWARD_TIMEOUT_S = 2.0
TCP_IDLE_TIMEOUT_S = 5.0  # a TCP client silent this long (also before its first query) is closed


@dataclass(frozen=True, slots=True)
class Lookup:
    namespace: str
    service: str
    authoritative: bool  # NXDOMAIN when missing (our zones); else forward
    port_label: str | None = None  # from _<port>._<proto>. prefix


def parse_name(name: str) -> Lookup | None:
    """Which service a query name refers to; None when it is not a mesh name."""
    labels = name.lower().split(".")
    port_label = None
    if len(labels) >= 2 and labels[0].startswith("_") and labels[1].startswith("_"):
        port_label, labels = labels[0][1:], labels[2:]
    if len(labels) == 5 and labels[2:] == ["svc", "cluster", "local"]:
        return Lookup(labels[1], labels[0], True, port_label)
    if len(labels) == 3 and labels[1:] == ["service", "consul"]:
        return Lookup(DEFAULT_NAMESPACE, labels[0], True, port_label)
    if len(labels) == 2 and all(labels):
        return Lookup(labels[1], labels[0], False, port_label)
    return None


def fqdn(s: Service) -> str:
    return f"{s.name}.{s.namespace}.svc.cluster.local"


def _reply(q: w.Message, rcode: int, *, aa: bool = True, answers: tuple[w.Record, ...] = (),
           additional: tuple[w.Record, ...] = ()) -> w.Message:
    return w.Message(id=q.id, qr=True, opcode=q.opcode, aa=aa, rd=q.rd, ra=False, rcode=rcode,
                     questions=q.questions, answers=answers, additional=additional)


def resolve(q: w.Message, snapshot: Snapshot) -> w.Message | None:
    """The response to a decoded query, or None to forward it."""
    if q.qr or q.opcode != 0 or len(q.questions) != 1:
        return _reply(q, w.FORMERR if len(q.questions) != 1 else w.NOTIMP, aa=False)
    question = q.questions[0]
    es = snapshot.entry_services.get(question.name.lower().rstrip("."))
    if es is not None and es.addresses:  # a ServiceEntry host: its addresses, or the VIP it was given
        return _entry_answer(q, question, es.addresses)
    lk = parse_name(question.name)
    if lk is None:
        return None
    svc = snapshot.service(lk.namespace, lk.service)
    if svc is None:
        return _reply(q, w.NXDOMAIN) if lk.authoritative else None
    if question.qclass not in (w.CLASS_IN, w.ANY):
        return _reply(q, w.REFUSED)
    vip_type = w.A if ipaddress.ip_address(svc.vip).version == 4 else w.AAAA
    addr = w.Record(question.name, vip_type, w.CLASS_IN, TTL_S, svc.vip)
    if question.qtype in (w.A, w.AAAA, w.ANY):
        answers = (addr,) if question.qtype in (vip_type, w.ANY) else ()
        return _reply(q, w.NOERROR, answers=answers)  # NODATA for the other family
    if question.qtype == w.SRV:
        target = fqdn(svc)
        srvs = []
        for p in svc.ports:
            if lk.port_label not in (None, p.name, str(p.port)):
                continue
            n = len(healthy_endpoints(snapshot, svc, p.port))
            srvs.append(w.Record(question.name, w.SRV, w.CLASS_IN, TTL_S,
                                 w.Srv(0, max(1, min(n, 65535)), p.port, target)))
        extra = (w.Record(target, vip_type, w.CLASS_IN, TTL_S, svc.vip),) if srvs else ()
        return _reply(q, w.NOERROR, answers=tuple(srvs), additional=extra)
    return _reply(q, w.NOERROR)  # the name exists, no records of that type


def _entry_answer(q: w.Message, question: w.Question, addresses: tuple[str, ...]) -> w.Message:
    """A/AAAA for a ServiceEntry host (as Istio's DNS proxy answers them); NODATA otherwise."""
    if question.qclass not in (w.CLASS_IN, w.ANY):
        return _reply(q, w.REFUSED)
    answers = tuple(
        w.Record(question.name, t, w.CLASS_IN, TTL_S, a) for a in addresses
        if question.qtype in (t := w.A if ipaddress.ip_address(a).version == 4 else w.AAAA, w.ANY)
    )
    return _reply(q, w.NOERROR, answers=answers)


def _edns_udp_size(q: w.Message) -> int:
    opt = next((r for r in q.additional if r.rtype == w.OPT), None)
    return MAX_UDP_BYTES if opt is None else max(MAX_UDP_BYTES, min(opt.rclass, 4096))


def answer(data: bytes, snapshot: Snapshot, *, udp: bool) -> bytes | None:
    """Pure: query bytes -> response bytes; None = forward. Malformed -> FORMERR or nothing."""
    try:
        q = w.decode(data)
    except w.DnsFormatError:
        if len(data) >= 12:  # echo the id with FORMERR, as resolvers expect
            mid, flags = struct.unpack_from("!HH", data, 0)
            if not flags & 0x8000:
                return w.encode(w.Message(id=mid, qr=True, rcode=w.FORMERR))
        return b""
    r = resolve(q, snapshot)
    if r is None:
        return None
    out = w.encode(r)
    if udp and len(out) > _edns_udp_size(q):
        out = w.encode(w.Message(id=r.id, qr=True, aa=r.aa, tc=True, rd=r.rd, rcode=r.rcode,
                                 questions=r.questions))
    return out


def refusal(data: bytes, rcode: int) -> bytes:
    """REFUSED/SERVFAIL for a query we cannot forward (keeps id and question)."""
    try:
        q = w.decode(data)
        return w.encode(_reply(q, rcode, aa=False))
    except w.DnsFormatError:
        return b""


async def udp_exchange(server: tuple[str, int], data: bytes) -> bytes:
    """One datagram to ``server``, its first answer back (the caller bounds the wait)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class _Once(asyncio.DatagramProtocol):
        def datagram_received(self, d: bytes, addr: tuple[str, int]) -> None:
            if not fut.done():
                fut.set_result(d)

        def error_received(self, exc: Exception) -> None:
            if not fut.done():
                fut.set_exception(exc)

    tr, _ = await loop.create_datagram_endpoint(_Once, remote_addr=server)
    try:
        tr.sendto(data)
        return await fut
    finally:
        tr.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: MeshDns):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a DatagramTransport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._spawn(self._handle(data, addr))

    async def _handle(self, data: bytes, addr: tuple[str, int]) -> None:
        out = await self.server.handle(data, udp=True)
        if out and self.transport is not None:
            self.transport.sendto(out, addr)


class MeshDns:
    """The node's DNS server (port 15053 in production)."""

    def __init__(self, snapshot: Callable[[], Snapshot], *,
                 upstream: tuple[str, int] | None = None,
                 forward_timeout_s: float = FORWARD_TIMEOUT_S):
        self._snapshot = snapshot
        self.upstream = upstream
        self.forward_timeout_s = forward_timeout_s
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 15053) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(20):
            us = socket.socket(family, socket.SOCK_DGRAM)
            ts = socket.socket(family, socket.SOCK_STREAM)
            try:
                ts.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                us.bind((host, port))
                ts.bind((host, us.getsockname()[1]))  # port 0: TCP takes the UDP port
                ts.listen(128)
                break
            except OSError as e:
                us.close()
                ts.close()
                # port 0: the kernel's free UDP port may be taken for TCP; pick another
                if port != 0 or e.errno != errno.EADDRINUSE or attempt == 19:
                    raise
        await self.start_on(us, ts)
        bound = us.getsockname()
        return bound[0], bound[1]

    async def start_on(self, udp_sock: socket.socket, tcp_sock: socket.socket | None) -> None:
        """Serve on sockets opened elsewhere (e.g. inside a netns, on a worker thread).
        ``tcp_sock`` None: the caller accepts TCP itself and calls :meth:`serve_tcp`."""
        loop = asyncio.get_running_loop()
        udp_sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        self._udp = transport
        if tcp_sock is not None:
            tcp_sock.setblocking(False)
            self._tcp = await asyncio.start_server(self.serve_tcp, sock=tcp_sock)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def handle(self, data: bytes, *, udp: bool) -> bytes:
        out = answer(data, self._snapshot(), udp=udp)
        if out is not None:
            return out
        if self.upstream is None:
            return refusal(data, w.REFUSED)
        try:
            async with asyncio.timeout(self.forward_timeout_s):
                return await self._forward(data, udp=udp)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, w.DnsFormatError) as e:
            log.info("dns: upstream %s failed: %s", self.upstream, e)
            return refusal(data, w.SERVFAIL)

    async def _forward(self, data: bytes, *, udp: bool) -> bytes:
        assert self.upstream is not None
        host, port = self.upstream
        if udp:
            return await udp_exchange((host, port), data)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(data).to_bytes(2, "big") + data)
            await writer.drain()
            n = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(n)
        finally:
            writer.close()

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                        idle_timeout_s: float = TCP_IDLE_TIMEOUT_S) -> None:
        """Queries on one TCP connection until EOF, or ``idle_timeout_s`` of silence."""
        try:
            while True:
                async with asyncio.timeout(idle_timeout_s):
                    head = await reader.readexactly(2)
                    data = await reader.readexactly(int.from_bytes(head, "big"))
                out = await self.handle(data, udp=False)
                if not out:
                    return
                writer.write(len(out).to_bytes(2, "big") + out)
                async with asyncio.timeout(idle_timeout_s):
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
