"""Listening-socket handoff between an old and a new agent process (restart, upgrade).

How this works: a running agent listens on a Unix socket
(``<runtime_dir>/agent-<node>.sock``). A new agent for the same node connects
before it opens any port and says ``TAKEOVER``; the old one answers with the
names of its listening sockets and the descriptors themselves (SCM_RIGHTS).
The new agent serves on them and says ``READY``; only then does the old one
stop accepting, drain its open connections up to its deadline, and exit.
The kernel socket behind each port is never closed, so connections that
arrive during the restart wait in the accept queue instead of being refused,
and the eBPF redirect target never goes dark. If no agent answers, the new
one opens fresh sockets (a cold start).

Wire (one line of ASCII each): new → old ``TAKEOVER\\n``; old → new one
``{"names": [...]}`` JSON line sent with the descriptors; new → old
``READY\\n``; old → new ``BYE\\n``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_FDS = 16
TIMEOUT_S = 10.0


class HandoffError(Exception):
    pass


def socket_path(runtime_dir: str, node: str) -> str:
    return os.path.join(runtime_dir, f"agent-{node}.sock")


def take_over(
    path: str, timeout_s: float = TIMEOUT_S
) -> tuple[socket.socket, dict[str, socket.socket]] | None:
    """Ask a running agent for its listening sockets. None: nobody answered (cold start).

    Returns the control connection (to send READY on) and the sockets by name.
    """
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.settimeout(timeout_s)
    try:
        ctl.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        ctl.close()
        return None
    try:
        ctl.sendall(b"TAKEOVER\n")
        msg, fds, _flags, _addr = socket.recv_fds(ctl, 4096, MAX_FDS)
        if not msg.endswith(b"\n"):
            raise HandoffError(f"handoff: truncated answer {msg[:80]!r}")
        names = json.loads(msg)["names"]
        if len(names) != len(fds):
            raise HandoffError(f"handoff: {len(names)} names for {len(fds)} descriptors")
        socks = {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
        for s in socks.values():
            s.setblocking(False)
        return ctl, socks
    except (OSError, ValueError, KeyError) as e:
        ctl.close()
        raise HandoffError(f"handoff from the running agent at {path} failed: {e}") from e


def confirm(ctl: socket.socket) -> None:
    """Tell the old agent we serve now; it stops accepting and drains."""
    try:
        ctl.sendall(b"READY\n")
        ctl.recv(16)
    except OSError as e:
        log.warning("handoff: the old agent did not acknowledge: %s", e)
    finally:
        ctl.close()


class HandoffServer:
    """The running agent's side: give our listening sockets to a successor once."""

    def __init__(
        self, path: str, sockets: Callable[[], dict[str, socket.socket]], on_handed_off: Callable[[], None]
    ) -> None:
        self.path = path
        self.sockets = sockets
        self.on_handed_off = on_handed_off
        self.server: asyncio.Server | None = None
        self.handed_off = False

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.server = await asyncio.start_unix_server(self._handle, path=self.path)
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                if await reader.readline() != b"TAKEOVER\n" or self.handed_off:
                    return
                socks = self.sockets()
                names = list(socks)
                payload = (json.dumps({"names": names}) + "\n").encode()
                # asyncio has no API for SCM_RIGHTS: send on a duplicate of the connection's fd
                raw = writer.get_extra_info("socket")
                with socket.socket(fileno=os.dup(raw.fileno())) as dup:
                    dup.setblocking(True)
                    socket.send_fds(dup, [payload], [s.fileno() for s in socks.values()])
                if await reader.readline() != b"READY\n":
                    log.warning("handoff: the new agent did not confirm; we keep serving")
                    return
                self.handed_off = True
                writer.write(b"BYE\n")
                await writer.drain()
            log.info("handoff: a new agent serves our sockets now; draining")
            self.on_handed_off()
        except (TimeoutError, OSError) as e:
            log.warning("handoff: aborted: %s", e)
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            if not self.handed_off:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
