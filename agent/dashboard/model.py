"""The mesh as the dashboard and ``nodemesh top`` show it: rates, quantiles, golden signals.

How this works: each agent's scrape becomes a :class:`NodeScrape`, its Istio
counters summed per :class:`EdgeKey` (source workload, destination service,
destination workload, protocol). Two scrapes of one node make a
:class:`Window` (counter deltas over the node's own elapsed time, a counter
that went down counts as reset, as Prometheus' ``rate`` does). :func:`stats`
adds the windows of every node that answered, grouped as the caller asks
(per edge, per service, per workload), into :class:`Stats`: requests/s,
success rate, p50/p90/p99 from the histogram buckets (Prometheus'
``histogram_quantile``: linear inside the bucket), mTLS share, TCP bytes/s
and connections. Pure: time is the scrapes' own, no I/O.

Which reporter counts: Istio reports each request twice (source and
destination proxy). We take the source's series (they include requests that
never reached a destination: ``UH``, ``UF``, timeouts) and the destination's
only where the source is ``unknown`` (callers outside the mesh), so nothing
is counted twice. A request fails when its response code is 5xx or 0 (no
response), or a gRPC call ends with a ``grpc-status`` other than 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.dashboard.promtext import Sample

REQUESTS = "istio_requests_total"
DURATION = "istio_request_duration_milliseconds_bucket"
TCP_FIELDS = {
    "istio_tcp_sent_bytes_total": "sent",
    "istio_tcp_received_bytes_total": "received",
    "istio_tcp_connections_opened_total": "opened",
    "istio_tcp_connections_closed_total": "closed",
}
GAUGE_PREFIX = "nodemesh_registry_"
WANTED = (REQUESTS, DURATION, *TCP_FIELDS, GAUGE_PREFIX + "*")
QUANTILES = (0.5, 0.9, 0.99)

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True, order=True)
class EdgeKey:
    source: str  # "<namespace>/<workload>", or "unknown" (outside the mesh)
    service: str  # destination_service (a host name), or "unknown"
    destination: str  # "<namespace>/<workload>", or "unknown" (no endpoint was reached)
    protocol: str  # http | grpc | tcp


@dataclass(slots=True)
class Counters:
    requests: float = 0.0
    errors: float = 0.0
    mtls: float = 0.0  # requests (HTTP) or connections (TCP) carried by mutual TLS
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count (ms)
    sent: float = 0.0
    received: float = 0.0
    opened: float = 0.0
    closed: float = 0.0

    def add(self, other: Counters) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.mtls += other.mtls
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n
        self.sent += other.sent
        self.received += other.received
        self.opened += other.opened
        self.closed += other.closed


@dataclass(frozen=True, slots=True)
class NodeScrape:
    node: str
    at_s: float  # when it was read (the dashboard's clock, or Prometheus' sample time)
    edges: Mapping[EdgeKey, Counters]
    gauges: Mapping[str, float]  # nodemesh_registry_* (revision, stale, dataplane_revision)
    skipped_lines: int = 0


def _workload(labels: Mapping[str, str], side: str) -> str:
    name = labels.get(f"{side}_workload", "unknown") or "unknown"
    if name == "unknown":
        return "unknown"
    return f"{labels.get(f'{side}_workload_namespace', 'unknown')}/{name}"


def _failed(labels: Mapping[str, str]) -> bool:
    try:
        code = int(labels.get("response_code", "0"))
    except ValueError:
        code = 0
    if code == 0 or code >= 500:
        return True
    grpc = labels.get("request_protocol") == "grpc"
    return grpc and labels.get("grpc_response_status", "") not in ("", "0")


def _counted(labels: Mapping[str, str]) -> bool:
    """The source's report, or the destination's for callers outside the mesh."""
    reporter = labels.get("reporter")
    if reporter == "source":
        return True
    return reporter == "destination" and labels.get("source_workload", "unknown") in ("unknown", "")


def _key(labels: Mapping[str, str], protocol: str) -> EdgeKey:
    return EdgeKey(
        _workload(labels, "source"),
        labels.get("destination_service", "unknown") or "unknown",
        _workload(labels, "destination"),
        protocol,
    )


def node_scrape(node: str, at_s: float, samples: Iterable[Sample], skipped_lines: int = 0) -> NodeScrape:
    edges: dict[EdgeKey, Counters] = {}
    gauges: dict[str, float] = {}
    # what a label set means, worked out once per set (a histogram's buckets share theirs)
    meaning: dict[tuple[int, str | None], tuple[Counters, bool, bool] | None] = {}

    def counters(labels: Mapping[str, str], protocol: str | None) -> tuple[Counters, bool, bool] | None:
        m = meaning.get((id(labels), protocol), False)
        if m is not False:
            return m  # type: ignore[return-value]
        if not _counted(labels):
            got = None
        else:
            key = _key(labels, protocol or labels.get("request_protocol", "http") or "http")
            c = edges.get(key)
            if c is None:
                c = edges[key] = Counters()
            got = (c, _failed(labels), labels.get("connection_security_policy") == "mutual_tls")
        meaning[(id(labels), protocol)] = got
        return got

    for s in samples:
        if s.name.startswith(GAUGE_PREFIX):
            gauges[s.name] = s.value
            continue
        lb = s.labels
        if s.name == REQUESTS:
            got = counters(lb, None)
            if got is not None:
                c, failed, mtls = got
                c.requests += s.value
                if failed:
                    c.errors += s.value
                if mtls:
                    c.mtls += s.value
        elif s.name == DURATION:
            le = s.le
            if le is None:  # (Prometheus' API keeps it among the labels)
                try:
                    le = float(lb.get("le", ""))
                except ValueError:
                    continue
                lb = {k: v for k, v in lb.items() if k != "le"}
                meaning.pop((id(lb), None), None)  # (a fresh dict: its id may be an old one's)
            got = counters(lb, None)
            if got is not None:
                got[0].buckets[le] = got[0].buckets.get(le, 0.0) + s.value
        elif s.name in TCP_FIELDS:
            got = counters(lb, "tcp")
            if got is not None:
                c, _, mtls = got
                attr = TCP_FIELDS[s.name]
                setattr(c, attr, getattr(c, attr) + s.value)
                if attr == "opened" and mtls:
                    c.mtls += s.value
    return NodeScrape(node, at_s, edges, gauges, skipped_lines)


@dataclass(frozen=True, slots=True)
class Window:
    """What one node counted between two of its scrapes."""

    node: str
    dt_s: float
    deltas: Mapping[EdgeKey, Counters]
    current: Mapping[EdgeKey, Counters]  # the newer scrape's totals (open connections, totals)


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # went down: the agent restarted, counting from 0


def window(older: NodeScrape, newer: NodeScrape) -> Window | None:
    dt = newer.at_s - older.at_s
    if dt <= 0:
        return None
    deltas: dict[EdgeKey, Counters] = {}
    for key, new in newer.edges.items():
        old = older.edges.get(key) or Counters()
        reset = new.requests < old.requests
        buckets = (
            dict(new.buckets)
            if reset
            else {le: max(0.0, n - old.buckets.get(le, 0.0)) for le, n in new.buckets.items()}
        )
        deltas[key] = Counters(
            _delta(new.requests, old.requests),
            new.errors if reset else max(0.0, new.errors - old.errors),
            new.mtls if (reset or new.mtls < old.mtls) else new.mtls - old.mtls,
            buckets,
            _delta(new.sent, old.sent),
            _delta(new.received, old.received),
            _delta(new.opened, old.opened),
            _delta(new.closed, old.closed),
        )
    return Window(newer.node, dt, deltas, newer.edges)


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``le -> count`` buckets; None when
    there were no observations."""
    if not buckets:
        return None
    les = sorted(buckets)
    counts = [buckets[le] for le in les]
    for i in range(1, len(counts)):  # cumulative counts never go down (sums of windows may)
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    for i, le in enumerate(les):
        if counts[i] >= rank:
            if math.isinf(le):
                return les[i - 1] if i > 0 else None
            lower = les[i - 1] if i > 0 else 0.0
            below = counts[i - 1] if i > 0 else 0.0
            in_bucket = counts[i] - below
            if in_bucket <= 0:
                return le
            return lower + (le - lower) * (rank - below) / in_bucket
    return les[-1] if not math.isinf(les[-1]) else (les[-2] if len(les) > 1 else None)


