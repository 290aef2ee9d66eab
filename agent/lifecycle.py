"""The agent process: listeners, readiness, status, reload, drain, restart handoff.

How this works: :func:`serve` takes a built :class:`agent.node.Agent`.

- Listeners come from the previous agent of this node if one is running
  (:mod:`agent.handoff`), else they are opened fresh. Then the proxy, DNS,
  admin (127.0.0.1:15000), metrics (15020) and health (15021) servers start on
  them, ``ready`` is printed and ``READY=1`` sent to systemd.
- Every TCP listener accepts through :class:`agent.dataplane.listener.Listener`:
  per-listener and per-peer connection limits (``limits:`` in the config), and
  an accept loop that outlives ``EMFILE``. While a listener cannot accept,
  ``/healthz/ready`` answers 503 naming it and ``status`` is degraded. At
  start the agent raises its open-files soft limit to the hard limit.
- ``SIGTERM``/``SIGINT``: stop accepting, let open connections finish up to the
  drain deadline, then exit. The eBPF programs stay attached: pods'
  connections are refused until an agent listens again (never sent around
  the mesh in plaintext).
- A successor taking the sockets over: the same drain, but the ports never
  close, so no connection is refused during a restart.
- ``SIGHUP`` or a change of the config file: reload what can change at run
  time (peer authentication, peers, capture CIDRs and excluded ports, enrolled
  pods, DNS upstream, log level) and log which changed keys need a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from agent import config as config_mod
from agent import handoff, hostsvc
from agent.admin import HttpEndpoints, Request, Response, listen_tcp
from agent.config import AgentConfig
from agent.control.health import HealthMonitor
from agent.control.screening import report_changes
from agent.dataplane.http.outlier import outliers_doc
from agent.dataplane.listener import FdReserve, Listener, stream_handler
from agent.dataplane.route import Directory
from agent.dataplane.tcp import SOCKET_READ_LIMIT
from agent.gcpause import freeze_startup_objects
from agent.node import (
    Agent,
    AgentError,
    apply_capture,
    apply_peer_auth,
    build,
    follow_snapshots,
    workload_guard,
)
from bpf.config import RedirectTarget
from bpf.maps import datapath_status

log = logging.getLogger("nodemesh.agent")

RELOADABLE = (
    "peer_authentication",
    "peers",
    "dns_upstream",
    "log_level",
    "interception.capture_cidrs",
    "interception.excluded_ports",
    "interception.enroll",
    "interception.host_cgroups",
)
DRAIN_S = 10.0
# /status "policies": kind -> the Snapshot table holding it
POLICY_TABLES = (
    ("VirtualService", "virtual_services"),
    ("DestinationRule", "destination_rules"),
    ("AuthorizationPolicy", "authorization_policies"),
    ("RequestAuthentication", "request_authentications"),
    ("PeerAuthentication", "peer_authentications"),
    ("RateLimitPolicy", "rate_limit_policies"),
    ("Gateway", "gateways"),
    ("ServiceEntry", "service_entries"),
)
# the agent's own endpoints: they get the descriptor reserve, so readiness answers when none is left
OWN_ENDPOINTS = ("admin", "metrics", "health")
TCP_LISTENERS = ("outbound", "hbone", "dns_tcp", *OWN_ENDPOINTS)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, hard


def _listen_udp(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


def open_listeners(cfg: AgentConfig) -> dict[str, socket.socket]:
    a, p = cfg.addresses, cfg.ports
    opened: dict[str, socket.socket] = {}
    try:
        opened["outbound"] = listen_tcp(a.proxy, p.outbound)
        opened["hbone"] = listen_tcp(a.hbone, p.hbone)
        opened["dns_udp"] = _listen_udp(a.proxy, p.dns)
        opened["dns_tcp"] = listen_tcp(a.proxy, p.dns, backlog=128)
        opened["admin"] = listen_tcp("127.0.0.1", p.admin, backlog=16)
        opened["metrics"] = listen_tcp(a.metrics, p.metrics, backlog=64)
        opened["health"] = listen_tcp(a.metrics, p.health, backlog=64)
    except OSError as e:
        for s in opened.values():
            s.close()
        raise OSError(
            e.errno, f"cannot listen: {e.strerror} (is another agent running without handoff?)"
        ) from e
    return opened


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of config fields that differ."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        out: list[str] = []
        for f in dataclasses.fields(old):
            out += _diff(getattr(old, f.name), getattr(new, f.name), f"{prefix}{f.name}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


class Lifecycle:
    def __init__(self, agent: Agent, config_path: str | None) -> None:
        self.agent = agent
        self.config_path = config_path
        self.started_s = time.time()
        self.stop = asyncio.Event()
        self.handed_off = False
        self.ready = False
        self.listeners: dict[str, socket.socket] = {}
        self.endpoints: list[HttpEndpoints] = []
        self.reserve: FdReserve | None = None
        self.accept: dict[str, Listener] = {}
        self._config_mtime = self._mtime()
        self._reload_wanted = asyncio.Event()  # SIGHUP
        self.reloads = 0
        self.restart_needed: list[str] = []

    def _mtime(self) -> float:
        try:
            return os.stat(self.config_path).st_mtime if self.config_path else 0.0
        except OSError:
            return 0.0

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        a = self.agent
        cfg = a.cfg
        reg = a.registry.status()
        now = time.time()
        interception: dict[str, Any]
        if a.dataplane is None:
            interception = {"ok": False, "error": "interception is disabled"}
        else:
            try:
                interception = datapath_status(cfg.interception.bpffs_root)
            except Exception as e:
                interception = {"ok": False, "error": str(e)}
        certs: list[dict[str, Any]] = []
        certs_ok = True
        for c in a.certs.status():
            left = (c.not_after.timestamp() - now) if c.not_after else None
            certs.append(
                {
                    "spiffe_id": c.spiffe_id.uri,
                    "not_after": c.not_after.isoformat() if c.not_after else None,
                    "expires_in_s": round(left) if left is not None else None,
                    "renew_at": c.renew_at.isoformat() if c.renew_at else None,
                    "error": c.last_error,
                }
            )
        registry = {
            "backend": cfg.registry.backend,
            "location": a.backend.location,
            "revision": reg.revision,
            "stale": reg.stale,
            "stale_for_s": round(time.monotonic() - reg.stale_since_s, 1) if reg.stale_since_s else None,
            "last_error": reg.last_error,
        }
        listeners = {}
        for name, s in self.listeners.items():
            with contextlib.suppress(OSError):  # closed while draining
                listeners[name] = f"{s.getsockname()[0]}:{s.getsockname()[1]}"
        accepting = {name: lst.health() for name, lst in self.accept.items()}
        problems = [p for h in accepting.values() if (p := h.problem()) is not None]
        if a.gateway is not None:  # a gateway port it cannot listen on
            problems += a.gateway.problem_lines()
        doc = {
            "node": cfg.node,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started_s, 1),
            "ready": self.ready,
            "draining": self.stop.is_set(),
            "interception": interception,
            "registry": registry,
            "certificates": certs,
            "listeners": listeners,
            "accept": {name: h.to_doc() for name, h in accepting.items()},
            "degraded": problems,
            "gateway": a.gateway.status() if a.gateway is not None else None,
            "proxy": {
                "tunnel_connections": a.outbound.pool.size,
                "tunnel_dials": a.outbound.pool.dials,
                "workloads_on_node": sum(
                    1 for w in a.directory.current.snapshot.workloads.values() if w.node == cfg.node
                ),
                "outbound_traffic_policy": cfg.outbound_traffic_policy,
                "service_entry_hosts": len(a.directory.current.snapshot.entry_services),
                "capture_cidrs": list(a.capture[0]),  # agent.yaml's, 0.0.0.0/0 or entry addresses
            },
            # in force: the snapshot routing and authorization decide with (nodemesh dashboard)
            "policies": {
                kind: len(getattr(a.directory.current.snapshot, table))
                for kind, table in POLICY_TABLES
            },
            "config": {
                "path": self.config_path,
                "reloads": self.reloads,
                "restart_needed": self.restart_needed,
            },
        }
        doc["ok"] = (
            bool(interception.get("ok"))
            and not reg.stale
            and certs_ok
            and self.ready
            and not a.peer_auth_errors
            and not problems
        )
        return doc

    # -- http handlers ---------------------------------------------------------------------------

    async def _status(self, _r: Request) -> Response:
        doc = await asyncio.to_thread(self.status)
        doc["rate_limits"] = self.rate_limits()  # (on the loop: the data path's own state)
        return Response.json(doc)

    def rate_limits(self) -> list[dict[str, Any]]:
        """Every RateLimitPolicy in force on this node: rate, share, tokens left, peers, fallback."""
        limits = self.agent.inbound.authorizer.limits
        return limits.status() if limits is not None else []

    async def _rate_limits(self, _r: Request) -> Response:
        return Response.json(self.rate_limits())

    def listener_problems(self) -> list[str]:
        gw = self.agent.gateway
        return [p for lst in self.accept.values() if (p := lst.health().problem()) is not None] + (
            gw.problem_lines() if gw is not None else [])

    async def _ready(self, _r: Request) -> Response:
        if not self.ready or self.stop.is_set():
            return Response.text("not ready\n", 503)
        problems = self.listener_problems()
        if problems:
            return Response.text(f"degraded: {'; '.join(problems)}\n", 503)
        return Response.text("ready\n")

    async def _config(self, _r: Request) -> Response:
        return Response.json(dataclasses.asdict(self.agent.cfg))

    async def _workloads(self, _r: Request) -> Response:
        snap = self.agent.directory.current.snapshot
        return Response.json(
            [
                {**w.to_doc(), "health": str(snap.effective_health(w.namespace, w.name))}
                for w in snap.workloads.values()
                if w.node == self.agent.cfg.node
            ]
        )

    async def _outliers(self, _r: Request) -> Response:
        states = self.agent.outbound.outliers.states()
        return Response.json(outliers_doc(self.agent.cfg.node, states, time.time()))

    async def _certs(self, _r: Request) -> Response:
        return Response.json(self.status()["certificates"])

    async def _metrics(self, _r: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, self.agent.prom)
        return Response(200, body, "text/plain; version=0.0.4; charset=utf-8")

    # -- reload ------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the config file again and take what can change live; True when it changed
        something: the caller then applies peer authentication, off the event loop."""
        if not self.config_path:
            return False
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e.message)
            return False
        old = self.agent.cfg
        changed = _diff(old, new)
        if not changed:
            return False
        live = [k for k in changed if any(k == r or k.startswith(r + ".") for r in RELOADABLE)]
        restart = [k for k in changed if k not in live]
        dp = self.agent.dataplane
        host_cgroups = old.interception.host_cgroups
        if dp is not None:
            if new.interception.capture_cidrs != old.interception.capture_cidrs or (
                new.interception.excluded_ports != old.interception.excluded_ports
            ):
                # (with REGISTRY_ONLY and the ServiceEntry addresses; that mode needs a restart)
                apply_capture(self.agent, dataclasses.replace(
                    new, outbound_traffic_policy=old.outbound_traffic_policy))
            target = RedirectTarget(old.addresses.proxy, old.ports.outbound, old.ports.dns)
            for ns in set(new.interception.enroll) - set(old.interception.enroll):
                dp.enroll(ns, target)
            for ns in set(old.interception.enroll) - set(new.interception.enroll):
                with contextlib.suppress(Exception):
                    dp.unenroll(ns)
            if new.interception.host_cgroups != old.interception.host_cgroups:
                host_cgroups = hostsvc.reload(new, dp, target, self.agent.outbound.host_source, old)
        # fields that need a restart keep their running values
        kept = {
            f.name: getattr(old, f.name)
            for f in dataclasses.fields(old)
            if f.name not in {"peer_authentication", "peers", "dns_upstream", "log_level", "interception"}
        }
        interception = dataclasses.replace(
            old.interception,
            capture_cidrs=new.interception.capture_cidrs,
            excluded_ports=new.interception.excluded_ports,
            enroll=new.interception.enroll,
            host_cgroups=host_cgroups,
        )
        self.agent.cfg = AgentConfig(
            **kept,
            peer_authentication=new.peer_authentication,
            peers=new.peers,
            dns_upstream=new.dns_upstream,
            log_level=new.log_level,
            interception=interception,
        )
        self.agent.outbound.node_address = self.agent.cfg.peers.get
        a = self.agent.cfg.addresses  # ServiceEntry endpoints never at this node's or a peer's address
        self.agent.outbound.egress.reserved = frozenset({a.proxy, a.hbone, a.metrics, *new.peers.values()})
        logging.getLogger().setLevel(new.log_level.upper())
        self.reloads += 1
        self.restart_needed = sorted(set(self.restart_needed) | set(restart))
        log.info(
            "configuration reloaded: %s changed%s",
            ", ".join(live) or "nothing live",
            f"; these need a restart to take effect: {', '.join(restart)}" if restart else "",
        )
        return True

    async def _watch_config(self) -> None:
        """Reload on SIGHUP or when the file changes (polled each second); cancelled at stop."""
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_wanted.wait(), 1.0)
            m = self._mtime()
            if self._reload_wanted.is_set() or m != self._config_mtime:
                self._reload_wanted.clear()
                self._config_mtime = m
                if self.reload():
                    await asyncio.to_thread(apply_peer_auth, self.agent)

    # -- serving -------------------------------------------------------------------------------

    def _handed_off(self) -> None:
        self.handed_off = True
        self.stop.set()

    async def serve(self, ready: Callable[[], None] | None = None, drain_s: float = DRAIN_S) -> None:
        a = self.agent
        cfg = a.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_wanted.set)
        a.registry.start()
        for _ in range(100):  # the first read (up to 5 s); a stale registry still starts, and says so
            if not a.registry.stale:
                break
            await asyncio.sleep(0.05)
        else:
            st = a.registry.status()
            a.registry.stop()
            raise AgentError(
                f"registry ({cfg.registry.backend}) {a.backend.location} unreachable at start: "
                f"{st.last_error or 'no answer in 5 s'}",
                hint="check registry.endpoints / registry.dir in the config; once running, the agent "
                "rides out registry outages on its last snapshot",
            )
        a.directory.current = Directory.build(a.registry.snapshot, workload_guard(cfg))
        report_changes({}, a.directory.current.rejected)
        await asyncio.to_thread(apply_peer_auth, a)  # STRICT pods are enforced before we serve
        await asyncio.to_thread(apply_capture, a)  # ServiceEntry addresses captured before we serve
        for sid in a.local_identities():  # certificates before the first connection
            await a.certs.ensure(sid)
        ctl_path = handoff.socket_path(cfg.runtime_dir, cfg.node)
        taken = await asyncio.to_thread(handoff.take_over, ctl_path)
        if taken is not None:
            ctl, self.listeners = taken
            log.info("took over %d listening sockets from the running agent", len(self.listeners))
        else:
            ctl, self.listeners = None, open_listeners(cfg)
        ls = self.listeners
        self.reserve = FdReserve()
        self.accept = {
            name: Listener(name, cfg.limits.of(name), metrics=a.metrics,
                           reserve=self.reserve if name in OWN_ENDPOINTS else None)
            for name in TCP_LISTENERS
        }
        a.inbound.config = dataclasses.replace(
            a.inbound.config, handshake_timeout_s=cfg.limits.hbone_handshake_timeout_s
        )
        dns_tcp = functools.partial(a.dns.serve_tcp, idle_timeout_s=cfg.limits.dns_tcp_idle_timeout_s)
        outbound = stream_handler(a.outbound.handle, limit=SOCKET_READ_LIMIT)
        accept_tasks = [
            asyncio.create_task(self.accept["outbound"].serve(ls["outbound"], outbound), name="outbound"),
            asyncio.create_task(a.inbound.serve(ls["hbone"], self.accept["hbone"]), name="listener hbone"),
            asyncio.create_task(
                self.accept["dns_tcp"].serve(ls["dns_tcp"], stream_handler(dns_tcp)), name="listener dns_tcp"
            ),
        ]
        await a.dns.start_on(ls["dns_udp"], None)
        admin = HttpEndpoints(
            {
                "/status": self._status,
                "/config_dump": self._config,
                "/workloads": self._workloads,
                "/certs": self._certs,
                "/outliers": self._outliers,
                "/ratelimits": self._rate_limits,
                "/healthz/ready": self._ready,
            },
            "admin",
            self.accept["admin"],
        )
        metrics = HttpEndpoints({"/metrics": self._metrics}, "metrics", self.accept["metrics"])
        health = HttpEndpoints(
            {"/healthz/ready": self._ready, "/status": self._status, "/outliers": self._outliers},
            "health",
            self.accept["health"],
        )
        for ep, name in ((admin, "admin"), (metrics, "metrics"), (health, "health")):
            await ep.start(ls[name])
        self.endpoints = [admin, metrics, health]
        tasks = [
            asyncio.create_task(follow_snapshots(a, self.stop), name="snapshots"),
            asyncio.create_task(
                HealthMonitor(cfg.node, a.backend, lambda: a.registry.snapshot).run(self.stop)
            ),
            asyncio.create_task(self._watch_config(), name="config"),
            asyncio.create_task(a.memory.run(self.stop), name="memory"),
        ]
        if a.gateway is not None:  # (after the handoff: its ports are opened, not taken over)
            tasks.append(asyncio.create_task(a.gateway.run(self.stop, drain_s), name="gateway"))
        hosts = getattr(a.outbound.host_source, "names", None)
        if isinstance(hosts, hostsvc.HostCgroups):  # host cgroups (re)appearing are enrolled
            tasks.append(asyncio.create_task(hostsvc.watch(hosts, self.stop), name="host cgroups"))
        if ctl is not None:
            await asyncio.to_thread(handoff.confirm, ctl)  # the old agent drains from here on
        hs = handoff.HandoffServer(ctl_path, lambda: self.listeners, self._handed_off)
        await hs.start()
        self.ready = True
        log.info(
            "agent %s ready (%s): %s",
            cfg.node,
            "took over" if ctl is not None else "fresh",
            ", ".join(f"{n} {s.getsockname()[0]}:{s.getsockname()[1]}" for n, s in ls.items()),
        )
        if ready is not None:
            ready()
        a.memory.rebase()
        await self.stop.wait()
        log.info(
            "agent %s %s: draining for up to %.0fs",
            cfg.node,
            "handed its sockets to a new agent" if self.handed_off else "stopping",
            drain_s,
        )
        hs.close()
        for t in accept_tasks:
            t.cancel()
        for ep in self.endpoints:
            ep.close()
        await asyncio.gather(*accept_tasks, return_exceptions=True)
        for ep in self.endpoints:
            await ep.wait_closed()
        for name in TCP_LISTENERS:  # our copy of the listening socket; a successor keeps its own
            self.listeners[name].close()
        await a.dns.stop()
        await self.accept["dns_tcp"].cancel_connections()
        await a.outbound.drain(drain_s)
        await a.inbound.close()
        await a.outbound.pool.close()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in self.listeners.values():
            s.close()
        self.reserve.close()
        a.registry.stop()
        if a.dataplane is not None:
            a.dataplane.close()
        log.info("agent %s stopped", cfg.node)


