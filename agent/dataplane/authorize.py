"""Authorization at the destination: which AuthorizationPolicies apply to a local workload,
and the verdict for a connection (TCP ports) or a request (HTTP ports).

How this works: :class:`Authorizer` keeps, per snapshot, the policies that apply to each
workload (:func:`agent.control.authz.applicable`); a workload none applies to costs one
dictionary lookup per connection or request. Facts come only from what this node verified:
the peer's identity from the tunnel's mTLS (or, for a same-node caller, the captured pod's
registered identity), the source address the registry ties to that identity, and the
request itself — never from headers the caller sent about itself. Each decision is counted
in ``nodemesh_authz_decisions_total{policy,action,result}``; a denial is logged (rate
limited) with the deciding policy, and AUDIT matches are logged.

Live changes (:meth:`Authorizer.watch`): open TCP connections are registered with their
facts; when a new snapshot changes the policies, each is judged again and one now denied
is closed (its stream or socket reset) within the watch interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.control import authz
from agent.control.authz_decider import Decider, decider
from agent.control.model import Workload
from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.http.normalize import (
    NormalizationError,
    PathNormalization,
    check_method,
    join_headers,
    normalize_path,
)
from agent.dataplane.jwtauth import REFRESH_S, JwksCache, JwtAuthn
from agent.dataplane.route import Directory
from agent.metrics.istio import MeshMetrics
from agent.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from agent.dataplane.ratelimit import RateLimits

log = logging.getLogger(__name__)

DENIED_BODY = "RBAC: access denied"  # Envoy's answer to a request its RBAC filter denied
DENIED_FLAG = "RBAC"  # Envoy's response flag for it
WATCH_INTERVAL_S = 0.25
_MAX_DECIDERS = 4096  # (workload, connection facts) pairs kept per snapshot; past it: made again


class LazyHeaders(Mapping[str, str]):
    """A request's headers for ``request.headers[...]`` conditions, joined (lower-case names,
    repeats joined with ",") only if a condition reads them."""

    __slots__ = ("_d", "_raw")

    def __init__(self, raw: Iterable[tuple[str | bytes, str | bytes]]) -> None:
        self._raw = raw
        self._d: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        if self._d is None:
            self._d = join_headers(h for h in self._raw if h[0][:1] not in (":", b":"))
        return self._d

    def __getitem__(self, name: str) -> str:
        v: str | None = self.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def get(self, name: str, default: Any = None) -> Any:
        """One header (what a condition asks for) without joining them all: names arrive
        lower-case from both request loops."""
        if self._d is not None:
            return self._d.get(name, default)
        b = name.encode("latin-1")
        found = [v.decode("latin-1") if isinstance(v, bytes) else v
                 for k, v in self._raw if k in (name, b)]
        return ",".join(found) if found else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())


def principal_of(spiffe_uri: str) -> str:
    """Istio's principal form: the SPIFFE ID without ``spiffe://``."""
    return spiffe_uri.removeprefix("spiffe://")


@dataclass(slots=True)
class _Open:
    """An open TCP connection, judged again when the policies change."""

    workload: Workload
    facts: authz.Facts
    close: Callable[[], None]


