"""The node agent: interception, registry, identity, proxy, DNS and metrics in one process.

How this works (the composition root; each part lives in its own package):

1. interception — the eBPF programs are compiled and attached by a short-lived
   loader process (``python -m bpf.loader install``: BCC and LLVM never live in
   the agent), or adopted if already attached; the agent opens the pinned
   maps, sets the capture CIDRs and enrolls the configured pod namespaces;
2. registry — a :class:`Registry` watcher keeps the current snapshot; a task
   rebuilds the address :class:`Directory` and makes sure every workload of
   this node has a certificate when a new snapshot arrives;
3. identity — the in-process CA issues workload certs, renewed at half life
   by :class:`CertManager`; the inbound server contexts follow renewals;
4. servers — outbound (15001) and DNS (15053) on the proxy address, HBONE
   inbound (15008) on the node address, Prometheus metrics (15020);
5. health — the Consul-style checks of this node's workloads.

The process lifecycle (listeners, handoff on restart, admin API, status,
reload, drain) is :mod:`agent.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import hostsvc
from agent.config import AgentConfig, PeerAuthConfig
from agent.control.backend import Backend
from agent.control.backends import open_backend
from agent.control.dns import MeshDns
from agent.control.etcd import EtcdTls
from agent.control.model import Workload
from agent.control.peerauthn import PeerAuthDecision, PeerAuthentication, decide
from agent.control.registry import Registry
from agent.control.screening import RejectedWorkloadsCollector, WorkloadGuard, report_changes
from agent.control.snapshot import Snapshot
from agent.dataplane.authorize import Authorizer
from agent.dataplane.egress import MAX_ENTRY_CIDRS, Egress, Resolver, capture_cidrs
from agent.dataplane.gateway import IngressGateway
from agent.dataplane.http.accesslog import AccessLog, AccessLogConfig
from agent.dataplane.http.h1 import LoopConfig
from agent.dataplane.http.upstream import PoolLimits, UpstreamPool
from agent.dataplane.inbound import RESERVED_PORTS, Inbound, InboundConfig
from agent.dataplane.lb import Balancer
from agent.dataplane.outbound import Outbound, OutboundConfig
from agent.dataplane.pool import TunnelPool
from agent.dataplane.ratelimit import RateLimits
from agent.dataplane.ratepeers import RateShare
from agent.dataplane.report import Reporter
from agent.dataplane.route import Directory
from agent.dataplane.tunnel import BufferBudget
from agent.identity.bundle import TrustBundle
from agent.identity.ca import MeshCA
from agent.identity.clock import SystemClock
from agent.identity.errors import IdentityError
from agent.identity.service import CaClient, RemoteIssuer
from agent.identity.spiffe import SpiffeId
from agent.identity.store import CertManager, Issuer, LocalIssuer
from agent.identity.tls import ClientContexts, ServerContexts
from agent.memtrim import MemoryTrimmer
from agent.metrics.istio import CallbackCollector, MeshMetrics
from agent.proto.http1 import H1Limits
from bpf import peerauth
from bpf.config import CaptureConfig, RedirectTarget
from bpf.maps import Dataplane

log = logging.getLogger("nodemesh.agent")


class AgentError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def install_datapath(cfg: AgentConfig) -> dict[str, object]:
    """Compile+attach in a child process (keeps LLVM out of the agent), or adopt."""
    ic = cfg.interception
    proc = subprocess.run(
        [sys.executable, "-m", "bpf.loader", "install", "--cgroup", ic.cgroup, "--bpffs-root", ic.bpffs_root],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AgentError(
            f"interception: the eBPF loader failed: {proc.stderr.strip()}",
            hint="run `nodemesh check` to see what this host is missing",
        )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


class PeerAuthCollector:
    """nodemesh_peer_auth_connections_total{workload, verdict}: new inbound TCP connections to
    this node's pods as the tc filter judged them (proxied, plaintext, refused); and
    nodemesh_peer_auth_mode{workload, namespace, port, mode} = 1: the mode the filter holds for
    each pod (port "*") and each of its port modes (portLevelMtls). Read from the maps at scrape."""

    def __init__(self, dp: Dataplane, directory: DirectoryRef, node: str) -> None:
        self.dp = dp
        self.directory = directory
        self.node = node

    def collect(self) -> list[Metric]:
        fam = CounterMetricFamily(
            "nodemesh_peer_auth_connections",
            "New inbound TCP connections to local pods by peer-auth verdict",
            labels=("workload", "namespace", "verdict"),
        )
        modes = GaugeMetricFamily(
            "nodemesh_peer_auth_mode",
            "Inbound mode the tc filter enforces for a local pod (port *) and its port modes: 1",
            labels=("workload", "namespace", "port", "mode"),
        )
        snap = self.directory.current.snapshot
        for w in snap.workloads.values():
            if w.node != self.node:
                continue
            try:
                counters = self.dp.peer_auth_counters(w.address)
                policy = self.dp.peer_auth(w.address)
            except Exception:
                continue
            for verdict, n in counters.items():
                fam.add_metric((w.name, w.namespace, verdict), n)
            if policy is not None:
                for port, mode in (("*", policy.mode), *((str(p), m) for p, m in policy.ports)):
                    modes.add_metric((w.name, w.namespace, port, mode), 1)
        return [fam, modes]


class DirectoryRef:
    """The current :class:`Directory`; replaced whole when a snapshot arrives (readers never lock)."""

    __slots__ = ("current",)

    def __init__(self, current: Directory) -> None:
        self.current = current

    def __call__(self) -> Directory:
        return self.current


@dataclass
class Agent:
    cfg: AgentConfig
    dataplane: Dataplane | None
    registry: Registry
    backend: Backend
    certs: CertManager
    server_contexts: ServerContexts
    metrics: MeshMetrics
    prom: CollectorRegistry
    outbound: Outbound
    inbound: Inbound
    dns: MeshDns
    directory: DirectoryRef
    memory: MemoryTrimmer
    peer_auth_errors: dict[str, str] = field(default_factory=dict)  # pod netns -> why not enforced
    peer_auth_addresses: dict[str, set[str]] = field(default_factory=dict)  # pod netns -> addresses set
    # apply_peer_auth runs on worker threads (a new snapshot, a reload): one at a time
    peer_auth_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    gateway: IngressGateway | None = None  # agent.yaml's gateway section: an ingress gateway too
    capture: tuple[tuple[str, ...], tuple[int, ...]] = ((), ())  # what apply_capture last wrote

    def local_identities(self) -> set[SpiffeId]:
        td = self.cfg.trust_domain
        return {
            SpiffeId(td, w.namespace, w.service_account)
            for w in self.directory.current.snapshot.workloads.values()
            if w.node == self.cfg.node
        } | ({self.gateway.identity} if self.gateway is not None else set())


def workload_guard(cfg: AgentConfig) -> WorkloadGuard:
    """Addresses no workload may have here: this agent's, its peers', etcd's and the CA's."""
    a = cfg.addresses
    control = [urlsplit(u).hostname or "" for u in cfg.registry.endpoints]
    if cfg.ca_service:
        control.append(cfg.ca_service.rpartition(":")[0].strip("[]"))
    return WorkloadGuard.of({"proxy": a.proxy, "hbone": a.hbone, "metrics": a.metrics}, cfg.peers, control,
                            node=cfg.node)


def identity_source(cfg: AgentConfig, clock: SystemClock) -> tuple[Issuer, TrustBundle]:
    """Single host: the CA in-process from ``ca.dir``. Several hosts: the CA service at
    ``ca.service``, authenticated by this node's cert in ``ca.node_dir``."""
    if not cfg.ca_service:
        try:
            ca = MeshCA.load(cfg.ca_dir)
        except Exception as e:
            raise AgentError(
                f"ca.dir {cfg.ca_dir}: {e}", hint="create one: nodemesh ca init --dir DIR"
            ) from e
        return LocalIssuer(ca), ca.bundle
    d = cfg.ca_node_dir
    try:
        with open(os.path.join(d, "node.crt"), "rb") as f:
            cert_pem = f.read()
        with open(os.path.join(d, "node.key"), "rb") as f:
            key_pem = f.read()
        bundle = TrustBundle.load(os.path.join(d, "bundle.pem"))
    except (OSError, IdentityError) as e:
        raise AgentError(
            f"ca.node_dir {d}: {e}",
            hint="write it with: nodemesh ca issue-node --dir CA --node NAME --out DIR",
        ) from e
    host, _, port = cfg.ca_service.rpartition(":")
    client = CaClient(
        host,
        int(port),
        node_cert_pem=cert_pem,
        node_key_pem=key_pem,
        bundle=bundle,
        trust_domain=cfg.trust_domain,
        clock=clock,
    )
    return RemoteIssuer(client), bundle