def sd_notify(message: bytes) -> None:
    notify = os.environ.get("NOTIFY_SOCKET")
    if not notify:
        return
    addr = "\0" + notify[1:] if notify.startswith("@") else notify
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(message, addr)


def spawn_successor(config_path: str, *, with_interception: bool = True, timeout_s: float = 120.0) -> int:
    """Start a new agent in its own session that takes over the running agent's sockets;
    return its PID once it serves. Under systemd it announces itself as the unit's new main
    process (``MAINPID=``; the unit has ``NotifyAccess=all``) and the old one drains and exits."""
    import subprocess

    argv = [sys.executable, "-m", "agent.cli.main", "agent", "-c", config_path]
    if not with_interception:
        argv.append("--no-interception")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == b"ready":
            proc.stdout.close()  # the agent prints nothing more on stdout
            return proc.pid
        if not line:
            break
    proc.kill()
    raise AgentError(
        f"the new agent did not become ready (exit {proc.wait()}); the running one keeps serving"
    )


def run(cfg: AgentConfig, *, config_path: str | None = None, with_interception: bool = True) -> None:
    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    before, after = raise_open_files_limit()
    log.info("open files limit: %d%s", after, f" (raised from {before})" if after != before else "")
    agent = build(cfg, with_interception=with_interception)
    life = Lifecycle(agent, config_path)

    def ready() -> None:
        freeze_startup_objects()  # later full collections skip everything alive by now
        print("ready", flush=True)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving".encode())

    try:  # uvloop: the event loop and its TLS in C; the data path's per-message cost halves
        import uvloop

        uvloop.run(life.serve(ready=ready, drain_s=cfg.drain_s))
    except ImportError:
        asyncio.run(life.serve(ready=ready, drain_s=cfg.drain_s))
