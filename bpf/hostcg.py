"""Host services enrolled by cgroup: capture for processes in the host network namespace.

How this works: a pod is enrolled by its network namespace, but a host service
(a systemd unit on a VM, e.g. ``system.slice/my-service.service``) shares the
host netns with the agent itself, so it is enrolled by the cgroup it runs in:

* :func:`refusal` (pure) refuses the agent's own cgroup and every ancestor of it
  (the root cgroup included): the proxy's own sockets must never meet a hook
  that could capture them;
* :func:`attach` links the loader's programs (found by the program ids of the
  pinned links, so nothing is compiled) to that cgroup too, pinned as
  ``host<cgroup id>_<hook>`` next to the loader's pins; a cgroup below the
  interception cgroup already runs them and gets no second link;
* :meth:`bpf.maps.Dataplane.enroll_host_cgroup` puts the cgroup id into
  ``nm_host_cg``; the programs (``nm_target_of`` in ``nodemesh.h``) capture a
  socket whose netns is an enrolled pod's or whose task runs in exactly an
  enrolled cgroup (``bpf_get_current_cgroup_id``: not its sub-cgroups), and
  record the cgroup id with the original destination, so the proxy knows which
  host service connected.

Everything else in the host netns, the agent included, is never captured:
its cgroup is not in ``nm_host_cg`` (``bypass_not_enrolled``).
:func:`detach` removes one cgroup's links; uninstall removes them with the rest.
"""

from __future__ import annotations

import errno as errno_mod
import os

from bpf import pins, syscall
from bpf.errors import BpfConfigError, BpfError
from bpf.layout import HOOKS


def refusal(cgroup: str, agent_cgroup: str) -> str | None:
    """Why the cgroup at absolute path ``cgroup`` can never be enrolled while the agent runs
    in ``agent_cgroup`` (absolute), or None."""
    c, a = os.path.normpath(cgroup), os.path.normpath(agent_cgroup)
    if c == a:
        return f"{c} is the agent's own cgroup: the proxy's connections would be captured"
    if os.path.commonpath([c, a]) == c:
        return (f"{c} is an ancestor of the agent's cgroup {a}: the proxy's connections would "
                "meet the capture hooks")
    return None


def cgroup_of(pid: int | str = "self") -> str:
    """The absolute path of the cgroup v2 that process ``pid`` runs in."""
    mount = pins.cgroup2_mount()
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.normpath(os.path.join(mount, line[3:].strip().lstrip("/")))
    raise BpfError(f"process {pid} has no cgroup v2 entry in /proc/{pid}/cgroup",
                   errno=errno_mod.ENOENT)


def cgroup_id(path: str) -> int:
    """The id the programs see (``bpf_get_current_cgroup_id``): the directory's inode."""
    return os.stat(path).st_ino


def link_pin(pin_dir: str, cg_id: int, hook: str) -> str:
    return os.path.join(pin_dir, f"host{cg_id}_{hook}")


def _attached(path: str) -> bool:
    fd = syscall.obj_get(path)
    try:
        return syscall.link_info(fd)["cgroup_id"] != 0
    finally:
        os.close(fd)


def attach(pin_dir: str, cgroup: str, interception_cgroup: str, agent_cgroup: str) -> int:
    """Run the data path's programs for the host cgroup ``cgroup`` (absolute); returns its id.
    Idempotent: links already pinned and attached are kept (a restarted agent adopts them)."""
    why = refusal(cgroup, agent_cgroup)
    if why is not None:
        raise BpfConfigError(why, where="interception.host_cgroups",
                             hint="name the service's own cgroup, e.g. system.slice/my-service.service")
    cg_id = cgroup_id(cgroup)
    if os.path.commonpath([cgroup, interception_cgroup]) == os.path.normpath(interception_cgroup):
        return cg_id  # below the interception cgroup: its links already run the programs
    cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for hook in HOOKS:
            path = link_pin(pin_dir, cg_id, hook.name)
            if os.path.exists(path):
                if _attached(path):
                    continue
                os.unlink(path)  # its cgroup was removed and made again: a new id, stale link
            lfd = syscall.obj_get(pins.link_pin(pin_dir, hook))
            try:
                pfd = syscall.prog_get_fd_by_id(syscall.link_info(lfd)["prog_id"])
            finally:
                os.close(lfd)
            try:
                link = syscall.link_create(pfd, cfd, hook.attach_type, f"attach {hook.func} to {cgroup}")
            finally:
                os.close(pfd)
            try:
                syscall.obj_pin(link, path)
            finally:
                os.close(link)
    finally:
        os.close(cfd)
    return cg_id


def detach(pin_dir: str, cg_id: int) -> list[str]:
    """Detach and unpin the links of host cgroup ``cg_id``; returns the pins removed."""
    paths = [link_pin(pin_dir, cg_id, hook.name) for hook in HOOKS]
    return [p for p in paths if pins.detach_link(p)]
