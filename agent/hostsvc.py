"""Host services in the mesh: enrolling their cgroups and naming them as sources.

How this works: ``interception.host_cgroups`` lists cgroups of services that run
in the host network namespace (systemd units). At start the agent refuses its own
cgroup and its ancestors, links the data path's programs to each cgroup and puts
it into ``nm_host_cg`` (:mod:`bpf.hostcg`); their connections to captured
destinations then reach the outbound like a pod's. Such a connection comes from
the node's own address, which names no pod: :class:`HostSources` reads the
cgroup id the programs recorded with the original destination and answers the
host workload of that name on this node (``my-service.service`` is workload
``my-service``, as a Consul definition registered it), whose identity the
connection then carries. A configured cgroup may not exist yet, or be removed and
made again (systemd does so on every stop and start of a unit, with a new id):
:func:`watch` enrolls it whenever it appears (:class:`HostCgroups`). The list can
change on a reload (:func:`reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.config import AgentConfig, host_workload_name
from agent.control.model import Workload
from agent.dataplane.route import Directory
from bpf import hostcg, pins
from bpf.config import RedirectTarget
from bpf.errors import BpfConfigError, BpfError
from bpf.loader import resolve_cgroup
from bpf.maps import Dataplane, OriginalDst

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Host:
    given: str  # as in the config
    path: str  # absolute
    name: str  # the workload
    cg_id: int = 0  # enrolled cgroup id; 0: the cgroup does not exist (yet)


class HostCgroups(Mapping[int, str]):
    """The configured host cgroups, kept enrolled while they come and go: systemd removes a
    unit's cgroup when it stops and makes a new one (a new id) when it starts, so
    :meth:`sync` (every second, :func:`watch`) enrolls a cgroup that appeared or changed and
    forgets one that is gone. As a mapping: enrolled cgroup id -> workload name."""

    def __init__(self, dp: Dataplane, target: RedirectTarget, interception_cgroup: str,
                 agent_cgroup: str) -> None:
        self.dp, self.target = dp, target
        self.interception_cgroup, self.agent_cgroup = interception_cgroup, agent_cgroup
        self.hosts: list[_Host] = []
        self.names: Mapping[int, str] = MappingProxyType({})
        self._lock = threading.Lock()
        self._swept = False  # map entries of cgroups no longer configured removed once

    def __getitem__(self, cg_id: int) -> str:
        return self.names[cg_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def configure(self, host_cgroups: tuple[str, ...]) -> None:
        """Take this list; :class:`BpfConfigError` (nothing changed) for the agent's own cgroup,
        an ancestor of it, or a path outside the cgroup v2 mount."""
        mount = pins.cgroup2_mount()
        hosts = []
        for given in host_cgroups:
            path = os.path.normpath(given if os.path.isabs(given) else os.path.join(mount, given))
            if os.path.commonpath([mount, path]) != mount:
                raise BpfConfigError(f"{path} is not inside the cgroup v2 mount {mount}",
                                     where="interception.host_cgroups")
            why = hostcg.refusal(path, self.agent_cgroup)
            if why is not None:
                raise BpfConfigError(why, where="interception.host_cgroups",
                                     hint="name the service's own cgroup, e.g. "
                                          "system.slice/my-service.service")
            hosts.append(_Host(given, path, host_workload_name(given)))
        with self._lock:
            kept = {h.path: h.cg_id for h in self.hosts}
            for h in hosts:
                h.cg_id = kept.get(h.path, 0)
            for h in self.hosts:  # no longer configured
                if h.cg_id and h.path not in {x.path for x in hosts}:
                    self._forget(h)
            self.hosts = hosts
            self._publish()

    def sync(self) -> None:
        """Enroll what appeared or changed, forget what is gone (a stat per cgroup when nothing did)."""
        with self._lock:
            changed = False
            for h in self.hosts:
                try:
                    cg_id = hostcg.cgroup_id(h.path)
                except FileNotFoundError:
                    cg_id = 0
                if cg_id == h.cg_id:
                    continue
                changed = True
                if h.cg_id:
                    self._forget(h)
                if cg_id:
                    try:
                        h.cg_id = hostcg.attach(self.dp.pin_dir, h.path, self.interception_cgroup,
                                                self.agent_cgroup)
                        self.dp.enroll_host_cgroup(h.cg_id, self.target)
                        log.info("host service cgroup %s (id %d) enrolled as workload %s", h.path,
                                 h.cg_id, h.name)
                    except (BpfError, OSError) as e:  # removed again meanwhile: the next sync sees it
                        log.warning("host service cgroup %s cannot be enrolled yet: %s", h.path, e)
                        h.cg_id = 0
                else:
                    log.info("host service cgroup %s does not exist (yet): waiting for it", h.path)
            if not self._swept:
                mine = {h.cg_id for h in self.hosts}
                for cg_id in set(self.dp.host_cgroups()) - mine:  # configured before, not now
                    self.dp.unenroll_host_cgroup(cg_id)
                    hostcg.detach(self.dp.pin_dir, cg_id)
                self._swept = changed = True
            if changed:
                self._publish()

    def _forget(self, h: _Host) -> None:
        self.dp.unenroll_host_cgroup(h.cg_id)
        hostcg.detach(self.dp.pin_dir, h.cg_id)
        log.info("host service cgroup %s (id %d) is no longer enrolled", h.path, h.cg_id)
        h.cg_id = 0

    def _publish(self) -> None:
        self.names = MappingProxyType({h.cg_id: h.name for h in self.hosts if h.cg_id})


def enroll(cfg: AgentConfig, dp: Dataplane, target: RedirectTarget) -> HostCgroups:
    """The host cgroups of ``cfg``, enrolled where they exist. Raises
    :class:`bpf.errors.BpfConfigError` for the agent's own cgroup or an ancestor of it,
    before anything is attached."""
    hc = HostCgroups(dp, target, resolve_cgroup(cfg.interception.cgroup, allow_root=True),
                     hostcg.cgroup_of())
    hc.configure(cfg.interception.host_cgroups)
    hc.sync()
    for h in hc.hosts:
        if not h.cg_id:
            log.warning("host service cgroup %s does not exist yet: enrolled when it appears", h.path)
    return hc


async def watch(hc: HostCgroups, stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """Until ``stop``: :meth:`HostCgroups.sync` every ``interval_s``, off the event loop."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(hc.sync)
        except BpfError as e:
            log.error("host service cgroups: %s", e.message)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()


