#!/usr/bin/env python3
"""Holds many HTTP/1.1 client connections open: first idle (keep-alive), then each with a request in flight.

Run inside a client pod by scripts/bench_dataplane.py, against
scripts/bench/hold_server.py:

    python hold_conns.py HOST PORT --conns 1000 [--first /now] [--hold /hold] [--max-seconds 120]

Phases, each ended by a JSON line on stdout; the next one starts on a line on
stdin (the bench samples the agents' memory in between):

1. ``idle``: opens ``--conns`` connections (at most ``--parallel`` being set
   up at a time); each sends ``GET <first>`` and reads the whole response
   (200 with a Content-Length body), then stays open and silent.
   ``{"phase": "idle", "open": n, "errors": n, "first_error": ..., "setup_s": s}``
2. ``inflight``: each open connection sends ``GET <hold>`` and reads nothing
   yet. ``{"phase": "inflight", "sent": n, "errors": n, ...}``
3. ``done``: reads every response (the bench has released them), closes every
   connection. ``{"phase": "done", "completed": n, "errors": n, ...}``

Bounded: the whole run ends after ``--max-seconds`` whatever happens. Raises
its own RLIMIT_NOFILE to the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"bad response: {head[:40]!r}")
    length = None
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(length)


def request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodemesh-bench\r\n\r\n".encode()


class Holder:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.deadline: float = time.monotonic() + a.max_seconds
        self.conns: list[Conn] = []
        self.errors: list[str] = []

    def left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    def say(self, phase: str, **doc: object) -> None:
        doc = {
            "phase": phase,
            **doc,
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
        }
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    async def idle(self) -> None:
        a = self.a
        gate = asyncio.Semaphore(a.parallel)
        first = request(a.host, a.first)

        async def setup() -> None:
            async with gate:
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(a.host, a.port), 10.0)
                except (OSError, TimeoutError) as e:
                    self.errors.append(f"connect: {e!r}")
                    return
                try:
                    w.write(first)
                    await asyncio.wait_for(w.drain(), 10.0)
                    await asyncio.wait_for(read_response(r), 10.0)
                except (OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError) as e:
                    self.errors.append(f"first request: {e!r}")
                    w.close()
                    return
                self.conns.append((r, w))

        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(setup()) for _ in range(a.conns)]
        _, pending = await asyncio.wait(tasks, timeout=self.left())
        for task in pending:
            task.cancel()
        if pending:
            self.errors.append(f"{len(pending)} connections not set up in time")
        self.say("idle", open=len(self.conns), setup_s=time.monotonic() - t0)

    async def inflight(self) -> None:
        hold = request(self.a.host, self.a.hold)
        sent = 0
        for _, w in self.conns:
            try:
                w.write(hold)
                sent += 1
            except OSError as e:
                self.errors.append(f"hold request: {e!r}")
        results = await asyncio.gather(
            *(asyncio.wait_for(w.drain(), self.left()) for _, w in self.conns), return_exceptions=True
        )
        self.errors += [f"hold request: {e!r}" for e in results if isinstance(e, BaseException)]
        self.say("inflight", sent=sent)

    async def finish(self) -> None:
        async def one(r: asyncio.StreamReader) -> bool:
            try:
                await read_response(r)
                return True
            except (OSError, RuntimeError, asyncio.IncompleteReadError) as e:
                self.errors.append(f"held response: {e!r}")
                return False

        results = [asyncio.ensure_future(one(r)) for r, _ in self.conns]
        completed = 0
        if results:
            _, late = await asyncio.wait(results, timeout=self.left())
            for task in late:
                task.cancel()
            if late:
                self.errors.append(f"{len(late)} held responses not received in time")
            completed = sum(1 for t in results if t.done() and not t.cancelled() and t.result())
        for _, w in self.conns:
            w.close()
        self.say("done", completed=completed)


async def run(a: argparse.Namespace) -> None:
    h = Holder(a)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def go_ahead() -> None:
        try:
            await asyncio.wait_for(stdin.readline(), h.left())
        except TimeoutError:
            h.errors.append("no go-ahead on stdin before --max-seconds")

    await h.idle()
    await go_ahead()
    await h.inflight()
    await go_ahead()
    await h.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--first", default="/now", help="path of each connection's first request")
    ap.add_argument("--hold", default="/hold", help="path of the request held in flight")
    ap.add_argument("--parallel", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    a = ap.parse_args()
    if not (1 <= a.conns <= 10000 and 1 <= a.parallel <= 1000 and 0 < a.max_seconds <= 600):
        ap.error("conns 1-10000, parallel 1-1000, max-seconds in (0, 600]")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.conns + 64:
        ap.error(f"RLIMIT_NOFILE hard limit {hard} is too low for {a.conns} connections")
    asyncio.run(run(a))


if __name__ == "__main__":
    main()
