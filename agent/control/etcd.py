"""The etcd backend, over etcd's native gRPC API.

How this works: etcd's API is gRPC (``etcdserverpb.KV`` and ``.Watch``). We
speak it with :mod:`agent.control.h2grpc` (our HTTP/2 core, no grpcio) and the
hand-written messages of :mod:`agent.control.etcd_wire`. An earlier version
used etcd's JSON gateway (``/v3/kv/...``): the gateway's JSON/base64
translation cost etcd ~80 ms for a 1,000-put transaction that the native API
commits in ~20 ms, and as much again for every watcher.

- ``read`` is one Range over the registry prefix; its header revision is the
  snapshot's revision.
- ``commit`` is one Txn (atomic). A guarded commit compares
  ``mod_revision(GUARD_KEY) < expect_revision + 1`` and rewrites the guard key.
- ``changes`` keeps one Watch stream open on its own connection, read by a
  thread into a queue. The stream starts at ``after_revision + 1``, so a
  reconnect resumes where the last delivered event left off. Resume positions
  come from event ``mod_revision``. If etcd answers that the start revision
  was compacted, we re-read everything and return a Reset. A broken stream or
  refused connection raises :class:`BackendUnavailable`; the caller keeps its
  last snapshot. Watches require a leader: a member cut off from the quorum
  ends them, so its silence is never taken for "no changes".
- Several members (one cluster) may be given: calls and new watches go to the
  current one and move on to the next when it cannot be reached.
- ``https://`` endpoints speak TLS (ALPN h2) with :class:`EtcdTls` files: the
  CA of etcd's server certificate and, for ``--client-cert-auth``, ours.

etcd's own limits apply to a commit: ``--max-txn-ops`` (default 128) and
``--max-request-bytes`` (default 1.5 MiB). An apply larger than that is
rejected by etcd with a clear message rather than split (splitting would not
be atomic).
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.control import etcd_wire as wire
from agent.control.backend import Change, Events, Reset
from agent.control.errors import BackendUnavailable, ConflictError, RegistryError, SettingError
from agent.control.h2grpc import GrpcConnection, GrpcError, GrpcUnavailable
from agent.control.model import GUARD_KEY, PREFIX

_RANGE = "/etcdserverpb.KV/Range"
_TXN = "/etcdserverpb.KV/Txn"
_COMPACT = "/etcdserverpb.KV/Compact"
_WATCH = "/etcdserverpb.Watch/Watch"


def prefix_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (etcd's range_end)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return b.decode()


_KEY = PREFIX.encode()
_END = prefix_end(PREFIX).encode()
_GUARD = GUARD_KEY.encode()


def _conn_error(url: str, e: BaseException) -> BackendUnavailable:
    return BackendUnavailable(
        f"etcd at {url} is unreachable: {e}",
        hint="check that etcd is running and --etcd / NODEMESH_ETCD points at its client URL",
    )


def _events(resp: wire.WatchResponse) -> Events:
    """The net effect of one watch answer: the last event per key wins."""
    puts: dict[str, str] = {}
    deletes: dict[str, None] = {}  # ordered set: O(1) when a key is deleted, then put again
    rev = 0
    for etype, kv in resp.events:
        key = kv.key.decode()
        if kv.mod_revision > rev:
            rev = kv.mod_revision
        if etype == wire.EVENT_DELETE:
            puts.pop(key, None)
            deletes[key] = None
        else:
            puts[key] = kv.value.decode()
            deletes.pop(key, None)
    return Events(rev, puts, tuple(deletes))


# etcd ends a watch carrying this metadata when its member loses the cluster's leader
# (instead of staying silent on a member cut off from the others), so we move on.
_REQUIRE_LEADER = (("hasleader", "true"),)


class _WatchStream:
    """One Watch call on its own connection, read by a daemon thread into ``self.q``."""

    def __init__(self, ep: _Endpoint, start_revision: int, timeout_s: float,
                 tls: ssl.SSLContext | None):
        self.start_revision = start_revision
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.established = False  # etcd confirmed the watch ("created")
        self.started = time.monotonic()
        self.endpoint = ep
        self._conn = GrpcConnection(ep.host, ep.port, timeout_s=timeout_s, keepalive=True, tls=tls)
        try:
            self._sid = self._conn.open_stream(
                _WATCH, wire.watch_create_request(_KEY, _END, start_revision), _REQUIRE_LEADER)
        except GrpcUnavailable:
            self._conn.close()
            raise
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                for raw in self._conn.read_messages(self._sid, None):
                    res = wire.watch_response(raw)
                    if res.compact_revision:
                        self.q.put(("compacted", res.compact_revision))
                        return
                    if res.canceled:
                        self.q.put(("error", f"watch canceled: {res.cancel_reason}"))
                        return
                    if res.created:
                        self.q.put(("created", None))
                    if res.events:
                        self.q.put(("events", _events(res)))
        except (GrpcUnavailable, GrpcError, wire.WireError, OSError, ValueError) as e:
            if not self._closed:
                self.q.put(("error", f"watch stream failed: {e}"))

    def close(self) -> None:
        self._closed = True
        self._conn.close()


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str
    host: str
    port: int
    tls: bool


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Files for etcd's https:// client port: the CA that signed etcd's server
    certificate ("" = the system's trust store) and, when etcd runs with
    ``--client-cert-auth``, our client certificate and key."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def context(self) -> ssl.SSLContext:
        if bool(self.cert) != bool(self.key):
            raise SettingError("an etcd client certificate needs its key, and a key its certificate")
        try:
            ctx = ssl.create_default_context(cafile=self.ca or None)
        except (OSError, ssl.SSLError) as e:
            raise SettingError(f"cannot use {self.ca} as the etcd CA: {e}") from e
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise SettingError(f"cannot use {self.cert} / {self.key} as the etcd client "
                                    f"certificate: {e}") from e
        ctx.set_alpn_protocols(["h2"])
        return ctx


_URL_FORM = "http://HOST:PORT or https://HOST:PORT"


def parse_endpoints(urls: str | Sequence[str]) -> tuple[_Endpoint, ...]:
    """``http://a:2379,http://b:2379`` (or a list) -> endpoints; RegistryError names a bad one."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for raw in items:
        url = raw.strip()
        u = urllib.parse.urlsplit(url)
        try:
            port = u.port or 2379
        except ValueError:
            port = 0
        if u.scheme not in ("http", "https") or not u.hostname or not port or u.path not in ("", "/"):
            raise SettingError(f"etcd URL must look like {_URL_FORM}, got {url!r}")
        out.append(_Endpoint(url, u.hostname, port, u.scheme == "https"))
    if not out:
        raise SettingError("no etcd endpoint given")
    if len({ep.tls for ep in out}) > 1:
        raise SettingError("etcd endpoints mix http:// and https://: one cluster speaks one of them")
    return tuple(out)


