"""Prometheus metrics with Istio's names and labels, plus nodemesh internals.

How this works: :class:`MeshMetrics` owns the metric families on an injected
``CollectorRegistry`` (tests get their own). The proxy reports one
:class:`ConnLabels` per connection; label values come from the registry
(workloads, services) and from verified identities, so their number is
bounded by what is deployed. Kernel counters (eBPF) are read at scrape time by
a collector (:class:`CallbackCollector`), never polled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

ISTIO_TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "connection_security_policy",
    "response_flags",
)


@dataclass(frozen=True, slots=True)
class ConnLabels:
    reporter: str  # "source" (outbound) or "destination" (inbound)
    source_workload: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"
    destination_service: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    connection_security_policy: str = "unknown"  # mutual_tls | none
    response_flags: str = "-"

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, k) for k in ISTIO_TCP_LABELS)


class MeshMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", ISTIO_TCP_LABELS, registry=registry
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", ISTIO_TCP_LABELS, registry=registry
        )
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent by the client during TCP connections",
            ISTIO_TCP_LABELS,
            registry=registry,
        )
        self.tcp_received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received by the client during TCP connections",
            ISTIO_TCP_LABELS,
            registry=registry,
        )
        self.tunnel_rejections = Counter(
            "nodemesh_tunnel_rejections",
            "Inbound tunnel connections or streams refused, by reason",
            ("reason",),
            registry=registry,
        )
        self.outbound_failures = Counter(
            "nodemesh_outbound_failures",
            "Captured connections that could not be served, by flag",
            ("response_flags",),
            registry=registry,
        )
        self.tunnel_pool = Gauge(
            "nodemesh_tunnel_pool_connections", "Open pooled HBONE connections", registry=registry
        )
        self.active = Gauge(
            "nodemesh_active_connections", "Connections being relayed now", ("direction",), registry=registry
        )
        # listeners (agent/dataplane/listener.py); label values: listener names, errno names
        self.listener_accept_errors = Counter(
            "nodemesh_listener_accept_errors",
            "accept() failures of a listener that did not end its loop, by errno (EMFILE, ...)",
            ("listener", "errno"),
            registry=registry,
        )
        self.listener_refused = Counter(
            "nodemesh_listener_refused_connections",
            "Connections reset at once for being over a listener's limits, by limit",
            ("listener", "reason"),
            registry=registry,
        )
        self.listener_connections = Gauge(
            "nodemesh_listener_connections", "Open accepted connections per listener", ("listener",),
            registry=registry,
        )
        self.tunnel_events = Counter(
            "nodemesh_tunnel_events",
            "HBONE connection events: stall, dead_peer, flood, protocol_error, preface_timeout, "
            "idle_closed, handler_failed",
            ("kind",),
            registry=registry,
        )
        self._series_of: dict[ConnLabels, _ConnSeries] = {}
        # resolved once: the data path updates these per connection
        self.active_outbound = self.active.labels("outbound")
        self.active_inbound = self.active.labels("inbound")

    def tunnel_event(self, kind: str) -> None:
        self.tunnel_events.labels(kind).inc()

    def _series(self, labels: ConnLabels) -> _ConnSeries:
        """The four counters of one label set, looked up once (``labels()`` costs a few µs,
        four times per connection). Bounded: cleared past MAX_CACHED_LABEL_SETS."""
        s = self._series_of.get(labels)
        if s is None:
            if len(self._series_of) >= MAX_CACHED_LABEL_SETS:
                self._series_of.clear()
            s = self._series_of[labels] = _ConnSeries(labels.values())
        return s

    def opened(self, labels: ConnLabels) -> None:
        s = self._series(labels)
        if s.opened is None:  # (each series appears with its first count, as before)
            s.opened = self.tcp_opened.labels(*s.values)
        s.opened.inc()

    def closed(self, labels: ConnLabels, request_bytes: int, response_bytes: int) -> None:
        """A connection ended; ``request_bytes`` went client to server, ``response_bytes`` back."""
        s = self._series(labels)
        if s.closed is None:
            s.closed = self.tcp_closed.labels(*s.values)
        s.closed.inc()
        if request_bytes:
            if s.received is None:
                s.received = self.tcp_received.labels(*s.values)
            s.received.inc(request_bytes)
        if response_bytes:
            if s.sent is None:
                s.sent = self.tcp_sent.labels(*s.values)
            s.sent.inc(response_bytes)


MAX_CACHED_LABEL_SETS = 4096


class _ConnSeries:
    __slots__ = ("closed", "opened", "received", "sent", "values")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.opened: Counter | None = None
        self.closed: Counter | None = None
        self.received: Counter | None = None
        self.sent: Counter | None = None


class CallbackCollector(Collector):
    """Turns a callable returning {name: value} into metric families at scrape time."""

    def __init__(
        self, prefix: str, read: Callable[[], dict[str, int]], *, kind: str = "counter", doc: str = ""
    ) -> None:
        self.prefix = prefix
        self.read = read
        self.kind = kind
        self.doc = doc

    def collect(self) -> Iterable[Metric]:
        try:
            values = self.read()
        except Exception:
            return []
        out: list[Metric] = []
        for name, value in sorted(values.items()):
            full = f"{self.prefix}_{name}"
            if self.kind == "counter":
                out.append(CounterMetricFamily(full, self.doc or full, value=value))
            else:
                out.append(GaugeMetricFamily(full, self.doc or full, value=value))
        return out
