"""The data path as it lives in bpffs: find, inspect and remove pinned objects.

How this works: an installed data path is one directory
``<root>/<version>/`` holding a pin per map (``map_<name>``), a pin per tc
program (``prog_<name>``, attached by the agent inside pods' netns) and a pin
per cgroup attachment (``link_<hook>``). Attachments are BPF links: the link pin
*is* the attachment, so it outlives the loader process, a restarted loader
finds it instead of attaching twice, and removing the pin (after an explicit
link detach) is the uninstall. Links are pinned last, so a directory with
every link pin is complete; anything else is a crashed install and is removed.
Nothing here compiles or imports BCC.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Iterator
from dataclasses import dataclass

from bpf import syscall
from bpf.errors import BpfError, NotInstalledError
from bpf.layout import HOOKS, MAP_NAMES, Hook, TcProgram
from netns import cgroup
from netns.errors import NetnsError


def map_pin(pin_dir: str, name: str) -> str:
    return os.path.join(pin_dir, f"map_{name}")


def link_pin(pin_dir: str, hook: Hook) -> str:
    return os.path.join(pin_dir, f"link_{hook.name}")


def prog_pin(pin_dir: str, prog: TcProgram) -> str:
    return os.path.join(pin_dir, f"prog_{prog.name}")


def version_dirs(root: str) -> list[str]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [os.path.join(root, n) for n in names if n.startswith("v")]


def is_complete(pin_dir: str) -> bool:
    # The loader pins tc programs before the links, so the links imply them.
    return all(os.path.exists(map_pin(pin_dir, m)) for m in MAP_NAMES) and all(
        os.path.exists(link_pin(pin_dir, h)) for h in HOOKS
    )


def installed_dir(root: str) -> str:
    """The one complete version directory under ``root``."""
    complete = [d for d in version_dirs(root) if is_complete(d)]
    if not complete:
        raise NotInstalledError(
            f"no nodemesh data path is pinned under {root}",
            hint="install it: python -m bpf.loader install --cgroup <cgroup> "
            f"--bpffs-root {root}",
        )
    if len(complete) > 1:
        raise BpfError(
            f"several data path versions are pinned under {root}: "
            f"{', '.join(os.path.basename(d) for d in complete)}",
            errno=errno_mod.EEXIST,
            hint="run nodemesh uninstall, then install again",
        )
    return complete[0]


def cgroup2_mount() -> str:
    """The cgroup v2 mount point, as a BpfError when there is none."""
    try:
        return cgroup.cgroup2_mount()
    except NetnsError as e:
        raise BpfError(e.message, errno=errno_mod.ENOENT, hint="run scripts/setup.sh") from None


def _walk_cgroups(path: str, depth: int) -> Iterator[os.DirEntry[str]]:
    if depth > 32:
        return
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield e
            yield from _walk_cgroups(e.path, depth + 1)


def cgroup_path_of_id(cgroup_id: int) -> str | None:
    """The cgroup directory whose id (kernfs inode) is ``cgroup_id``."""
    mount = cgroup2_mount()
    if os.stat(mount).st_ino == cgroup_id:
        return mount
    for e in _walk_cgroups(mount, 0):
        if e.inode() == cgroup_id:
            return e.path
    return None


@dataclass(frozen=True, slots=True)
class HookState:
    hook: str
    link_id: int
    prog_id: int
    cgroup_id: int
    cgroup: str | None  # absolute path, None if the cgroup is gone
    attached: bool  # the kernel lists prog_id among the cgroup's programs
    programs_on_cgroup: int  # all programs of this attach type on the cgroup (any owner)


def hook_states(pin_dir: str) -> list[HookState]:
    """What the kernel says about each pinned link of ``pin_dir``."""
    states: list[HookState] = []
    for hook in HOOKS:
        path = link_pin(pin_dir, hook)
        if not os.path.exists(path):
            states.append(HookState(hook.name, 0, 0, 0, None, False, 0))
            continue
        fd = syscall.obj_get(path)
        try:
            info = syscall.link_info(fd)
        finally:
            os.close(fd)
        cg = cgroup_path_of_id(info["cgroup_id"]) if info["cgroup_id"] else None
        attached, on_cgroup = False, 0
        if cg is not None:
            cfd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                ids = syscall.prog_query(cfd, hook.attach_type)
            finally:
                os.close(cfd)
            attached, on_cgroup = info["prog_id"] in ids, len(ids)
        states.append(HookState(hook.name, info["id"], info["prog_id"], info["cgroup_id"], cg,
                                attached, on_cgroup))
    return states


def detach_link(path: str) -> bool:
    """Detach the cgroup link pinned at ``path`` and unpin it; False if there is none."""
    if not os.path.exists(path):
        return False
    fd = syscall.obj_get(path)
    try:
        try:
            syscall.link_detach(fd)
        except BpfError as e:
            if e.errno not in (errno_mod.ENOLINK, errno_mod.EINVAL):
                raise
    finally:
        os.close(fd)
    os.unlink(path)
    return True


def remove_dir(pin_dir: str) -> list[str]:
    """Detach every link, unpin everything, remove the directory. Idempotent.

    Returns the pins removed. Links are detached explicitly first, so the
    programs leave the cgroup even if some process still holds a link fd.
    """
    removed: list[str] = []
    if not os.path.isdir(pin_dir):
        return removed
    for hook in HOOKS:
        path = link_pin(pin_dir, hook)
        if detach_link(path):
            removed.append(path)
    for name in sorted(os.listdir(pin_dir)):
        os.unlink(os.path.join(pin_dir, name))
        removed.append(os.path.join(pin_dir, name))
    os.rmdir(pin_dir)
    return removed


def uninstall(root: str) -> list[str]:
    """Remove every version under ``root`` and ``root`` itself if empty."""
    removed: list[str] = []
    for d in version_dirs(root):
        removed.extend(remove_dir(d))
    try:
        os.rmdir(root)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno_mod.ENOTEMPTY:
            raise BpfError(f"cannot remove {root}: {e.strerror}", errno=e.errno or 0) from e
    return removed