@dataclass(frozen=True, slots=True)
class Stats:
    rps: float
    error_rps: float
    success: float | None  # share of requests that did not fail; None: no requests in the window
    latency_ms: tuple[float | None, ...]  # at QUANTILES
    mtls: float | None  # share of requests (or TCP connections) over mutual TLS
    protocols: tuple[str, ...]
    requests_total: float  # counted since the agents started
    bytes_per_s: float = 0.0  # TCP: both directions
    connections_per_s: float = 0.0
    connections_open: float = 0.0

    def to_doc(self) -> dict[str, Any]:
        def r(x: float | None, n: int = 3) -> float | None:
            return None if x is None else round(x, n)

        return {
            "rps": r(self.rps),
            "error_rps": r(self.error_rps),
            "success": r(self.success, 4),
            **{f"p{round(q * 100)}_ms": r(v) for q, v in zip(QUANTILES, self.latency_ms, strict=True)},
            "mtls": r(self.mtls, 4),
            "protocols": list(self.protocols),
            "requests_total": self.requests_total,
            "bytes_per_s": r(self.bytes_per_s, 1),
            "connections_per_s": r(self.connections_per_s),
            "connections_open": self.connections_open,
        }


class _Acc:
    __slots__ = ("bps", "buckets", "cps", "err", "mtls_now", "mtls_win", "n_now", "n_win", "open",
                 "protocols", "rps", "total")

    def __init__(self) -> None:
        self.rps = self.err = self.bps = self.cps = self.open = self.total = 0.0
        self.mtls_win = self.n_win = self.mtls_now = self.n_now = 0.0
        self.buckets: dict[float, float] = {}
        self.protocols: set[str] = set()


