#!/usr/bin/env python3
"""Fixed-rate HTTP/1.1 client: latency at a constant request rate (open loop).

Run inside a pod by scripts/bench_dataplane.py:

    python fixed_rate.py HOST PORT PATH --rate 1000 --seconds 2 --conns 16

Opens ``--conns`` keep-alive connections first (their setup is not timed),
then sends request i at t0 + i/rate on an idle connection, whatever happened
to earlier requests (so a slow path cannot slow the schedule down: the
schedule is open loop). Latency is taken from the moment the request is
written to the moment its whole response (Content-Length body) is read. A
request that finds no idle connection waits for one and is counted ``late``
(its latency still counts from its scheduled time, so queueing is not hidden).
Bounded: at most rate*seconds requests and seconds+10 s wall time.
Prints one JSON object: count, errors, late, achieved rate, p50/p90/p99/max in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> None:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad response: {head[:40]!r}")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)


def _pct(sorted_us: list[float], q: float) -> float:
    if not sorted_us:
        return float("nan")
    i = min(len(sorted_us) - 1, max(0, round(q * (len(sorted_us) - 1))))
    return sorted_us[i]


async def run(host: str, port: int, path: str, rate: float, seconds: float, conns: int) -> dict[str, object]:
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodemesh-bench\r\n\r\n".encode()
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(conns):
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        await asyncio.wait_for(_request(r, w, req), 5.0)  # warm the connection (not timed)
        idle.put_nowait((r, w))
    lat_us: list[float] = []
    errors = 0
    late = 0
    total = int(rate * seconds)
    interval = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()

    async def one(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], started: float) -> None:
        nonlocal errors
        try:
            await asyncio.wait_for(_request(conn[0], conn[1], req), 5.0)
        except Exception:
            errors += 1
            conn[1].close()
            return
        lat_us.append((time.perf_counter() - started) * 1e6)
        idle.put_nowait(conn)

    t0 = time.perf_counter() + 0.01
    hard_end = t0 + seconds + 10.0
    for i in range(total):
        due = t0 + i * interval
        now = time.perf_counter()
        if now > hard_end:
            break
        if due > now:
            await asyncio.sleep(due - now)
        if idle.empty():
            late += 1
            try:
                conn = await asyncio.wait_for(idle.get(), max(0.01, hard_end - time.perf_counter()))
            except TimeoutError:
                break
            started = due  # queueing delay counts
        else:
            conn = idle.get_nowait()
            started = time.perf_counter()
        t = asyncio.ensure_future(one(conn, started))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks), timeout=5.0)
    elapsed = time.perf_counter() - t0
    while not idle.empty():
        idle.get_nowait()[1].close()
    lat_us.sort()
    return {
        "count": len(lat_us),
        "errors": errors,
        "late": late,
        "rate_achieved": len(lat_us) / elapsed if elapsed > 0 else 0.0,
        "p50_us": _pct(lat_us, 0.50),
        "p90_us": _pct(lat_us, 0.90),
        "p99_us": _pct(lat_us, 0.99),
        "max_us": lat_us[-1] if lat_us else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("path")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--conns", type=int, default=16)
    a = ap.parse_args()
    if not (0 < a.rate <= 20000 and 0 < a.seconds <= 60 and 1 <= a.conns <= 256):
        ap.error("rate in (0, 20000], seconds in (0, 60], conns in [1, 256]")
    print(json.dumps(asyncio.run(run(a.host, a.port, a.path, a.rate, a.seconds, a.conns))))


if __name__ == "__main__":
    main()
