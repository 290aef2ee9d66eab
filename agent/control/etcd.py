"""The etcd backend, over etcd's v3 JSON gateway (HTTP, stdlib only).

How this works: etcd 3.4 serves its gRPC API as JSON on the client URL:
``/v3/kv/range``, ``/v3/kv/txn`` and the streaming ``/v3/watch`` (one JSON
object per line); keys and values are base64, 64-bit integers are strings.

- ``read`` is one range over the registry prefix; its header revision is the
  snapshot's revision.
- ``commit`` is one txn (atomic). A guarded commit compares
  ``mod_revision(GUARD_KEY) < expect_revision + 1`` and rewrites the guard key.
- ``changes`` keeps one watch stream open, read by a thread into a queue. The
  stream starts at ``after_revision + 1``, so a reconnect resumes where the last
  delivered event left off. Resume positions come from event ``mod_revision``
  (a catching-up watch may carry a header revision ahead of its events). If
  etcd answers that the start revision was compacted, we re-read everything
  and return a Reset. A broken stream or refused connection raises
  :class:`BackendUnavailable`; the caller keeps its last snapshot.

etcd's own limits apply to a commit: ``--max-txn-ops`` (default 128) and
``--max-request-bytes`` (default 1.5 MiB). An apply larger than that is
rejected by etcd with a clear message rather than split (splitting would not
be atomic).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Collection, Mapping
from typing import Any

from agent.control.backend import Change, Events, Reset
from agent.control.errors import BackendUnavailable, ConflictError, RegistryError
from agent.control.model import GUARD_KEY, PREFIX


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def prefix_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (etcd's range_end)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return b.decode()


def _conn_error(url: str, e: BaseException) -> BackendUnavailable:
    return BackendUnavailable(
        f"etcd at {url} is unreachable: {e}",
        hint="check that etcd is running and --etcd / NODEMESH_ETCD points at its client URL",
    )


class _WatchStream:
    """One /v3/watch stream read by a daemon thread into ``self.q``."""

    def __init__(self, host: str, port: int, url: str, start_revision: int, timeout_s: float):
        self.start_revision = start_revision
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.established = False  # etcd confirmed the watch ("created")
        self._conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        body = json.dumps({"create_request": {
            "key": _b64(PREFIX), "range_end": _b64(prefix_end(PREFIX)),
            "start_revision": str(start_revision),
        }})
        try:
            self._conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
            self._resp = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise _conn_error(url, e) from e
        if self._resp.status != 200:
            self._conn.close()
            raise BackendUnavailable(f"etcd at {url} refused the watch: HTTP {self._resp.status}")
        sock = self._conn.sock
        if sock is not None:
            sock.settimeout(None)  # idle streams are normal; keepalive finds dead peers
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                line = self._resp.readline()
                if not line:
                    self.q.put(("error", "watch stream closed by etcd"))
                    return
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    self.q.put(("error", f"watch error: {msg['error']}"))
                    return
                res = msg.get("result", {})
                if res.get("compact_revision") not in (None, "0"):
                    self.q.put(("compacted", int(res["compact_revision"])))
                    return
                if res.get("canceled"):
                    self.q.put(("error", f"watch canceled: {res.get('cancel_reason', '')}"))
                    return
                if res.get("created"):
                    self.q.put(("created", None))
                evs = res.get("events", [])
                if evs:
                    puts: dict[str, str] = {}
                    deletes: list[str] = []
                    rev = 0
                    for ev in evs:
                        kv = ev["kv"]
                        key = _unb64(kv["key"])
                        rev = max(rev, int(kv.get("mod_revision", 0)))
                        if ev.get("type") == "DELETE":
                            puts.pop(key, None)
                            deletes.append(key)
                        else:
                            puts[key] = _unb64(kv.get("value", ""))
                            if key in deletes:
                                deletes.remove(key)
                    self.q.put(("events", Events(rev, puts, tuple(deletes))))
        except (OSError, ValueError, KeyError, AttributeError, http.client.HTTPException) as e:
            # AttributeError: http.client's reader after close() from another thread
            if not self._closed:
                self.q.put(("error", f"watch stream failed: {e}"))

    def close(self) -> None:
        self._closed = True
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()


class EtcdBackend:
    def __init__(self, url: str, *, timeout_s: float = 5.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise RegistryError(f"etcd URL must look like http://HOST:PORT, got {url!r}")
        self.url = url
        self._host, self._port = u.hostname, u.port or 2379
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._watch: _WatchStream | None = None
        self._watch_revision = -1  # last revision handed out by changes()

    @property
    def location(self) -> str:
        return self.url

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        data = json.dumps(body)
        with self._lock:
            for attempt in (1, 2):  # one retry on a stale keep-alive connection
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(
                        self._host, self._port, timeout=self._timeout_s)
                try:
                    self._conn.request("POST", path, data, {"Content-Type": "application/json"})
                    resp = self._conn.getresponse()
                    raw = resp.read()
                    break
                except (OSError, http.client.HTTPException) as e:
                    self._conn.close()
                    self._conn = None
                    if attempt == 2 or isinstance(e, ConnectionRefusedError | TimeoutError):
                        raise _conn_error(self.url, e) from e
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise RegistryError(f"etcd at {self.url} sent non-JSON for {path}: {raw[:200]!r}") from e
        if resp.status != 200 or "error" in doc:
            msg = doc.get("message") or doc.get("error") or raw[:200].decode(errors="replace")
            raise RegistryError(f"etcd at {self.url} rejected {path}: {msg}")
        return dict(doc)

    def read(self) -> Reset:
        doc = self._post("/v3/kv/range", {"key": _b64(PREFIX), "range_end": _b64(prefix_end(PREFIX))})
        items = {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in doc.get("kvs", [])}
        return Reset(int(doc["header"]["revision"]), items)

    def commit(
        self, puts: Mapping[str, str], deletes: Collection[str] = (), *,
        expect_revision: int | None = None,
    ) -> int:
        ops: list[dict[str, Any]] = [
            {"request_delete_range": {"key": _b64(k)}} for k in deletes if k not in puts]
        ops += [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in puts.items()]
        txn: dict[str, Any] = {"success": ops}
        if expect_revision is not None:
            txn["compare"] = [{"key": _b64(GUARD_KEY), "target": "MOD", "result": "LESS",
                               "mod_revision": str(expect_revision + 1)}]
            ops.append({"request_put": {"key": _b64(GUARD_KEY), "value": _b64("{}")}})
        doc = self._post("/v3/kv/txn", txn)
        if expect_revision is not None and not doc.get("succeeded", False):
            raise ConflictError(f"registry in etcd changed since revision {expect_revision}; retry")
        return int(doc["header"]["revision"])

    def compact(self, revision: int) -> None:
        self._post("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def changes(self, after_revision: int, timeout_s: float) -> Change | None:
        if self._watch is not None and after_revision != self._watch_revision:
            self._watch.close()
            self._watch = None
        if self._watch is None:
            self._watch = _WatchStream(self._host, self._port, self.url, after_revision + 1,
                                       self._timeout_s)
            self._watch_revision = after_revision
        watch = self._watch
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                kind, value = watch.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if not watch.established:  # a new watch etcd has not confirmed: not "no news"
                    raise BackendUnavailable(
                        f"etcd at {self.url} is unreachable: the watch was not confirmed in {timeout_s}s"
                    ) from None
                return None
            if kind != "created":
                break
            watch.established = True
        if kind == "events":
            assert isinstance(value, Events)
            self._watch_revision = value.revision
            return value
        watch.close()
        if self._watch is watch:
            self._watch = None
        if kind == "compacted":
            state = self.read()  # history is gone: start over from a full read
            self._watch_revision = state.revision
            return state
        raise BackendUnavailable(f"etcd at {self.url} is unreachable: {value}")

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
