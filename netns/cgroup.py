"""cgroup v2 leaves for pods: find the mount, create, populate, kill, remove.

Works with a pure cgroup v2 system (/sys/fs/cgroup) and with hybrid mode
(/sys/fs/cgroup/unified). nodemesh only ever writes below cgroups it created.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import time

from netns.errors import KernelError


def cgroup2_mount() -> str:
    """The mount point of the cgroup v2 hierarchy, read from /proc/mounts."""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return fields[1]
    raise KernelError(
        "no cgroup v2 hierarchy is mounted",
        errno=errno_mod.ENOENT,
        hint="mount one: mount -t cgroup2 none /sys/fs/cgroup/unified (scripts/setup.sh checks this)",
    )


def cgroup_path(relative: str) -> str:
    rel = relative.strip("/")
    if not rel or ".." in rel.split("/"):
        raise ValueError(f"cgroup path {relative!r} must be a non-empty relative path")
    return os.path.join(cgroup2_mount(), rel)


def create(relative: str) -> str:
    """Create a cgroup (and missing parents). Returns its absolute path."""
    path = cgroup_path(relative)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise KernelError(f"cannot create cgroup {path}: {e.strerror}", errno=e.errno or 0) from e
    return path


def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _walk_bottom_up(path: str) -> list[str]:
    out: list[str] = []
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        out.append(dirpath)
    return out


def kill_all(path: str, timeout_s: float = 5.0) -> None:
    """SIGKILL every process in the cgroup subtree (processes this testbed started)."""
    if not os.path.isdir(path):
        return
    kill_file = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill_file):
        with open(kill_file, "w") as f:
            f.write("1")
    else:  # kernels before 5.14
        for d in _walk_bottom_up(path):
            for pid in procs(d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
    deadline = time.monotonic() + timeout_s
    while any(procs(d) for d in _walk_bottom_up(path)):
        if time.monotonic() > deadline:
            raise KernelError(f"processes in {path} did not exit after SIGKILL", errno=errno_mod.EBUSY)
        time.sleep(0.01)


def remove_tree(path: str, timeout_s: float = 5.0) -> bool:
    """Kill what runs in it, then rmdir the subtree bottom-up. Idempotent."""
    if not os.path.isdir(path):
        return False
    kill_all(path, timeout_s)
    for d in _walk_bottom_up(path):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY right after the last process exits: the kernel is still
                # releasing the css; retry briefly.
                if e.errno != errno_mod.EBUSY or time.monotonic() > deadline:
                    raise KernelError(f"cannot remove cgroup {d}: {e.strerror}", errno=e.errno or 0) from e
                time.sleep(0.01)
    return True
