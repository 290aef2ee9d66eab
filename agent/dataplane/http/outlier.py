"""Outlier detection (a DestinationRule's ``outlierDetection``): endpoints that keep failing are
ejected from load balancing for a while, as Envoy does. Pure state, clock injected.

How this works: the source proxy reports each finished try to :meth:`Outliers.observe` with
the endpoint, the response code and flags. A 5xx — or a failure of our own to reach the
endpoint (``UF``, ``UC``, ``UT``: Envoy counts local-origin failures as 5xx unless told to
split them: with ``splitExternalLocalOriginErrors`` they count apart, against
``consecutiveLocalOriginFailures``) — adds to the endpoint's consecutive count; anything else
resets it. At
``consecutive5xxErrors`` (or ``consecutiveGatewayErrors`` for 502/503/504) the endpoint is
ejected for ``baseEjectionTime`` times its ejection count so far (a flapping endpoint stays
out longer each time), unless that would eject more than ``maxEjectionPercent`` of the
cluster's endpoints (at least one may always be ejected). :meth:`Outliers.available` filters a
cluster's endpoints for the balancer; if fewer than ``minHealthPercent`` would be left, no
endpoint is filtered (Istio's default 0 never turns ejection off). Ejection works on top of the registry's
active health checks: an endpoint they mark critical is not a candidate at all.
:meth:`Outliers.states` reads the state back (the agent's admin ``/outliers``, which
``nodemesh explain`` asks), and :func:`keep_available` is the one filter both the proxy and
explain apply, so explain's pick skips what the proxy skips.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.control.istio import OutlierDetection
from agent.control.snapshot import Endpoint

Clock = Callable[[], float]
EndpointKey = tuple[str, int]
LOCAL_ORIGIN_FAILURES = frozenset({"UF", "UC", "UT", "URX"})
MAX_TRACKED = 65536


@dataclass(slots=True)
class _State:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0  # local-origin failures, counted apart (splitExternalLocalOriginErrors)
    ejected_until: float = 0.0
    ejections: int = 0


@dataclass(frozen=True, slots=True)
class EndpointOutlierState:
    """One endpoint's outlier state in one cluster, as read at one moment."""

    cluster: str  # the balancer's key: namespace/service/subset
    address: str
    port: int
    ejected_for_s: float  # how much longer it stays ejected (0.0: it is in)
    ejections: int  # how often it was ejected so far (the next ejection lasts one more base time)
    consecutive_5xx: int
    consecutive_gateway: int
    consecutive_local: int

    @property
    def ejected(self) -> bool:
        return self.ejected_for_s > 0

    def to_doc(self, wall_now_s: float) -> dict[str, Any]:
        """JSON form; ``wall_now_s`` (time.time()) turns the remaining time into a wall clock."""
        until = None
        if self.ejected:
            until = datetime.fromtimestamp(wall_now_s + self.ejected_for_s, UTC).isoformat(
                timespec="milliseconds")
        return {"endpoint": f"{self.address}:{self.port}", "ejected": self.ejected,
                "ejected_for_s": round(self.ejected_for_s, 3), "ejected_until": until,
                "ejections": self.ejections, "consecutive_5xx": self.consecutive_5xx,
                "consecutive_gateway": self.consecutive_gateway,
                "consecutive_local_origin": self.consecutive_local}


def outliers_doc(node: str, states: Sequence[EndpointOutlierState], wall_now_s: float) -> dict[str, Any]:
    """The admin API's ``/outliers``: this node's proxy's state per cluster and endpoint."""
    clusters: dict[str, list[dict[str, Any]]] = {}
    for st in states:
        clusters.setdefault(st.cluster, []).append(st.to_doc(wall_now_s))
    return {"node": node, "clusters": clusters}


