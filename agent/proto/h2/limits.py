"""Abuse limits of the HTTP/2 core: how fast a peer may make us do work for nothing.

How this works: each limit is a :class:`TokenBucket` that holds up to ``burst``
tokens and regains ``rate_per_s`` per second of the caller's clock (the core
never reads a clock: ``H2Connection.receive_data(data, now_s=...)`` passes the
time once per call). A peer action that costs us work without giving us any —
a RST_STREAM received, a PING or SETTINGS we must acknowledge, a stream we had
to reset because of the peer's error, an empty frame — takes one token; an empty bucket ends
the connection with GOAWAY ENHANCE_YOUR_CALM, the error naming the limit.
The DATA hot path never touches a bucket.

Defaults, and whom they follow:

- Peer resets (CVE-2023-44487, "rapid reset"): nghttp2's token bucket
  (``nghttp2_option_set_stream_reset_rate_limit``, server side only: burst
  1000, 33/s; Node.js uses the same). One HBONE tunnel multiplexes every
  connection between two identities on a node pair, and an app connection
  that ends with a TCP reset legitimately becomes a RST_STREAM, so the
  sustained rate is higher here: 1000 burst, 500/s. The attack seen in the
  issue (68,600 resets/s) still empties the bucket in about 15 ms.
- Peer errors: streams we reset because of the peer (refused above the
  concurrency limit, DATA on a closed stream, flow-control overruns, malformed
  header blocks) and frames with an empty payload that end neither a stream nor
  a header block (CVE-2019-9518: empty DATA, zero-length CONTINUATION floods).
  nghttp2's "glitch" limiter (burst 1000, 33/s) counts such frames alike;
  Envoy closes a connection on a stream of HEADERS crafted to elicit an early
  reset and on consecutive empty frames
  (``max_consecutive_inbound_frames_with_empty_payload``, default 1). A bucket
  here, so the DATA path needs no per-frame counter reset: 1000 burst, 100/s.
- PING and SETTINGS that make us queue an acknowledgement (CVE-2019-9512,
  -9515): 1000 burst, 100/s; plus a cap on acknowledgements and resets queued
  but not yet taken by ``data_to_send()`` (Go x/net's ``maxQueuedControlFrames``
  is 10,000; nghttp2's outbound-queue flood limit is 1,000 items: 10,000 here).
- At most 32 entries per SETTINGS frame (nghttp2's ``max_settings`` default).
- Frames we only parse, no answer and no bucket on the hot path, held against
  what they could be for, as Envoy does: PRIORITY frames at most 100 per stream
  opened plus 100 (``max_inbound_priority_frames_per_stream``); WINDOW_UPDATE
  frames at most ``5 + 2 x (streams opened + 10 x DATA frames we sent)``
  (``max_inbound_window_update_frames_per_data_frame_sent``: a reader crediting
  both windows for every frame it reads stays far below).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.proto.h2.frames import ErrorCode, H2ProtocolError

DEFAULT_PEER_RESET_BURST = 1000
DEFAULT_MAX_PEER_RESETS_PER_S = 500.0
DEFAULT_PEER_ERROR_BURST = 1000
DEFAULT_MAX_PEER_ERRORS_PER_S = 100.0
DEFAULT_CONTROL_FRAME_BURST = 1000
DEFAULT_MAX_CONTROL_FRAMES_PER_S = 100.0
DEFAULT_MAX_QUEUED_CONTROL_FRAMES = 10_000
DEFAULT_MAX_SETTINGS_ENTRIES = 32
DEFAULT_MAX_PRIORITY_FRAMES_PER_STREAM = 100
DEFAULT_MAX_WINDOW_UPDATES_PER_DATA_FRAME = 10


@dataclass(slots=True)
class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; time only moves forwards."""

    rate_per_s: float
    burst: int
    tokens: float = 0.0
    last_s: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now_s: float) -> bool:
        elapsed_s = now_s - self.last_s
        if elapsed_s > 0:
            self.tokens = min(float(self.burst), self.tokens + elapsed_s * self.rate_per_s)
            self.last_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def calm(what: str, limit: str, value: float, burst: int | None = None) -> H2ProtocolError:
    """The connection error for a peer over one of our limits, naming the limit."""
    over = f"{limit}={value:g}" + (f" (burst {burst})" if burst is not None else "")
    return H2ProtocolError(f"peer exceeded {over}: {what}", ErrorCode.ENHANCE_YOUR_CALM)
