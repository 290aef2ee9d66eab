"""The embedded backend: the registry in one JSON file in a local directory.

How this works: ``<dir>/state.json`` holds ``{"format": 1, "revision": N,
"guard": G, "items": {key: value}}``. A commit takes an exclusive ``flock`` on
``<dir>/lock`` (so the CLI and the agent can both write), reads the file, writes
the new state to a temporary file in the same directory, fsyncs it, renames it
over ``state.json`` and fsyncs the directory: after a crash the file is either
the old or the new state, never torn. ``changes`` polls the file's stat and
answers with a full :class:`Reset` when the revision moved.

A state file that cannot be parsed raises :class:`StateCorruptError` naming the
file; it is never overwritten silently. ``changes`` raises it on every call
while the file stays corrupt (the file's stat is remembered only after a good
read), so a watching agent stays stale until the file is fixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.control.backend import Reset
from agent.control.errors import ConflictError, RegistryError, StateCorruptError

STATE_FILE = "state.json"
FORMAT = 1
POLL_INTERVAL_S = 0.02


class EmbeddedBackend:
    def __init__(self, directory: str | os.PathLike[str], *, create: bool = True):
        self.dir = Path(directory)
        self.path = self.dir / STATE_FILE
        if create:
            try:
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise RegistryError(
                    f"cannot create registry directory {self.dir}: {e.strerror}",
                    hint="pass --registry-dir (or NODEMESH_REGISTRY_DIR) a writable directory",
                ) from e
        self._last_stat: tuple[int, int, int] | None = None
        self._seen_revision: int | None = None

    @property
    def location(self) -> str:
        return str(self.dir)

    # -- reading ---------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": FORMAT, "revision": 0, "guard": 0, "items": {}}
        except OSError as e:
            raise RegistryError(f"cannot read registry state {self.path}: {e.strerror}") from e
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"expected an object with \"format\": {FORMAT}")
            rev, guard, items = doc["revision"], doc["guard"], doc["items"]
            if not (isinstance(rev, int) and isinstance(guard, int) and isinstance(items, dict)
                    and all(isinstance(v, str) for v in items.values())):
                raise ValueError("expected integer revision/guard and an items object of strings")
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise StateCorruptError(
                f"registry state file {self.path} is corrupted: {e}",
                hint=f"restore it from a backup, or move it away to start empty "
                     f"(mv {self.path} {self.path}.bad); nothing was changed",
            ) from e
        return doc

    def read(self) -> Reset:
        doc = self._load()
        return Reset(doc["revision"], dict(doc["items"]))

    # -- writing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise RegistryError(f"cannot lock registry {self.dir}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def commit(
        self, puts: Mapping[str, str], deletes: Collection[str] = (), *,
        expect_revision: int | None = None,
    ) -> int:
        with self._locked():
            doc = self._load()
            if expect_revision is not None and doc["guard"] > expect_revision:
                raise ConflictError(
                    f"registry changed since revision {expect_revision} "
                    f"(now {doc['revision']}); retry")
            items: dict[str, str] = doc["items"]
            for k in deletes:
                items.pop(k, None)
            items.update(puts)
            doc["revision"] += 1
            if expect_revision is not None:
                doc["guard"] = doc["revision"]
            self._write(doc)
            return int(doc["revision"])

    def _write(self, doc: dict[str, Any]) -> None:
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RegistryError(f"cannot write registry state {self.path}: {e.strerror}") from e

    # -- watching --------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changes(self, after_revision: int, timeout_s: float) -> Reset | None:
        deadline = time.monotonic() + timeout_s
        while True:
            st = self._stat()
            if st != self._last_stat or self._seen_revision != after_revision:
                state = self.read()  # a corrupt file raises, every time, until it is fixed
                self._last_stat = st
                self._seen_revision = state.revision
                if state.revision != after_revision:
                    return state
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_INTERVAL_S)

    def close(self) -> None:
        pass
