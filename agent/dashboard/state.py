"""What the dashboard knows between rounds: each agent's last two scrapes, its status, history.

How this works: a poller (:mod:`agent.dashboard.scrape`) reads every agent once
per round and hands each answer (or failure) to :meth:`MeshState.observe`;
:meth:`MeshState.end_round` then computes the view once (graph, golden
signals, ``top`` rows, node status) and appends each service's and workload's
signals to a short history for the charts. An agent whose last read failed
is *down* at once, whatever it said before: its traffic leaves the view and
its row says why. Memory is bounded: two scrapes per agent, ``HISTORY_POINTS``
points per series, at most ``MAX_SERIES`` series (the least recently seen go
first). Pure: time comes in as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.dashboard.graph import service_graph
from agent.dashboard.model import NodeScrape, Stats, Window, by_service, by_workload, stats, top_rows, window

HISTORY_POINTS = 90
MAX_SERIES = 5000


@dataclass
class NodeState:
    name: str
    address: str
    older: NodeScrape | None = None
    newer: NodeScrape | None = None
    up: bool = False
    error: str = "not read yet"
    last_ok_s: float | None = None
    last_try_s: float | None = None
    status: Mapping[str, Any] | None = None  # the agent's /status document, if it answered
    status_error: str | None = None


@dataclass
class _Series:
    points: deque[tuple[float, float, float | None, float | None]] = field(
        default_factory=lambda: deque(maxlen=HISTORY_POINTS)
    )  # (time, rps, success, p99 ms)
    seen_s: float = 0.0


def node_summary(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """The agent status the dashboard shows: interception, certificates, registry, policies."""
    if not doc:
        return {}
    ic = doc.get("interception") or {}
    hooks = ic.get("hooks") or []
    certs = [
        {"spiffe_id": c.get("spiffe_id"), "expires_in_s": c.get("expires_in_s"), "error": c.get("error")}
        for c in doc.get("certificates") or []
    ]
    expiries = [c["expires_in_s"] for c in certs if isinstance(c["expires_in_s"], int | float)]
    reg = doc.get("registry") or {}
    out: dict[str, Any] = {
        "ok": bool(doc.get("ok")),
        "ready": bool(doc.get("ready")),
        "uptime_s": doc.get("uptime_s"),
        "interception": {
            "ok": bool(ic.get("ok")),
            "hooks_attached": sum(1 for h in hooks if h.get("attached")),
            "hooks": len(hooks),
            "enrolled": ic.get("enrolled"),
            "error": ic.get("error"),
        },
        "certificates": certs,
        "first_expiry_s": min(expiries) if expiries else None,
        "registry": {
            "backend": reg.get("backend"),
            "revision": reg.get("revision"),
            "stale": bool(reg.get("stale")),
            "stale_for_s": reg.get("stale_for_s"),
            "last_error": reg.get("last_error"),
        },
        "degraded": list(doc.get("degraded") or []),
    }
    if isinstance(doc.get("policies"), dict):  # kind -> count in force
        out["policies"] = {k: v for k, v in doc["policies"].items() if v}
    limits = doc.get("rate_limits")
    if isinstance(limits, list):  # RateLimitPolicy in force on the node (issue 15's status)
        out["rate_limits"] = [_rate_limit(r) for r in limits[:MAX_SHOWN_LIMITS] if isinstance(r, dict)]
    return out


MAX_SHOWN_LIMITS = 20


def _rate_limit(r: Mapping[str, Any]) -> str:
    rate = r.get("local_per_s")
    if rate is None and r.get("buckets"):
        rate = r["buckets"][0].get("rate_per_s")
    text = f"{r.get('policy', '?')} on {r.get('service', '?')}:{r.get('port', '?')}"
    if rate is not None:
        text += f" {rate:g}/s here"
    if isinstance(r.get("share"), int | float) and r.get("scope") == "service":
        text += f" ({r['share']:.0%} of {r.get('total_per_s', '?')}/s, {r.get('sharing', '?')})"
    if r.get("limited"):
        text += f", {r['limited']} limited"
    return text


class MeshState:
    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.nodes: dict[str, NodeState] = {}
        self.series: dict[str, _Series] = {}
        self.rounds = 0
        self.view: dict[str, Any] = {}

    def target(self, name: str, address: str) -> None:
        self.nodes.setdefault(name, NodeState(name, address))

    def observe(
        self,
        name: str,
        at_s: float,
        scrape: NodeScrape | None,
        error: str | None = None,
        status: Mapping[str, Any] | None = None,
        status_error: str | None = None,
    ) -> None:
        """One agent's answer this round (``scrape`` None: it did not answer, ``error`` says why)."""
        n = self.nodes.setdefault(name, NodeState(name, name))
        n.last_try_s = at_s
        if scrape is None:
            n.up = False
            n.error = error or "no answer"
            n.status = None
            n.status_error = status_error
            return
        if n.newer is None or scrape.at_s > n.newer.at_s:  # (Prometheus may not have scraped again)
            n.older, n.newer = n.newer, scrape
        n.up, n.error, n.last_ok_s = True, "", at_s
        n.status, n.status_error = status, status_error

    def windows(self) -> list[Window]:
        out = []
        for n in self.nodes.values():
            if n.up and n.older is not None and n.newer is not None:
                w = window(n.older, n.newer)
                if w is not None:
                    out.append(w)
        return out

    def _record(self, now_s: float, name: str, st: Stats) -> None:
        s = self.series.get(name)
        if s is None:
            if len(self.series) >= MAX_SERIES:
                del self.series[min(self.series, key=lambda k: self.series[k].seen_s)]
            s = self.series[name] = _Series()
        s.seen_s = now_s
        s.points.append((round(now_s, 3), round(st.rps, 3), st.success, st.latency_ms[-1]))

    def end_round(self, now_s: float) -> dict[str, Any]:
        self.rounds += 1
        ws = self.windows()
        services = stats(ws, by_service)
        workloads = stats(ws, by_workload)
        for k, st in services.items():
            self._record(now_s, f"s:{k}", st)
        for k, st in workloads.items():
            self._record(now_s, f"w:{k}", st)

        def history(key: str) -> list[list[Any]]:
            s = self.series.get(key)
            return [list(p) for p in s.points] if s else []

        self.view = {
            "at_s": round(now_s, 3),
            "refresh_s": self.refresh_s,
            "round": self.rounds,
            "graph": service_graph(ws),
            "services": [{"name": k, **st.to_doc(), "history": history(f"s:{k}")}
                         for k, st in sorted(services.items())],
            "workloads": [{"name": k, **st.to_doc(), "history": history(f"w:{k}")}
                          for k, st in sorted(workloads.items())],
            "top": top_rows(ws),
            "nodes": [self._node_doc(n, now_s) for _, n in sorted(self.nodes.items())],
        }
        return self.view

    @staticmethod
    def _node_doc(n: NodeState, now_s: float) -> dict[str, Any]:
        gauges = dict(n.newer.gauges) if n.newer is not None and n.up else {}
        return {
            "name": n.name,
            "address": n.address,
            "up": n.up,
            "error": n.error,
            "last_ok_ago_s": None if n.last_ok_s is None else round(now_s - n.last_ok_s, 1),
            "skipped_lines": n.newer.skipped_lines if n.newer is not None and n.up else 0,
            "registry_gauges": gauges,
            "status": node_summary(n.status) if n.up else {},
            "status_error": n.status_error,
        }
