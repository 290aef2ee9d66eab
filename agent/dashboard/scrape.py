"""Reading the agents (or a Prometheus server): where to ask, and one round of asking.

How this works: a :class:`Target` says where one agent's ``/metrics`` and
``/status`` are (``HOST`` uses the agents' ports 15020 and 15021; ``HOST:PORT``
names the metrics port; ``http://HOST:PORT`` serves both paths, as a proxy in
front of an agent would; a testbed node is asked from inside its netns).
:meth:`Poller.round` asks every target at once (a thread each, every read
under one deadline and a size cap, the body parsed as it streams in, never
held whole) and feeds the answers to a :class:`~agent.dashboard.state.MeshState`.
With ``--prometheus URL`` one instant query returns every agent's counters
(grouped by ``instance``) and ``up`` says which answered Prometheus' last
scrape; the agents are the instances of the jobs that carry our series.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.dashboard.model import WANTED, node_scrape
from agent.dashboard.promtext import LabelCache, from_prometheus_api, parse_lines
from agent.dashboard.state import MeshState

MAX_BODY_BYTES = 64 << 20
METRICS_PORT = 15020
STATUS_PORT = 15021
_STARTS = tuple(w.rstrip("*").encode() for w in WANTED)
_HOSTPORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+))(?::(\d{1,5}))?", re.ASCII)


class TargetError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    host: str
    metrics_port: int
    status_port: int
    netns: str | None = None

    @property
    def address(self) -> str:
        return f"{self.netns + '/' if self.netns else ''}{self.host}:{self.metrics_port}"


def parse_target(
    spec: str, metrics_port: int = METRICS_PORT, status_port: int = STATUS_PORT, netns: str | None = None
) -> Target:
    """``HOST``, ``HOST:METRICS_PORT``, ``[IPv6]:PORT`` or ``http://HOST:PORT`` (both paths there)."""
    text = spec.strip()
    both = text.startswith("http://")
    if both:
        text = text[len("http://"):].rstrip("/")
    m = _HOSTPORT.fullmatch(text)
    if m is None:
        raise TargetError(f"agent {spec!r}: expected HOST, HOST:PORT or http://HOST:PORT")
    host = m.group(1) or m.group(2)
    port = int(m.group(3)) if m.group(3) else None
    if port is not None and not 0 < port < 65536:
        raise TargetError(f"agent {spec!r}: port {port} is out of range")
    if both:
        if port is None:
            raise TargetError(f"agent {spec!r}: http://HOST:PORT needs the port")
        return Target(f"{host}:{port}", host, port, port, netns)
    return Target(f"{host}:{port}" if port else host, host, port or metrics_port, status_port, netns)


def testbed_targets(
    prefix: str, metrics_port: int = METRICS_PORT, status_port: int = STATUS_PORT
) -> list[Target]:
    """Each node of a running ``nodemesh testbed``, asked from inside its netns."""
    from netns import testbed

    topo = testbed.load(prefix)
    return [Target(n.name, n.fabric_address, metrics_port, status_port, n.netns) for n in topo.nodes]


