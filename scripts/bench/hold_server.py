#!/usr/bin/env python3
"""HTTP/1.1 server that holds responses: requests in flight, for the agent-memory measurement.

Run inside the server pod by scripts/bench_dataplane.py:

    python hold_server.py PORT [--max-hold-seconds 120]

Keep-alive, ``GET`` without a body only (anything else: 400 and close).

* ``GET /hold``: the response (200, a short body) waits until ``/release`` is
  requested, or ``--max-hold-seconds`` passed — whichever comes first, so a
  held request always ends.
* ``GET /release``: lets every request held so far answer (later ``/hold``
  requests are held again).
* ``GET /count``: ``{"holding": n, "served": n, "connections": n}`` at once.
* any other path: 200 ``ok`` at once.

The bench asks ``/count`` and ``/release`` on 127.0.0.1 inside the pod (not
captured, not counted by the mesh). Raises its own RLIMIT_NOFILE to the hard
limit. Never exits on its own: the bench stops it by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource

MAX_HEAD_BYTES = 16384


class HoldServer:
    def __init__(self, max_hold_s: float) -> None:
        self.max_hold_s = max_hold_s
        self.release = asyncio.Event()
        self.holding = 0
        self.served = 0
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                status, body, close = await self.answer(head)
                writer.write(
                    b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
                    % (
                        status,
                        b"OK" if status == 200 else b"Bad Request",
                        len(body),
                        b"Connection: close\r\n" if close else b"",
                    )
                    + body
                )
                await writer.drain()
                self.served += 1
                if close:
                    return
        except ConnectionError:
            return
        finally:
            self.connections -= 1
            writer.close()

    async def answer(self, head: bytes) -> tuple[int, bytes, bool]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
            return 400, b"GET only\n", True
        close = parts[2] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
                return 400, b"no request bodies\n", True
            if name == b"connection":
                close = value == b"close" or (parts[2] == b"HTTP/1.0" and value != b"keep-alive")
        path = parts[1]
        if path == b"/hold":
            self.holding += 1
            try:
                await asyncio.wait_for(self.release.wait(), self.max_hold_s)
            except TimeoutError:
                pass
            finally:
                self.holding -= 1
            return 200, b"held\n", close
        if path == b"/release":
            released, self.release = self.release, asyncio.Event()
            released.set()
            return 200, b"released\n", close
        if path == b"/count":
            doc = {"holding": self.holding, "served": self.served, "connections": self.connections}
            return 200, json.dumps(doc).encode() + b"\n", close
        return 200, b"ok\n", close


async def main_async(port: int, max_hold_s: float) -> None:
    hs = HoldServer(max_hold_s)
    server = await asyncio.start_server(hs.serve, "0.0.0.0", port, backlog=4096, limit=MAX_HEAD_BYTES)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=int)
    ap.add_argument("--max-hold-seconds", type=float, default=120.0)
    a = ap.parse_args()
    if not (1 <= a.port <= 65535 and 0 < a.max_hold_seconds <= 600):
        ap.error("port 1-65535, max-hold-seconds in (0, 600]")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main_async(a.port, a.max_hold_seconds))


if __name__ == "__main__":
    main()
