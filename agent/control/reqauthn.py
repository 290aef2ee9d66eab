"""Istio's RequestAuthentication as nodemesh holds it. Pure.

How this works: ``validate_reqauthn.py`` turns the YAML users write for Istio
(``security.istio.io/v1``, ``v1beta1``) into these frozen values; they are
stored as JSON (:func:`request_authentication_doc` /
:func:`request_authentication_from_doc`) and reach the destination node in
snapshots. Which resources apply to a workload is the AuthorizationPolicy rule
(:func:`applicable`): the mesh's root namespace without a selector, the
workload's namespace without a selector, or a ``selector.matchLabels`` the
workload's labels include. Their ``jwtRules`` together say which issuers the
workload accepts and where their tokens are found; verifying a token is the
data path's business (:mod:`agent.dataplane.jwtauth`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# what a JWKS key may sign with (Envoy's jwt_verify_lib, without the HMAC ones: a JWKS
# here holds public keys only)
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_HEADER = "authorization"  # with the prefix "Bearer " (Istio's default location)
DEFAULT_PARAM = "access_token"  # then this query parameter
DEFAULT_TIMEOUT_S = 5.0  # Istio's jwtRules[].timeout: how long a jwksUri fetch may take


@dataclass(frozen=True, slots=True)
class HeaderLocation:
    name: str  # lower case
    prefix: str = ""  # the value starts with it; the token follows


@dataclass(frozen=True, slots=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()  # () : the token's aud is not checked
    jwks: str = ""  # the JSON Web Key Set inline, as written
    jwks_uri: str = ""  # or where to fetch it (http or https)
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    forward_original_token: bool = False  # Istio's default: the token's header is removed
    output_payload_to_header: str = ""  # lower case; "" : none
    from_cookies: tuple[str, ...] = ()  # cookie names
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header in lower case, claim a.b.c)
    timeout_s: float = DEFAULT_TIMEOUT_S  # a jwksUri fetch

    def locations(self) -> tuple[tuple[HeaderLocation, ...], tuple[str, ...], tuple[str, ...]]:
        """Where this rule's tokens are looked for (headers, query parameters, cookies): its
        own, else Istio's defaults."""
        if self.from_headers or self.from_params or self.from_cookies:
            return self.from_headers, self.from_params, self.from_cookies
        return (HeaderLocation(DEFAULT_HEADER, "Bearer "),), (DEFAULT_PARAM,), ()


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...] | None = None  # matchLabels; None: every workload
    jwt_rules: tuple[JwtRule, ...] = ()
    source: str = ""  # file:line it was applied from


def rules_of(resources: Iterable[RequestAuthentication]) -> tuple[JwtRule, ...]:
    """The jwtRules of ``resources`` in order, one per issuer (the first one wins, as in
    Istio where the oldest resource's rule is kept)."""
    seen: set[str] = set()
    out = []
    for r in resources:
        for rule in r.jwt_rules:
            if rule.issuer not in seen:
                seen.add(rule.issuer)
                out.append(rule)
    return tuple(out)


# -- JSON documents ---------------------------------------------------------------------------


def request_authentication_doc(r: RequestAuthentication) -> dict[str, Any]:
    rules = []
    for j in r.jwt_rules:
        d: dict[str, Any] = {"issuer": j.issuer}
        if j.audiences:
            d["audiences"] = list(j.audiences)
        if j.jwks:
            d["jwks"] = j.jwks
        if j.jwks_uri:
            d["jwksUri"] = j.jwks_uri
        if j.from_headers:
            d["fromHeaders"] = [{"name": h.name, "prefix": h.prefix} if h.prefix else {"name": h.name}
                                for h in j.from_headers]
        if j.from_params:
            d["fromParams"] = list(j.from_params)
        if j.forward_original_token:
            d["forwardOriginalToken"] = True
        if j.output_payload_to_header:
            d["outputPayloadToHeader"] = j.output_payload_to_header
        if j.from_cookies:
            d["fromCookies"] = list(j.from_cookies)
        if j.output_claim_to_headers:
            d["outputClaimToHeaders"] = [{"header": h, "claim": c} for h, c in j.output_claim_to_headers]
        if j.timeout_s != DEFAULT_TIMEOUT_S:
            d["timeout_s"] = j.timeout_s
        rules.append(d)
    return {"name": r.name, "namespace": r.namespace,
            "selector": dict(r.selector) if r.selector is not None else None, "jwtRules": rules,
            "source": r.source}


