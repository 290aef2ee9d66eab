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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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


# Istio's standard request labels (the ones its dashboards and Kiali query); the last four
# vary per request, the others per (source, destination) pair: see :class:`RequestLabels`
ISTIO_HTTP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "connection_security_policy",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
)
# Envoy's default histogram buckets, which Istio's request histograms use (ms, and bytes)
ISTIO_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                 300000, 600000, 1800000, 3600000)


@dataclass(frozen=True, slots=True)
class RequestLabels:
    """The labels of one (source, destination) pair; a request adds protocol, code, grpc
    status and flags. Built once per connection or endpoint choice, not per request."""

    reporter: str
    source_workload: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"
    source_app: str = "unknown"
    source_version: str = "unknown"
    destination_service: str = "unknown"
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    destination_app: str = "unknown"
    destination_version: str = "unknown"
    connection_security_policy: str = "unknown"

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, k) for k in ISTIO_HTTP_LABELS[:-4])


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
        self.authz_decisions = Counter(
            "nodemesh_authz_decisions",
            "Authorization decisions at the destination: the deciding policy (or '-': no policy "
            "applies, or none of the ALLOW policies matched), its action, allowed or denied",
            ("policy", "action", "result"),
            registry=registry,
        )
        self.requestauthn_decisions = Counter(
            "nodemesh_requestauthn_decisions",
            "JWT checks at the destination (RequestAuthentication): the resource whose rule names "
            "the token's issuer ('-': none does), valid/invalid/missing, the reason code ('-': none)",
            ("policy", "result", "reason"),
            registry=registry,
        )
        self.outbound_refused = Counter(
            "nodemesh_outbound_refused",
            "Captured connections refused by policy before any upstream was chosen "
            "(registry_only: outboundTrafficPolicy REGISTRY_ONLY, destination unknown)",
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
        self.requests = Counter(
            "istio_requests", "Requests served, by Istio's labels", ISTIO_HTTP_LABELS, registry=registry
        )
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration: request start to response end",
            ISTIO_HTTP_LABELS,
            buckets=ISTIO_BUCKETS,
            registry=registry,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request size (head and body)",
            ISTIO_HTTP_LABELS,
            buckets=ISTIO_BUCKETS,
            registry=registry,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response size (head and body)",
            ISTIO_HTTP_LABELS,
            buckets=ISTIO_BUCKETS,
            registry=registry,
        )
        self._series_of: dict[ConnLabels, _ConnSeries] = {}
        self._request_series: dict[tuple[RequestLabels, str, int, str, str], _RequestSeries] = {}
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


    def request(
        self,
        labels: RequestLabels,
        protocol: str,
        code: int,
        grpc_status: str,
        flags: str,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """One request ended. The label children of each distinct label set are resolved
        once and kept (bounded), not looked up per request."""
        key = (labels, protocol, code, grpc_status, flags)
        s = self._request_series.get(key)
        if s is None:
            if len(self._request_series) >= MAX_CACHED_LABEL_SETS:
                self._request_series.clear()
            values = (*labels.values(), protocol, str(code), grpc_status, flags)
            s = self._request_series[key] = _RequestSeries(
                self.requests.labels(*values),
                self.request_duration.labels(*values),
                self.request_bytes.labels(*values),
                self.response_bytes.labels(*values),
            )
        s.count.inc()
        s.duration.observe(duration_ms)
        s.req_bytes.observe(request_bytes)
        s.resp_bytes.observe(response_bytes)


MAX_CACHED_LABEL_SETS = 4096


class _RequestSeries:
    __slots__ = ("count", "duration", "req_bytes", "resp_bytes")

    def __init__(self, count: Counter, duration: Histogram, req_bytes: Histogram, resp_bytes: Histogram):
        self.count = count
        self.duration = duration
        self.req_bytes = req_bytes
        self.resp_bytes = resp_bytes


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