def build(cfg: AgentConfig, *, with_interception: bool = True) -> Agent:
    dataplane: Dataplane | None = None
    host_names: Mapping[int, str] = {}
    if with_interception:
        if not cfg.interception.cgroup:
            raise AgentError("interception.cgroup is not set", hint="the cgroup your pods run below")
        install_datapath(cfg)
        dataplane = Dataplane.open(cfg.interception.bpffs_root)
        dataplane.set_capture(CaptureConfig(capture_cidrs(cfg.interception.capture_cidrs, registry_only(cfg),
                                                          Snapshot(0))[0], cfg.interception.excluded_ports))
        target = RedirectTarget(cfg.addresses.proxy, cfg.ports.outbound, cfg.ports.dns)
        for ns in cfg.interception.enroll:
            dataplane.enroll(ns, target)
        host_names = hostsvc.enroll(cfg, dataplane, target)
    clock = SystemClock()
    issuer, bundle = identity_source(cfg, clock)
    certs = CertManager(issuer, clock, ttl_s=cfg.cert_ttl_s)
    server_contexts = ServerContexts(bundle, trust_domain=cfg.trust_domain)
    certs.subscribe(server_contexts.set_identity)
    reg = cfg.registry
    backend = open_backend(reg.dir, ",".join(reg.endpoints) if reg.backend == "etcd" else None,
                           EtcdTls(reg.tls_ca, reg.tls_cert, reg.tls_key))
    registry = Registry(backend)
    prom = CollectorRegistry()
    metrics = MeshMetrics(prom)
    budget = BufferBudget()  # agent-wide: bytes received on tunnel streams, not yet consumed
    directory = DirectoryRef(Directory.build(registry.snapshot))
    pool = TunnelPool(
        certs.ensure,
        ClientContexts(bundle, trust_domain=cfg.trust_domain),
        on_change=lambda n: metrics.tunnel_pool.set(n),
        budget=budget,
        on_event=metrics.tunnel_event,
    )

    def lookup(peer: tuple[str, int], local: tuple[str, int]) -> tuple[str, int] | None:
        if dataplane is None:
            return None
        o = dataplane.lookup_original_dst(peer, local)
        return None if o is None else (o.ip, o.port)

    hc = cfg.http
    loop_config = LoopConfig(
        H1Limits(hc.max_request_line_bytes, hc.max_header_bytes, hc.max_headers),
        idle_timeout_s=hc.idle_timeout_s,
        retry_buffer_bytes=hc.retry_buffer_bytes,
    )
    access_log = AccessLog(
        AccessLogConfig(bool(hc.access_log_path), hc.access_log_path or "-", hc.access_log_sampling)
    )
    reporter = Reporter(metrics, access_log)
    authorizer = Authorizer(directory, metrics,  # one for both: same-node and remote callers
                            root_namespace=cfg.mesh.root_namespace, jwks_refresh_s=hc.jwks_refresh_s)
    authorizer.limits = RateLimits(directory, cfg.node, prom)  # RateLimitPolicy, after authorization
    outbound = Outbound(
        OutboundConfig(
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            hbone_port=cfg.ports.hbone,
            proxy_mark=cfg.peer_authentication.proxy_mark,
            sniff_timeout_s=hc.sniff_timeout_s,
            http=loop_config,
            path_normalization=hc.path_normalization,
            registry_only=registry_only(cfg),
        ),
        directory=directory,
        original_dst=lookup,
        node_address=cfg.peers.get,
        pool=pool,
        balancer=Balancer(),
        metrics=metrics,
        upstreams=UpstreamPool(
            PoolLimits(hc.upstream_max_idle_per_endpoint, hc.upstream_idle_timeout_s)
        ),
        reporter=reporter,
        authorizer=authorizer,
        host_source=None if dataplane is None else hostsvc.HostSources(
            cfg.node, frozenset({cfg.addresses.proxy, cfg.addresses.hbone}), host_names,
            dataplane.lookup_original_dst, directory),
    )
    own = {cfg.addresses.proxy, cfg.addresses.hbone, cfg.addresses.metrics}
    inbound = Inbound(
        InboundConfig(
            node=cfg.node,
            trust_domain=cfg.trust_domain,
            reserved_addresses=frozenset(own | set(cfg.peers.values())),
            # the agent's own ports, as configured: never dialled, also not for a host workload
            reserved_ports=RESERVED_PORTS | set(dataclasses.astuple(cfg.ports)),
            proxy_mark=cfg.peer_authentication.proxy_mark,
            sniff_timeout_s=hc.sniff_timeout_s,
            http=loop_config,
            path_normalization=hc.path_normalization,
        ),
        contexts=server_contexts,
        directory=directory,
        metrics=metrics,
        node_address=lambda n: cfg.addresses.hbone if n == cfg.node else cfg.peers.get(n),
        budget=budget,
        reporter=reporter,
        authorizer=authorizer,
    )
    inbound.rate_share = RateShare(authorizer.limits, directory, cfg.node, inbound.node_address, pool,
                                   cfg.trust_domain, cfg.ports.hbone)  # service-wide rate limits
    upstream = None
    if cfg.dns_upstream:
        host, _, port = cfg.dns_upstream.rpartition(":")
        upstream = (host, int(port))
    # the data path's snapshot: a name (a ServiceEntry host's VIP) is answered once the proxy routes it
    dns = MeshDns(lambda: directory.current.snapshot, upstream=upstream)
    # ServiceEntry DNS endpoints are resolved through the same upstream (never the mesh DNS)
    outbound.egress = Egress(Resolver(upstream), frozenset(own | set(cfg.peers.values())))
    if dataplane is not None:
        dp = dataplane
        prom.register(CallbackCollector("nodemesh_bpf", dp.counters, doc="eBPF redirect counters"))
        prom.register(PeerAuthCollector(dp, directory, cfg.node))
    prom.register(
        CallbackCollector(
            "nodemesh_registry",
            # revision: what the registry client holds; dataplane_revision: what the data path
            # (routing, authorization) decides with — it follows within follow_snapshots' poll
            lambda: {"revision": registry.snapshot.revision, "stale": int(registry.stale),
                     "dataplane_revision": directory.current.snapshot.revision},
            kind="gauge",
        )
    )
    prom.register(RejectedWorkloadsCollector(lambda: directory.current.rejected))
    memory = MemoryTrimmer()
    prom.register(
        CallbackCollector(
            "nodemesh_memory",
            lambda: {"trims": memory.stats.trims, "returned_bytes": memory.stats.returned_bytes},
            doc="malloc_trim calls after bursts, and the RSS they gave back",
        )
    )
    return Agent(
        cfg,
        dataplane,
        registry,
        backend,
        certs,
        server_contexts,
        metrics,
        prom,
        outbound,
        inbound,
        dns,
        directory,
        memory,
        gateway=IngressGateway(cfg.gateway, cfg.node, cfg.trust_domain, outbound, directory,
                               frozenset(dataclasses.astuple(cfg.ports)))
        if cfg.gateway is not None else None,
    )


