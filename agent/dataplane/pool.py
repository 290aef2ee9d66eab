"""Pool of HBONE connections: one TLS connection carries many app connections.

How this works: connections are keyed by (source identity, destination
identity, destination node address), since the client certificate is the
source workload's and the server certificate the destination workload's
(DESIGN §6). :meth:`TunnelPool.open_stream` reuses a live connection with room
for another stream, or dials one — a per-key lock makes concurrent callers
share a single new dial instead of each paying a handshake. Dead connections
are dropped on use; idle ones are closed by :meth:`reap`.

Certificate renewal: a connection remembers the fingerprint of the source
certificate it was opened with. Once the source identity has a renewed cert,
that connection takes no new streams (its open streams finish undisturbed)
and new streams go over a connection handshaked with the new cert; drained
old connections are closed by :meth:`reap`.

Stalled connections: a connection whose watchdog found it making no progress
while it had data to send is *retired* (see :mod:`agent.dataplane.tunnel`): it
takes no new streams, so the next stream dials a fresh connection; the
retired one is closed by :meth:`reap` once its streams ended (or by its
watchdog, at once, when the peer is dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.dataplane.tunnel import (
    BufferBudget,
    EventSink,
    TunnelConnection,
    TunnelError,
    TunnelLimits,
    TunnelStream,
)
from agent.identity.certs import WorkloadCert
from agent.identity.errors import PeerRejected
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import ClientContexts, connect_tls
from agent.proto.h2.connection import H2Config, Headers
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

HBONE_PORT = 15008


CertSource = Callable[[SpiffeId], Awaitable[WorkloadCert]]
"""The current certificate of a local workload identity (issued or renewed on demand),
e.g. :meth:`agent.identity.store.CertManager.ensure`."""


PoolKey = tuple[SpiffeId, SpiffeId, str, int]


@dataclass(slots=True)
class _Entry:
    conns: list[TunnelConnection] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = 0.0


class TunnelPool:
    def __init__(
        self,
        certs: CertSource,
        contexts: ClientContexts,
        *,
        connect_timeout_s: float = 5.0,
        max_streams_per_conn: int = 100,
        idle_timeout_s: float = 300.0,
        h2_config: H2Config | None = None,
        on_change: Callable[[int], None] | None = None,
        tunnel_limits: TunnelLimits | None = None,
        budget: BufferBudget | None = None,
        on_event: EventSink | None = None,
    ) -> None:
        self.certs = certs
        self.contexts = contexts
        self.connect_timeout_s = connect_timeout_s
        self.max_streams_per_conn = max_streams_per_conn
        self.idle_timeout_s = idle_timeout_s
        self.h2_config = h2_config or H2Config(client=True)
        self._entries: dict[PoolKey, _Entry] = {}
        self._on_change = on_change
        self.tunnel_limits = tunnel_limits or TunnelLimits()
        self.budget = budget or BufferBudget()
        self._on_event = on_event
        self.rlog = RateLimitedLog(log)
        self.dials = 0

    @property
    def size(self) -> int:
        return sum(len(e.conns) for e in self._entries.values())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.size)

    def _usable(self, entry: _Entry, fingerprint: str) -> TunnelConnection | None:
        entry.conns = [c for c in entry.conns if not c.closed]
        for c in entry.conns:
            if (
                c.cert_fingerprint == fingerprint
                and c.can_open()
                and c.active_streams < self.max_streams_per_conn
            ):
                return c
        return None

    async def open_stream(
        self,
        source: SpiffeId,
        destination: SpiffeId,
        node_address: str,
        headers: Headers,
        port: int = HBONE_PORT,
    ) -> TunnelStream:
        key = (source, destination, node_address, port)
        entry = self._entries.setdefault(key, _Entry())
        entry.last_used = time.monotonic()
        cert = await self.certs(source)
        conn = self._usable(entry, cert.fingerprint_sha256)
        if conn is None:
            async with entry.lock:
                conn = self._usable(entry, cert.fingerprint_sha256)
                if conn is None:
                    conn = await self._dial(cert, destination, node_address, port)
                    entry.conns.append(conn)
                    self._changed()
        try:
            return await conn.open_stream(headers)
        except TunnelError:
            if conn.closed:
                self._changed()
            raise

    async def _dial(
        self, source: WorkloadCert, destination: SpiffeId, host: str, port: int
    ) -> TunnelConnection:
        try:
            reader, writer, _peer = await connect_tls(
                host,
                port,
                source=source,
                destination=destination,
                contexts=self.contexts,
                timeout_s=self.connect_timeout_s,
            )
        except TimeoutError:
            raise TunnelError(f"connect to {host}:{port} timed out after {self.connect_timeout_s}s") from None
        except PeerRejected as e:
            raise TunnelError(f"tunnel peer {host}:{port} refused: {e} ({e.reason})") from e
        except OSError as e:
            raise TunnelError(f"cannot reach tunnel {host}:{port}: {e}") from e
        self.dials += 1
        conn = TunnelConnection(
            reader,
            writer,
            client=True,
            config=self.h2_config,
            name=f"{host}:{port}",
            limits=self.tunnel_limits,
            budget=self.budget,
            on_event=self._on_event,
            rlog=self.rlog,
        )
        conn.cert_fingerprint = source.fingerprint_sha256
        return conn

    async def reap(self) -> int:
        """Close connections idle (no stream) for longer than the idle timeout."""
        now = time.monotonic()
        closed = 0
        for key, entry in list(self._entries.items()):
            newest = entry.conns[-1].cert_fingerprint if entry.conns else ""
            idle = now - entry.last_used >= self.idle_timeout_s
            for c in list(entry.conns):
                superseded = c.cert_fingerprint != newest  # renewed: drained old connection
                if c.active_streams == 0 and (idle or superseded or c.retired):
                    await c.close()
                    entry.conns.remove(c)
                    closed += 1
            if not entry.conns:
                del self._entries[key]
        if closed:
            self._changed()
        return closed

    async def close(self) -> None:
        for entry in self._entries.values():
            for c in entry.conns:
                with contextlib.suppress(Exception):
                    await c.close()
        self._entries.clear()
        self._changed()
