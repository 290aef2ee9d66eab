"""Choosing a backend and reading one snapshot from it: what the agent, the CLI and the
CA service share."""

from __future__ import annotations

from agent.control.backend import Backend
from agent.control.embedded import EmbeddedBackend
from agent.control.etcd import EtcdBackend, EtcdTls
from agent.control.snapshot import Snapshot, SnapshotBuilder


def open_backend(registry_dir: str, etcd_url: str | None, etcd_tls: EtcdTls | None = None) -> Backend:
    """etcd at ``etcd_url`` (one or several comma-separated members; TLS files for
    https://) if given, else the embedded store in ``registry_dir``."""
    if etcd_url:
        return EtcdBackend(etcd_url, tls=etcd_tls)
    return EmbeddedBackend(registry_dir)


def read_snapshot(backend: Backend) -> Snapshot:
    """One full read, frozen (for commands; agents keep theirs current with a Registry)."""
    state = backend.read()
    b = SnapshotBuilder()
    b.reset(state.items)
    return b.build(state.revision)
