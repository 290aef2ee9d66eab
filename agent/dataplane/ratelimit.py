"""Rate limits at the destination: RateLimitPolicy buckets, judged after authorization.

How this works: :class:`RateLimits` finds, once per snapshot, the policies whose
target Service selects a local workload on the pod port a request or connection
arrived at (a workload none applies to costs one dictionary lookup). A policy with a
``route`` target counts only the requests of that VirtualService route: the route the
source agent chose, which this node's inbound read from the HBONE stream's
:data:`~agent.control.ratelimit.ROUTE_HEADER` (or, same-node, the source agent's own
decision); a request without a trusted route passes it by. Each policy
owns token buckets (:class:`Bucket`, time an input): ``total``, one per source
identity (``perIdentity``, or an override's rate for a named identity) and one per
matching descriptor (one per distinct header value when the descriptor names no
value). A request is admitted only if every bucket that applies has a token; then
each gives one (a refused request takes none). A refusal is Envoy's local rate
limit answer: 429 ``local_rate_limited`` with ``retry-after`` and the
``x-ratelimit-*`` headers (gRPC: RESOURCE_EXHAUSTED, trailers only), flag ``RL``.
TCP ports: connections per second (a bucket) and connections open at once.

Scope: ``endpoint`` gives each local endpoint its own buckets. ``service`` gives
this node one set of buckets running at ``share × rate``, where the share of the
service's limit comes from :mod:`agent.dataplane.ratepeers` (demand exchanged with
the other agents hosting endpoints), or else is the static share, own endpoints /
all endpoints. Bucket state survives snapshots that leave the policy unchanged;
per-key buckets are bounded (full ones are dropped first: a full bucket is a new one).

Metrics: ``nodemesh_ratelimit_decisions_total{policy,kind,result}`` and, at scrape
time, each policy's local rate, share, tokens left and fallback state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.control import authz
from agent.control.model import Workload, selects
from agent.control.ratelimit import Rate, RateLimitPolicy
from agent.control.snapshot import Snapshot
from agent.dataplane.authorize import LazyHeaders
from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.route import Directory

LIMITED_BODY = "local_rate_limited"  # Envoy's local rate limit answer
LIMITED_FLAG = "RL"  # Envoy's response flag for it
MAX_KEYED_BUCKETS = 10_000  # per policy: per-identity and per-header-value buckets

Clock = Callable[[], float]
_ONE = 1 - 1e-9  # a token, give or take the rounding of sums of small time steps
_HTTP_ADMITTED, _HTTP_LIMITED = ("http", "admitted"), ("http", "limited")
_TCP_ADMITTED, _TCP_LIMITED = ("tcp", "admitted"), ("tcp", "limited")
_DECISIONS = (_HTTP_ADMITTED, _HTTP_LIMITED, _TCP_ADMITTED, _TCP_LIMITED)


class Bucket:
    """A token bucket: ``per_s`` tokens a second up to ``burst``; starts full."""

    __slots__ = ("burst", "per_s", "stamp", "tokens")

    def __init__(self, per_s: float, burst: float, now: float) -> None:
        self.per_s = per_s
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.per_s)
            self.stamp = now
        return self.tokens

    def wait_s(self) -> float:
        """Seconds until the next token (0: one is there)."""
        return 0.0 if self.tokens >= _ONE else (1 - self.tokens) / self.per_s

    def full_in_s(self) -> float:
        return (self.burst - self.tokens) / self.per_s

    def retune(self, per_s: float, burst: float) -> None:
        """A new rate (a service-wide share moved); saved tokens above the new burst go."""
        self.per_s, self.burst = per_s, burst
        self.tokens = min(self.tokens, burst)


def scaled(rate: Rate, share: float) -> tuple[float, float]:
    """(tokens/s, burst) of ``rate`` for a node holding ``share`` (0-1] of a service's limit.
    The burst is scaled too, but kept at two tokens (one if that is the configured burst): a
    bucket of one token loses what a late request would have used, and admits nothing if it
    can never hold one."""
    return max(rate.per_s * share, 1e-3), max(rate.burst * share, min(float(rate.burst), 2.0))


@dataclass(slots=True)
class _State:
    """One policy's buckets at this node, kept across snapshots while the policy is unchanged."""

    policy: RateLimitPolicy
    share: float = 1.0  # of the service's limit (scope service); 1 for scope endpoint
    buckets: dict[tuple[Any, ...], Bucket] = field(default_factory=dict)
    open_conns: dict[str, int] = field(default_factory=dict)  # scope key -> open TCP connections
    offered: int = 0  # requests or connections seen since the last exchange (scope service)
    admitted: int = 0
    offered_total: int = 0
    admitted_total: int = 0
    # decisions since this state was made: (kind, result) -> count, read at scrape time
    decided: dict[tuple[str, str], int] = field(default_factory=lambda: dict.fromkeys(_DECISIONS, 0))

    def bucket(self, key: tuple[Any, ...], rate: Rate, now: float) -> Bucket:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_KEYED_BUCKETS:
                self._trim(now)
            per_s, burst = scaled(rate, self.share)
            b = self.buckets[key] = Bucket(per_s, burst, now)
        return b

    def _trim(self, now: float) -> None:
        """Drop full buckets (nothing lost); if none is full, the older half."""
        full = [k for k, b in self.buckets.items() if b.refill(now) >= b.burst]
        for k in full or list(self.buckets)[: len(self.buckets) // 2]:
            del self.buckets[k]

    def set_share(self, share: float) -> None:
        if abs(share - self.share) < 1e-9:
            return
        self.share = share
        p = self.policy
        for key, b in self.buckets.items():
            rate = _rate_of(p, key)
            if rate is not None:
                b.retune(*scaled(rate, share))


def _rate_of(p: RateLimitPolicy, key: tuple[Any, ...]) -> Rate | None:
    """The configured rate of the bucket ``key`` (see :meth:`RateLimits._buckets_for`)."""
    kind = key[1]
    if kind == "total":
        return p.total
    if kind == "id":
        return next((i.rate for i in p.identities if i.principal == key[2]), p.per_identity)
    if kind == "d":
        d: Rate = p.descriptors[key[2]].rate
        return d
    if kind == "conn":
        return p.connections
    return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused: the bucket that had no token, and its numbers."""

    policy: str
    bucket: str
    limit_per_s: float
    remaining: int
    retry_after_s: float

    def reply(self) -> LocalReply:
        wait = max(1, math.ceil(self.retry_after_s))
        limit = f"{self.limit_per_s:g}"
        return LocalReply(
            429, LIMITED_BODY, LIMITED_FLAG, grpc_status="RESOURCE_EXHAUSTED",
            headers=(
                (b"retry-after", b"%d" % wait),
                (b"x-ratelimit-limit", f"{limit}, {limit};w=1".encode()),
                (b"x-ratelimit-remaining", b"%d" % self.remaining),
                (b"x-ratelimit-reset", b"%d" % wait),
                (b"x-envoy-ratelimited", b"true"),
            ),
        )


def _descriptor_value(d_kind: str, d_key: str, d_value: str | None, method: str, path: str,
                      header: Callable[[str], str | None]) -> str | None:
    """The bucket key a descriptor gives this request; None: it does not apply."""
    if d_kind == "method":
        return "" if method == d_key else None
    if d_kind == "pathPrefix":
        return "" if path.startswith(d_key) else None
    v = header(d_key)
    if v is None:
        return None
    if d_value is None:
        return v[:256]  # (a bucket per value; values are bounded in length and in number)
    return "" if v == d_value else None


def policy_name(p: RateLimitPolicy) -> str:
    return f"{p.namespace}/{p.name}"


class RateLimits:
    def __init__(
        self, directory: Callable[[], Directory], node: str, registry: CollectorRegistry | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.directory = directory
        self.node = node
        self.clock = clock
        self._of: object = None
        self._per: dict[tuple[str, str], dict[int, tuple[_State, ...]]] = {}
        self._states: dict[tuple[str, str], _State] = {}
        self._shares: Mapping[tuple[str, str], float] = {}  # set by the peer exchange (scope service)
        self._fallback: dict[tuple[str, str], str] = {}  # policy -> why it runs on its static share
        self._peers: dict[tuple[str, str], Mapping[str, str]] = {}  # policy -> peer node -> state
        self._retired: dict[tuple[str, str, str], int] = {}  # counts of replaced policies
        if registry is not None:
            registry.register(_Collector(self))

    # -- which policies apply ---------------------------------------------------------------

    def _refresh(self) -> Directory:
        d = self.directory()
        if self._of is not d:
            self._of = d
            self._per = {}
            states: dict[tuple[str, str], _State] = {}
            for key, p in d.snapshot.rate_limit_policies.items():
                old = self._states.get(key)
                st = old if old is not None and old.policy == p else _State(p)
                if old is not None and st is not old:  # (its counters stay monotonic)
                    for (kind, result), n in old.decided.items():
                        k = (policy_name(p), kind, result)
                        self._retired[k] = self._retired.get(k, 0) + n
                if p.scope == "service":
                    st.set_share(self._shares.get(key, static_share(d, p, self.node)))
                states[key] = st
            for key in self._states.keys() - states.keys():  # deleted: its series go
                name = f"{key[0]}/{key[1]}"
                self._retired = {k: n for k, n in self._retired.items() if k[0] != name}
            self._states = states
        return d

    def for_port(self, w: Workload, port: int) -> tuple[_State, ...]:
        """The policies in force for requests or connections to ``w``'s pod ``port``."""
        return self._in_force(self._refresh(), w, port)

    def _in_force(self, d: Directory, w: Workload, port: int) -> tuple[_State, ...]:
        per = self._per.get((w.namespace, w.name))
        if per is None:
            per = self._per[(w.namespace, w.name)] = _compile(d, w, self._states.values())
        return per.get(port, ())

    # -- requests ---------------------------------------------------------------------------

    def judge_request(
        self, w: Workload, conn: Callable[[], authz.Facts], ex: Exchange,
        headers: Sequence[tuple[str | bytes, str | bytes]], path: str, route: str = "",
    ) -> None:
        """Raises the 429 :class:`LocalReply` when a limit refuses the request. ``route``: the
        VirtualService route the source agent chose, as far as it is trusted ("": none)."""
        d = self._refresh()
        if not self._states:  # (no policy anywhere: one check)
            return
        f = conn()
        states = self._in_force(d, w, f.destination_port)
        if not states:
            return
        header = None
        if any(st.policy.descriptors for st in states):
            header = LazyHeaders(headers).get  # (the one-header read)
        refusal = self.take(states, w.name, f.principal, ex.method, path.partition("?")[0], header, route)
        if refusal is not None:
            raise refusal.reply()

    def take(
        self, states: Iterable[_State], endpoint: str, principal: str, method: str, path: str,
        header: Callable[[str], str | None] | None = None, route: str = "",
    ) -> Refusal | None:
        """Admit one request (a token from every bucket that applies) or refuse it (none taken);
        a policy for another route than ``route`` does not apply."""
        now = self.clock()
        chosen: list[Bucket] = []
        passed: list[_State] = []
        for st in states:
            p = st.policy
            if not p.http or (p.route and p.route != route):
                continue
            scope = endpoint if p.scope == "endpoint" else ""
            st.offered += 1
            st.offered_total += 1
            for key, rate, label in _buckets_for(p, scope, principal, method, path, header):
                b = st.bucket(key, rate, now)
                if b.refill(now) < _ONE:
                    st.decided[_HTTP_LIMITED] += 1
                    return Refusal(policy_name(p), label, rate.per_s, 0, b.wait_s())  # (the policy's rate)
                chosen.append(b)
            passed.append(st)
        for b in chosen:
            b.tokens -= 1
        for st in passed:
            st.admitted += 1
            st.admitted_total += 1
            st.decided[_HTTP_ADMITTED] += 1
        return None

    # -- TCP connections ----------------------------------------------------------------------

    def admit_connection(self, w: Workload, port: int) -> tuple[Callable[[], None] | None, str]:
        """(release, "") for an admitted connection (call release when it closes), or
        (None, why) when a limit refuses it."""
        self._refresh()
        if not self._states:
            return _NOTHING, ""
        states = [st for st in self.for_port(w, port) if st.policy.tcp]
        if not states:
            return _NOTHING, ""
        now = self.clock()
        taken: list[tuple[_State, Bucket | None, str]] = []
        for st in states:
            p = st.policy
            scope = w.name if p.scope == "endpoint" else ""
            st.offered += 1
            st.offered_total += 1
            b = None
            if p.connections is not None:
                b = st.bucket((scope, "conn"), p.connections, now)
                if b.refill(now) < _ONE:
                    st.decided[_TCP_LIMITED] += 1
                    return None, f"{policy_name(p)}: over {b.per_s:g} connections/s"
            if p.max_connections is not None:
                cap = max(1, math.floor(p.max_connections * st.share))
                if st.open_conns.get(scope, 0) >= cap:
                    st.decided[_TCP_LIMITED] += 1
                    return None, f"{policy_name(p)}: {cap} connections open already"
            taken.append((st, b, scope))
        for st, b, scope in taken:
            if b is not None:
                b.tokens -= 1
            st.open_conns[scope] = st.open_conns.get(scope, 0) + 1
            st.admitted += 1
            st.admitted_total += 1
            st.decided[_TCP_ADMITTED] += 1

        def release() -> None:
            for st, _, scope in taken:
                n = st.open_conns.get(scope, 0) - 1
                if n > 0:
                    st.open_conns[scope] = n
                else:
                    st.open_conns.pop(scope, None)

        return release, ""

    def decisions(self) -> dict[tuple[str, str, str], int]:
        """(policy, kind, result) -> decisions so far, monotonic (a replaced policy's counts are
        kept; a deleted one's are dropped). A read: safe on a scrape's thread."""
        out = dict(self._retired)
        for st in list(self._states.values()):
            for (kind, result), n in list(st.decided.items()):
                key = (policy_name(st.policy), kind, result)
                out[key] = out.get(key, 0) + n
        return out

    # -- service-wide shares --------------------------------------------------------------------

    def service_policies(self) -> dict[tuple[str, str], _State]:
        """The scope-service policies with endpoints on this node (what the peer exchange shares)."""
        d = self._refresh()
        return {k: st for k, st in self._states.items()
                if st.policy.scope == "service" and endpoint_counts(d, st.policy).get(self.node)}

    def set_shares(
        self, shares: Mapping[tuple[str, str], float], fallback: Mapping[tuple[str, str], str],
        peers: Mapping[tuple[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        """New shares from the exchange (policy -> fraction of its limit), which policies run on
        their static share and why, and each policy's peers (node -> reachable/unreachable)."""
        self._shares = dict(shares)
        self._fallback = dict(fallback)
        self._peers = dict(peers or {})
        for key, share in shares.items():
            st = self._states.get(key)
            if st is not None:
                st.set_share(share)

    def status(self, *, refresh: bool = True) -> list[dict[str, Any]]:
        """Every limit in force here: rate, share, tokens left, fallback (status and admin API).
        ``refresh=False`` (a scrape, on another thread): only reads, the snapshot last used."""
        d = self._refresh() if refresh else self._of
        if not isinstance(d, Directory):
            return []
        now = self.clock()
        out = []
        for (ns, name), st in sorted(list(self._states.items())):
            p = st.policy
            eps = endpoint_counts(d, p)
            if not eps.get(self.node):
                continue
            limits = []
            for key, b in sorted(list(st.buckets.items()), key=lambda kv: str(kv[0]))[:50]:
                left = min(b.burst, b.tokens + max(0.0, now - b.stamp) * b.per_s)  # (not refilled: a read)
                limits.append({"bucket": _bucket_label(p, key), "rate_per_s": round(b.per_s, 3),
                               "burst": round(b.burst, 2), "remaining": math.floor(left + 1e-9)})
            doc: dict[str, Any] = {
                "policy": f"{ns}/{name}", "service": p.service, "port": p.port, "route": p.route or None,
                "scope": p.scope,
                "endpoints_here": eps.get(self.node, 0), "endpoints_total": sum(eps.values()),
                "share": round(st.share, 4), "admitted": st.admitted_total,
                "limited": st.offered_total - st.admitted_total, "buckets": limits,
            }
            if p.total is not None:
                doc["total_per_s"] = p.total.per_s
                doc["local_per_s"] = round(scaled(p.total, st.share)[0], 3)
            if p.scope == "service":
                why = self._fallback.get((ns, name))
                if (ns, name) not in self._shares:
                    why = "no demand exchanged yet: static share"
                doc["sharing"] = "static" if why else "by demand"
                doc["peers"] = dict(self._peers.get((ns, name), {}))
                if why:
                    doc["fallback"] = why
            out.append(doc)
        return out


def _NOTHING() -> None:
    pass


def _buckets_for(
    p: RateLimitPolicy, scope: str, principal: str, method: str, path: str,
    header: Callable[[str], str | None] | None,
) -> Iterable[tuple[tuple[Any, ...], Rate, str]]:
    """(bucket key, rate, label) of every bucket of ``p`` this request takes a token from."""
    if p.total is not None:
        yield (scope, "total"), p.total, "total"
    if p.per_identity is not None or p.identities:
        rate = next((i.rate for i in p.identities if i.principal == principal), p.per_identity)
        if rate is not None:
            yield (scope, "id", principal), rate, f"identity {principal}"
    for i, d in enumerate(p.descriptors):
        v = _descriptor_value(d.kind, d.key, d.value, method, path, header or _no_header)
        if v is not None:
            yield (scope, "d", i, v), d.rate, d.label()


def _no_header(_name: str) -> str | None:
    return None


def _bucket_label(p: RateLimitPolicy, key: tuple[Any, ...]) -> str:
    where = f"{key[0]}: " if key[0] else ""
    if key[1] == "id":
        return f"{where}identity {key[2]}"
    if key[1] == "d":
        d = p.descriptors[key[2]]
        return f"{where}{d.label()}" + (f" [{key[3]}]" if d.kind == "header" and d.value is None else "")
    return f"{where}{key[1]}"


def pod_ports(snap: Snapshot, p: RateLimitPolicy, w: Workload) -> set[int]:
    """The pod ports of workload ``w`` where ``p`` is in force (none: not ``w``'s). Pure."""
    svc = snap.services.get((p.namespace, p.service))
    if svc is None or svc.namespace != w.namespace or not selects(svc.selector, w.labels):
        return set()
    out = set()
    for sp in svc.ports:
        if p.port is None or sp.port == p.port:
            target = sp.target_port if isinstance(sp.target_port, int) else w.ports.get(sp.target_port)
            if target is not None:
                out.add(target)
    return out


def _compile(d: Directory, w: Workload, states: Iterable[_State]) -> dict[int, tuple[_State, ...]]:
    """Pod port -> the policies in force there, for workload ``w`` (pure)."""
    out: dict[int, list[_State]] = {}
    for st in states:
        for port in sorted(pod_ports(d.snapshot, st.policy, w)):
            out.setdefault(port, []).append(st)
    return {port: tuple(sts) for port, sts in out.items()}


def endpoint_counts(d: Directory, p: RateLimitPolicy) -> dict[str, int]:
    """Node -> how many endpoints of ``p``'s service it hosts (every member, whatever its health:
    shares must not jump when a check flaps)."""
    out: dict[str, int] = {}
    snap = d.snapshot
    for key in snap.members.get((p.namespace, p.service), ()):
        w = snap.workloads.get(key)
        if w is not None:
            out[w.node] = out.get(w.node, 0) + 1
    return out


def static_share(d: Directory, p: RateLimitPolicy, node: str) -> float:
    """This node's static share of a service-wide limit: its endpoints / all endpoints."""
    eps = endpoint_counts(d, p)
    total = sum(eps.values())
    return eps.get(node, 0) / total if total else 1.0


def divide(
    node: str, limit_per_s: float | None, endpoints: Mapping[str, int], demand: Mapping[str, float],
    reachable: Iterable[str],
) -> float:
    """This node's share (0-1] of a service-wide limit of ``limit_per_s``. Pure.

    ``endpoints``: node -> its endpoints of the service; ``demand``: node -> requests (or
    connections) per second offered recently, this node's and the reachable peers';
    ``reachable``: the peers that this node and that hear each other. An unreachable peer is
    assumed to run on its static share (its endpoints / all), which is set aside; the rest
    is divided among this node and the reachable peers: if their demand fits, each gets its
    demand plus the spare divided by endpoints; if not, each gets the same fraction of its
    demand (no node is starved of its fair part). Without a total rate (only per-identity
    or descriptor limits) the rest is divided by demand alone."""
    total_eps = sum(endpoints.values())
    mine = endpoints.get(node, 0)
    if total_eps <= 0 or mine <= 0:
        return 1.0
    near = set(reachable)
    group = [n for n in endpoints if n == node or n in near]
    group_eps = sum(endpoints[n] for n in group)
    budget = group_eps / total_eps  # 1 minus the unreachable peers' static shares
    want = {n: max(0.0, demand.get(n, 0.0)) for n in group}
    wanted = sum(want.values())
    if wanted <= 0:
        return mine / total_eps
    if limit_per_s is None or wanted > budget * limit_per_s:
        return budget * want[node] / wanted
    spare = budget * limit_per_s - wanted
    return (want[node] + spare * mine / group_eps) / limit_per_s


class _Collector:
    """Read at scrape time: decisions per policy, each policy's local rate, share and fallback."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits

    def collect(self) -> Iterable[Metric]:
        share = GaugeMetricFamily("nodemesh_ratelimit_share",
                                  "This node's share (0-1) of a policy's limit (1: scope endpoint)",
                                  labels=["policy"])
        rate = GaugeMetricFamily("nodemesh_ratelimit_local_rate",
                                 "Requests/s this node admits for a policy's total limit", labels=["policy"])
        fallback = GaugeMetricFamily("nodemesh_ratelimit_fallback",
                                     "1: a service-wide limit runs on its static share (peers unreachable)",
                                     labels=["policy"])
        decisions = CounterMetricFamily(
            "nodemesh_ratelimit_decisions", "Rate limit decisions at the destination: policy, kind "
            "(http: requests, tcp: connections), admitted or limited", labels=["policy", "kind", "result"])
        for labels, n in sorted(self.limits.decisions().items()):
            decisions.add_metric(list(labels), n)
        yield decisions
        for doc in self.limits.status(refresh=False):  # (a scrape runs on a worker thread)
            share.add_metric([doc["policy"]], doc["share"])
            if "local_per_s" in doc:
                rate.add_metric([doc["policy"]], doc["local_per_s"])
            if doc["scope"] == "service":
                fallback.add_metric([doc["policy"]], 1.0 if "fallback" in doc else 0.0)
        yield from (share, rate, fallback)
