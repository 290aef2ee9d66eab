"""The route's retries (a VirtualService's ``retries``), shared by the HTTP/1.1 and HTTP/2 loops:
which outcome of a try is retried, and the copy of the request body a retry sends again.

How this works: :func:`decide` is Envoy's router retry decision, pure: the outcome of one try
(a response status, with the ``grpc-status`` of its header block, or a failure without a response:
``reset``, ``refused-stream``, ``per-try-timeout``) against the policy's conditions, as Istio's
``retryOn`` names them (Envoy's ``x-envoy-retry-on`` and ``x-envoy-retry-grpc-on``); a wanted
retry with the attempts spent is ``URX``. The loops ask only before any byte of the response
went to the client.

A request with a body can be retried while a copy of what was sent of it fits a
:class:`BodyBudget` (Envoy buffers the body for a retry up to the connection's buffer limit,
``per_connection_buffer_limit_bytes``, 1 MiB by default): :class:`BodyCopy` keeps the chunks,
and once they would exceed the budget drops them and gives the budget back, and the request is
then forwarded but never retried. A retry that happens while the client is still sending sends
the copy, then the rest as it arrives. The budget is one per client connection (an HTTP/2
connection's concurrent streams share it), so what copies hold stays bounded by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.control.istio import Retry
from agent.dataplane.http.exchange import Exchange

RETRY_BUFFER_BYTES = 1 << 20  # default of agent.yaml's http.retry_buffer_bytes (Envoy's buffer limit)

# x-envoy-retry-grpc-on: retried on the grpc-status of the response's header block
GRPC_RETRY_ON = {"cancelled": "1", "deadline-exceeded": "4", "resource-exhausted": "8", "internal": "13",
                 "unavailable": "14"}

# outcomes without a response
RESET = "reset"  # the upstream reset or closed before its response (or the stream's session ended)
REFUSED = "refused-stream"  # HTTP/2 RST_STREAM REFUSED_STREAM, or a stream above a GOAWAY's last id
PER_TRY_TIMEOUT = "per-try-timeout"

Outcome = int | str  # a response status, or one of the names above


def wanted(r: Retry, outcome: Outcome, grpc_status: str = "") -> bool:
    """Does the policy's ``retryOn`` take this outcome (Envoy's conditions)?"""
    on = r.retry_on
    if isinstance(outcome, int):
        s = outcome
        if (
            ("5xx" in on and s >= 500)
            or ("gateway-error" in on and s in (502, 503, 504))
            or ("retriable-4xx" in on and s == 409)
            or ("retriable-status-codes" in on and s in r.status_codes)
        ):
            return True
        return bool(grpc_status) and any(GRPC_RETRY_ON.get(c) == grpc_status for c in on)
    if outcome == REFUSED and "refused-stream" in on:
        return True
    # a reset (refused or not), a per-try timeout: counted as a 5xx, as Envoy does
    return any(c in on for c in ("reset", "5xx", "gateway-error"))


def decide(r: object, tries: int, outcome: Outcome, grpc_status: str = "") -> str:
    """``"retry"``, ``"URX"`` (wanted, but the retries are spent) or ``""`` (not wanted)."""
    if not isinstance(r, Retry) or not r.attempts or not wanted(r, outcome, grpc_status):
        return ""
    return "retry" if tries < r.attempts else "URX"


def take(ex: Exchange, outcome: Outcome, grpc_status: str = "") -> bool:
    """Will this try's outcome be retried? :func:`decide` on the exchange's policy; spent
    retries flag it ``URX``; a retry the destination's ``connectionPool.http.maxRetries`` has
    no room for is not made and flags it ``UO`` (Envoy's retry overflow: the answer is passed
    on)."""
    verdict = decide(ex.retry, ex.tries, outcome, grpc_status)
    if verdict == "URX":
        ex.flags = "URX"
        return False
    if verdict == "retry" and ex.retry_gate is not None and not ex.retry_gate():
        ex.flags = "UO"
        return False
    return verdict == "retry"


@dataclass(slots=True)
class BodyBudget:
    """Bytes of request body copies one client connection may hold (``limit_bytes``)."""

    limit_bytes: int
    used_bytes: int = 0

    def take(self, n: int) -> bool:
        if self.used_bytes + n > self.limit_bytes:
            return False
        self.used_bytes += n
        return True

    def give(self, n: int) -> None:
        self.used_bytes = max(self.used_bytes - n, 0)


@dataclass(slots=True)
class BodyCopy:
    """What was taken of one request's body from the client so far, for a retry to send again;
    ``intact`` False once it no longer fits (then the request is not retried)."""

    budget: BodyBudget
    chunks: list[bytes] = field(default_factory=list)
    size_bytes: int = 0
    intact: bool = True

    @classmethod
    def start(cls, budget: BodyBudget, expected_bytes: int | None = None) -> BodyCopy:
        """A copy for a request whose declared length (if any) says whether it can fit at all."""
        c = cls(budget)
        if expected_bytes is not None and expected_bytes > budget.limit_bytes - budget.used_bytes:
            c.intact = False
        return c

    def add(self, data: bytes) -> None:
        if not self.intact or not data:
            return
        if not self.budget.take(len(data)):
            self.release()
            self.intact = False
            return
        self.chunks.append(data)
        self.size_bytes += len(data)

    def release(self) -> None:
        """The exchange is over (or the copy overflowed): its bytes go back to the budget."""
        self.budget.give(self.size_bytes)
        self.chunks.clear()
        self.size_bytes = 0
