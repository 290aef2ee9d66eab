"""The backend Protocol shared by the embedded store and etcd.

How this works: a backend is a flat map ``key -> JSON text`` under
:data:`agent.control.model.PREFIX` with a monotonically increasing revision.

- ``read()`` returns everything at one revision (a :class:`Reset`).
- ``commit(puts, deletes, expect_revision=R)`` applies all changes atomically.
  With ``expect_revision`` the commit is *guarded*: it fails with
  :class:`ConflictError` when another guarded commit happened after revision R
  (apply uses this so two concurrent applies cannot take the same VIP). Health
  status writes are unguarded.
- ``changes(after_revision, timeout_s)`` blocks up to ``timeout_s`` and returns
  what changed after ``after_revision``: :class:`Events` (puts and deletes), a
  :class:`Reset` when history is gone (etcd compaction; the embedded store always
  answers with a Reset), or None when nothing happened. It raises
  :class:`BackendUnavailable` when the store cannot be reached.

One contract test suite (tests/unit/test_control_backend_contract.py and its
etcd twin) runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Reset:
    revision: int
    items: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Events:
    revision: int
    puts: Mapping[str, str]
    deletes: tuple[str, ...]


Change = Reset | Events


class Backend(Protocol):
    @property
    def location(self) -> str:
        """Where the state lives, for messages (a directory, an etcd URL)."""
        ...

    def read(self) -> Reset: ...

    def commit(
        self, puts: Mapping[str, str], deletes: Collection[str] = (), *,
        expect_revision: int | None = None,
    ) -> int:
        """Apply atomically; return the new revision."""
        ...

    def changes(self, after_revision: int, timeout_s: float) -> Change | None: ...

    def close(self) -> None: ...
