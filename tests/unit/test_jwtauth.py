"""RequestAuthentication's token check (agent.dataplane.jwtauth), with keys made by
``cryptography`` and tokens signed by pyjwt: what is accepted, what is 401 (or 403) with
Envoy's reason, where tokens are found, what the destination forwards, and the JWKS of a
jwksUri fetched from a real HTTP server on 127.0.0.1, kept when a later fetch fails."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from agent.control.reqauthn import HeaderLocation, Jwk, JwtRule, parse_jwks
from agent.dataplane import jwtauth
from agent.dataplane.jwtauth import JwksCache, JwtError, Outcome, authenticate, plan

NOW = 1_800_000_000.0
ISS = "https://issuer.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str, **extra: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPublicKey):
        text = RSAAlgorithm.to_jwk(key)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        text = ECAlgorithm.to_jwk(key)
    else:
        text = OKPAlgorithm.to_jwk(key)
    d: dict[str, Any] = json.loads(text)
    return {**d, "kid": kid, **extra}


JWKS = json.dumps({"keys": [jwk(RSA_KEY.public_key(), "rsa1", alg="RS256"), jwk(EC_KEY.public_key(), "ec1"),
                            jwk(ED_KEY.public_key(), "ed1")]})


def token(claims: dict[str, Any] | None = None, key: Any = RSA_KEY, alg: str = "RS256", kid: str = "rsa1",
          **headers: Any) -> str:
    c = {"iss": ISS, "sub": "alice", "aud": ["web"], "exp": NOW + 300, "nbf": NOW - 10, "azp": "cli",
         "groups": ["admins"]}
    c.update(claims or {})
    return jwt.encode({k: v for k, v in c.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": kid, **headers})


def rule(**kw: Any) -> JwtRule:
    return JwtRule(**{"issuer": ISS, "jwks": JWKS, **kw})


def keys_of(r: JwtRule) -> Sequence[Jwk] | None:
    return parse_jwks(r.jwks) if r.jwks else None


def run(rules: Sequence[JwtRule], headers: dict[str, str], query: str = "", now: float = NOW) -> Outcome:
    return authenticate(plan(rules), headers, query, keys_of, now)


def refused(rules: Sequence[JwtRule], headers: dict[str, str], query: str = "") -> JwtError:
    with pytest.raises(JwtError) as ei:
        run(rules, headers, query)
    return ei.value


def bearer(t: str) -> dict[str, str]:
    return {"authorization": f"Bearer {t}"}


def test_valid_tokens_give_the_request_principal_audiences_presenter_and_claims() -> None:
    for key, alg, kid in ((RSA_KEY, "RS256", "rsa1"), (EC_KEY, "ES256", "ec1"), (ED_KEY, "EdDSA", "ed1")):
        o = run([rule()], bearer(token(key=key, alg=alg, kid=kid)))
        assert o.identity is not None, alg
        assert o.identity.principal == f"{ISS}/alice"
        assert o.identity.audiences == ("web",) and o.identity.presenter == "cli"
        assert o.identity.claims["groups"] == ["admins"]
    # no kid in the token: every key of a fitting type is tried; a scheme in any case (RFC 6750)
    o = run([rule()], {"authorization": "bearer " + jwt.encode({"iss": ISS, "sub": "bob"}, RSA_KEY, "RS256")})
    assert o.identity is not None and o.identity.principal == f"{ISS}/bob" and o.identity.audiences == ()
    # a string aud, and the audience rule matched without scheme or trailing slash (jwt_verify_lib)
    o = run([rule(audiences=("https://web/",))], bearer(token({"aud": "web"})))
    assert o.identity is not None and o.identity.audiences == ("web",)


def test_invalid_tokens_are_refused_with_envoys_reason() -> None:
    r = [rule(audiences=("web",))]
    cases = {
        "expired": (token({"exp": NOW - 61}), jwtauth.EXPIRED, 401),
        "not yet valid": (token({"nbf": NOW + 61}), jwtauth.NOT_YET_VALID, 401),
        "wrong issuer": (token({"iss": "https://evil.example"}), jwtauth.UNKNOWN_ISSUER, 401),
        "no issuer": (token({"iss": None}), jwtauth.UNKNOWN_ISSUER, 401),
        "wrong audience": (token({"aud": ["other"]}), jwtauth.AUDIENCE, 403),
        "no audience": (token({"aud": None}), jwtauth.AUDIENCE, 403),
        "unknown kid": (token(kid="rsa2"), jwtauth.NO_KEY, 401),
        "signed by another key": (token(key=OTHER_RSA), jwtauth.BAD_SIGNATURE, 401),
        "ES256 header on an RSA key": (token(key=EC_KEY, alg="ES256", kid="rsa1"), jwtauth.NO_KEY, 401),
        "malformed": ("abc.def", jwtauth.BAD_FORMAT, 401),
        "not base64": ("!!!.???.***", jwtauth.BAD_HEADER, 401),
        "exp not a number": (token({"exp": "tomorrow"}), jwtauth.BAD_EXP, 401),
        "exp NaN (never expiring)": (token({"exp": float("nan")}), jwtauth.BAD_EXP, 401),
        "nbf -Infinity": (token({"nbf": float("-inf")}), jwtauth.BAD_NBF, 401),
    }
    for name, (t, reason, status) in cases.items():
        e = refused(r, bearer(t))
        assert (e.reason, e.status) == (reason, status), name
    # the leeway: 60 s either side
    assert run(r, bearer(token({"exp": NOW - 59, "nbf": NOW + 59}))).identity is not None


def test_tampered_signature_and_payload() -> None:
    h, p, s = token().split(".")
    flipped = s[:10] + ("A" if s[10] != "A" else "B") + s[11:]
    assert refused([rule()], bearer(f"{h}.{p}.{flipped}")).reason == jwtauth.BAD_SIGNATURE
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refused([rule()], bearer(f"{h}.{forged}.{s}")).reason == jwtauth.BAD_SIGNATURE


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    def seg(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    return f"{seg(json.dumps(header).encode())}.{seg(json.dumps(claims).encode())}.{seg(signature)}"


def test_alg_none_and_hmac_with_the_public_key_are_refused() -> None:
    claims = {"iss": ISS, "sub": "admin", "exp": NOW + 300}
    for alg in ("none", "None", "NONE"):
        e = refused([rule()], bearer(_unsigned({"alg": alg, "kid": "rsa1"}, claims)))
        assert e.reason == jwtauth.BAD_ALG, alg
    # the classic confusion: HS256 "signed" with the RSA public key (PEM) as the HMAC secret
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    unsigned = _unsigned({"alg": "HS256", "kid": "rsa1"}, claims)
    head = unsigned.rsplit(".", 1)[0]
    mac = hmac.new(pem, head.encode(), hashlib.sha256).digest()
    forged = head + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert refused([rule()], bearer(forged)).reason == jwtauth.BAD_ALG
    assert refused([rule()], bearer(_unsigned({"alg": "XY999"}, claims))).reason == jwtauth.BAD_ALG


def test_missing_token_passes_without_a_principal() -> None:
    o = run([rule()], {"x-other": "1"})
    assert o == Outcome(None, None)
    # 'Basic' credentials are not a bearer token: nothing to verify
    assert run([rule()], {"authorization": "Basic YTpi"}).identity is None


def test_from_headers_with_prefix_and_from_params() -> None:
    r = rule(from_headers=(HeaderLocation("x-jwt", "Token "),), from_params=("jwt",))
    t = token()
    o = run([r], {"x-jwt": f"Token {t}"})
    assert o.identity is not None and o.edit is not None and o.edit.drop == {b"x-jwt"}
    assert run([r], {"x-jwt": t}).identity is None  # without the prefix: not this place's token
    assert run([r], bearer(t)).identity is None  # the default place is not read when others are set
    o = run([r], {}, f"a=1&jwt={t}")
    assert o.identity is not None and o.edit is None  # (a query parameter stays, as in Envoy)
    assert refused([r], {}, "jwt=" + token({"exp": NOW - 100})).reason == jwtauth.EXPIRED
    # defaults: Authorization: Bearer, then ?access_token=
    assert run([rule()], {}, f"access_token={t}").identity is not None
    # a token of issuer B in a place only issuer A reads is not B's
    b = JwtRule("https://b.example", jwks=JWKS, from_headers=(HeaderLocation("x-b"),))
    tb = token({"iss": "https://b.example"})
    assert run([rule(), b], {"x-b": tb}).identity is not None
    assert refused([rule(), b], bearer(tb)).reason == jwtauth.UNKNOWN_ISSUER
    # every token carried must be valid
    assert refused([rule(), b], {**bearer(t), "x-b": "x.y.z"}).status == 401


def test_forward_original_token_and_output_payload_to_header() -> None:
    t = token()
    sent = [(b"authorization", f"Bearer {t}".encode()), (b"x-payload", b"spoofed"), (b"accept", b"*/*")]
    o = run([rule(output_payload_to_header="x-payload")], bearer(t))
    assert o.edit is not None
    out = o.edit.apply(sent)
    assert out[0] == (b"accept", b"*/*") and out[1][0] == b"x-payload"
    assert [k for k, _ in out] == [b"accept", b"x-payload"]  # token removed (Istio's default)
    payload = json.loads(base64.urlsafe_b64decode(out[1][1] + b"=" * (-len(out[1][1]) % 4)))
    assert payload["sub"] == "alice" and payload["iss"] == ISS
    # forwardOriginalToken: the token stays
    o = run([rule(forward_original_token=True)], bearer(t))
    assert o.edit is None
    # no token: a payload header the client wrote is still removed
    o = run([rule(output_payload_to_header="x-payload")], {})
    assert o.edit is not None and o.edit.apply(sent[1:]) == [(b"accept", b"*/*")]


# -- jwksUri -----------------------------------------------------------------------------------


class _Jwks(BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[ThreadingHTTPServer]:
    _Jwks.body, _Jwks.hits = JWKS.encode(), 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Jwks)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(5)


def test_jwks_uri_fetched_cached_refreshed_and_kept_when_a_fetch_fails(
    jwks_server: ThreadingHTTPServer,
) -> None:
    uri = f"http://127.0.0.1:{jwks_server.server_address[1]}/jwks.json"
    clock = [0.0]
    cache = JwksCache(clock=lambda: clock[0], refresh_s=100, retry_s=10, timeout_s=2)
    r = rule(jwks="", jwks_uri=uri)

    def keys(rr: JwtRule) -> Sequence[Jwk] | None:
        return cache.keys(rr.jwks_uri)

    async def main() -> None:
        # before the first fetch: a token of that issuer is refused (no request waits)
        with pytest.raises(JwtError) as e:
            authenticate(plan([r]), bearer(token()), "", keys, NOW)
        assert e.value.reason == jwtauth.FETCH_FAILED
        for _ in range(200):  # the background fetch lands
            if cache.keys(uri) is not None:
                break
            await asyncio.sleep(0.01)
        assert _Jwks.hits == 1
        assert authenticate(plan([r]), bearer(token()), "", keys, NOW).identity is not None
        cache.keys(uri)
        await asyncio.sleep(0.05)
        assert _Jwks.hits == 1  # cached: no fetch per request
        # the server goes away; the refresh fails; the last good keys are kept
        jwks_server.shutdown()
        jwks_server.server_close()
        clock[0] = 150.0
        assert await cache.refresh(uri) is False
        assert authenticate(plan([r]), bearer(token()), "", keys, NOW).identity is not None
        # a set that does not parse is a failed fetch too
        bad = JwksCache(fetch=lambda u: _value(b"{not json"))
        assert await bad.refresh(uri) is False and bad.keys(uri) is None

    asyncio.run(main())


async def _value(b: bytes) -> bytes:
    return b


def test_unknown_kid_refetches_at_most_once_a_minute() -> None:
    fetched: list[str] = []
    sets = [JWKS, json.dumps({"keys": [jwk(OTHER_RSA.public_key(), "rsa2")]})]

    async def fetch(uri: str) -> bytes:
        fetched.append(uri)
        return sets[min(len(fetched), len(sets)) - 1].encode()

    clock = [0.0]
    cache = JwksCache(fetch=fetch, clock=lambda: clock[0])

    async def main() -> None:
        assert await cache.refresh("https://k") is True
        ks = cache.keys("https://k")
        assert ks is not None and {k.kid for k in ks} == {"rsa1", "ec1", "ed1"}
        clock[0] = 30.0
        cache.unknown_key("https://k")  # within a minute of the last fetch: nothing
        await asyncio.sleep(0)
        assert len(fetched) == 1
        clock[0] = 61.0
        cache.unknown_key("https://k")
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(fetched) == 2
        ks = cache.keys("https://k")
        assert ks is not None and {k.kid for k in ks} == {"rsa2"}  # the rotated set

    asyncio.run(main())


# -- fromCookies, outputClaimToHeaders, timeout --------------------------------------------------


def test_from_cookies_finds_the_token_and_leaves_the_cookie() -> None:
    r = rule(from_cookies=("session",))
    t = token()
    # among other cookies, over two Cookie headers (joined with ',' as join_headers does)
    o = run([r], {"cookie": f"theme=dark; session={t},lang=en"})
    assert o.identity is not None and o.identity.principal == f"{ISS}/alice"
    assert o.edit is None  # the cookie stays, as in Envoy (as a query parameter does)
    assert run([r], {"cookie": f'session="{t}"'}).identity is not None  # a quoted value
    assert run([r], {"cookie": f"xsession={t}"}).identity is None  # another cookie's name
    assert run([r], bearer(t)).identity is None  # a cookie rule does not read the default places
    assert refused([r], {"cookie": "session=" + token({"exp": NOW - 100})}).reason == jwtauth.EXPIRED
    # only the issuers naming the cookie are accepted from it
    b = JwtRule("https://b.example", jwks=JWKS, from_cookies=("b",))
    assert refused([r, b], {"cookie": f"b={t}"}).reason == jwtauth.UNKNOWN_ISSUER
    assert jwtauth.cookies("a=1; a=2; ;=x; b") == {"a": "1"}


def test_output_claim_to_headers_copies_verified_claims_only() -> None:
    r = rule(output_claim_to_headers=(("x-sub", "sub"), ("x-team", "org.team"), ("x-level", "level"),
                                      ("x-admin", "admin"), ("x-groups", "groups"), ("x-none", "nope"),
                                      ("x-evil", "evil")))
    t = token({"org": {"team": "payments"}, "level": 3, "admin": True, "evil": "a\r\nx-injected: 1"})
    sent = [(b"authorization", f"Bearer {t}".encode()), (b"x-team", b"spoofed"), (b"x-none", b"spoofed"),
            (b"accept", b"*/*")]
    o = run([r], bearer(t))
    assert o.edit is not None
    out = o.edit.apply(sent)
    assert out == [(b"accept", b"*/*"), (b"x-sub", b"alice"), (b"x-team", b"payments"), (b"x-level", b"3"),
                   (b"x-admin", b"true")]  # lists, missing claims and control characters: not copied
    # no token or an invalid one: the client's copies are removed all the same
    o = run([r], {})
    assert o.edit is not None and o.edit.apply(sent[1:]) == [(b"accept", b"*/*")]
    assert jwtauth.claim_value({"a": {"b": 1.5}, "s": "é"}, "a.b") == "1.5"
    assert jwtauth.claim_value({"s": "é"}, "s") == "é"


def test_a_rules_timeout_bounds_its_jwks_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, float]] = []

    def fetch_url(uri: str, timeout_s: float = 0.0) -> bytes:
        asked.append((uri, timeout_s))
        return JWKS.encode()

    monkeypatch.setattr(jwtauth, "fetch_url", fetch_url)

    async def main() -> None:
        cache = JwksCache()
        cache.keys("https://a/jwks", 1.5)  # (as JwtAuthn.keys passes the rule's timeout)
        cache.keys("https://b/jwks")
        assert await cache.refresh("https://a/jwks") and await cache.refresh("https://b/jwks")
        cache.close()

    asyncio.run(main())
    # (keys() in a running loop fetches in the background too: every fetch had its timeout)
    assert set(asked) == {("https://a/jwks", 1.5), ("https://b/jwks", jwtauth.FETCH_TIMEOUT_S)}
    authn = jwtauth.JwtAuthn(lambda: None, cache=JwksCache(fetch=lambda u: _value(b"")))  # type: ignore[arg-type,return-value]
    authn.keys(rule(jwks="", jwks_uri="https://c/jwks", timeout_s=2.5))
    assert authn.cache._timeout("https://c/jwks") == 2.5


def test_a_server_not_speaking_http_is_a_failed_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.client
    import urllib.request

    class Opener:
        def open(self, req: Any, timeout: float) -> Any:
            raise http.client.BadStatusLine("SSH-2.0-OpenSSH")

    monkeypatch.setattr(urllib.request, "build_opener", lambda *a: Opener())
    with pytest.raises(OSError, match="not an HTTP answer: BadStatusLine"):
        jwtauth.fetch_url("http://127.0.0.1:1/jwks")


# -- outcomes counted and logged -----------------------------------------------------------------


def test_outcomes_counted_and_refusals_logged_with_the_resource(caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import logging

    from prometheus_client import CollectorRegistry

    from agent.control.model import Workload
    from agent.control.reqauthn import RequestAuthentication
    from agent.control.snapshot import SnapshotBuilder
    from agent.dataplane.http.exchange import LocalReply
    from agent.dataplane.route import Directory
    from agent.metrics.istio import MeshMetrics

    w = Workload(name="web-1", namespace="shop", address="10.244.2.9", node="n2", service_account="web",
                 labels={"app": "web"})
    ra = RequestAuthentication("web-jwt", "shop", (("app", "web"),), (rule(),))
    directory = Directory.build(dataclasses.replace(SnapshotBuilder().build(1),
                                                    request_authentications={("shop", "web-jwt"): ra}))
    reg = CollectorRegistry()
    authn = jwtauth.JwtAuthn(lambda: directory, metrics=MeshMetrics(reg), clock=lambda: NOW)

    def judge(headers: dict[str, str]) -> int:
        try:
            authn.judge(w, list(headers.items()), "/p?x=1", "web.shop")
        except LocalReply as r:
            return r.status
        return 200

    def count(policy: str, result: str, reason: str) -> float:
        v = reg.get_sample_value("nodemesh_requestauthn_decisions_total",
                                 {"policy": policy, "result": result, "reason": reason})
        return v or 0.0

    caplog.set_level(logging.INFO, logger="agent.dataplane.jwtauth")
    assert judge(bearer(token())) == 200
    assert judge({}) == 200
    assert [judge(bearer(token({"exp": NOW - 100}))) for _ in range(3)] == [401] * 3
    assert judge(bearer(token({"iss": "https://evil.example"}))) == 401
    assert judge(bearer(token({"aud": "x"}))) == 200  # (no audiences in this rule)
    assert count("shop/web-jwt", "valid", "-") == 2
    assert count("-", "missing", "-") == 1
    assert count("shop/web-jwt", "invalid", "expired") == 3
    assert count("-", "invalid", "unknown_issuer") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.dataplane.jwtauth"]
    assert lines == [  # three expired tokens: one line (rate limited per resource and reason)
        "jwt: 401 for a request to shop/web-1, RequestAuthentication shop/web-jwt: Jwt is expired (expired)",
        "jwt: 401 for a request to shop/web-1, RequestAuthentication shop/web-jwt (the token's issuer is "
        "not one of theirs, or not yet known): Jwt issuer is not configured (unknown_issuer)",
    ], lines


def test_agent_yaml_jwks_refresh_reaches_the_authorizers_cache() -> None:
    from prometheus_client import CollectorRegistry

    from agent.config import ConfigError, from_mapping
    from agent.dataplane.authorize import Authorizer
    from agent.metrics.istio import MeshMetrics

    base = {"node": "n1", "addresses": {"proxy": "127.0.0.1"}}
    assert from_mapping(base).http.jwks_refresh_s == 1200.0  # Istio's 20 minutes
    cfg = from_mapping({**base, "http": {"jwks_refresh_s": 2}})
    az = Authorizer(lambda: None, MeshMetrics(CollectorRegistry()),  # type: ignore[arg-type,return-value]
                    jwks_refresh_s=cfg.http.jwks_refresh_s)
    assert az.jwt.cache.refresh_s == 2.0 and az.jwt.cache.retry_s == 2.0  # (a retry never later)
    for bad in (0, "20m", True):
        with pytest.raises(ConfigError) as e:
            from_mapping({**base, "http": {"jwks_refresh_s": bad}}, source="agent.yaml")
        assert "agent.yaml: http.jwks_refresh_s: expected a number between 1 and 86400" in str(e.value)


def test_a_long_query_is_read_not_refused() -> None:
    t = token()
    many = "&".join(f"a{i}=1" for i in range(500))
    assert run([rule()], {}, f"access_token={t}&{many}").identity is not None
    assert run([rule()], {}, f"{many}&access_token={t}").identity is None  # (past the first 100)
    assert jwtauth.query_params("a=1&b=%2F+x&a=2&c&=v") == {"a": ["1", "2"], "b": ["/ x"], "": ["v"]}


def test_deeply_nested_json_is_a_bad_token_or_a_bad_key_set() -> None:
    deep = base64.urlsafe_b64encode(b"[" * 30000).rstrip(b"=").decode()
    h, p, s = token().split(".")
    assert refused([rule()], bearer(f"{deep}.{p}.{s}")).reason == jwtauth.BAD_HEADER
    assert refused([rule()], bearer(f"{h}.{deep}.{s}")).reason == jwtauth.BAD_PAYLOAD
    with pytest.raises(ValueError, match="is not JSON"):
        parse_jwks('{"keys": ' + "[" * 30000)


# -- hostile input: a verdict or JwtError, nothing else ------------------------------------------

_SEGMENT = st.one_of(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/.", max_size=40),
    st.builds(lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode(), st.binary(max_size=60)),
    st.builds(lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode(),
              st.dictionaries(st.sampled_from(["alg", "kid", "iss", "exp", "nbf", "aud", "sub"]),
                              st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                        st.text(max_size=8), st.sampled_from(["RS256", "ES256", "none", ISS]),
                                        st.lists(st.text(max_size=4), max_size=3)), max_size=6)),
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_SEGMENT, min_size=1, max_size=4), query=st.text(max_size=60),
       cookie=st.text(max_size=60))
def test_any_token_query_or_cookie_gives_an_outcome_or_a_jwt_error(parts: list[str], query: str,
                                                                    cookie: str) -> None:
    r = rule(from_params=("t",), from_headers=(HeaderLocation("authorization", "Bearer "),),
             from_cookies=("c",), output_claim_to_headers=(("x-sub", "sub"),))
    t = ".".join(parts)
    for headers, q in (({"authorization": f"Bearer {t}"}, query), ({"cookie": f"c={t}; {cookie}"}, ""),
                       ({}, f"t={t}&{query}")):
        try:
            o = run([r], headers, q)
        except JwtError as e:
            assert e.status in (401, 403) and e.reason in jwtauth.REASON_CODES
        else:
            assert isinstance(o, Outcome)
