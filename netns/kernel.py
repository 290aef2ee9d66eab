"""Kernel primitives for network namespaces: create, remove, enter, list.

Namespaces are named bind mounts under /run/netns (as ``ip netns`` makes them),
so other tools see them. Entering a namespace (``setns``) happens only on a
short-lived worker thread (:func:`run_in_netns`) or in a child between fork and
exec (:func:`enter_in_child`), never on a thread that serves anything else.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from netns.errors import KernelError, NotFoundError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str) -> None:
    if netns_exists(name):
        raise KernelError(f"network namespace {name!r} already exists", errno=errno_mod.EEXIST)
    try:
        pr_netns.create(name)
    except OSError as e:
        raise KernelError(f"cannot create network namespace {name!r}: {e}", errno=e.errno or 0) from e


def remove_netns(name: str) -> bool:
    """Unmount and unlink a named netns. Idempotent: False if it was not there."""
    path = netns_path(name)
    if not os.path.lexists(path):
        return False
    _libc.umount2(path.encode(), 2)  # MNT_DETACH; EINVAL if not mounted is fine
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def setns_fd(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise KernelError(f"setns failed: {os.strerror(err)}", errno=err)


def open_netns(name: str) -> int:
    try:
        return os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"network namespace {name!r} does not exist") from None


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that has entered netns ``name``; return its result.

    The thread ends after ``fn``, so no other code ever runs in the wrong namespace.
    File descriptors (sockets) created by ``fn`` stay in that namespace.
    """
    fd = open_netns(name)
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            setns_fd(fd)
            box["result"] = fn()
        except BaseException as e:  # handed back to the caller below
            box["error"] = e

    try:
        t = threading.Thread(target=worker, name=f"netns:{name}")
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def connect_tcp(host: str, port: int, timeout_s: float, netns: str | None = None) -> socket.socket:
    """A TCP connection to ``host:port``, from inside ``netns`` when given (opened on a worker
    thread; the socket stays in that namespace), else from here."""

    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout_s)

    return run_in_netns(netns, connect) if netns else connect()


def enter_in_child(netns_fd: int, cgroup_procs: str | None) -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: join a cgroup, then a netns.

    Runs in the child between fork and exec; keeps to plain syscalls.
    """
    if cgroup_procs is not None:
        with open(cgroup_procs, "w") as f:
            f.write(str(os.getpid()))
    if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into the pod's netns failed")


def write_sysctl(netns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    run_in_netns(netns, write)


_Call = tuple[str, tuple[Any, ...], dict[str, Any], "Future[Any]"]


class _NetnsIPRoute:
    """An IPRoute whose every call runs on one worker thread that lives inside a netns.

    pyroute2 opens its netlink socket lazily on the calling thread, and its own
    ``netns=`` support forks a child for that; a fork from an asyncio process
    shares the loop's signal wakeup pipe, so a signal to the child would look
    like one to the agent. Here the socket is made on a thread that has
    entered the namespace, and stays there; nothing forks.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._calls: queue.Queue[_Call | None] = queue.Queue()
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(fd, started), name=f"ipr:{name}", daemon=True)
        self._thread.start()
        started.result()

    def _run(self, fd: int, started: Future[None]) -> None:
        try:
            setns_fd(fd)
            handle = IPRoute()
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(None)
        try:
            while (item := self._calls.get()) is not None:
                method, args, kwargs, fut = item
                try:
                    result = getattr(handle, method)(*args, **kwargs)
                    if isinstance(result, Iterator):  # pyroute2 may answer lazily: read it here
                        result = list(result)
                    fut.set_result(result)
                except BaseException as e:
                    fut.set_exception(e)
        finally:
            handle.close()

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fut: Future[Any] = Future()
        self._calls.put((method, args, kwargs, fut))
        return fut.result()

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(method, args, kwargs)

        return call

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join()


@contextmanager
def ipr(netns: str) -> Iterator[Any]:
    """An rtnetlink handle bound inside ``netns`` (a name or a path; never creates it)."""
    path = netns if os.path.isabs(netns) else netns_path(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"network namespace {netns!r} does not exist") from None
    try:
        handle = _NetnsIPRoute(fd, os.path.basename(path))
    finally:
        os.close(fd)
    try:
        yield handle
    except NetlinkError as e:
        raise KernelError(f"in netns {netns!r}: {e}", errno=e.code) from e
    finally:
        handle.close()


def netns_inode(name: str) -> int:
    """Identity of a namespace, to check later that it is really gone."""
    return os.stat(netns_path(name)).st_ino
