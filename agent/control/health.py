"""Active health checks with Consul's semantics, run by the agent for its node.

How this works: :class:`HealthTracker` is the bookkeeping, without I/O and with
time passed in. It knows every check of the workloads on this node, when each
is due, and folds probe results into statuses the way Consul's status handler
does: a passing or warning result counts towards ``success_before_passing``
and resets the failure count; a critical one counts towards
``failures_before_critical`` and resets the success count; the status changes
only when the count is reached. A check starts in its ``initial_status``
(critical unless configured). A workload's status is the worst of its checks;
when it has been critical longer than a check's
``deregister_critical_after_s`` the workload is to be deregistered.

Probe results follow Consul: HTTP 2xx passing, 429 warning, anything else
(other codes, timeouts, refused connections) critical; TCP connect succeeded
passing, else critical. :class:`HealthMonitor` drives the tracker with real
probes on asyncio and writes status changes to the backend (unguarded puts of
``health/<ns>/<name>``), from where every agent's snapshot picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.control.backend import Backend
from agent.control.errors import RegistryError
from agent.control.model import CheckSpec, Health, HealthStatus, Workload, health_key
from agent.control.snapshot import NsName, Snapshot, worst

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Check:
    spec: CheckSpec
    status: Health
    next_due_s: float
    successes: int = 0
    failures: int = 0
    output: str = ""


@dataclass(slots=True)
class _WorkloadChecks:
    checks: list[_Check]
    status: Health
    critical_since_s: float | None
    signature: tuple[CheckSpec, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Probe:
    workload: NsName
    index: int
    spec: CheckSpec


@dataclass(frozen=True, slots=True)
class StatusChange:
    workload: NsName
    status: Health
    output: str


class HealthTracker:
    """Check scheduling and status bookkeeping; every method takes ``now`` (seconds)."""

    def __init__(self) -> None:
        self._w: dict[NsName, _WorkloadChecks] = {}

    def sync(self, workloads: Iterable[Workload], now: float) -> None:
        """Track exactly these workloads' checks (new ones are due at once)."""
        seen = set()
        for wl in workloads:
            key = (wl.namespace, wl.name)
            seen.add(key)
            cur = self._w.get(key)
            if cur is not None and cur.signature == wl.checks:
                continue
            checks = [_Check(c, c.initial_status, now) for c in wl.checks]
            status = worst(c.status for c in checks)
            self._w[key] = _WorkloadChecks(checks, status,
                                           now if status == Health.CRITICAL else None, wl.checks)
        for key in set(self._w) - seen:
            del self._w[key]

    def status(self, key: NsName) -> Health | None:
        wc = self._w.get(key)
        return None if wc is None else wc.status

    def initial(self) -> list[StatusChange]:
        return [StatusChange(k, wc.status, "") for k, wc in self._w.items()]

    def due(self, now: float) -> list[Probe]:
        out = []
        for key, wc in self._w.items():
            for i, c in enumerate(wc.checks):
                if c.next_due_s <= now:
                    c.next_due_s = now + c.spec.interval_s
                    out.append(Probe(key, i, c.spec))
        return out

    def next_due_s(self) -> float | None:
        return min((c.next_due_s for wc in self._w.values() for c in wc.checks), default=None)

    def record(self, probe: Probe, result: Health, output: str, now: float,
               ) -> StatusChange | None:
        """Fold one probe result in; return the workload's new status if it changed."""
        wc = self._w.get(probe.workload)
        if wc is None or probe.index >= len(wc.checks) or wc.checks[probe.index].spec != probe.spec:
            return None  # the workload or check went away meanwhile
        c = wc.checks[probe.index]
        c.output = output
        if result in (Health.PASSING, Health.WARNING):
            c.successes += 1
            c.failures = 0
            if c.successes >= c.spec.success_before_passing:
                c.status = result
        else:
            c.failures += 1
            c.successes = 0
            if c.failures >= c.spec.failures_before_critical:
                c.status = Health.CRITICAL
        new = worst(x.status for x in wc.checks)
        if new == wc.status:
            return None
        wc.status = new
        wc.critical_since_s = now if new == Health.CRITICAL else None
        return StatusChange(probe.workload, new, output)

    def to_deregister(self, now: float) -> list[NsName]:
        out = []
        for key, wc in self._w.items():
            if wc.critical_since_s is None:
                continue
            limits = [c.spec.deregister_critical_after_s for c in wc.checks
                      if c.spec.deregister_critical_after_s is not None]
            if limits and now - wc.critical_since_s >= min(limits):
                out.append(key)
        return out