HOST_NETNS = "/proc/self/ns/net"  # the agent's own netns: where the pods' host-side veths are


def pod_interfaces(netns: str) -> list[peerauth.PodLink]:
    """A pod's interfaces other than loopback, with their IPv4 and IPv6 addresses."""
    return peerauth.pod_links(netns)


def peer_auth_decision(policies: Iterable[PeerAuthentication], w: Workload | None,
                       pa: PeerAuthConfig, root_namespace: str) -> PeerAuthDecision:
    """Pure: the inbound modes of workload ``w`` (None: an enrolled pod the registry does not
    know), per port: the registry's PeerAuthentications (:func:`agent.control.peerauthn.decide`,
    ``root_namespace`` holding the mesh-wide one), agent.yaml's ``peer_authentication`` (``pa``)
    where none applies. ``nodemesh explain`` shows the same decision."""
    if w is None:
        return PeerAuthDecision(pa.mode, "agent.yaml peer_authentication.mode (no workload has this address)")
    default, set_by = pa.default_of(w.namespace, w.name)
    return decide(policies, w.namespace, w.labels, default, root_namespace, set_by)


@dataclass(frozen=True, slots=True)
class PodPeerAuth:
    """What the filters of one interface of an enrolled pod are to hold."""

    link: peerauth.PodLink
    pod_ip: str  # the address the filters key on: the workload's, else the interface's first
    decision: PeerAuthDecision