def stats(windows: Iterable[Window], group: Callable[[EdgeKey], K | None]) -> dict[K, Stats]:
    """Golden signals per group of edges (``group`` returns None to leave an edge out); groups
    without a request, a TCP byte or an open connection in the window are left out."""
    accs: dict[K, _Acc] = {}
    for w in windows:
        for key, d in w.deltas.items():
            g = group(key)
            if g is None:
                continue
            a = accs.get(g)
            if a is None:
                a = accs[g] = _Acc()
            a.protocols.add(key.protocol)
            cur = w.current.get(key) or Counters()
            if key.protocol == "tcp":
                a.bps += (d.sent + d.received) / w.dt_s
                a.cps += d.opened / w.dt_s
                a.open += max(0.0, cur.opened - cur.closed)
                a.mtls_win += d.mtls
                a.n_win += d.opened
                a.mtls_now += cur.mtls
                a.n_now += cur.opened
                continue
            a.rps += d.requests / w.dt_s
            a.err += d.errors / w.dt_s
            a.total += cur.requests
            a.mtls_win += d.mtls
            a.n_win += d.requests
            a.mtls_now += cur.mtls
            a.n_now += cur.requests
            for le, n in d.buckets.items():
                a.buckets[le] = a.buckets.get(le, 0.0) + n
    out: dict[K, Stats] = {}
    for g, a in accs.items():
        if a.n_win == 0 and a.bps == 0 and a.open == 0:
            continue  # idle in this window (as Kiali hides idle edges): the view is of live traffic
        if a.n_win > 0:
            mtls: float | None = a.mtls_win / a.n_win
        else:
            mtls = a.mtls_now / a.n_now if a.n_now > 0 else None
        out[g] = Stats(
            rps=a.rps,
            error_rps=a.err,
            success=(1.0 - a.err / a.rps) if a.rps > 0 else None,
            latency_ms=tuple(histogram_quantile(q, a.buckets) for q in QUANTILES),
            mtls=mtls,
            protocols=tuple(sorted(a.protocols)),
            requests_total=a.total,
            bytes_per_s=a.bps,
            connections_per_s=a.cps,
            connections_open=a.open,
        )
    return out


# -- groupings -----------------------------------------------------------------------------------


def by_edge(key: EdgeKey) -> tuple[str, str, str]:
    """One row of ``nodemesh top``: source -> service -> destination workload, protocols merged."""
    return (key.source, key.service, key.destination)


def by_service(key: EdgeKey) -> str:
    return key.service


def by_workload(key: EdgeKey) -> str | None:
    """Per destination workload: what it serves (requests that reached no workload: none)."""
    return None if key.destination == "unknown" else key.destination


def sort_rows(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Rows sorted for people: rates and latencies highest first, success lowest first, names A-Z."""
    if by in ("source", "destination", "service"):
        return sorted(rows, key=lambda r: (str(r[by]), str(r["destination"])))
    if by == "success":
        return sorted(rows, key=lambda r: (r["success"] is None, r["success"] or 0.0, r["source"]))
    return sorted(rows, key=lambda r: (-(r.get(by) or 0.0), r["source"], r["destination"]))


def top_rows(windows: Iterable[Window]) -> list[dict[str, Any]]:
    rows = []
    for (src, svc, dst), st in stats(windows, by_edge).items():
        rows.append({"source": src, "service": svc, "destination": dst, **st.to_doc()})
    return rows
