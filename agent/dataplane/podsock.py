"""Dialling a local pod as the node proxy: a TCP connection that carries the proxy's mark.

How this works: the host-side tc filter of a pod (``bpf/inbound_tc.c``) lets a
connection from the node proxy's address reach a STRICT pod only if its
packets carry ``peer_authentication.proxy_mark`` in ``skb->mark``. The kernel
copies a socket's ``SO_MARK`` into every packet it sends, and setting
``SO_MARK`` needs ``CAP_NET_ADMIN``, which a plain process in the node's
netns does not have. :func:`dial_pod` creates the socket non-blocking, sets
the mark, connects it on the event loop and hands it to asyncio. It waits for
the connect itself (``connect_ex``, then the socket turning writable):
uvloop's ``sock_connect`` costs about 150 µs more per connection (measured on
loopback: 380-450 µs per dial with it, 220-260 µs without; a plain
``open_connection`` takes 150-200 µs).

The mark also takes part in routing decisions of the node (``ip rule
fwmark``) and in netfilter rules that match on it; choose a value nothing
else on the node uses.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

SO_MARK = getattr(socket, "SO_MARK", 36)


class PodDialError(OSError):
    """The pod could not be dialled (keeps errno; names the pod and what failed)."""


def _marked_socket(family: socket.AddressFamily, mark: int, where: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        sock.close()
        hint = " (setting SO_MARK needs CAP_NET_ADMIN)" if e.errno == 1 else ""
        raise PodDialError(e.errno, f"{where}: cannot mark the socket with {mark:#x}: "
                           f"{e.strerror}{hint}") from None
    return sock


async def dial_pod(host: str, port: int, *, mark: int, timeout_s: float | None,
                   limit: int = 1 << 20) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``host:port`` (a local pod) with ``SO_MARK`` = ``mark``, within ``timeout_s``
    (None: the caller bounds the time).

    Raises :class:`PodDialError` when the socket cannot be marked, ``OSError``
    from the connect (refused, unreachable, ...) and ``TimeoutError`` as
    ``asyncio.open_connection`` would.
    """
    if isinstance(mark, bool) or not 0 < mark <= 0xFFFFFFFF:
        raise ValueError(f"expected a mark between 1 and 0xffffffff, got {mark!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = _marked_socket(family, mark, f"{host}:{port}")
    loop = asyncio.get_running_loop()
    try:
        if timeout_s is None:
            await _connect(loop, sock, (host, port))
        else:
            async with asyncio.timeout(timeout_s):
                await _connect(loop, sock, (host, port))
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple[str, int]) -> None:
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        done: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, done)
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {addr[0]}:{addr[1]}: {os.strerror(err)}")


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


async def open_pod(
    host: str, port: int, mark: int, *, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to a local pod as the proxy makes it: marked when ``mark`` is set (the
    caller bounds the time). Without a mark (tests whose pods sit on loopback) a plain one."""
    if mark:
        return await dial_pod(host, port, mark=mark, timeout_s=None, limit=limit)
    return await asyncio.open_connection(host, port, limit=limit)
