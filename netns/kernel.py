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
import threading
from collections.abc import Callable, Iterator
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


@contextmanager
def ipr(netns: str) -> Iterator[Any]:
    """An rtnetlink handle bound inside ``netns`` (never creates the netns)."""
    if not netns_exists(netns):
        raise NotFoundError(f"network namespace {netns!r} does not exist")
    handle = IPRoute(netns=netns, flags=0)
    try:
        yield handle
    except NetlinkError as e:
        raise KernelError(f"in netns {netns!r}: {e}", errno=e.code) from e
    finally:
        handle.close()


def netns_inode(name: str) -> int:
    """Identity of a namespace, to check later that it is really gone."""
    return os.stat(netns_path(name)).st_ino