def reload(cfg: AgentConfig, dp: Dataplane, target: RedirectTarget, source: object,
           running: AgentConfig) -> tuple[str, ...]:
    """``interception.host_cgroups`` changed on a reload: take the new list (cgroups no longer
    listed are detached) and enroll what exists; returns the list now in force. A refused list
    (the agent's own cgroup, an ancestor) changes nothing."""
    del dp, target  # the running HostCgroups has them
    hc = source.names if isinstance(source, HostSources) else None
    if not isinstance(hc, HostCgroups):
        return running.interception.host_cgroups
    try:
        hc.configure(cfg.interception.host_cgroups)
    except BpfError as e:
        log.error("reload: interception.host_cgroups refused, the running ones stay: %s", e.message)
        return running.interception.host_cgroups
    hc.sync()
    return cfg.interception.host_cgroups


class HostSources:
    """The source workload of a captured connection from a host service, or None."""

    def __init__(self, node: str, own: frozenset[str], names: Mapping[int, str],
                 lookup: Callable[[tuple[str, int], tuple[str, int]], OriginalDst | None],
                 directory: Callable[[], Directory]) -> None:
        self.node = node
        self.own = own  # this node's addresses: the only ones a host service's connection has
        self.names = names
        self.lookup = lookup
        self.directory = directory

    def __call__(self, peer: tuple[str, int], local: tuple[str, int]) -> Workload | None:
        if not self.names or peer[0] not in self.own:
            return None  # a pod (one map lookup saved)
        o = self.lookup(peer, local)
        if o is None or not o.host:
            return None
        name = self.names.get(o.netns_cookie)
        return None if name is None else self.directory().host_workload(self.node, name)