class Authorizer:
    def __init__(
        self, directory: Callable[[], Directory], metrics: MeshMetrics,
        root_namespace: str = authz.DEFAULT_ROOT_NAMESPACE, rlog: RateLimitedLog | None = None,
        jwks_refresh_s: float = REFRESH_S,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self.root_namespace = root_namespace
        self.rlog = rlog or RateLimitedLog(log)
        self._of: object = None
        self._policies: tuple[authz.AuthorizationPolicy, ...] = ()
        self._per: dict[tuple[str, str], list[authz.AuthorizationPolicy]] = {}
        # per (workload, a connection's L4 facts): its policies reduced for HTTP requests
        self._deciders: dict[tuple[object, ...], Decider] = {}
        self._last: tuple[authz.Facts, Workload, Decider] | None = None  # (the last one asked for)
        self._open: dict[int, _Open] = {}
        self._counters: dict[tuple[str, str, bool], Any] = {}
        self._next = 0
        # RequestAuthentication, judged before the policies
        self.jwt = JwtAuthn(directory, root_namespace, JwksCache(refresh_s=jwks_refresh_s),
                            metrics=metrics, rlog=self.rlog)
        self.limits: RateLimits | None = None  # RateLimitPolicies, judged after the policies

    def policies(self, w: Workload) -> list[authz.AuthorizationPolicy]:
        d = self.directory()
        if self._of is not d:
            self._of = d
            self._policies = tuple(sorted(d.snapshot.authorization_policies.values(),
                                          key=lambda p: (p.namespace, p.name)))
            self._per = {}
            self._deciders = {}
            self._last = None
        key = (w.namespace, w.name)
        got = self._per.get(key)
        if got is None:
            got = self._per[key] = authz.applicable(self._policies, w.namespace, w.labels,
                                                    self.root_namespace)
        return got

    def check(self, w: Workload, facts: authz.Facts) -> authz.Verdict | None:
        """The verdict for ``facts`` at workload ``w`` (None: no policy applies, allowed)."""
        policies = self.policies(w)
        if not policies:
            return None
        return self._record(w, facts, authz.evaluate(policies, facts))

    def decider(self, w: Workload, conn: authz.Facts) -> Decider:
        """``w``'s policies reduced for the HTTP requests of a connection with the L4 facts of
        ``conn`` (:func:`agent.control.authz_decider.decider`), made once per snapshot and connection
        facts: a request then runs only the checks its L4 facts leave."""
        last = self._last
        if last is not None and last[0] is conn and last[1] is w:  # (the same connection again)
            return last[2]
        key = (w.namespace, w.name, conn.principal, conn.namespace, conn.source_ip, conn.remote_ip,
               conn.destination_ip, conn.destination_port, conn.sni)
        d = self._deciders.get(key)
        if d is None:
            if len(self._deciders) >= _MAX_DECIDERS:
                self._deciders.clear()
            d = self._deciders[key] = decider(self.policies(w), conn)
        self._last = (conn, w, d)
        return d

    def _record(self, w: Workload, facts: authz.Facts, v: authz.Verdict) -> authz.Verdict:
        """Count verdict ``v``; log a denial (rate limited) and AUDIT matches."""
        self._count(v)
        for name in v.audited:
            log.info("authz: AUDIT %s matched %s %s at %s/%s", name, facts.principal or facts.source_ip,
                     f"{facts.method} {facts.path}" if facts.http else f"port {facts.destination_port}",
                     w.namespace, w.name)
        if not v.allowed:
            self.rlog.info(f"deny {v.policy}", "authz: denied %s -> %s/%s %s: %s",
                           facts.principal or facts.source_ip or "?", w.namespace, w.name,
                           f"{facts.method} {facts.path}" if facts.http else f"port {facts.destination_port}",
                           v.why)
        return v

    def _count(self, v: authz.Verdict) -> None:
        key = (v.policy, v.action, v.allowed)
        counter = self._counters.get(key)
        if counter is None:  # (a labelled child is looked up once, not per decision)
            if len(self._counters) > 4096:
                self._counters.clear()
            counter = self._counters[key] = self.metrics.authz_decisions.labels(
                v.policy or "-", v.action or "-", "allowed" if v.allowed else "denied")
        counter.inc()

    def judge_request(
        self, w: Workload | None, conn: Callable[[], authz.Facts], ex: Exchange,
        headers: Sequence[tuple[str | bytes, str | bytes]], normalization: PathNormalization,
        route: str = "",
    ) -> None:
        """What the destination does with an HTTP request before it is forwarded (its node's
        inbound, or for a same-node caller the source agent): the method checked and the path
        normalised as Istio does (400 if refused; the normalised path is what is matched and
        forwarded, in ``ex.target``); for workload ``w``, its RequestAuthentications (an invalid
        JWT: 401) and its AuthorizationPolicies (403 ``RBAC``). ``conn`` gives the connection's
        verified facts, asked for only when policies apply; ``route``: the VirtualService route
        the source agent chose, as far as it is trusted (its RateLimitPolicies)."""
        path = target = ex.target or ex.path
        if ex.method != "CONNECT":  # (its target is an authority, not a path)
            try:
                check_method(ex.method)
                target = normalize_path(path, normalization, allow_asterisk=ex.method == "OPTIONS")
            except NormalizationError as e:
                raise LocalReply(400, e.reason, "-") from None
            if target != path:
                ex.target = target
        if w is None:
            return
        jwt = self.jwt.judge(w, headers, target, ex.authority)
        ex.header_edit = jwt.edit.apply if jwt is not None and jwt.edit is not None else None
        if not self.policies(w):
            if self.limits is not None:  # (429 RL)
                self.limits.judge_request(w, conn, ex, headers, target, route)
            return
        f = conn()
        reduced = self.decider(w, f)  # (after policies(w): the snapshot is current)
        v = reduced.fixed
        if v is not None and v.allowed and not v.audited:  # (the connection decides; nothing to log)
            self._count(v)
        else:
            i = jwt.identity if jwt is not None else None
            facts = authz.Facts(  # (built directly: dataclasses.replace costs twice as much)
                f.principal, f.namespace, f.source_ip, f.remote_ip, f.destination_ip, f.destination_port,
                f.sni, True, ex.method, target.partition("?")[0], ex.authority, LazyHeaders(headers),
                *((i.principal, i.audiences, i.presenter, i.claims) if i is not None else ()),
            )
            if not self._record(w, facts, v or reduced.decide(facts)).allowed:
                raise LocalReply(403, DENIED_BODY, DENIED_FLAG)
        if self.limits is not None:  # (429 RL)
            self.limits.judge_request(w, conn, ex, headers, target, route)

    # -- live changes for TCP connections -----------------------------------------------------

    def opened(self, w: Workload, facts: authz.Facts, close: Callable[[], None]) -> int:
        self._next += 1
        self._open[self._next] = _Open(w, facts, close)
        return self._next

    def closed(self, token: int) -> None:
        self._open.pop(token, None)

    def recheck(self) -> int:
        """Judge the open TCP connections again (the policies changed); close the denied ones."""
        n = 0
        for token, o in list(self._open.items()):
            v = self.check(o.workload, o.facts)
            if v is not None and not v.allowed:
                self._open.pop(token, None)
                o.close()
                n += 1
        return n

    async def watch(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Recheck open connections whenever the snapshot's policies change."""
        seen = self.directory().snapshot.authorization_policies
        while True:
            await asyncio.sleep(interval_s)
            self.jwt.prefetch()  # (a new jwksUri is fetched before its first request)
            current = self.directory().snapshot.authorization_policies
            if current is seen:
                continue
            changed = current != seen
            seen = current
            if changed:
                closed = self.recheck()
                if closed:
                    log.info("authz: closed %d open connection(s) the new policies deny", closed)