def plan_peer_auth(links: Mapping[str, Sequence[peerauth.PodLink]], directory: Directory,
                   pa: PeerAuthConfig, root_namespace: str) -> dict[str, list[PodPeerAuth]]:
    """Pure: for each enrolled pod (netns -> its interfaces) what its filters are to hold
    (:func:`peer_auth_decision` for the workload at its address); interfaces without IPv4 have
    nothing to bind."""
    policies = tuple(directory.snapshot.peer_authentications.values())
    plan: dict[str, list[PodPeerAuth]] = {}
    for ns, ifaces in links.items():
        plan[ns] = []
        for link in ifaces:
            if not link.ip4:
                continue
            pod_ip = next((a for a in link.ip4 if directory.workload_at(a) is not None), link.ip4[0])
            plan[ns].append(PodPeerAuth(link, pod_ip, peer_auth_decision(
                policies, directory.workload_at(pod_ip), pa, root_namespace)))
    return plan


def apply_peer_auth(agent: Agent) -> None:
    """Read each enrolled pod's interfaces, plan what its filters hold (:func:`plan_peer_auth`),
    then write it: every address's modes, the filters on its host-side veth (knowing every
    address the pod has now), and forget addresses the pod lost. Idempotent: run at start and on
    every snapshot, off the event loop (it opens netns sockets and writes maps), one run at a
    time. DISABLE is the filter's own mode (everything passes, uncounted)."""
    dp = agent.dataplane
    if dp is None:
        return
    with agent.peer_auth_lock:
        cfg = agent.cfg
        pa = cfg.peer_authentication
        agent.peer_auth_errors.clear()
        enrolled = set(cfg.interception.enroll)
        for ns in [n for n in agent.peer_auth_addresses if n not in enrolled]:  # no longer enrolled
            for address in agent.peer_auth_addresses.pop(ns):
                dp.remove_peer_auth(address)
        links: dict[str, list[peerauth.PodLink]] = {}
        for ns in cfg.interception.enroll:
            try:
                links[ns] = pod_interfaces(ns)
            except Exception as e:  # a pod that went away must not stop the others; status shows it
                agent.peer_auth_errors[ns] = str(e)
                log.error("peer authentication NOT enforced for %s: %s", ns, e)
        for ns, pods in plan_peer_auth(links, agent.directory.current, pa, cfg.mesh.root_namespace).items():
            try:
                now = {a for link in links[ns] for a in link.ip4}
                for p in pods:
                    for address in p.link.ip4:
                        dp.set_peer_auth(address, p.decision.mode, cfg.addresses.proxy,
                                         proxy_mark=pa.proxy_mark, udp=pa.udp, dns_port=cfg.ports.dns,
                                         ports=p.decision.ports)
                    host_if = peerauth.host_peer(HOST_NETNS, ns, p.link)
                    dp.attach_pod_filters(HOST_NETNS, host_if, p.pod_ip, [*p.link.ip4, *p.link.ip6])
                    peerauth.remove_pod_side_filter(ns, p.link.ifname)  # left by an older release
                for address in agent.peer_auth_addresses.get(ns, set()) - now:  # the pod lost it
                    dp.remove_peer_auth(address)
                agent.peer_auth_addresses[ns] = now
            except Exception as e:  # a pod that went away must not stop the others; status shows it
                agent.peer_auth_errors[ns] = str(e)
                log.error("peer authentication NOT enforced for %s: %s", ns, e)