def request_authentication_from_doc(d: Mapping[str, Any]) -> RequestAuthentication:
    rules = tuple(
        JwtRule(
            issuer=j["issuer"], audiences=tuple(j.get("audiences", ())), jwks=j.get("jwks", ""),
            jwks_uri=j.get("jwksUri", ""),
            from_headers=tuple(HeaderLocation(h["name"], h.get("prefix", ""))
                               for h in j.get("fromHeaders", ())),
            from_params=tuple(j.get("fromParams", ())),
            forward_original_token=bool(j.get("forwardOriginalToken", False)),
            output_payload_to_header=j.get("outputPayloadToHeader", ""),
            from_cookies=tuple(j.get("fromCookies", ())),
            output_claim_to_headers=tuple((o["header"], o["claim"])
                                          for o in j.get("outputClaimToHeaders", ())),
            timeout_s=float(j.get("timeout_s", DEFAULT_TIMEOUT_S)),
        )
        for j in d.get("jwtRules", ())
    )
    sel = d.get("selector")
    selector = tuple(sorted(sel.items())) if sel is not None else None
    return RequestAuthentication(d["name"], d["namespace"], selector, rules, d.get("source", ""))


# -- JSON Web Key Sets ------------------------------------------------------------------------

_KTY_ALGS = {"RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
             "EC": ("ES256", "ES384", "ES512"), "OKP": ("EdDSA",)}
_EC_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_MAX_KEYS = 64


@dataclass(frozen=True, slots=True)
class Jwk:
    """One public key of a JWKS, ready to verify with."""

    kid: str  # "" : none
    alg: str  # "" : any algorithm of its type
    kty: str  # RSA, EC or OKP
    crv: str  # EC and OKP keys
    key: Any  # the cryptography public key

    def verifies(self, alg: str) -> bool:
        """Can this key check a signature made with ``alg``? (never an HMAC or ``none``)"""
        if self.alg and self.alg != alg:
            return False
        if alg not in _KTY_ALGS.get(self.kty, ()):
            return False
        return self.kty != "EC" or _EC_CURVE[alg] == self.crv


def parse_jwks(text: str | bytes, *, strict: bool = True) -> tuple[Jwk, ...]:
    """The public keys of a JSON Web Key Set. ValueError says what is wrong and where
    (``keys[1].alg``). ``strict`` False (a fetched set): keys nodemesh cannot use are
    skipped, as Envoy does; the set must still hold one it can."""
    import jwt  # (pyjwt loads cryptography: only where keys are read)

    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # (RecursionError: deep nesting)
        raise ValueError(f"is not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('is not a JSON Web Key Set: expected an object {"keys": [...]}')
    if not doc["keys"]:
        raise ValueError("has no keys")
    if len(doc["keys"]) > _MAX_KEYS:
        raise ValueError(f"has {len(doc['keys'])} keys (at most {_MAX_KEYS})")
    out = []
    for i, k in enumerate(doc["keys"]):
        try:
            out.append(_jwk(jwt, k))
        except ValueError as e:
            if strict:
                raise ValueError(f"keys[{i}]{e}") from None
    if not out:
        raise ValueError("has no key nodemesh can verify with (RSA, EC or OKP public keys)")
    return tuple(out)


def _jwk(jwt: Any, k: Any) -> Jwk:
    if not isinstance(k, dict):
        raise ValueError(": expected an object")
    kty, alg, kid, crv = k.get("kty"), k.get("alg", ""), k.get("kid", ""), k.get("crv", "")
    if not all(isinstance(v, str) for v in (kty, alg, kid, crv)):
        raise ValueError(": kty, alg, kid and crv must be strings")
    if kty == "oct":
        raise ValueError(".kty: symmetric (oct) keys are not supported: a JWKS here holds public keys")
    if kty not in _KTY_ALGS:
        raise ValueError(f".kty: unknown key type {kty!r} (RSA, EC or OKP)")
    if alg and alg not in ALGORITHMS:
        raise ValueError(f".alg: unknown or unsupported algorithm {alg!r} (one of: {', '.join(ALGORITHMS)})")
    if alg and alg not in _KTY_ALGS[kty]:
        raise ValueError(f".alg: {alg} is not an algorithm of a {kty} key")
    if kty == "EC" and crv not in _EC_CURVE.values():
        raise ValueError(f".crv: unsupported curve {crv!r} (P-256, P-384 or P-521)")
    if kty == "EC" and alg and _EC_CURVE[alg] != crv:
        raise ValueError(f".alg: {alg} needs curve {_EC_CURVE[alg]}, the key is {crv}")
    if kty == "OKP" and crv not in ("Ed25519", "Ed448"):
        raise ValueError(f".crv: unsupported curve {crv!r} (Ed25519 or Ed448)")
    if "d" in k:
        raise ValueError(": holds a private key ('d'): publish the public key only")
    use = k.get("use", "sig")
    if use != "sig":
        raise ValueError(f".use: {use!r} (a key verifying tokens has use 'sig')")
    try:
        key = jwt.PyJWK(k, alg or _default_alg(kty, crv)).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f": not a usable {kty} key ({e})") from None
    return Jwk(kid, alg, kty, crv, key)


def _default_alg(kty: str, crv: str) -> str:
    if kty == "EC":
        return next(a for a, c in _EC_CURVE.items() if c == crv)
    return _KTY_ALGS[kty][0]
