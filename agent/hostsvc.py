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
connection then carries. The list can change on a reload (:func:`reload`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType

from agent.config import AgentConfig, host_workload_name
from agent.control.model import Workload
from agent.dataplane.route import Directory
from bpf import hostcg
from bpf.config import RedirectTarget
from bpf.errors import BpfConfigError, BpfError
from bpf.loader import resolve_cgroup
from bpf.maps import Dataplane, OriginalDst

log = logging.getLogger(__name__)


def enroll(cfg: AgentConfig, dp: Dataplane, target: RedirectTarget) -> Mapping[int, str]:
    """Enroll every host cgroup of ``cfg``; returns cgroup id -> workload name. Raises
    :class:`bpf.errors.BpfConfigError` for the agent's own cgroup or an ancestor of it,
    before anything is attached."""
    agent_cg = hostcg.cgroup_of()
    paths = [resolve_cgroup(c, allow_root=True) for c in cfg.interception.host_cgroups]
    for path in paths:
        why = hostcg.refusal(path, agent_cg)
        if why is not None:
            raise BpfConfigError(why, where="interception.host_cgroups",
                                 hint="name the service's own cgroup, e.g. "
                                      "system.slice/my-service.service")
    icg = resolve_cgroup(cfg.interception.cgroup, allow_root=True)
    names: dict[int, str] = {}
    for given, path in zip(cfg.interception.host_cgroups, paths, strict=True):
        cg_id = hostcg.attach(dp.pin_dir, path, icg, agent_cg)
        dp.enroll_host_cgroup(cg_id, target)
        names[cg_id] = host_workload_name(given)
        log.info("host service cgroup %s (id %d) enrolled as workload %s", path, cg_id, names[cg_id])
    for cg_id in set(dp.host_cgroups()) - set(names):  # gone from the config since the last start
        dp.unenroll_host_cgroup(cg_id)
        hostcg.detach(dp.pin_dir, cg_id)
        log.info("host service cgroup id %d is no longer enrolled", cg_id)
    return MappingProxyType(names)


def reload(cfg: AgentConfig, dp: Dataplane, target: RedirectTarget, source: object,
           running: AgentConfig) -> tuple[str, ...]:
    """``interception.host_cgroups`` changed on a reload: enroll the new list (cgroups no longer
    listed are detached) and name its workloads; returns the list now in force. A refused list
    (the agent's own cgroup, an ancestor, a cgroup that does not exist) changes nothing."""
    try:
        names = enroll(cfg, dp, target)
    except BpfError as e:
        log.error("reload: interception.host_cgroups refused, the running ones stay: %s", e.message)
        return running.interception.host_cgroups
    if isinstance(source, HostSources):
        source.names = names
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
