"""What the proxy reports about a connection or a request: Istio's labels and the access log.

How this works: both node proxies describe the two ends of what they carry as
:class:`Party` values built from verified facts only (a registered workload
found by the socket's address, or the identity of a verified certificate).
:class:`Reporter` turns a pair of parties into Istio's label sets (once per
connection or endpoint choice, then reused for every request on it), counts a
finished TCP connection or HTTP request, and writes its access log line.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.control.model import Service, Workload
from agent.dataplane.http.accesslog import AccessLog
from agent.dataplane.http.exchange import Exchange
from agent.metrics.istio import ConnLabels, MeshMetrics, RequestLabels

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Party:
    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN


def party(w: Workload | None, principal: str, *, namespace: str = UNKNOWN) -> Party:
    if w is None:
        return Party(namespace=namespace, principal=principal or UNKNOWN)
    return Party(
        w.name,
        w.namespace,
        principal or UNKNOWN,
        w.labels.get("app", w.labels.get("app.kubernetes.io/name", UNKNOWN)),
        w.labels.get("version", w.labels.get("app.kubernetes.io/version", UNKNOWN)),
    )


def service_host(svc: Service | None) -> str:
    """Istio's destination_service: <name>.<namespace>.svc.cluster.local."""
    return svc.fqdn if svc is not None else UNKNOWN  # (a ServiceEntry's host for its services)


@dataclass(frozen=True, slots=True)
class Flow:
    """Who talks to whom, as one reporter saw it."""

    reporter: str  # "source" | "destination"
    source: Party
    destination: Party
    service: Service | None
    mutual_tls: bool

    def conn_labels(self) -> ConnLabels:
        return ConnLabels(
            reporter=self.reporter,
            source_workload=self.source.workload,
            source_workload_namespace=self.source.namespace,
            source_principal=self.source.principal,
            destination_service=service_host(self.service),
            destination_workload=self.destination.workload,
            destination_workload_namespace=self.destination.namespace,
            destination_principal=self.destination.principal,
            connection_security_policy="mutual_tls" if self.mutual_tls else "none",
        )

    def request_labels(self) -> RequestLabels:
        svc = self.service
        return RequestLabels(
            reporter=self.reporter,
            source_workload=self.source.workload,
            source_workload_namespace=self.source.namespace,
            source_principal=self.source.principal,
            source_app=self.source.app,
            source_version=self.source.version,
            destination_service=service_host(svc),
            destination_service_name=svc.name if svc is not None else UNKNOWN,
            destination_service_namespace=svc.namespace if svc is not None else UNKNOWN,
            destination_workload=self.destination.workload,
            destination_workload_namespace=self.destination.namespace,
            destination_principal=self.destination.principal,
            destination_app=self.destination.app,
            destination_version=self.destination.version,
            connection_security_policy="mutual_tls" if self.mutual_tls else "none",
        )


class Reporter:
    def __init__(self, metrics: MeshMetrics, access_log: AccessLog | None = None) -> None:
        self.metrics = metrics
        self.access_log = access_log if access_log is not None and access_log.enabled else None

    def request(self, flow: Flow, labels: RequestLabels, ex: Exchange, request_protocol: str) -> None:
        self.metrics.request(
            labels,
            request_protocol,
            ex.status,
            ex.grpc_status,
            ex.flags,
            ex.duration_ms,
            ex.request_bytes,
            ex.response_bytes,
        )
        log = self.access_log
        if log is not None and log.keep(ex.status, ex.flags):
            log.write(
                {
                    "reporter": flow.reporter,
                    "method": ex.method,
                    "authority": ex.authority,
                    "path": ex.path,
                    "protocol": ex.protocol,
                    "response_code": ex.status,
                    "response_flags": ex.flags,
                    "grpc_status": ex.grpc_status or None,
                    "bytes_received": ex.request_bytes,
                    "bytes_sent": ex.response_bytes,
                    "duration_ms": round(ex.duration_ms, 3),
                    "upstream_host": ex.upstream or None,
                    "source_workload": flow.source.workload,
                    "source_namespace": flow.source.namespace,
                    "source_principal": flow.source.principal,
                    "destination_service": service_host(flow.service),
                    "destination_workload": flow.destination.workload,
                    "destination_namespace": flow.destination.namespace,
                    "destination_principal": flow.destination.principal,
                    "x_request_id": ex.request_id or None,
                    "trace_id": ex.trace_id or None,
                    "detail": ex.detail or None,
                }
            )

    def tcp(
        self,
        flow: Flow,
        labels: ConnLabels,
        sent: int,
        received: int,
        duration_ms: float,
        upstream: str,
    ) -> None:
        """A TCP connection ended (metrics ``closed`` is counted by the caller)."""
        log = self.access_log
        if log is not None and log.keep(0, labels.response_flags):
            log.write(
                {
                    "reporter": flow.reporter,
                    "protocol": "tcp",
                    "response_flags": labels.response_flags,
                    "bytes_received": sent,
                    "bytes_sent": received,
                    "duration_ms": round(duration_ms, 3),
                    "upstream_host": upstream or None,
                    "source_workload": flow.source.workload,
                    "source_namespace": flow.source.namespace,
                    "source_principal": flow.source.principal,
                    "destination_service": service_host(flow.service),
                    "destination_workload": flow.destination.workload,
                    "destination_namespace": flow.destination.namespace,
                    "destination_principal": flow.destination.principal,
                }
            )
