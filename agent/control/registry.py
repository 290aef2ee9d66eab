"""The registry watcher: keeps the current Snapshot from a backend, in an agent.

How this works: :meth:`Registry.step` does one unit of work: a full read when
we have none yet (or history was lost), else one ``backend.changes`` call with
a short timeout. Each change is folded into the :class:`SnapshotBuilder` and a
new immutable Snapshot replaces the old one in one attribute assignment (readers
never lock). Any :class:`RegistryError` (etcd unreachable, corrupted state file)
keeps the last snapshot serving and marks the registry *stale* with the reason
and the time it started; the next successful call clears it. :meth:`start` runs
``step`` on a daemon thread with bounded backoff; tests may call ``step``
directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.control.backend import Backend, Change, Reset
from agent.control.errors import RegistryError
from agent.control.snapshot import Snapshot, SnapshotBuilder
from agent.gcpause import paused

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 1.0


@dataclass(frozen=True, slots=True)
class RegistryStatus:
    revision: int
    stale: bool
    stale_since_s: float | None  # monotonic clock
    last_error: str
    snapshots_built: int
    full_reads: int  # initial read, compactions (etcd), every change (embedded)


class Registry:
    def __init__(self, backend: Backend, *, poll_timeout_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 on_snapshot: Callable[[Snapshot], None] | None = None):
        self.backend = backend
        self._builder = SnapshotBuilder()
        self._snapshot = Snapshot(revision=0)
        self._poll_timeout_s = poll_timeout_s
        self._clock = clock
        self._on_snapshot = on_snapshot
        self._have_state = False
        self._stale_since: float | None = None
        self._last_error = ""
        self._built = 0
        self._full_reads = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def stale(self) -> bool:
        return self._stale_since is not None or not self._have_state

    def status(self) -> RegistryStatus:
        return RegistryStatus(self._snapshot.revision, self.stale, self._stale_since,
                              self._last_error, self._built, self._full_reads)

    def step(self, timeout_s: float | None = None) -> bool:
        """One read or watch call; True when the backend answered."""
        change: Change | None
        try:
            if not self._have_state:
                change = self.backend.read()
            else:
                change = self.backend.changes(self._snapshot.revision,
                                              self._poll_timeout_s if timeout_s is None
                                              else timeout_s)
        except RegistryError as e:
            if self._stale_since is None:
                self._stale_since = self._clock()
                log.warning("registry: %s failed, serving revision %d: %s",
                            self.backend.location, self._snapshot.revision, e.message)
            self._last_error = e.message
            return False
        if change is not None:
            with paused():  # no collection in the middle of decoding a change
                if isinstance(change, Reset):
                    self._full_reads += 1
                    self._builder.reset(change.items)
                else:
                    self._builder.apply(change.puts, change.deletes)
                self._publish(self._builder.build(change.revision))
        self._have_state = True
        if self._stale_since is not None:
            log.info("registry: %s reachable again", self.backend.location)
        self._stale_since = None
        self._last_error = ""
        return True

    def _publish(self, snap: Snapshot) -> None:
        with self._cond:
            self._snapshot = snap
            self._built += 1
            self._cond.notify_all()
        if self._on_snapshot is not None:
            self._on_snapshot(snap)

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout_s: float) -> Snapshot | None:
        """Block until a snapshot satisfies ``predicate`` (thread mode); None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._snapshot):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._snapshot

    # -- thread mode -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            if self.step():
                backoff = 0.05
            else:
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.backend.close()