def registry_only(cfg: AgentConfig) -> bool:
    return cfg.outbound_traffic_policy == "REGISTRY_ONLY"


def apply_capture(agent: Agent, cfg: AgentConfig | None = None) -> None:
    """Make the eBPF capture CIDRs what ``cfg`` (the running config) and the current snapshot's
    ServiceEntries ask for (:func:`agent.dataplane.egress.capture_cidrs`); only writes a change.
    Off the event loop when it follows a snapshot (it writes maps)."""
    dp = agent.dataplane
    cfg = cfg or agent.cfg
    if dp is None:
        return
    ic = cfg.interception
    cidrs, left_out = capture_cidrs(ic.capture_cidrs, registry_only(cfg), agent.directory.current.snapshot)
    want = (cidrs, ic.excluded_ports)
    if want == agent.capture:
        return
    if left_out:
        log.error("capture: %d ServiceEntry addresses outside capture_cidrs are not captured (at most %d); "
                  "add their network to interception.capture_cidrs", left_out, MAX_ENTRY_CIDRS)
    try:
        dp.set_capture(CaptureConfig(*want))
        agent.capture = want
    except Exception as e:  # the map is as it was; the next snapshot tries again
        log.error("capture: cannot set %d CIDRs: %s", len(cidrs), e)


async def follow_snapshots(agent: Agent, stop: asyncio.Event) -> None:
    seen: object = None
    seen_guard = workload_guard(agent.cfg)
    while not stop.is_set():
        snap = agent.registry.snapshot
        guard = workload_guard(agent.cfg)  # peers may change on reload
        if snap is not seen or guard != seen_guard:  # a new snapshot object (revisions may repeat)
            seen, seen_guard = snap, guard
            before = agent.directory.current.rejected
            agent.directory.current = Directory.build(snap, guard)
            report_changes(before, agent.directory.current.rejected)
            await asyncio.to_thread(apply_peer_auth, agent)
            await asyncio.to_thread(apply_capture, agent)
            want = agent.local_identities()
            for sid in want:
                try:
                    await agent.certs.ensure(sid)
                except Exception as e:
                    log.warning("cannot issue a certificate for %s: %s", sid, e)
            for sid in set(agent.certs.identities()) - want:
                agent.certs.forget(sid)
                agent.server_contexts.remove_identity(sid)
        await agent.certs.renew_due()
        await agent.outbound.pool.reap()  # idle tunnels, and tunnels superseded by a renewed cert
        agent.outbound.upstreams.reap()  # idle pooled HTTP upstream connections
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
