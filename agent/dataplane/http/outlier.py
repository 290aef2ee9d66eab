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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
        keep = tuple(
            e for e in endpoints
            if (st := self._state.get((cluster, (e.address, e.port)))) is None or st.ejected_until <= now
        )
        if len(keep) == len(endpoints):
            return tuple(endpoints)
        if len(keep) * 100 < od.min_health_percent * len(endpoints):
            return tuple(endpoints)  # below minHealthPercent: ejection is off, balance over all
        return keep  # (with minHealthPercent 0, Istio's default, all may be out: 503 UH)