def discover(
    admin: str, netns: str | None = None, timeout_s: float = 2.0
) -> list[Target]:
    """This node's agent and its peers, from the local agent's ``/config_dump``: each at its
    ``peers`` address with this node's metrics and health ports (a mesh's agents share them)."""
    host, _, port_s = admin.rpartition(":")
    if not host or not port_s.isdigit():
        raise TargetError(f"--admin {admin!r}: expected HOST:PORT")
    try:
        doc = json.loads(http_get(host.strip("[]"), int(port_s), "/config_dump", timeout_s, netns))
        ports, addrs = doc.get("ports") or {}, doc.get("addresses") or {}
        mp, hp = int(ports.get("metrics", METRICS_PORT)), int(ports.get("health", STATUS_PORT))
        targets = [Target(str(doc["node"]), str(addrs["metrics"]), mp, hp, netns)]
        peers = doc.get("peers") or {}
        targets += [Target(str(n), str(a), mp, hp, netns) for n, a in sorted(peers.items())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        where = f"{admin} (netns {netns})" if netns else admin
        raise TargetError(f"no agent's config at {where}: {_describe(e)}") from None
    return targets


def http_stream(
    host: str, port: int, path: str, timeout_s: float, netns: str | None = None
) -> Iterator[bytes]:
    """GET over HTTP/1.0 (no chunking): the body in pieces as they arrive, so a large answer
    is never held whole; the whole exchange within ``timeout_s`` and ``MAX_BODY_BYTES``."""
    from netns import kernel

    deadline = time.monotonic() + timeout_s
    sock = kernel.connect_tcp(host, port, timeout_s, netns)
    size = 0
    head: bytes | None = b""
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode())
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no full answer in {timeout_s:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError(f"no full answer in {timeout_s:g} s") from None
            if not chunk:
                if head is not None:
                    raise OSError("closed before the end of the answer's head")
                return
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise OSError(f"answer larger than {MAX_BODY_BYTES >> 20} MiB")
            if head is None:
                yield chunk
                continue
            head += chunk
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > 16384:
                    raise OSError("answer's head larger than 16 KiB")
                continue
            first = head.split(b"\r\n", 1)[0]
            if not re.match(rb"HTTP/1\.[01] 200 ", first + b" "):
                raise OSError(f"answered {first[:80].decode('latin-1')!r}")
            body, head = head[end + 4:], None
            if body:
                yield body


def http_get(host: str, port: int, path: str, timeout_s: float, netns: str | None = None) -> bytes:
    """The whole body of a small answer (see :func:`http_stream`)."""
    return b"".join(http_stream(host, port, path, timeout_s, netns))


def lines_of(chunks: Iterable[bytes], starts: tuple[bytes, ...]) -> Iterator[str]:
    """The lines that begin with one of ``starts``, decoded, from body pieces."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for line in parts:
            if line.startswith(starts):
                yield line.decode("utf-8", "replace")
    if rest.startswith(starts):
        yield rest.decode("utf-8", "replace")


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return str(e) or "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return f"{type(e).__name__}: {e}" if not isinstance(e, OSError) or not e.strerror else e.strerror


def _read_agent(
    t: Target, timeout_s: float, clock: Callable[[], float], cache: LabelCache
) -> tuple[Any, ...]:
    try:
        chunks = http_stream(t.host, t.metrics_port, "/metrics", timeout_s, t.netns)
        parsed = parse_lines(lines_of(chunks, _STARTS), WANTED, cache)
        at = clock()
    except Exception as e:  # an agent's failure is data for the view, not an error of ours
        return (None, _describe(e), None, None)
    status: dict[str, Any] | None = None
    status_error = None
    try:
        doc = json.loads(http_get(t.host, t.status_port, "/status", timeout_s, t.netns))
        status = doc if isinstance(doc, dict) else None
    except Exception as e:
        status_error = _describe(e)
    return (node_scrape(t.name, at, parsed.samples, parsed.skipped_lines), None, status, status_error)


class Poller:
    """Reads every target once per call of :meth:`round`, into ``state``."""

    def __init__(
        self,
        state: MeshState,
        targets: Sequence[Target] = (),
        prometheus: str | None = None,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not targets and not prometheus:
            raise TargetError("nothing to read: give --agent, --testbed or --prometheus")
        self.state = state
        self.targets = list(targets)
        self.prometheus = prometheus.rstrip("/") if prometheus else None
        self.timeout_s = timeout_s
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=min(32, max(1, len(self.targets))),
                                        thread_name_prefix="scrape")
        self._labels: dict[str, LabelCache] = {t.name: {} for t in self.targets}  # per agent
        self._jobs: set[str] = set()  # Prometheus jobs that scrape agents
        for t in self.targets:
            state.target(t.name, t.address)

    def round(self) -> dict[str, Any]:
        if self.prometheus:
            self._prometheus_round()
        else:
            answers = list(self._pool.map(
                lambda t: _read_agent(t, self.timeout_s, self.clock, self._labels[t.name]), self.targets))
            now = self.clock()
            for t, (scrape, error, status, status_error) in zip(self.targets, answers, strict=True):
                self.state.observe(t.name, now, scrape, error, status, status_error)
        return self.state.end_round(self.clock())

    def _prometheus_query(self, query: str) -> Any:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
            return json.loads(r.read(MAX_BODY_BYTES))

    def _prometheus_round(self) -> None:
        now = self.clock()
        names = "|".join(n.replace("*", ".*") for n in WANTED)
        try:
            by_instance = from_prometheus_api(self._prometheus_query(f'{{__name__=~"{names}"}}'))
            up = from_prometheus_api(self._prometheus_query("up"))
        except Exception as e:
            for name in list(self.state.nodes) or [self.prometheus or "prometheus"]:
                self.state.observe(name, now, None, f"Prometheus: {_describe(e)}")
            return
        # the agents: instances of the scrape jobs that carry our series (other targets of the
        # same Prometheus are not agents); a job stays known when all its agents are down
        for _, samples in by_instance.values():
            self._jobs.update(s.labels["job"] for s in samples if "job" in s.labels)
        up_now = {inst: any(s.value == 1 for s in samples) for inst, (_, samples) in up.items()
                  if any(s.labels.get("job") in self._jobs for s in samples)}
        for inst in sorted(set(by_instance) | set(up_now)):
            at, samples = by_instance.get(inst, (now, []))
            if not up_now.get(inst, True):
                self.state.observe(inst, now, None, "down in Prometheus (up == 0)")
                continue
            self.state.observe(inst, now, node_scrape(inst, at, samples))
