"""RequestAuthentication at the destination: a request's JWT verified, its principal found.

How this works: the RequestAuthentications that apply to the destination workload
(:func:`agent.control.authz.applicable`, once per snapshot and workload; none costs one
dictionary lookup) become a :class:`Plan`: where tokens are looked for (each rule's
``fromHeaders``/``fromParams``/``fromCookies``, else ``Authorization: Bearer`` and
``access_token``) and which issuers each place accepts. :func:`authenticate` is pure: every
token found is verified as Envoy's jwt_authn does (Istio's ``allow_missing`` requirement) — its issuer
must be one the place accepts, ``exp``/``nbf`` hold with 60 s of leeway, ``aud`` meets the
rule's ``audiences`` if any, and a key of the issuer's JWKS whose ``kid``, type and curve
fit the header's ``alg`` checks the signature (RSA, RSA-PSS, ECDSA, EdDSA only: ``none``
and HMAC are refused, so a public key can never serve as an HMAC secret). An invalid
token is a :class:`JwtError` with Envoy's reason and status (401, or 403 when only the
audience is wrong); no token passes with no principal (AuthorizationPolicy decides).
A valid one gives the request principal ``<iss>/<sub>``, audiences, presenter (``azp``)
and claims, and the header changes: the token's header removed unless
``forwardOriginalToken`` (a query parameter stays, as in Envoy), the base64url payload
in ``outputPayloadToHeader``, each ``outputClaimToHeaders`` claim (a string, number or
boolean; ``a.b`` nested) in its header; those headers are always removed from what the client
sent. A cookie carrying the token stays, as a query parameter does (Envoy's behaviour).

Outcomes (:class:`JwtAuthn`): each request a RequestAuthentication applies to is counted in
``nodemesh_requestauthn_decisions_total{policy,result,reason}`` (``policy``: the
RequestAuthentication whose rule names the token's issuer, "-" when none does; ``result``:
``valid``, ``invalid`` or ``missing``; ``reason``: a short code of Envoy's reason, "-" if
valid or missing); a refusal is logged, at most once per 10 s per resource and reason, with
both names.

Keys: an inline ``jwks`` is parsed once. A ``jwksUri`` set is fetched in the background
by :class:`JwksCache` (5 s timeout, 256 KiB at most, a worker thread), kept, refreshed
every 20 min and, when a token names a key the set lacks, at most once a minute; a failed
fetch keeps the last good keys. Requests never wait for a fetch: until the first one
succeeds, a token of that issuer is refused 401 ``Jwks remote fetch is failed`` (Istio
likewise fails the tokens it cannot verify).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import logging
import math
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.control import authz, reqauthn
from agent.control.authz import DEFAULT_ROOT_NAMESPACE
from agent.control.model import Workload
from agent.control.reqauthn import Jwk, JwtRule
from agent.dataplane.http.exchange import LocalReply
from agent.dataplane.http.normalize import join_headers
from agent.dataplane.route import Directory
from agent.metrics.istio import MeshMetrics
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

Header = tuple[bytes, bytes]

LEEWAY_S = 60  # Envoy's default clock_skew_seconds
REFRESH_S = 20 * 60  # Istio's JWKS refresh interval
UNKNOWN_KID_REFRESH_S = 60  # a token naming an unknown key refreshes at most this often
RETRY_S = 10  # a failed fetch is tried again after this
FETCH_TIMEOUT_S = reqauthn.DEFAULT_TIMEOUT_S  # a rule's ``timeout`` overrides it
MAX_JWKS_BYTES = 256 * 1024
MAX_REALM_CHARS = 256  # Envoy's MaximumUriLength
MAX_QUERY_FIELDS = 100  # query parameters looked at for a token

# Envoy's jwt_verify_lib texts (the 401 body and response code details)
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
BAD_HEADER = "Jwt header is an invalid JSON"
BAD_PAYLOAD = "Jwt payload is an invalid JSON"
BAD_ALG = "Jwt header [alg] field value is invalid"
BAD_EXP = "Jwt payload [exp] field must be an integer"
BAD_NBF = "Jwt payload [nbf] field must be an integer"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
AUDIENCE = "Audiences in Jwt are not allowed"
NO_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
FETCH_FAILED = "Jwks remote fetch is failed"
BAD_SIGNATURE = "Jwt verification fails"
# the reason label of nodemesh_requestauthn_decisions_total (bounded: one per reason above)
REASON_CODES = {BAD_FORMAT: "bad_format", BAD_HEADER: "bad_header", BAD_PAYLOAD: "bad_payload",
                BAD_ALG: "bad_alg", BAD_EXP: "bad_exp", BAD_NBF: "bad_nbf", EXPIRED: "expired",
                NOT_YET_VALID: "not_yet_valid", UNKNOWN_ISSUER: "unknown_issuer", AUDIENCE: "audience",
                NO_KEY: "unknown_kid", FETCH_FAILED: "jwks_fetch_failed", BAD_SIGNATURE: "bad_signature"}


class JwtError(Exception):
    """The token is invalid: the request is answered ``status`` (401, 403 for the audience)."""

    def __init__(self, reason: str, status: int = 401, *, unknown_key: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.unknown_key = unknown_key  # the jwksUri that lacked the token's key ("" : none)
        self.issuer = ""  # the token's issuer once it is one the place accepts ("" : not known)

    @property
    def code(self) -> str:
        return REASON_CODES.get(self.reason, "other")


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """What the destination changes in the request it forwards (names in lower case)."""

    drop: frozenset[bytes] = frozenset()
    add: tuple[Header, ...] = ()

    def apply(self, headers: list[Header]) -> list[Header]:
        return [(k, v) for k, v in headers if k.lower() not in self.drop] + list(self.add)


@dataclass(frozen=True, slots=True)
class Identity:
    principal: str  # "<iss>/<sub>"
    audiences: tuple[str, ...] = ()
    presenter: str = ""  # azp
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    identity: Identity | None  # None: the request carried no token
    edit: HeaderEdit | None  # None: forward the headers as they are


@dataclass(frozen=True, slots=True)
class Plan:
    """The jwtRules of one workload: where tokens are, which issuers each place accepts."""

    headers: tuple[tuple[str, str, frozenset[str]], ...]  # (name, prefix, issuers)
    params: tuple[tuple[str, frozenset[str]], ...]  # (name, issuers)
    rules: Mapping[str, JwtRule]  # issuer -> rule
    payload_headers: frozenset[bytes]  # outputPayloadToHeader and outputClaimToHeaders names:
    # never taken from the client
    cookies: tuple[tuple[str, frozenset[str]], ...] = ()  # (name, issuers)
    owners: Mapping[str, str] = field(default_factory=dict)  # issuer -> "<ns>/<name>" of its resource
    names: str = ""  # the RequestAuthentications that apply, "<ns>/<name>, ..." (for logs)


def plan(rules: Sequence[JwtRule], owners: Mapping[str, str] | None = None, names: str = "") -> Plan:
    hs: dict[tuple[str, str], set[str]] = {}
    ps: dict[str, set[str]] = {}
    cs: dict[str, set[str]] = {}
    for r in rules:
        headers, params, cookies = r.locations()
        for h in headers:
            hs.setdefault((h.name, h.prefix), set()).add(r.issuer)
        for p in params:
            ps.setdefault(p, set()).add(r.issuer)
        for c in cookies:
            cs.setdefault(c, set()).add(r.issuer)
    out = {r.output_payload_to_header for r in rules if r.output_payload_to_header}
    out.update(h for r in rules for h, _ in r.output_claim_to_headers)
    return Plan(tuple((n, p, frozenset(i)) for (n, p), i in hs.items()),
                tuple((n, frozenset(i)) for n, i in ps.items()), {r.issuer: r for r in rules},
                frozenset(h.encode("latin-1") for h in out),
                tuple((n, frozenset(i)) for n, i in cs.items()), dict(owners or {}), names)


# -- finding and verifying tokens (pure) ------------------------------------------------------


def tokens(p: Plan, headers: Mapping[str, str], query: str) -> list[tuple[str, frozenset[str], str]]:
    """The tokens a request carries: (token, issuers its place accepts, header name or "")."""
    found = []
    for name, prefix, issuers in p.headers:
        v = headers.get(name)
        if v is None:
            continue
        if prefix:
            # Istio's default 'Bearer ' is matched as RFC 6750 says (the scheme in any case)
            ok = (v[:len(prefix)].lower() == prefix.lower() if name == reqauthn.DEFAULT_HEADER
                  else v.startswith(prefix))
            if not ok:
                continue
            v = v[len(prefix):]
        v = v.strip()
        if v:
            found.append((v, issuers, name))
    if p.params and query:
        params = query_params(query)
        for name, issuers in p.params:
            for v in params.get(name, ()):
                if v.strip():
                    found.append((v.strip(), issuers, ""))
    if p.cookies:
        jar = cookies(headers.get("cookie", ""))
        for name, issuers in p.cookies:
            v = jar.get(name, "")
            if v:
                found.append((v, issuers, ""))
    return found


def query_params(query: str, max_fields: int = MAX_QUERY_FIELDS) -> dict[str, list[str]]:
    """The query's parameters, decoded as parse_qs does, from its first ``max_fields`` fields
    (a longer query is read, not refused: a token further on is not looked for)."""
    out: dict[str, list[str]] = {}
    for field_ in query.split("&", max_fields)[:max_fields]:
        name, eq, value = field_.partition("=")
        if eq:
            out.setdefault(urllib.parse.unquote_plus(name), []).append(urllib.parse.unquote_plus(value))
    return out


def cookies(header: str) -> dict[str, str]:
    """``name=value`` pairs of a Cookie header (several headers arrive joined with ','; a
    cookie value has neither ';' nor ','): the first value of each name, quotes removed."""
    jar: dict[str, str] = {}
    for part in header.replace(",", ";").split(";")[:256]:
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if eq and name and name not in jar:
            jar[name] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return jar


def claim_value(claims: Mapping[str, Any], path: str) -> str | None:
    """``outputClaimToHeaders``' claim ``a.b`` (claim b of object claim a) as a header value:
    a string (sent as UTF-8), an integer, a number or a boolean (``true``/``false``); None for
    anything else, a missing claim, or a value a header cannot carry (control characters)."""
    v: Any = claims
    for part in path.split("."):
        if not isinstance(v, Mapping) or part not in v:
            return None
        v = v[part]
    if isinstance(v, bool):
        out = "true" if v else "false"
    elif isinstance(v, int):
        out = str(v)
    elif isinstance(v, float):
        out = str(int(v)) if v.is_integer() else repr(v)
    elif isinstance(v, str):
        out = v
    else:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in out):
        return None
    return out


def _b64(segment: str) -> bytes:
    if not segment or not segment.isascii():
        raise ValueError("empty or not ASCII")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(segment: str, why: str) -> dict[str, Any]:
    try:
        v = json.loads(_b64(segment))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):  # (deep nesting)
        raise JwtError(why) from None
    if not isinstance(v, dict):
        raise JwtError(why)
    return v


def _number(v: Any, why: str) -> float:
    """A NumericDate: a finite number (NaN or Infinity, which Python's JSON reads, never)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise JwtError(why)
    return float(v)


def _aud_norm(a: str) -> str:
    """jwt_verify_lib compares audiences without the scheme and a trailing slash."""
    for scheme in ("http://", "https://"):
        if a.startswith(scheme):
            a = a[len(scheme):]
    return a.rstrip("/")


def verify(
    token: str, issuers: frozenset[str], p: Plan, keys: Callable[[JwtRule], Sequence[Jwk] | None],
    now: float, leeway_s: float = LEEWAY_S,
) -> tuple[dict[str, Any], JwtRule, str]:
    """The claims of a valid ``token``, its rule and its base64url payload; JwtError if not.
    Checked in Envoy's order: form, issuer, time, audience, key, signature."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError(BAD_FORMAT)
    header = _json_object(parts[0], BAD_HEADER)
    payload = _json_object(parts[1], BAD_PAYLOAD)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in reqauthn.ALGORITHMS:
        raise JwtError(BAD_ALG)  # none, HS256 (a public key is never an HMAC secret), unknown
    iss = payload.get("iss")
    if not isinstance(iss, str) or iss not in issuers or iss not in p.rules:
        raise JwtError(UNKNOWN_ISSUER)
    try:
        return _verify_issued(parts, header, payload, alg, p.rules[iss], keys, now, leeway_s)
    except JwtError as e:
        e.issuer = iss
        raise


def _verify_issued(
    parts: list[str], header: dict[str, Any], payload: dict[str, Any], alg: str, rule: JwtRule,
    keys: Callable[[JwtRule], Sequence[Jwk] | None], now: float, leeway_s: float,
) -> tuple[dict[str, Any], JwtRule, str]:
    from jwt.algorithms import get_default_algorithms  # (pyjwt: loaded with the first token)

    if "exp" in payload and now > _number(payload["exp"], BAD_EXP) + leeway_s:
        raise JwtError(EXPIRED)
    if "nbf" in payload and now + leeway_s < _number(payload["nbf"], BAD_NBF):
        raise JwtError(NOT_YET_VALID)
    if rule.audiences:
        aud = payload.get("aud")
        have = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)] \
            if isinstance(aud, list) else []
        want = {_aud_norm(a) for a in rule.audiences}
        if not any(_aud_norm(a) in want for a in have):
            raise JwtError(AUDIENCE, 403)
    ks = keys(rule)
    if ks is None:
        raise JwtError(FETCH_FAILED)
    kid = header.get("kid")
    kid = kid if isinstance(kid, str) else ""
    cands = [k for k in ks if (not kid or not k.kid or k.kid == kid) and k.verifies(alg)]
    if not cands:
        raise JwtError(NO_KEY, unknown_key=rule.jwks_uri)
    try:
        signature = _b64(parts[2])
    except (ValueError, binascii.Error):
        raise JwtError(BAD_SIGNATURE) from None
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    algorithm = get_default_algorithms()[alg]
    for k in cands:
        try:
            if algorithm.verify(signed, k.key, signature):
                return payload, rule, parts[1]
        except (ValueError, TypeError):
            continue
    raise JwtError(BAD_SIGNATURE)


def authenticate(
    p: Plan, headers: Mapping[str, str], query: str,
    keys: Callable[[JwtRule], Sequence[Jwk] | None], now: float,
) -> Outcome:
    """Every token the request carries must be valid (Envoy's allow_missing); the first gives
    the identity. ``headers``: lower-case names, duplicates joined (``join_headers``)."""
    found = tokens(p, headers, query)
    drop = set(p.payload_headers)
    if not found:
        return Outcome(None, HeaderEdit(frozenset(drop)) if drop else None)
    identity = None
    add: list[Header] = []
    for token, issuers, header in dict.fromkeys(found):
        claims, rule, payload = verify(token, issuers, p, keys, now)
        if identity is None:
            aud = claims.get("aud")
            audiences = (aud,) if isinstance(aud, str) else tuple(a for a in aud if isinstance(a, str)) \
                if isinstance(aud, list) else ()
            sub, azp = claims.get("sub"), claims.get("azp")
            identity = Identity(f"{claims['iss']}/{sub if isinstance(sub, str) else ''}", audiences,
                                azp if isinstance(azp, str) else "", claims)
        if header and not rule.forward_original_token:
            drop.add(header.encode("latin-1"))
        if rule.output_payload_to_header:
            add.append((rule.output_payload_to_header.encode("latin-1"), payload.encode("ascii")))
        for name, claim in rule.output_claim_to_headers:
            v = claim_value(claims, claim)
            if v is not None:
                add.append((name.encode("latin-1"), v.encode("utf-8")))
    return Outcome(identity, HeaderEdit(frozenset(drop), tuple(add)) if drop or add else None)


def realm(authority: str, target: str) -> str:
    """Envoy's ``Bearer realm``: the request's URL without its query, at most 256 characters."""
    return f"http://{authority}{target.partition('?')[0]}"[:MAX_REALM_CHARS]


def reply(e: JwtError, authority: str, target: str) -> LocalReply:
    """Envoy's answer to an invalid token: 401 (or 403), the reason as the body."""
    challenge = f'Bearer realm="{realm(authority, target)}", error="invalid_token"'
    return LocalReply(e.status, e.reason, "-", headers=((b"www-authenticate", challenge.encode("latin-1")),))


# -- keys from jwksUri --------------------------------------------------------------------------


def fetch_url(uri: str, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_JWKS_BYTES) -> bytes:
    """GET ``uri`` (blocking: run it on a worker thread). No proxies from the environment.
    Whatever goes wrong is an OSError (a server speaking something else than HTTP too)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(uri, headers={"accept": "application/json"})
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
            body: bytes = resp.read(max_bytes + 1)
    except http.client.HTTPException as e:  # (BadStatusLine, IncompleteRead, ...: not OSErrors)
        raise OSError(f"not an HTTP answer: {type(e).__name__} {e}") from None
    if len(body) > max_bytes:
        raise OSError(f"the JWKS is larger than {max_bytes} bytes")
    return body


@dataclass(slots=True)
class _Entry:
    keys: tuple[Jwk, ...] | None = None
    fetched_at: float = -1e18  # when the keys were last fetched
    tried_at: float = -1e18  # when a fetch last started
    task: asyncio.Task[None] | None = None
    error: str = ""
    timeout_s: float | None = None  # the rule's ``timeout`` (None: the cache's)


class JwksCache:
    """JWKS of ``jwksUri`` s, fetched in the background; the last good set is kept. A fetch
    may take the ``timeout`` of the rule naming the URI (else ``timeout_s``)."""

    def __init__(
        self, fetch: Callable[[str], Awaitable[bytes]] | None = None,
        clock: Callable[[], float] = time.monotonic, refresh_s: float = REFRESH_S,
        retry_s: float = RETRY_S, timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self._fetch = fetch or (lambda uri: asyncio.to_thread(fetch_url, uri, self._timeout(uri)))
        self.clock = clock
        self.refresh_s = refresh_s
        self.retry_s = min(retry_s, refresh_s)  # (a failed fetch is never retried later than a refresh)
        self.timeout_s = timeout_s
        self._entries: dict[str, _Entry] = {}

    def _timeout(self, uri: str) -> float:
        e = self._entries.get(uri)
        return self.timeout_s if e is None or e.timeout_s is None else e.timeout_s

    def keys(self, uri: str, timeout_s: float | None = None) -> tuple[Jwk, ...] | None:
        """The keys now (None: never fetched); a stale or missing set is fetched meanwhile."""
        e = self._entries.get(uri)
        if e is None:
            e = self._entries[uri] = _Entry()
        if timeout_s is not None:
            e.timeout_s = timeout_s
        now = self.clock()
        if (e.keys is None or now - e.fetched_at >= self.refresh_s) and now - e.tried_at >= self.retry_s:
            self._start(uri, e, now)
        return e.keys

    def want(self, uris: Mapping[str, float]) -> None:
        """Start fetching each URI (-> its fetch timeout) not fetched yet."""
        for uri, timeout_s in uris.items():
            self.keys(uri, timeout_s)

    def unknown_key(self, uri: str) -> None:
        """A token named a key the set lacks: fetch again, at most once a minute."""
        e = self._entries.get(uri)
        now = self.clock()
        if e is not None and now - e.tried_at >= UNKNOWN_KID_REFRESH_S:
            self._start(uri, e, now)

    def _start(self, uri: str, e: _Entry, now: float) -> None:
        if e.task is not None and not e.task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (no loop: nothing fetches; a caller awaits refresh() itself)
        e.tried_at = now
        e.task = loop.create_task(self._refresh(uri), name=f"jwks {uri}")

    async def _refresh(self, uri: str) -> None:
        await self.refresh(uri)

    async def refresh(self, uri: str) -> bool:
        """Fetch ``uri`` now; False (the last good keys kept) if it fails."""
        e = self._entries.setdefault(uri, _Entry())
        e.tried_at = self.clock()
        try:
            async with asyncio.timeout(self._timeout(uri) + 1):
                body = await self._fetch(uri)
            keys = reqauthn.parse_jwks(body, strict=False)
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, ValueError) as err:  # (URLError is an OSError)
            e.error = str(err)
            log.warning("jwt: fetching the JWKS at %s failed: %s; %s", uri, err,
                        "keeping the last good keys" if e.keys is not None
                        else "tokens of its issuer are refused until it succeeds")
            return False
        e.keys, e.fetched_at, e.error = keys, self.clock(), ""
        return True

    def close(self) -> None:
        for e in self._entries.values():
            if e.task is not None:
                e.task.cancel()


# -- per workload ---------------------------------------------------------------------------


class JwtAuthn:
    """The JWT step of the destination's judgement, per workload and snapshot."""

    def __init__(
        self, directory: Callable[[], Directory], root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        cache: JwksCache | None = None, clock: Callable[[], float] = time.time,
        metrics: MeshMetrics | None = None, rlog: RateLimitedLog | None = None,
    ) -> None:
        self.directory = directory
        self.root_namespace = root_namespace
        self.cache = cache or JwksCache()
        self.clock = clock
        self.metrics = metrics
        self.rlog = rlog or RateLimitedLog(log)
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._of: object = None
        self._resources: tuple[reqauthn.RequestAuthentication, ...] = ()
        self._per: dict[tuple[str, str], Plan | None] = {}
        self._inline: dict[str, tuple[Jwk, ...] | None] = {}

    def plan_for(self, w: Workload) -> Plan | None:
        """The workload's plan (None: no RequestAuthentication applies)."""
        d = self.directory()
        if self._of is not d:
            self.prefetch()
        key = (w.namespace, w.name)
        try:
            return self._per[key]
        except KeyError:
            ras = authz.applicable(self._resources, w.namespace, w.labels, self.root_namespace)
            rules = reqauthn.rules_of(ras)
            owners: dict[str, str] = {}
            for r in ras:
                for j in r.jwt_rules:
                    owners.setdefault(j.issuer, f"{r.namespace}/{r.name}")
            p = self._per[key] = plan(rules, owners, ", ".join(f"{r.namespace}/{r.name}" for r in ras)) \
                if rules else None
            return p

    def prefetch(self) -> None:
        """On a new snapshot: forget the plans, start fetching every jwksUri it names."""
        d = self.directory()
        if self._of is d:
            return
        self._of = d
        ras = d.snapshot.request_authentications
        self._resources = tuple(sorted(ras.values(), key=lambda r: (r.namespace, r.name)))
        self._per = {}
        self.cache.want({j.jwks_uri: j.timeout_s for r in self._resources for j in r.jwt_rules if j.jwks_uri})

    def keys(self, rule: JwtRule) -> tuple[Jwk, ...] | None:
        if rule.jwks_uri:
            return self.cache.keys(rule.jwks_uri, rule.timeout_s)
        try:
            return self._inline[rule.jwks]
        except KeyError:
            try:
                ks: tuple[Jwk, ...] | None = reqauthn.parse_jwks(rule.jwks, strict=False)
            except ValueError:
                ks = ()  # (validated on apply; a stored set that does not parse has no key)
            if len(self._inline) > 1024:
                self._inline.clear()
            self._inline[rule.jwks] = ks
            return ks

    def judge(self, w: Workload, headers: Iterable[tuple[str | bytes, str | bytes]], target: str,
              authority: str) -> Outcome | None:
        """The JWT step for a request to ``w``: None when no RequestAuthentication applies;
        the outcome; or :class:`LocalReply` 401/403 raised for an invalid token."""
        p = self.plan_for(w)
        if p is None:
            return None
        joined = join_headers(h for h in headers if not _pseudo(h[0]))
        try:
            o = authenticate(p, joined, target.partition("?")[2], self.keys, self.clock())
        except JwtError as e:
            if e.unknown_key:
                self.cache.unknown_key(e.unknown_key)
            owner = p.owners.get(e.issuer, "-")
            self._count(owner, "invalid", e.code)
            self.rlog.info(f"jwt {owner} {e.code}",
                           "jwt: %d for a request to %s/%s, RequestAuthentication %s: %s (%s)",
                           e.status, w.namespace, w.name,
                           owner if e.issuer else f"{p.names} (the token's issuer is not one of theirs, "
                           "or not yet known)", e.reason, e.code)
            raise reply(e, authority, target) from None
        if o.identity is None:
            self._count("-", "missing", "-")
        else:
            self._count(p.owners.get(str(o.identity.claims.get("iss")), "-"), "valid", "-")
        return o

    def _count(self, policy: str, result: str, reason: str) -> None:
        if self.metrics is None:
            return
        key = (policy, result, reason)
        c = self._counters.get(key)
        if c is None:  # (a labelled child is looked up once, not per request)
            if len(self._counters) > 4096:
                self._counters.clear()
            c = self._counters[key] = self.metrics.requestauthn_decisions.labels(policy, result, reason)
        c.inc()


def _pseudo(name: str | bytes) -> bool:
    return name[:1] in (":", b":")