def keep_available(
    endpoints: Sequence[Endpoint], ejected: Callable[[EndpointKey], bool], od: OutlierDetection
) -> tuple[Endpoint, ...]:
    """The endpoints the balancer may pick: those not ejected (all of them below minHealthPercent)."""
    keep = tuple(e for e in endpoints if not ejected((e.address, e.port)))
    if len(keep) == len(endpoints):
        return tuple(endpoints)
    if len(keep) * 100 < od.min_health_percent * len(endpoints):
        return tuple(endpoints)  # below minHealthPercent: ejection is off, balance over all
    return keep  # (with minHealthPercent 0, Istio's default, all may be out: 503 UH)


@dataclass(slots=True)
class Outliers:
    clock: Clock = time.monotonic
    _state: dict[tuple[str, EndpointKey], _State] = field(default_factory=dict)
    ejected_total: int = 0

    def _get(self, cluster: str, ep: EndpointKey) -> _State:
        st = self._state.get((cluster, ep))
        if st is None:
            if len(self._state) >= MAX_TRACKED:
                self._state.clear()
            st = self._state[(cluster, ep)] = _State()
        return st

    def ejected(self, cluster: str, ep: EndpointKey) -> bool:
        st = self._state.get((cluster, ep))
        return st is not None and st.ejected_until > self.clock()

    def observe(
        self, cluster: str, ep: EndpointKey, status: int, flags: str, od: OutlierDetection, cluster_size: int
    ) -> bool:
        """Count one finished try; True if this ejected the endpoint."""
        st = self._get(cluster, ep)
        local = flags in LOCAL_ORIGIN_FAILURES
        if od.split_local_origin:
            # Envoy's split mode: local-origin failures have their own count
            # (consecutiveLocalOriginFailures); the 5xx counts see only what the endpoint answered
            if local:
                st.consecutive_local += 1
                limit = od.consecutive_local_origin
                trip = bool(limit) and st.consecutive_local >= limit
                return self._eject(cluster, st, od, cluster_size) if trip else False
            st.consecutive_local = 0
            if not status:
                return False
        failed = status >= 500 or local
        gateway = status in (502, 503, 504) or local
        if not failed:
            st.consecutive_5xx = st.consecutive_gateway = 0
            return False
        st.consecutive_5xx += 1
        st.consecutive_gateway = st.consecutive_gateway + 1 if gateway else 0
        trip = bool(od.consecutive_5xx and st.consecutive_5xx >= od.consecutive_5xx) or bool(
            od.consecutive_gateway and st.consecutive_gateway >= od.consecutive_gateway
        )
        return self._eject(cluster, st, od, cluster_size) if trip else False

    def _eject(self, cluster: str, st: _State, od: OutlierDetection, cluster_size: int) -> bool:
        now = self.clock()
        if st.ejected_until > now:
            return False
        out_now = sum(1 for (c, _), s in self._state.items() if c == cluster and s.ejected_until > now)
        limit = max(1, cluster_size * od.max_ejection_percent // 100) if od.max_ejection_percent else 0
        if out_now >= limit:
            return False
        st.ejections += 1
        st.ejected_until = now + od.base_ejection_s * st.ejections
        st.consecutive_5xx = st.consecutive_gateway = st.consecutive_local = 0
        self.ejected_total += 1
        return True

    def available(
        self, cluster: str, endpoints: Sequence[Endpoint], od: OutlierDetection
    ) -> tuple[Endpoint, ...]:
        """The endpoints not ejected now (all of them below minHealthPercent)."""
        now = self.clock()

        def ejected(ep: EndpointKey) -> bool:
            st = self._state.get((cluster, ep))
            return st is not None and st.ejected_until > now

        return keep_available(endpoints, ejected, od)

    def states(self) -> tuple[EndpointOutlierState, ...]:
        """Every tracked endpoint's state now, by cluster and address (read-only)."""
        now = self.clock()
        return tuple(
            EndpointOutlierState(cluster, addr, port, max(0.0, st.ejected_until - now), st.ejections,
                                 st.consecutive_5xx, st.consecutive_gateway, st.consecutive_local)
            for (cluster, (addr, port)), st in sorted(self._state.items(), key=lambda kv: kv[0])
        )
