"""Service-wide rate limits without a central store: the agents that host a service's endpoints
tell each other their demand every 100 ms over the mesh's own mTLS, and each re-divides the
budget (:func:`agent.dataplane.ratelimit.divide`).

How this works: every ``interval_s`` :class:`RateShare` samples, for each ``scope: service``
policy with endpoints on this node, the requests (or connections) offered since the last
sample (a smoothed rate), and sends one JSON line to every other node hosting endpoints of
those services: ``{"node", "heard", "demand": {"ns/name": per_s}}``, where ``heard`` lists the
peers whose reports arrived within ``stale_s``. The line travels on a long-lived HBONE CONNECT
stream to the reserved target ``<peer node address>:15008`` (the agent's own inbound port,
never a pod): TLS 1.3 with a local endpoint's certificate, to an identity the peer hosts, so
the peer's inbound verifies the chain and that the identity runs on the node the tunnel comes
from, as for any tunnel. The receiving side (:meth:`RateShare.serve`) accepts a report only
from the node it claims to be (address and identity) and only for policies whose service has
endpoints on that node; lines are bounded.

A peer counts as reachable when its report is fresh *and* it heard us (so two agents agree
on whether they are connected). Unreachable peers are assumed to run on their static share,
which is set aside; the rest is divided by demand among the reachable. With no peer
reachable a policy runs on its static share (own endpoints / all), and the status says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.control.model import selects
from agent.dataplane.pool import TunnelPool
from agent.dataplane.ratelimit import RateLimits, divide, endpoint_counts
from agent.dataplane.route import Directory
from agent.dataplane.tunnel import TunnelError, TunnelStream
from agent.identity.spiffe import SpiffeId
from agent.proto import hbone

log = logging.getLogger(__name__)

EXCHANGE_PORT = 15008  # the :authority port of the reserved target (the agent's HBONE port)
INTERVAL_S = 0.1
STALE_S = 0.5  # a peer silent this long is unreachable
WINDOW_SAMPLES = 5  # demand is the rate over the last this many samples (0.5 s)
MAX_LINE_BYTES = 64 * 1024
MAX_POLICIES = 10_000
MAX_DEMAND = 1e9  # requests/s a report may claim
RETRY_S = 0.5  # a peer we could not reach is dialled again after this long
IDLE_S = 5.0  # a receiving stream with no report for this long is closed

Key = tuple[str, str]


@dataclass(slots=True)
class _Peer:
    at: float = -math.inf  # when its last report arrived (monotonic)
    heard: frozenset[str] = frozenset()
    demand: dict[Key, float] = field(default_factory=dict)


class RateShare:
    def __init__(
        self, limits: RateLimits, directory: Callable[[], Directory], node: str,
        node_address: Callable[[str], str | None], pool: TunnelPool | None, trust_domain: str,
        hbone_port: int = EXCHANGE_PORT, clock: Callable[[], float] = time.monotonic,
        interval_s: float = INTERVAL_S, stale_s: float = STALE_S,
    ) -> None:
        self.limits = limits
        self.directory = directory
        self.node = node
        self.node_address = node_address
        self.pool = pool
        self.trust_domain = trust_domain
        self.hbone_port = hbone_port
        self.clock = clock
        self.interval_s = interval_s
        self.stale_s = stale_s
        self.peers: dict[str, _Peer] = {}
        self.demand: dict[Key, float] = {}  # this node's demand per policy (requests/s)
        self._samples: dict[Key, deque[tuple[float, int]]] = {}  # (seconds, offered) per sample
        self._sampled = clock()
        self._senders: dict[str, asyncio.Task[None]] = {}
        self.reports_sent = 0
        self.reports_received = 0

    # -- the pure part: samples, reports, shares ----------------------------------------------

    def sample(self, now: float) -> None:
        """Demand per shared policy: what was offered over the last WINDOW_SAMPLES samples."""
        dt = max(now - self._sampled, 1e-3)
        self._sampled = now
        states = self.limits.service_policies()
        for key, st in states.items():
            window = self._samples.setdefault(key, deque(maxlen=WINDOW_SAMPLES))
            window.append((dt, st.offered))
            st.offered = st.admitted = 0
            self.demand[key] = sum(n for _, n in window) / sum(t for t, _ in window)
        for key in [k for k in self.demand if k not in states]:
            del self.demand[key]
            self._samples.pop(key, None)

    def heard(self, now: float) -> list[str]:
        return sorted(n for n, p in self.peers.items() if now - p.at <= self.stale_s)

    def report(self, now: float) -> bytes:
        doc = {"node": self.node, "heard": self.heard(now),
               "demand": {f"{ns}/{name}": round(v, 3) for (ns, name), v in self.demand.items()}}
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"

    def receive(self, node: str, doc: Any, now: float) -> str | None:
        """Take a peer's report (already tied to ``node``); why not, or None."""
        if not isinstance(doc, dict) or doc.get("node") != node:
            return f"a report from {node} names another node"
        heard, demand = doc.get("heard"), doc.get("demand")
        if not isinstance(heard, list) or not all(isinstance(h, str) for h in heard):
            return "heard: expected a list of node names"
        if not isinstance(demand, dict) or len(demand) > MAX_POLICIES:
            return "demand: expected a mapping of at most 10000 policies"
        d = self.directory()
        allowed = {k: st.policy for k, st in self.limits.service_policies().items()}
        out: dict[Key, float] = {}
        for name, v in demand.items():
            ns, _, n = str(name).partition("/")
            p = allowed.get((ns, n))
            if p is None or type(v) not in (int, float) or not math.isfinite(v) or not 0 <= v <= MAX_DEMAND:
                continue  # not a policy we share with that node, or not a rate
            if endpoint_counts(d, p).get(node):
                out[(ns, n)] = float(v)
        self.peers[node] = _Peer(now, frozenset(heard), out)
        self.reports_received += 1
        return None

    def recompute(self, now: float) -> None:
        """Each shared policy's share from the latest demand (:func:`divide`)."""
        d = self.directory()
        shares: dict[Key, float] = {}
        fallback: dict[Key, str] = {}
        peers_of: dict[Key, dict[str, str]] = {}
        for key, st in self.limits.service_policies().items():
            p = st.policy
            eps = endpoint_counts(d, p)
            others = sorted(n for n in eps if n != self.node)
            reachable = {n for n in others if (q := self.peers.get(n)) is not None
                         and now - q.at <= self.stale_s and self.node in q.heard}
            demand = {n: self.peers[n].demand.get(key, 0.0) for n in reachable}
            demand[self.node] = self.demand.get(key, 0.0)
            limit = p.total.per_s if p.total is not None else p.connections.per_s if p.connections else None
            shares[key] = divide(self.node, limit, eps, demand, reachable)
            peers_of[key] = {n: "reachable" if n in reachable else "unreachable" for n in others}
            if others and not reachable:
                fallback[key] = (f"no peer heard within {self.stale_s:g} s ({', '.join(others)}): "
                                 f"static share {eps.get(self.node, 0)}/{sum(eps.values())} endpoints")
        self.limits.set_shares(shares, fallback, peers_of)

    def peers_wanted(self) -> dict[str, tuple[SpiffeId, SpiffeId]]:
        """Peer node -> (our identity, theirs) for the exchange: a local endpoint's identity of a
        shared service, and one of that service's endpoints on the peer."""
        d = self.directory()
        snap = d.snapshot
        out: dict[str, tuple[SpiffeId, SpiffeId]] = {}
        for st in self.limits.service_policies().values():
            p = st.policy
            svc = snap.services.get((p.namespace, p.service))
            if svc is None:
                continue
            members = [snap.workloads[k] for k in snap.members.get((p.namespace, p.service), ())
                       if k in snap.workloads and selects(svc.selector, snap.workloads[k].labels)]
            mine = sorted((w.namespace, w.service_account) for w in members if w.node == self.node)
            if not mine:
                continue
            src = SpiffeId(self.trust_domain, *mine[0])
            for w in sorted(members, key=lambda w: (w.node, w.name)):
                if w.node != self.node and w.node not in out:
                    out[w.node] = (src, SpiffeId(self.trust_domain, w.namespace, w.service_account))
        return out

    # -- I/O ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sample, divide and keep one sender per peer, every interval, until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                now = self.clock()
                self.sample(now)
                self.recompute(now)
                wanted = self.peers_wanted() if self.pool is not None else {}
                for node, task in list(self._senders.items()):
                    if node not in wanted or task.done():
                        task.cancel()
                        del self._senders[node]
                for node, ids in wanted.items():
                    if node not in self._senders:
                        self._senders[node] = asyncio.create_task(self._send(node, *ids),
                                                                  name=f"ratelimit peer {node}")
        finally:
            for t in self._senders.values():
                t.cancel()
            self._senders.clear()

    async def _send(self, node: str, src: SpiffeId, dst: SpiffeId) -> None:
        """Keep a stream to ``node`` and write our report on it every interval."""
        assert self.pool is not None
        while True:
            address = self.node_address(node)
            if address is None:
                return
            try:
                headers = hbone.connect_headers(hbone.Target(address, EXCHANGE_PORT),
                                                self.node_address(self.node) or "0.0.0.0", 0)
                async with asyncio.timeout(1.0):
                    stream = await self.pool.open_stream(src, dst, address, headers, self.hbone_port)
                try:
                    while True:
                        async with asyncio.timeout(1.0):
                            await stream.write(self.report(self.clock()))
                        self.reports_sent += 1
                        await asyncio.sleep(self.interval_s)
                finally:
                    stream.reset()
            except (OSError, TunnelError, TimeoutError) as e:
                log.debug("ratelimit: peer %s unreachable: %s", node, e)
            await asyncio.sleep(RETRY_S)

    async def serve(self, stream: TunnelStream, peer_ip: str, client_nodes: frozenset[str]) -> None:
        """The receiving end (the inbound hands over a CONNECT to the reserved target): reports
        from a node at ``peer_ip`` whose verified identity runs on ``client_nodes``."""
        buf = b""
        try:
            async with asyncio.timeout(IDLE_S):
                await stream.respond(200)
            while True:
                async with asyncio.timeout(IDLE_S):
                    data, credit = await stream.read()
                if not data:
                    return
                stream.ack(credit)
                buf += data
                if len(buf) > MAX_LINE_BYTES and b"\n" not in buf:
                    log.warning("ratelimit: report from %s over %d bytes: closed", peer_ip, MAX_LINE_BYTES)
                    return
                *lines, buf = buf.split(b"\n")
                for line in lines[-1:]:  # (only the newest counts)
                    why = self._take(line, peer_ip, client_nodes)
                    if why is not None:
                        log.warning("ratelimit: report from %s refused: %s", peer_ip, why)
                        return
        except (TimeoutError, TunnelError):  # (silent, or gone: the sender dials again)
            return
        finally:
            with contextlib.suppress(Exception):
                stream.reset()

    def _take(self, line: bytes, peer_ip: str, client_nodes: frozenset[str]) -> str | None:
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):  # (a deeply nested line, too)
            return "not JSON"
        node = doc.get("node") if isinstance(doc, dict) else None
        if not isinstance(node, str) or node == self.node:
            return "no node name"
        if node not in client_nodes or self.node_address(node) != peer_ip:
            return f"{node!r} is not where the tunnel comes from ({peer_ip})"
        return self.receive(node, doc, self.clock())

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {"peers": {n: {"last_report_s_ago": round(now - p.at, 3) if p.at > -math.inf else None,
                              "hears_us": self.node in p.heard}
                          for n, p in sorted(self.peers.items())},
                "reports_sent": self.reports_sent, "reports_received": self.reports_received,
                "demand_per_s": {f"{ns}/{n}": round(v, 2) for (ns, n), v in self.demand.items()}}


def reserved_target(target: hbone.Target, own_address: str | None) -> bool:
    """Is ``target`` the rate-limit exchange (this agent's own address, port 15008)?"""
    return target.port == EXCHANGE_PORT and own_address is not None and target.address == own_address

