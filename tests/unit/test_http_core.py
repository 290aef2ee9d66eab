"""The HTTP pieces that are pure: the HTTP/1.1 reader (sans I/O), protocol sniffing,
tracing and forwarding headers, access-log sampling, the agent's http settings."""

from __future__ import annotations

import json
import os
import random
import tempfile

import pytest

from agent.config import ConfigError, from_mapping
from agent.dataplane.http import headers as hdrs
from agent.dataplane.http.accesslog import AccessLog, AccessLogConfig
from agent.dataplane.protocol import Wire, classify
from agent.proto import http1
from agent.proto.http1 import DATA, END, HEAD, UPGRADE, H1Error, H1Limits, RequestReader, ResponseReader


def test_requests_come_out_in_order_with_bodies_dechunked_and_trailers() -> None:
    r = RequestReader()
    wire = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    events = []
    for i in range(0, len(wire), 7):  # any split of the bytes gives the same events
        events += r.feed(wire[i : i + 7])
    kinds = [k for k, _ in events]
    assert kinds[0] == HEAD and kinds[-2:] == [HEAD, END]
    head = events[0][1]
    assert isinstance(head, http1.RequestHead) and head.chunked and head.target == "/a" and head.keep_alive
    assert b"".join(v for k, v in events if k == DATA) == b"abcde"  # type: ignore[misc]
    assert (END, [(b"x-sum", b"5")]) in events
    assert r.idle


def test_upgrade_hands_back_the_bytes_past_the_request() -> None:
    r = RequestReader()
    ev = r.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nFRAME")
    assert [k for k, _ in ev] == [HEAD, END, UPGRADE] and ev[-1][1] == b"FRAME"
    assert ev[0][1].upgrade == b"websocket"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 2000 + b"\r\n\r\n", 431),
    ],
)
def test_refusals_carry_the_status_the_client_gets(wire: bytes, status: int) -> None:
    r = RequestReader(H1Limits(max_request_line_bytes=256, max_header_bytes=1024, max_headers=10))
    with pytest.raises(H1Error) as e:
        r.feed(wire)
    assert e.value.status == status


def test_a_head_that_never_ends_is_refused_once_over_the_limit_not_buffered() -> None:
    r = RequestReader(H1Limits(max_request_line_bytes=256, max_header_bytes=1024, max_headers=10))
    r.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(H1Error) as e:
        for _ in range(100):
            r.feed(b"b" * 100)  # no CRLF, ever
    assert e.value.status == 431


def test_responses_interim_head_and_until_close() -> None:
    rr = ResponseReader()
    ev = rr.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [k for k, _ in ev] == [HEAD, END, HEAD, DATA, END] and rr.done and not rr.extra
    rr = ResponseReader(head_only=True)  # the request was HEAD: no body whatever the length says
    ev = rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    assert [k for k, _ in ev] == [HEAD, END] and rr.done and not rr.extra
    rr = ResponseReader()
    ev = rr.feed(b"HTTP/1.1 200 OK\r\n\r\nbody")
    assert rr.final is not None and rr.final.until_close and not rr.done
    assert rr.eof() == [(END, [])] and rr.done
    with pytest.raises(H1Error):
        ResponseReader().eof()  # closed before any response: 502


def test_local_reply_says_who_answered() -> None:
    out = http1.local_reply(503, "no healthy upstream", close=True)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"server: nodemesh" in head and b"connection: close" in head and body == b"no healthy upstream\n"


def test_hop_by_hop_and_connection_named_headers_are_not_forwarded() -> None:
    h = [
        (b"connection", b"close, x-secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"5"),
        (b"content-length", b"3"),
        (b"x-ok", b"1"),
    ]
    assert http1.end_to_end(h) == [(b"x-ok", b"1")]


@pytest.mark.parametrize(
    ("first", "wire"),
    [
        (b"GET / HTTP/1.1\r\n", Wire.HTTP1),
        (b"POST ", Wire.HTTP1),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Wire.HTTP2),
        (b"PRI * HTTP", None),  # could still be the preface
        (b"GE", None),
        (b"", None),
        (b"\x16\x03\x01", Wire.TCP),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH", Wire.TCP),
        (b"GETX / HTTP/1.1", Wire.TCP),
    ],
)
def test_sniffing(first: bytes, wire: Wire | None) -> None:
    assert classify(first) is wire


def test_tracing_keeps_a_valid_trace_with_a_new_span_and_starts_one_otherwise() -> None:
    rng = random.Random(1)
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out, rid, trace = hdrs.tracing([(b"traceparent", parent), (b"x-request-id", b"abc")], rng)
    tp = dict(out)[b"traceparent"].split(b"-")
    assert (
        trace == "4bf92f3577b34da6a3ce929d0e0e4736"
        and tp[1] == trace.encode()
        and tp[2] != b"00f067aa0ba902b7"
    )
    assert rid == "abc"
    for bad in (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", b"garbage", b"01-xyz"):
        out, rid, trace = hdrs.tracing([(b"traceparent", bad)], rng)
        assert len(trace) == 32 and trace != "0" * 32 and len(rid) == 36
        assert dict(out)[b"traceparent"].endswith(b"-01")


def test_forwarding_headers_the_sender_wrote_are_replaced() -> None:
    h = [
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"forwarded", b"for=6.6.6.6"),
        (b"x-forwarded-client-cert", b"URI=spiffe://evil"),
        (b"a", b"b"),
    ]
    out = hdrs.forwarding(
        h, "10.244.1.2", by="spiffe://td/ns/d/sa/web", client_principal="spiffe://td/ns/d/sa/c"
    )
    assert out == [
        (b"a", b"b"),
        (b"x-forwarded-for", b"10.244.1.2"),
        (b"forwarded", b"for=10.244.1.2"),
        (b"x-forwarded-client-cert", b"By=spiffe://td/ns/d/sa/web;URI=spiffe://td/ns/d/sa/c"),
    ]
    assert hdrs.forwarding(h, None) == [(b"a", b"b")]  # nothing verified: nothing claimed
    assert (b"forwarded", b'for="[fd00::1]"') in hdrs.forwarding([], "fd00::1")


def test_access_log_sampling_keeps_errors_always() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.log")
        log = AccessLog(AccessLogConfig(True, path, sampling=0.1), rng=random.Random(7))
        kept = [log.keep(200, "-") for _ in range(1000)]
        assert 50 < sum(kept) < 150
        assert all(log.keep(503, "UH") for _ in range(100)) and all(log.keep(200, "DC") for _ in range(100))
        log.write({"a": 1})
        log.close()
        with open(path) as f:
            line = json.loads(f.read())
        assert line["a"] == 1 and line["time"].endswith("Z")


def test_agent_http_settings_are_checked_by_name() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.244.1.1"}}
    cfg = from_mapping(
        {**base, "http": {"sniff_timeout_s": 0.5, "access_log": {"path": "-", "sampling": 0.5}}}
    )
    assert cfg.http.sniff_timeout_s == 0.5 and cfg.http.access_log_path == "-"
    for bad, where in (
        ({"sniff_timeout_s": 0}, "http.sniff_timeout_s"),
        ({"max_headers": "many"}, "http.max_headers"),
        ({"access_log": {"sampling": 2}}, "http.access_log.sampling"),
        ({"acess_log": {}}, "acess_log"),
    ):
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            from_mapping({**base, "http": bad})
