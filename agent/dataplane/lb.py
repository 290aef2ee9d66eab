"""Load balancing: choose one endpoint of a service, by the service's policy.

Policies (Istio's names): ``ROUND_ROBIN``, ``RANDOM``, ``LEAST_REQUEST``
(power of two choices on in-flight connections); ``WEIGHTED_ROUND_ROBIN``
(smooth weighted round robin, as nginx does it) and ``WEIGHTED_RANDOM`` honour
workload weights, and so does ``LEAST_REQUEST`` (in-flight divided by weight).

A :class:`Balancer` keeps the little state policies need (round-robin
positions, in-flight counts) keyed by service; the choice itself is a pure
function of that state, the endpoints and an injected random source, so it
is tested without sockets or sleeps.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.control.snapshot import Endpoint


class Policy(enum.StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    WEIGHTED_ROUND_ROBIN = "WEIGHTED_ROUND_ROBIN"
    WEIGHTED_RANDOM = "WEIGHTED_RANDOM"
    LEAST_REQUEST = "LEAST_REQUEST"

    @classmethod
    def parse(cls, text: str) -> Policy:
        try:
            return cls(text.upper())
        except ValueError:
            raise ValueError(
                f"unknown load-balancing policy {text!r} (expected one of {', '.join(p.value for p in cls)})"
            ) from None


def endpoint_key(e: Endpoint) -> tuple[str, int]:
    return (e.address, e.port)


@dataclass(slots=True)
class _ServiceState:
    rr_next: int = 0
    swrr_current: dict[tuple[str, int], int] = field(default_factory=dict)


class Balancer:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._state: dict[str, _ServiceState] = {}
        self.in_flight: dict[tuple[str, int], int] = {}

    def pick(
        self,
        service_key: str,
        policy: Policy,
        endpoints: Sequence[Endpoint],
        exclude: frozenset[tuple[str, int]] = frozenset(),
    ) -> Endpoint | None:
        """One endpoint, or None if none is left after ``exclude`` (endpoints already tried)."""
        cands = [e for e in endpoints if endpoint_key(e) not in exclude and e.weight > 0]
        if not cands:
            return None
        cands.sort(key=endpoint_key)  # stable order whatever the snapshot's order
        st = self._state.setdefault(service_key, _ServiceState())
        if policy is Policy.ROUND_ROBIN:
            e = cands[st.rr_next % len(cands)]
            st.rr_next += 1
            return e
        if policy is Policy.RANDOM:
            return self.rng.choice(cands)
        if policy is Policy.WEIGHTED_RANDOM:
            return self.rng.choices(cands, weights=[e.weight for e in cands])[0]
        if policy is Policy.WEIGHTED_ROUND_ROBIN:
            return self._smooth_wrr(st, cands)
        # LEAST_REQUEST: two random candidates, fewer in-flight per unit of weight wins
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        load_a = self.in_flight.get(endpoint_key(a), 0) / a.weight
        load_b = self.in_flight.get(endpoint_key(b), 0) / b.weight
        return a if load_a <= load_b else b

    @staticmethod
    def _smooth_wrr(st: _ServiceState, cands: list[Endpoint]) -> Endpoint:
        total = 0
        best: Endpoint | None = None
        best_cur = 0
        live = {endpoint_key(e) for e in cands}
        for k in [k for k in st.swrr_current if k not in live]:
            del st.swrr_current[k]
        for e in cands:
            k = endpoint_key(e)
            cur = st.swrr_current.get(k, 0) + e.weight
            st.swrr_current[k] = cur
            total += e.weight
            if best is None or cur > best_cur:
                best, best_cur = e, cur
        assert best is not None
        st.swrr_current[endpoint_key(best)] -= total
        return best

    def started(self, e: Endpoint) -> None:
        k = endpoint_key(e)
        self.in_flight[k] = self.in_flight.get(k, 0) + 1

    def finished(self, e: Endpoint) -> None:
        k = endpoint_key(e)
        n = self.in_flight.get(k, 0) - 1
        if n > 0:
            self.in_flight[k] = n
        else:
            self.in_flight.pop(k, None)
