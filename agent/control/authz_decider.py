"""AuthorizationPolicies reduced for one connection's HTTP requests. Pure.

How this works: of the facts a request is judged on, the L4 ones (the peer's principal,
namespace and addresses, the destination's address and port, the SNI) are the connection's.
So once per connection (and policy set) :func:`decider` runs every rule's L4 checks (the
checks :mod:`agent.control.authz` compiles once per policy): a rule whose L4 part fails is
dropped, one with nothing else left matches every request, the rest keep only their L7
checks (methods, paths, hosts, request principals, ``request.*`` conditions).
:meth:`Decider.decide` then runs only those per request, with no allocation unless an AUDIT
policy matches. Same verdicts as :func:`agent.control.authz.evaluate` on the same HTTP facts
(unit test: random policies and facts); TCP connections use ``evaluate`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.control.authz import (
    AuthorizationPolicy,
    Facts,
    Verdict,
    _any_of,
    _Compiled,
    _compiled,
    _Match,
    _Parts,
    _RuleParts,
    _with_audited,
)

_ALWAYS: _Match = lambda f: True  # noqa: E731 (a rule left with no check: matches every request)


def _all_of(matches: Sequence[_Match]) -> _Match:
    if not matches:
        return _ALWAYS
    if len(matches) == 1:
        return matches[0]
    ms = tuple(matches)

    def match(f: Facts) -> bool:
        for m in ms:  # noqa: SIM110 (a loop: no generator per call)
            if not m(f):
                return False
        return True

    return match


def _left(alternatives: tuple[_Parts, ...], conn: Facts) -> _Match | bool:
    """Of ``from`` sources or ``to`` operations (one must match): False if none can on this
    connection, True if one always does, else the L7 checks of those whose L4 part holds."""
    left: list[_Match] = []
    for l4, l7 in alternatives:
        if all(c(conn) for c in l4):
            if not l7:
                return True
            left.append(_all_of(l7))
    return _any_of(tuple(left)) if left else False


def _residual_rule(rp: _RuleParts, conn: Facts) -> _Match | bool:
    checks: list[_Match] = []
    for alternatives in (rp.sources, rp.operations):
        if alternatives is not None:
            m = _left(alternatives, conn)
            if m is False:
                return False
            if m is not True:
                checks.append(m)
    if not all(c(conn) for c in rp.l4_when):
        return False
    checks.extend(rp.l7_when)
    return _all_of(checks) if checks else True


def _residual(c: _Compiled, conn: Facts) -> _Match | bool:
    """Policy ``c`` for this connection's requests: False never matches, True always does."""
    rules: list[_Match] = []
    for rp in c.rules:
        m = _residual_rule(rp, conn)
        if m is True:
            return True
        if m is not False:
            rules.append(m)
    return _any_of(tuple(rules)) if rules else False


@dataclass(frozen=True, slots=True)
class Decider:
    """The policies of a workload, reduced for the HTTP requests of one connection
    (:func:`decider`). Each entry: (what is left to check, None: matches every request)."""

    denies: tuple[tuple[_Match | None, Verdict], ...]
    audits: tuple[tuple[_Match | None, str], ...]
    allows: tuple[tuple[_Match | None, Verdict], ...]
    otherwise: Verdict  # when no DENY and no ALLOW matches
    # the verdict of every request on this connection when no check is left to run on it
    # (policies reading only L4 facts, as most do): None if requests differ
    fixed: Verdict | None = None

    def decide(self, f: Facts) -> Verdict:
        """The verdict for request ``f`` on the connection this was made for."""
        audited = [name for m, name in self.audits if m is None or m(f)] if self.audits else None
        for m, v in self.denies:
            if m is None or m(f):
                return _with_audited(v, audited) if audited else v
        for m, v in self.allows:
            if m is None or m(f):
                return _with_audited(v, audited) if audited else v
        return _with_audited(self.otherwise, audited) if audited else self.otherwise


def decider(policies: Sequence[AuthorizationPolicy], conn: Facts) -> Decider:
    """``policies`` (those applying to a workload, in order) for HTTP requests carrying the
    L4 facts of ``conn``."""
    denies: list[tuple[_Match | None, Verdict]] = []
    audits: list[tuple[_Match | None, str]] = []
    allows: list[tuple[_Match | None, Verdict]] = []
    allow_names: list[str] = []
    for p in policies:
        c = _compiled(p)
        if p.action == "ALLOW":
            allow_names.append(c.name)
        m = _residual(c, conn)
        if m is False:
            continue
        left = None if m is True else m
        if p.action == "DENY":
            denies.append((left, c.decided))
        elif p.action == "ALLOW":
            allows.append((left, c.decided))
        elif p.action == "AUDIT":
            audits.append((left, c.name))
    otherwise = (Verdict(False, "", "ALLOW", (), f"no ALLOW policy matched ({', '.join(allow_names)})")
                 if allow_names else Verdict(True, "", "", (), "no ALLOW policy applies"))
    d = Decider(tuple(denies), tuple(audits), tuple(allows), otherwise)
    return Decider(d.denies, d.audits, d.allows, otherwise, _fixed(d))


def _fixed(d: Decider) -> Verdict | None:
    """``d``'s verdict when it runs no check: the first entry it would try decides outright."""
    if any(m is not None for m, _ in d.audits):
        return None
    audited = [name for _, name in d.audits]
    first = d.denies[0] if d.denies else d.allows[0] if d.allows else (None, d.otherwise)
    if first[0] is not None:
        return None
    return _with_audited(first[1], audited)