_STATUS_RE = re.compile(rb"HTTP/\d\.\d (\d{3})", re.ASCII)


async def probe_http(url: str, timeout_s: float) -> tuple[Health, str]:
    u = urllib.parse.urlsplit(url)
    tls = u.scheme == "https"
    host = u.hostname or ""
    port = u.port or (443 if tls else 80)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl.create_default_context() if tls else None)
            try:
                hosthdr = u.netloc.rsplit("@", 1)[-1]
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\n"
                             "User-Agent: nodemesh-health-check\r\nAccept: */*\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return Health.CRITICAL, f"GET {url}: timed out after {timeout_s}s"
    except (OSError, ssl.SSLError) as e:
        return Health.CRITICAL, f"GET {url}: {e}"
    m = _STATUS_RE.match(line)
    if m is None:
        return Health.CRITICAL, f"GET {url}: not an HTTP response: {line[:60]!r}"
    code = int(m.group(1))
    out = f"HTTP GET {url}: {code}"
    if 200 <= code < 300:
        return Health.PASSING, out
    if code == 429:
        return Health.WARNING, out
    return Health.CRITICAL, out


async def probe_tcp(target: str, timeout_s: float) -> tuple[Health, str]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
    except TimeoutError:
        return Health.CRITICAL, f"TCP connect {target}: timed out after {timeout_s}s"
    except OSError as e:
        return Health.CRITICAL, f"TCP connect {target}: {e}"
    return Health.PASSING, f"TCP connect {target}: Success"


async def run_probe(spec: CheckSpec) -> tuple[Health, str]:
    if spec.kind == "http":
        return await probe_http(spec.target, spec.timeout_s)
    return await probe_tcp(spec.target, spec.timeout_s)


class HealthMonitor:
    """Runs the checks of this node's workloads and writes status changes to the backend."""

    def __init__(self, node: str, backend: Backend, snapshot: Callable[[], Snapshot], *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 max_tick_s: float = 0.1):
        self.node = node
        self.backend = backend
        self._snapshot = snapshot
        self._clock = clock
        self._wall = wall_clock
        self._max_tick_s = max_tick_s
        self.tracker = HealthTracker()

    def _local(self, snap: Snapshot) -> list[Workload]:
        return [wl for wl in snap.workloads.values() if wl.node == self.node and wl.checks]

    async def _write(self, change: StatusChange) -> None:
        st = HealthStatus(change.status, change.output[:500], self._wall())
        key = health_key(*change.workload)
        doc = json.dumps(st.to_doc(), sort_keys=True)
        try:
            await asyncio.to_thread(self.backend.commit, {key: doc})
        except RegistryError as e:
            log.warning("health: cannot record %s as %s: %s", key, change.status, e.message)

    async def _deregister(self, key: NsName) -> None:
        snap = self._snapshot()
        wl = snap.workloads.get(key)
        if wl is None:
            return
        log.info("health: deregistering %s/%s, critical too long", *key)
        try:
            await asyncio.to_thread(self.backend.commit, {}, [wl.key, health_key(*key)])
        except RegistryError as e:
            log.warning("health: cannot deregister %s/%s: %s", *key, e.message)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: probe what is due, record, write changes."""
        pending: set[asyncio.Task[tuple[Probe, Health, str]]] = set()
        known: dict[NsName, Health] = {}

        async def one(p: Probe) -> tuple[Probe, Health, str]:
            h, out = await run_probe(p.spec)
            return p, h, out

        try:
            while not stop.is_set():
                now = self._clock()
                self.tracker.sync(self._local(self._snapshot()), now)
                for ch in self.tracker.initial():
                    if known.get(ch.workload) is None:
                        known[ch.workload] = ch.status
                        await self._write(ch)
                for p in self.tracker.due(now):
                    pending.add(asyncio.create_task(one(p)))
                wait_s = self._max_tick_s
                nxt = self.tracker.next_due_s()
                if nxt is not None:
                    wait_s = max(0.0, min(wait_s, nxt - now))
                if pending:
                    done, pending = await asyncio.wait(pending, timeout=wait_s)
                else:
                    done = set()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await stop.wait()
                for t in done:
                    p, h, out = t.result()
                    rec = self.tracker.record(p, h, out, self._clock())
                    if rec is not None:
                        known[rec.workload] = rec.status
                        await self._write(rec)
                for key in self.tracker.to_deregister(self._clock()):
                    await self._deregister(key)
                for key in set(known) - {k for k in known if self.tracker.status(k)}:
                    del known[key]
        finally:
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