class EtcdBackend:
    """etcd at one or several client URLs (the members of one cluster).

    Calls go to the current member; when it cannot be reached, the next one is
    tried, and so on once around the list, before the call fails. The watch
    does the same when it has to be re-created."""

    def __init__(self, urls: str | Sequence[str], *, timeout_s: float = 5.0,
                 tls: EtcdTls | None = None):
        self._eps = parse_endpoints(urls)
        self.url = ",".join(ep.url for ep in self._eps)
        self._tls: ssl.SSLContext | None = None
        if self._eps[0].tls:
            self._tls = (tls or EtcdTls()).context()
        elif tls is not None and (tls.ca or tls.cert):
            raise SettingError(f"etcd TLS files are given but {self.url} is http://: use https://")
        self._current = 0  # index of the member calls go to
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: GrpcConnection | None = None
        self._watch: _WatchStream | None = None
        self._watch_revision = -1  # last revision handed out by changes()

    @property
    def location(self) -> str:
        return self.url

    def _unreachable(self, errors: list[str]) -> BackendUnavailable:
        return _conn_error(self.url, Exception("; ".join(errors)))

    def _call(self, method: str, request: bytes) -> bytes:
        with self._lock:
            errors: list[str] = []
            tried = 0
            while tried < len(self._eps):
                ep = self._eps[self._current]
                fresh = self._conn is None
                try:
                    if self._conn is None:
                        self._conn = GrpcConnection(ep.host, ep.port, timeout_s=self._timeout_s,
                                                    tls=self._tls)
                    return self._conn.unary(method, request)
                except GrpcUnavailable as e:
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    if not fresh:
                        continue  # a kept connection the server closed meanwhile: reconnect once
                    errors.append(f"{ep.url}: {e}" if len(self._eps) > 1 else str(e))
                    tried += 1
                    self._current = (self._current + 1) % len(self._eps)
                except GrpcError as e:
                    raise RegistryError(f"etcd at {ep.url} rejected {method.rsplit('/', 1)[-1]}: "
                                        f"{e.message}") from e
            raise self._unreachable(errors)

    def _open_watch(self, start_revision: int) -> _WatchStream:
        errors: list[str] = []
        for _ in self._eps:
            ep = self._eps[self._current]
            try:
                return _WatchStream(ep, start_revision, self._timeout_s, self._tls)
            except GrpcUnavailable as e:
                errors.append(f"{ep.url}: {e}" if len(self._eps) > 1 else str(e))
                self._current = (self._current + 1) % len(self._eps)
        raise self._unreachable(errors)

    def read(self) -> Reset:
        raw = self._call(_RANGE, wire.range_request(_KEY, _END))
        try:
            revision, kvs = wire.range_response(raw)
            items = {kv.key.decode(): kv.value.decode() for kv in kvs}
        except (wire.WireError, UnicodeDecodeError) as e:
            raise RegistryError(f"etcd at {self.url} sent a Range answer we cannot read: {e}") from e
        return Reset(revision, items)

    def commit(
        self, puts: Mapping[str, str], deletes: Collection[str] = (), *,
        expect_revision: int | None = None,
    ) -> int:
        ops = [wire.request_op_delete(k.encode()) for k in deletes if k not in puts]
        ops += [wire.request_op_put(k.encode(), v.encode()) for k, v in puts.items()]
        compares: list[bytes] = []
        if expect_revision is not None:
            compares.append(wire.compare_mod_less(_GUARD, expect_revision + 1))
            ops.append(wire.request_op_put(_GUARD, b"{}"))
        raw = self._call(_TXN, wire.txn_request(compares, ops))
        try:
            revision, succeeded = wire.txn_response(raw)
        except wire.WireError as e:
            raise RegistryError(f"etcd at {self.url} sent a Txn answer we cannot read: {e}") from e
        if expect_revision is not None and not succeeded:
            raise ConflictError(f"registry in etcd changed since revision {expect_revision}; retry")
        return revision

    def compact(self, revision: int) -> None:
        self._call(_COMPACT, wire.compaction_request(revision, physical=True))

    def changes(self, after_revision: int, timeout_s: float) -> Change | None:
        if self._watch is not None and after_revision != self._watch_revision:
            self._watch.close()
            self._watch = None
        if self._watch is None:
            self._watch = self._open_watch(after_revision + 1)
            self._watch_revision = after_revision
        watch = self._watch
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                kind, value = watch.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if not watch.established:  # a new watch etcd has not confirmed: not "no news"
                    if time.monotonic() - watch.started > self._timeout_s:
                        self._drop_watch(watch)  # a member that accepts but never answers
                    raise BackendUnavailable(
                        f"etcd at {watch.endpoint.url} is unreachable: the watch was not confirmed "
                        f"in {timeout_s}s") from None
                return None
            if kind != "created":
                break
            watch.established = True
        if kind == "events":
            assert isinstance(value, Events)
            self._watch_revision = value.revision
            return value
        if kind == "compacted":
            watch.close()
            self._watch = None
            state = self.read()  # history is gone: start over from a full read
            self._watch_revision = state.revision
            return state
        self._drop_watch(watch)
        raise BackendUnavailable(f"etcd at {watch.endpoint.url} is unreachable: {value}")

    def _drop_watch(self, watch: _WatchStream) -> None:
        """A watch that failed: the next one starts on the next member."""
        watch.close()
        if self._watch is watch:
            self._watch = None
        if self._eps[self._current] == watch.endpoint:
            self._current = (self._current + 1) % len(self._eps)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
