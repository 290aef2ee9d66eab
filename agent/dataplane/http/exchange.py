"""One request and its outcome (:class:`Exchange`), and the proxy's own answers (:class:`LocalReply`).

Shared by the HTTP/1.1 and HTTP/2 request loops, read by metrics and the access log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Exchange:
    """One request and its outcome: what metrics and the access log read."""

    start: float
    method: str
    authority: str
    path: str
    protocol: str = "HTTP/1.1"
    request_id: str = ""
    trace_id: str = ""
    status: int = 0
    flags: str = "-"
    grpc_status: str = ""
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: float = 0.0
    upstream: str = ""  # address:port of the endpoint
    detail: str = ""  # why the proxy answered itself
    state: object = None  # the side's own per-request facts (endpoint, labels)
    plan: object = None  # the routing decision (source side, with a VirtualService)
    target: str = ""  # request target sent upstream, if rewritten ("" = as received)
    timeout_s: float | None = None  # the route's timeout (None: none)
    retry: object = None  # the route's retry policy (agent.control.istio.Retry) or None
    tries: int = 0  # retries made so far
    tried: set[tuple[str, int]] | None = None  # endpoints tried (retries go elsewhere)
    holds_slot: bool = False  # counted in its cluster's requests in flight (connectionPool)
    # may this request retry now? (connectionPool.http.maxRetries; None: no limit)
    retry_gate: Callable[[], bool] | None = None
    retrying: str = ""  # the cluster whose retries in flight count this request
    conn_slot: str = ""  # the cluster whose connection slot it holds (connectionPool.tcp.maxConnections)
    hash_key: str | None = None  # consistent-hash key of the request (None: none)
    set_cookie: str = ""  # a consistent-hash cookie to set on the response
    response_extra: list[tuple[bytes, bytes]] | None = None  # added to the response (CORS)
    mirrored: bool = False  # a copy went to the route's mirror
    authorized: bool = False  # judged by the destination's AuthorizationPolicies
    # the destination's changes to the forwarded headers (RequestAuthentication's HeaderEdit.apply)
    header_edit: Callable[[list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]] | None = None
    # given the whole request body once it has passed, if it fit the loop's copy (a mirror)
    on_body: Callable[[bytes], None] | None = None


class LocalReply(Exception):
    """The side answers the request itself: ``status`` with Envoy's ``flag``."""

    def __init__(
        self, status: int, message: str, flag: str, *, grpc_status: str = "",
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.flag = flag
        self.grpc_status = grpc_status  # a fault's grpcStatus (an HTTP/2 gRPC call gets this)
        self.headers = headers  # added to the answer (a redirect's location)


class UpstreamGone(Exception):
    """Destination side: the pod connection this tunnel stream was bound to is gone. The
    stream is reset instead of answered, so the source node sees its pooled stream fail
    before any response byte and tries again on a fresh stream (whose CONNECT dials the pod
    anew, and on failure makes the source try the next endpoint, as for a TCP connection)."""
