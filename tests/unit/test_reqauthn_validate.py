"""Istio's RequestAuthentication as users write it: parsed strictly (file, line and field for
every refusal), stored and read back unchanged, applied all or nothing, in snapshots, and shown
by the CLI (get/describe/delete, short name ra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from agent.cli.main import cli
from agent.control.apply import _dump, plan
from agent.control.authz import applicable
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.model import Kind, resource_key
from agent.control.reqauthn import (
    HeaderLocation,
    JwtRule,
    RequestAuthentication,
    request_authentication_doc,
    request_authentication_from_doc,
    rules_of,
)
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import Located, parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")
EC_JWK = {**json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())),
          "kid": "k1", "alg": "ES256", "use": "sig"}
RSA_PRIVATE_JWK = json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537,
                                                                         key_size=2048)))
JWKS = json.dumps({"keys": [EC_JWK]})

RA = f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: web-jwt, namespace: shop}}
spec:
  selector:
    matchLabels: {{app: web}}
  jwtRules:
  - issuer: https://issuer.example
    audiences: [web, "https://web.example"]
    jwks: '{JWKS}'
    fromHeaders:
    - name: X-Jwt
      prefix: "Token "
    - name: x-other
    fromParams: [jwt]
    forwardOriginalToken: true
    outputPayloadToHeader: X-Jwt-Payload
    fromCookies: [session]
    outputClaimToHeaders:
    - {{header: X-Jwt-Sub, claim: sub}}
    - {{header: x-jwt-team, claim: org.team}}
  - issuer: https://other.example
    jwksUri: https://other.example/.well-known/jwks.json
    timeout: 1500ms
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def parse(text: str, file: str = "ra.yaml") -> list[Located]:
    return parse_yaml(text, file, NET)


def ra(text: str = RA) -> RequestAuthentication:
    (loc,) = parse(text)
    assert isinstance(loc.resource, RequestAuthentication)
    return loc.resource


def test_full_resource_parses_and_round_trips() -> None:
    r = ra()
    assert (r.name, r.namespace, r.selector, r.source) == ("web-jwt", "shop", (("app", "web"),), "ra.yaml:1")
    first, second = r.jwt_rules
    assert first == JwtRule(
        issuer="https://issuer.example", audiences=("web", "https://web.example"), jwks=JWKS,
        from_headers=(HeaderLocation("x-jwt", "Token "), HeaderLocation("x-other")), from_params=("jwt",),
        forward_original_token=True, output_payload_to_header="x-jwt-payload", from_cookies=("session",),
        output_claim_to_headers=(("x-jwt-sub", "sub"), ("x-jwt-team", "org.team")))
    assert first.locations() == ((HeaderLocation("x-jwt", "Token "), HeaderLocation("x-other")), ("jwt",),
                                 ("session",))
    assert second == JwtRule("https://other.example", jwks_uri="https://other.example/.well-known/jwks.json",
                             timeout_s=1.5)
    assert second.locations() == ((HeaderLocation("authorization", "Bearer "),), ("access_token",), ())
    # a cookie alone is a place of its own: the defaults are then not read
    assert JwtRule("i", jwks=JWKS, from_cookies=("c",)).locations() == ((), (), ("c",))
    assert ra(RA.replace("    timeout: 1500ms\n", "")).jwt_rules[1].timeout_s == 5.0  # Istio's default
    assert request_authentication_from_doc(json.loads(_dump(r))) == r
    assert request_authentication_from_doc(request_authentication_doc(r)) == r
    beta = ra(RA.replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n"))
    assert beta == r
    # no selector: the whole namespace; no rules at all is allowed (Istio accepts it)
    head = RA.split("  selector:")[0]
    assert ra(head.replace("spec:\n", "spec: {}\n")).jwt_rules == ()
    # plain http jwksUri (in-mesh issuers), as Istio accepts
    plain = ra(RA.replace("https://other.example/.well", "http://127.0.0.1:8080/.well"))
    assert plain.jwt_rules[1].jwks_uri == "http://127.0.0.1:8080/.well-known/jwks.json"


def test_which_resources_apply_and_the_first_rule_per_issuer() -> None:
    shop = RequestAuthentication("a", "shop", (("app", "web"),), (JwtRule("i1", jwks=JWKS),))
    mesh = RequestAuthentication("m", "istio-system", None,
                                 (JwtRule("i1", jwks="x"), JwtRule("i2", jwks=JWKS)))
    other = RequestAuthentication("o", "other", None, (JwtRule("i3", jwks=JWKS),))
    got = applicable([mesh, shop, other], "shop", {"app": "web"})
    assert got == [mesh, shop]
    assert applicable([shop], "shop", {"app": "db"}) == []
    assert [(r.issuer, r.jwks) for r in rules_of([shop, mesh])] == [("i1", JWKS), ("i2", JWKS)]


def _set(old: str, new: str) -> str:
    assert old in RA, old
    return RA.replace(old, new, 1)


def _jwks(keys: object) -> str:
    return _set(f"jwks: '{JWKS}'", f"jwks: '{json.dumps(keys)}'")


R0 = "spec.jwtRules[0]"
# (text, the text on the failing line, field path, reason)
REFUSED: dict[str, tuple[str, str, str, str]] = {
    "no issuer": (_set("- issuer: https://issuer.example\n    audiences:", "- audiences:"), "- audiences:",
                  R0 + ".issuer", "missing required field 'issuer'"),
    "empty issuer": (_set("issuer: https://issuer.example", 'issuer: ""'), 'issuer: ""', R0 + ".issuer",
                     "expected a non-empty string"),
    "duplicate issuer": (_set("issuer: https://other.example", "issuer: https://issuer.example  # again"),
                         "# again", "spec.jwtRules[1].issuer",
                         "issuer 'https://issuer.example' is already in jwtRules[0]"),
    "jwks not JSON": (_set(f"jwks: '{JWKS}'", "jwks: '{keys: nope'"), "jwks:", R0 + ".jwks",
                      "the JWKS is not JSON"),
    "jwks not a key set": (_jwks([EC_JWK]), "jwks:", R0 + ".jwks", "is not a JSON Web Key Set"),
    "jwks without keys": (_jwks({"keys": []}), "jwks:", R0 + ".jwks", "the JWKS has no keys"),
    "unknown alg": (_jwks({"keys": [{**EC_JWK, "alg": "ES999"}]}), "jwks:", R0 + ".jwks",
                    "keys[0].alg: unknown or unsupported algorithm 'ES999'"),
    "alg none in a key": (_jwks({"keys": [{**EC_JWK, "alg": "none"}]}), "jwks:", R0 + ".jwks",
                          "unknown or unsupported algorithm 'none'"),
    "alg of another key type": (_jwks({"keys": [{**EC_JWK, "alg": "RS256"}]}), "jwks:", R0 + ".jwks",
                                "keys[0].alg: RS256 is not an algorithm of a EC key"),
    "HMAC key": (_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}), "jwks:", R0 + ".jwks",
                 "symmetric (oct) keys are not supported"),
    "private key": (_jwks({"keys": [RSA_PRIVATE_JWK]}), "jwks:", R0 + ".jwks", "holds a private key"),
    "broken key": (_jwks({"keys": [{**EC_JWK, "x": "AAAA"}]}), "jwks:", R0 + ".jwks",
                   "keys[0]: not a usable EC key"),
    "both jwks and jwksUri": (_set("    fromParams: [jwt]\n", "    fromParams: [jwt]\n    jwksUri: https://x/j\n"),
                              "jwksUri: https://x/j", R0 + ".jwksUri", "give jwks or jwksUri, not both"),
    "neither jwks nor jwksUri": (_set("    jwksUri: https://other.example/.well-known/jwks.json\n", ""),
                                 "- issuer: https://other.example", "spec.jwtRules[1]",
                                 "needs jwks or jwksUri"),
    "jwksUri not http": (_set("jwksUri: https://other.example", "jwksUri: ftp://other.example"),
                         "jwksUri:", "spec.jwtRules[1].jwksUri", "expected an http or https URL with a host"),
    "jwksUri without host": (_set("jwksUri: https://other.example/.well-known/jwks.json", "jwksUri: https:///x"),
                             "jwksUri:", "spec.jwtRules[1].jwksUri", "expected an http or https URL"),
    "jwksUri bad port": (_set("jwksUri: https://other.example/", "jwksUri: https://other.example:99999/"),
                         "jwksUri:", "spec.jwtRules[1].jwksUri", "is not a URL"),
    "header name": (_set("name: X-Jwt", 'name: "X Jwt"'), "name: \"X Jwt\"", R0 + ".fromHeaders[0].name",
                    "is not an HTTP header name"),
    "header without name": (_set("    - name: x-other\n", "    - prefix: x\n"), "- prefix: x",
                            R0 + ".fromHeaders[1].name", "missing required field 'name'"),
    "header field": (_set("    - name: x-other\n", "    - {name: x-other, value: y}\n"), "{name: x-other",
                     R0 + ".fromHeaders[1].value", "unknown field 'value'"),
    "empty param": (_set("fromParams: [jwt]", 'fromParams: [""]'), "fromParams:", R0 + ".fromParams[0]",
                    "expected a non-empty string"),
    "forward not bool": (_set("forwardOriginalToken: true", 'forwardOriginalToken: "yes"'),
                         "forwardOriginalToken:", R0 + ".forwardOriginalToken", "expected true or false"),
    "payload header": (_set("outputPayloadToHeader: X-Jwt-Payload", "outputPayloadToHeader: 'a:b'"),
                       "outputPayloadToHeader:", R0 + ".outputPayloadToHeader", "is not an HTTP header name"),
    "claim header twice": (_set("claim: org.team}",
                                "claim: org.team}\n    - {header: X-JWT-SUB, claim: iss}"),
                           "X-JWT-SUB", R0 + ".outputClaimToHeaders[2].header",
                           "header 'x-jwt-sub' is already set by outputClaimToHeaders[0]"),
    "claim header is the payload header": (_set("header: x-jwt-team", "header: x-jwt-payload"),
                                           "header: x-jwt-payload", R0 + ".outputClaimToHeaders[1].header",
                                           "'x-jwt-payload' cannot carry a claim"),
    "claim header authorization": (_set("header: x-jwt-team", "header: Authorization"),
                                   "header: Authorization", R0 + ".outputClaimToHeaders[1].header",
                                   "'authorization' cannot carry a claim"),
    "claim header name": (_set("header: x-jwt-team", "header: 'x jwt'"), "header: 'x jwt'",
                          R0 + ".outputClaimToHeaders[1].header", "is not an HTTP header name"),
    "claim missing": (_set("{header: x-jwt-team, claim: org.team}", "{header: x-jwt-team}"),
                      "{header: x-jwt-team}", R0 + ".outputClaimToHeaders[1].claim",
                      "missing required field 'claim'"),
    "claim name": (_set("claim: org.team", "claim: org..team"), "org..team",
                   R0 + ".outputClaimToHeaders[1].claim", "is not a claim name"),
    "claim field": (_set("claim: org.team}", "claim: org.team, value: x}"), "value: x",
                    R0 + ".outputClaimToHeaders[1].value", "unknown field 'value'"),
    "cookie name": (_set("fromCookies: [session]", "fromCookies: ['a;b']"), "fromCookies:",
                    R0 + ".fromCookies[0]", "is not a cookie name"),
    "cookies not a list": (_set("fromCookies: [session]", "fromCookies: session"), "fromCookies:",
                           R0 + ".fromCookies", "expected a list"),
    "timeout without unit": (_set("timeout: 1500ms", "timeout: 5"), "timeout: 5", "spec.jwtRules[1].timeout",
                             "is not a duration"),
    "timeout zero": (_set("timeout: 1500ms", "timeout: 0s"), "timeout: 0s", "spec.jwtRules[1].timeout",
                     "a JWKS fetch needs a timeout above 0s"),
    "targetRef": (_set("  jwtRules:\n", "  targetRef: {kind: Gateway, name: gw}\n  jwtRules:\n"),
                  "targetRef:", "spec.targetRef", "targetRef is not supported"),
    "targetRefs": (_set("  jwtRules:\n", "  targetRefs: [{kind: Gateway, name: gw}]\n  jwtRules:\n"),
                   "targetRefs:", "spec.targetRefs", "targetRefs is not supported"),
    "unknown rule field": (_set("    fromParams: [jwt]\n", "    fromParam: [jwt]\n"), "fromParam:",
                           R0 + ".fromParam", "unknown field 'fromParam'"),
    "selector field": (_set("matchLabels:", "labels:"), "labels:", "spec.selector.labels",
                       "unknown field 'labels'"),
    "networking api": (_set("security.istio.io/v1", "networking.istio.io/v1"), "kind:", "kind",
                       "kind RequestAuthentication does not exist in networking.istio.io/v1"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_file_line_field_and_reason(case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    with pytest.raises(InputError) as ei:
        parse(text)
    e = ei.value
    expected = line_of(text, on_line)
    assert (e.file, e.line, e.path) == ("ra.yaml", expected, path), str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"ra.yaml:{expected} at {path}: "), str(e)


def test_apply_atomic_unchanged_and_snapshot() -> None:
    (loc,) = parse(RA)
    p = plan({}, [loc], NET)
    assert p.created == ("RequestAuthentication shop/web-jwt",)
    key = resource_key(Kind.REQUEST_AUTHENTICATION, "shop", "web-jwt")
    assert key == "/nodemesh/registry/requestauthentication/shop/web-jwt" and key in p.puts
    assert plan(p.puts, [loc], NET).unchanged == ("RequestAuthentication shop/web-jwt",)
    b = SnapshotBuilder()
    b.reset(p.puts)
    s1 = b.build(1)
    assert s1.request_authentications[("shop", "web-jwt")] == loc.resource
    b.apply({}, (key,))
    assert b.build(2).request_authentications == {}
    # a stored value that does not decode is skipped; the rest keeps serving
    b.apply({key: p.puts[key], resource_key(Kind.REQUEST_AUTHENTICATION, "shop", "bad"): '{"name": 1}'}, ())
    assert list(b.build(3).request_authentications) == [("shop", "web-jwt")]


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


@pytest.mark.parametrize("case", ["unknown alg", "jwks not JSON", "claim header twice", "jwksUri not http"])
def test_bad_input_applies_nothing(tmp_path: Path, case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    good = RA.replace("web-jwt", "good")
    full = good + "---\n" + text
    f.write_text(full)
    code, out = run(["apply", "-f", str(f)], reg)
    expected = len(good.splitlines()) + 1 + line_of(text, on_line)
    assert code == 2 and f"error: {f}:{expected} at {path}: " in out, out
    assert reason in out, out
    assert EmbeddedBackend(reg).read().items == {}


def test_cli_get_describe_delete(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "ra.yaml"
    f.write_text(RA)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "RequestAuthentication shop/web-jwt created" in out, out
    code, out = run(["get", "ra", "-n", "shop"], reg)
    assert code == 0, out
    header, row = out.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "SELECTOR", "ISSUERS", "KEYS", "SOURCE"]
    assert row.split() == ["shop", "web-jwt", "app=web", "https://issuer.example,https://other.example",
                           "inline,https://other.example/.well-known/jwks.json", f"{f}:1"], out
    code, out = run(["get", "requestauthentications", "-A", "-o", "json"], reg)
    assert code == 0 and [d["name"] for d in json.loads(out)] == ["web-jwt"], out
    code, out = run(["describe", "requestauthentication", "web-jwt", "-n", "shop", "-o", "json"], reg)
    doc = json.loads(out)
    assert code == 0 and doc["source"] == f"{f}:1" and doc["jwtRules"][0]["forwardOriginalToken"] is True
    code, out = run(["describe", "ra", "nope", "-n", "shop"], reg)
    assert code == 3 and "RequestAuthentication shop/nope not found" in out, out
    assert "nodemesh get requestauthentications -A" in out, out
    code, out = run(["delete", "ra", "web-jwt", "-n", "shop"], reg)
    assert code == 0 and "RequestAuthentication shop/web-jwt deleted" in out, out
    code, out = run(["get", "ra", "-A", "-o", "json"], reg)
    assert code == 0 and json.loads(out) == [], out
