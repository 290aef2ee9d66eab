"""The node's workload certs: issue on first use, renew at half life, tell listeners.

How this works: :class:`CertManager` keeps the current :class:`WorkloadCert`
per identity. A cert is *due* when ``now >= not_before + (not_after -
not_before) / 2``. :meth:`CertManager.renew_due` renews every due cert through
the :class:`Issuer` (in-process :class:`LocalIssuer`, or the CA service client
in :mod:`agent.identity.service`); a failure keeps the old cert (still valid
for half its life) and is retried after ``retry_s``. Listeners (the server
contexts, metrics) are called with each new cert. :meth:`CertManager.run` is
the loop the agent runs in its task group: renew, then sleep on the injected
clock until the next renewal or retry. Tests drive it with a fake clock and
call ``renew_due`` directly; nothing sleeps for real.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from agent.identity.ca import MeshCA
from agent.identity.certs import DEFAULT_TTL_S, WorkloadCert
from agent.identity.clock import Clock
from agent.identity.errors import IdentityError
from agent.identity.spiffe import SpiffeId

log = logging.getLogger(__name__)


class Issuer(Protocol):
    async def issue(self, spiffe_id: SpiffeId, *, now: datetime, ttl_s: int) -> WorkloadCert: ...


class LocalIssuer:
    """Single host: the CA runs in the agent process."""

    def __init__(self, ca: MeshCA) -> None:
        self.ca = ca

    async def issue(self, spiffe_id: SpiffeId, *, now: datetime, ttl_s: int) -> WorkloadCert:
        return self.ca.issue(spiffe_id, now=now, ttl_s=ttl_s)


RenewListener = Callable[[WorkloadCert], None]


@dataclass(frozen=True, slots=True)
class CertStatus:
    spiffe_id: SpiffeId
    not_after: datetime | None
    renew_at: datetime | None
    fingerprint_sha256: str | None
    last_error: str | None


class CertManager:
    def __init__(self, issuer: Issuer, clock: Clock, *, ttl_s: int = DEFAULT_TTL_S,
                 retry_s: float = 10.0, max_sleep_s: float = 300.0) -> None:
        if retry_s <= 0 or max_sleep_s <= 0:
            raise ValueError(f"expected retry_s and max_sleep_s > 0, got {retry_s}, {max_sleep_s}")
        self._issuer = issuer
        self._clock = clock
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.max_sleep_s = max_sleep_s
        self._certs: dict[SpiffeId, WorkloadCert] = {}
        self._wanted: set[SpiffeId] = set()
        self._retry_at: dict[SpiffeId, datetime] = {}
        self._errors: dict[SpiffeId, str] = {}
        self._listeners: list[RenewListener] = []
        self._locks: dict[SpiffeId, asyncio.Lock] = {}

    def subscribe(self, listener: RenewListener) -> None:
        """``listener(cert)`` runs after every issuance or renewal (it must not block)."""
        self._listeners.append(listener)

    def current(self, spiffe_id: SpiffeId) -> WorkloadCert | None:
        """The cert to use now, if any (synchronous, for the data path)."""
        return self._certs.get(spiffe_id)

    def identities(self) -> list[SpiffeId]:
        return sorted(self._wanted, key=str)

    async def ensure(self, spiffe_id: SpiffeId) -> WorkloadCert:
        """The current cert of ``spiffe_id``; issued now if there is none or it is due."""
        self._wanted.add(spiffe_id)
        cert = self._certs.get(spiffe_id)
        if cert is not None and self._clock.now() < cert.renew_at:
            return cert
        return await self._renew(spiffe_id)

    def forget(self, spiffe_id: SpiffeId) -> None:
        """The workload left this node: stop renewing its cert."""
        self._wanted.discard(spiffe_id)
        self._certs.pop(spiffe_id, None)
        self._retry_at.pop(spiffe_id, None)
        self._errors.pop(spiffe_id, None)
        self._locks.pop(spiffe_id, None)

    def due(self) -> list[SpiffeId]:
        now = self._clock.now()
        out = []
        for sid in self.identities():
            cert = self._certs.get(sid)
            retry = self._retry_at.get(sid)
            if retry is not None and now < retry:
                continue
            if cert is None or now >= cert.renew_at:
                out.append(sid)
        return out

    async def renew_due(self) -> list[WorkloadCert]:
        """Renew every due cert; failures are logged, kept in status, and retried later."""
        renewed = []
        for sid in self.due():
            try:
                renewed.append(await self._renew(sid))
            except IdentityError as e:
                self._errors[sid] = e.message
                self._retry_at[sid] = self._clock.now() + timedelta(seconds=self.retry_s)
                log.warning("renewal of %s failed, retrying in %.0fs: %s", sid, self.retry_s, e.message)
        return renewed

    async def _renew(self, spiffe_id: SpiffeId) -> WorkloadCert:
        lock = self._locks.setdefault(spiffe_id, asyncio.Lock())
        async with lock:  # many connections of a new workload at once: one issuance
            cert = self._certs.get(spiffe_id)
            if cert is not None and self._clock.now() < cert.renew_at:
                return cert
            return await self._issue(spiffe_id)

    async def _issue(self, spiffe_id: SpiffeId) -> WorkloadCert:
        cert = await self._issuer.issue(spiffe_id, now=self._clock.now(), ttl_s=self.ttl_s)
        if cert.spiffe_id != spiffe_id:
            raise IdentityError(f"issuer: expected a cert for {spiffe_id}, got one for {cert.spiffe_id}")
        self._certs[spiffe_id] = cert
        self._retry_at.pop(spiffe_id, None)
        self._errors.pop(spiffe_id, None)
        for listener in self._listeners:
            listener(cert)
        return cert

    def next_wakeup(self) -> datetime | None:
        """When :meth:`renew_due` has something to do next (None: nothing wanted)."""
        times = []
        for sid in self._wanted:
            retry = self._retry_at.get(sid)
            cert = self._certs.get(sid)
            if retry is not None:
                times.append(retry)
            elif cert is not None:
                times.append(cert.renew_at)
            else:
                times.append(self._clock.now())
        return min(times, default=None)

    def sleep_s(self) -> float:
        """How long :meth:`run` sleeps before the next round (bounded by ``max_sleep_s``)."""
        nxt = self.next_wakeup()
        if nxt is None:
            return self.max_sleep_s
        return min(self.max_sleep_s, max(0.0, (nxt - self._clock.now()).total_seconds()))

    async def run(self) -> None:
        """Renew forever on the injected clock; the agent cancels the task to stop it."""
        while True:
            await self.renew_due()
            await self._clock.sleep(max(self.sleep_s(), 0.001))

    def status(self) -> list[CertStatus]:
        out = []
        for sid in self.identities():
            cert = self._certs.get(sid)
            out.append(CertStatus(
                spiffe_id=sid,
                not_after=cert.not_after if cert else None,
                renew_at=cert.renew_at if cert else None,
                fingerprint_sha256=cert.fingerprint_sha256 if cert else None,
                last_error=self._errors.get(sid),
            ))
        return out
