"""RequestAuthentication (JWT) on the testbed (issue 13, "Must show"): resources applied with
`nodemesh apply` as users write them, real agents on two nodes, real eBPF capture and HBONE
mTLS; curl in a pod on n1 calls ``api``, whose pod is on n2, so n2's inbound judges each token.

Two issuers: ``a`` with an inline JWKS (audience ``api``, the payload and a claim forwarded to
the pod as headers, the token itself removed) and ``b`` whose keys the n2 agent fetches from a
``jwksUri`` served by a real HTTP server in pod n2-p2 (tokens in an ``x-b-token: Token ...``
header or a ``b_session`` cookie, forwarded as they came). n2's agent refreshes the JWKS every
2 s (``http.jwks_refresh_s``), so stopping that server makes the agent fail a fetch and keep
the last good keys within the test's time.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from agent import meshbed
from netns import testbed, topology
from tests.integration.conftest import pod_servers, run_prefix
from tests.integration.test_authz_mesh import Mesh, metric, workloads

VIP = "10.96.0.80"
ISS_A = "https://a.example"
ISS_B = "https://b.example"
KEY_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_B = ec.generate_private_key(ec.SECP256R1())
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS_A = json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY_A.public_key())), "kid": "a1"}]})
JWKS_B = json.dumps({"keys": [{**json.loads(ECAlgorithm.to_jwk(KEY_B.public_key())), "kid": "b1"}]})
JWKS_PORT = 8081
REFRESH_S = 2

SERVICES = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: api, namespace: backend}}
spec:
  vip: {VIP}
  selector: {{app: api}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
---
"""
# pod -> (namespace, service account, labels)
ROLES: dict[str, tuple[str, str, dict[str, str]]] = {
    "n1-p1": ("frontend", "web", {"app": "web"}),
    "n2-p1": ("backend", "api", {"app": "api"}),
    "n2-p2": ("auth", "issuer", {"app": "issuer"}),
}

# In n2-p1: HTTP on :8080 answering {"target": ..., "headers": {...}} (names lower case).
SERVER = textwrap.dedent(
    """
    import http.server, json, sys
    NAME, ADDR = sys.argv[1], sys.argv[2]
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            headers = {}
            for k, v in self.headers.items():
                headers[k.lower()] = headers[k.lower()] + "," + v if k.lower() in headers else v
            body = json.dumps({"target": self.path, "headers": headers}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer((ADDR, 8080), H)
    print("ready", flush=True)
    srv.serve_forever()
    """
)

# In n2-p2: the issuer's JWKS at /jwks.json (the file argv[3]); each GET counted in argv[4].
JWKS_SERVER = textwrap.dedent(
    """
    import http.server, sys
    NAME, ADDR, KEYS, HITS = sys.argv[1:5]
    hits = 0
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            global hits
            hits += 1
            with open(HITS, "w") as f:
                f.write(str(hits))
            with open(KEYS, "rb") as f:
                body = f.read()
            self.send_response(200 if self.path == "/jwks.json" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer((ADDR, PORT), H)
    print("ready", flush=True)
    srv.serve_forever()
    """
).replace("PORT", str(JWKS_PORT))


def ra_manifest(jwks_host: str) -> str:
    return f"""apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api-jwt, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: {ISS_A}
    audiences: [api]
    jwks: '{JWKS_A}'
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - {{header: x-jwt-team, claim: org.team}}
  - issuer: {ISS_B}
    jwksUri: http://{jwks_host}:{JWKS_PORT}/jwks.json
    timeout: 2s
    fromHeaders: [{{name: x-b-token, prefix: "Token "}}]
    fromCookies: [b_session]
    forwardOriginalToken: true
"""


NEED_PRINCIPAL = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-need-jwt, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {requestPrincipals: ["https://a.example/*", "https://b.example/*"]}}]
"""


def token(key: Any = KEY_A, alg: str = "RS256", kid: str = "a1", **claims: Any) -> str:
    c = {"iss": ISS_A, "sub": "alice", "aud": "api", "exp": time.time() + 600, "org": {"team": "payments"},
         **claims}
    return jwt.encode(c, key, algorithm=alg, headers={"kid": kid})


def token_b(**claims: Any) -> str:
    return token(KEY_B, "ES256", "b1", iss=ISS_B, sub="bob", aud="any", **claims)


def alg_none() -> str:
    def seg(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{seg({'alg': 'none', 'kid': 'a1'})}.{seg({'iss': ISS_A, 'sub': 'admin', 'aud': 'api'})}."


def tampered() -> str:
    h, p, s = token().split(".")
    return f"{h}.{p}.{s[:20]}{'A' if s[20] != 'A' else 'B'}{s[21:]}"


class JwtMesh(Mesh):
    def __init__(self, bed: meshbed.MeshBed, work: str) -> None:
        super().__init__(bed, work)
        self.hits_path = os.path.join(work, "jwks-hits")
        self.issuer: subprocess.Popen[bytes] | None = None  # the JWKS server's process

    def get(self, *headers: dict[str, str]) -> list[tuple[str, Any]]:
        """One keep-alive curl from n1-p1 per call; (status, the pod's JSON or the body)."""
        rows = self.http("n1-p1", [("GET", f"http://{VIP}/orders?x=1", h) for h in headers])
        return [(code, json.loads(body) if code == "200" else body) for code, body in rows]

    def hits(self) -> int:
        with open(self.hits_path) as f:
            return int(f.read() or 0)

    def count(self, **labels: str) -> float:
        return metric(self.text("n2"), "nodemesh_requestauthn_decisions_total", **labels)


@pytest.fixture(scope="module")
def mesh() -> Iterator[JwtMesh]:
    prefix = run_prefix("j")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    work = f"/run/nodemesh/{prefix}-jwt"
    os.makedirs(work, exist_ok=True)
    keys = os.path.join(work, "jwks.json")
    with open(keys, "w") as f:
        f.write(JWKS_B)
    try:
        with meshbed.running(topo, SERVICES + workloads(topo, ROLES), start_agents=False) as mb:
            mb.node_extra["n2"] = {"http": {"jwks_refresh_s": REFRESH_S}}
            for node in topo.nodes:
                mb.start_agent(node)
            m = JwtMesh(mb, work)
            with pod_servers(topo, SERVER, {"n2-p1": ()}), \
                    pod_servers(topo, JWKS_SERVER, {"n2-p2": (keys, m.hits_path)}) as issuer:
                m.issuer = issuer["n2-p2"]
                assert m.get({})[0][0] == "200"  # no RequestAuthentication yet
                m.apply(ra_manifest(m.address("n2-p2")))
                yield m
    finally:
        testbed.down(prefix)
        shutil.rmtree(work, ignore_errors=True)


def test_tokens_judged_at_the_destination_and_what_the_pod_receives(mesh: JwtMesh) -> None:
    before = {r: mesh.count(result=r) for r in ("valid", "invalid", "missing")}
    expired = mesh.count(policy="backend/api-jwt", result="invalid", reason="expired")
    a = token()
    got = mesh.get(
        {"Authorization": f"Bearer {a}", "X-Jwt-Team": "spoofed"},  # valid
        {"Authorization": f"Bearer {token(exp=time.time() - 300)}"},  # expired (60 s leeway)
        {"Authorization": f"Bearer {token(iss='https://evil.example')}"},  # wrong issuer
        {"Authorization": f"Bearer {token(aud='other')}"},  # wrong audience: 403, as Envoy
        {"Authorization": f"Bearer {tampered()}"},
        {"Authorization": f"Bearer {alg_none()}"},
        {"Authorization": f"Bearer {token(kid='a2')}"},  # unknown kid
        {"Authorization": f"Bearer {token(key=OTHER)}"},  # signed by another key
        {},  # no token: allowed, no principal
    )
    status, pod = got[0]
    assert status == "200", got[0]
    h = pod["headers"]
    assert "authorization" not in h  # forwardOriginalToken false (Istio's default): removed
    payload = json.loads(base64.urlsafe_b64decode(h["x-jwt-payload"] + "=" * (-len(h["x-jwt-payload"]) % 4)))
    assert (payload["iss"], payload["sub"]) == (ISS_A, "alice")
    assert h["x-jwt-team"] == "payments"  # outputClaimToHeaders: the verified claim, not the client's
    assert pod["target"] == "/orders?x=1"
    assert got[1:8] == [
        ("401", "Jwt is expired\n"),
        ("401", "Jwt issuer is not configured\n"),
        ("403", "Audiences in Jwt are not allowed\n"),
        ("401", "Jwt verification fails\n"),
        ("401", "Jwt header [alg] field value is invalid\n"),
        ("401", "Jwks doesn't have key to match kid or alg from Jwt\n"),
        ("401", "Jwt verification fails\n"),
    ]
    assert got[8][0] == "200" and "x-jwt-payload" not in got[8][1]["headers"]
    # counted at the destination, and the refusal logged with the resource and reason
    assert mesh.count(result="valid") - before["valid"] == 1
    assert mesh.count(result="invalid") - before["invalid"] == 7
    assert mesh.count(result="missing") - before["missing"] == 1
    assert mesh.count(policy="backend/api-jwt", result="invalid", reason="expired") - expired == 1
    assert ("jwt: 401 for a request to backend/n2-p1, RequestAuthentication backend/api-jwt: "
            "Jwt is expired (expired)") in mesh.log("n2")


def test_jwks_uri_fetched_cached_and_kept_when_the_server_stops(mesh: JwtMesh) -> None:
    b = token_b()
    deadline = time.monotonic() + 10  # the agent fetches the keys as soon as it sees the resource
    while (got := mesh.get({"X-B-Token": f"Token {b}"}))[0][0] != "200":
        assert got[0] == ("401", "Jwks remote fetch is failed\n"), got
        assert time.monotonic() < deadline, "the jwksUri keys were never fetched"
        time.sleep(0.2)
    hits = mesh.hits()
    assert hits >= 1  # (fetched from the issuer's server)
    rows = mesh.get(*[{"X-B-Token": f"Token {b}"}] * 20, {"Cookie": f"theme=dark; b_session={b}"},
                    {"X-B-Token": b},  # without the prefix: not b's place, so no token: allowed
                    {"Authorization": f"Bearer {b}"})  # the default place is a's only
    assert [s for s, _ in rows[:22]] == ["200"] * 22, rows
    assert rows[0][1]["headers"]["x-b-token"] == f"Token {b}"  # forwardOriginalToken: true
    assert f"b_session={b}" in rows[20][1]["headers"]["cookie"]
    assert rows[22] == ("401", "Jwt issuer is not configured\n")
    assert mesh.hits() - hits <= 3  # cached: fetched every 2 s, not per request
    # the issuer's server goes away: a refresh (due 2 s after the last, started by a request)
    # fails, and the last good keys keep serving
    assert mesh.issuer is not None
    mesh.issuer.kill()
    mesh.issuer.wait()
    failed = f"jwt: fetching the JWKS at http://{mesh.address('n2-p2')}:{JWKS_PORT}/jwks.json failed"
    deadline = time.monotonic() + 2 * REFRESH_S + 5
    while failed not in mesh.log("n2"):
        assert time.monotonic() < deadline, "the agent never tried to fetch again"
        assert mesh.get({"X-B-Token": f"Token {b}"})[0][0] == "200"
        time.sleep(0.2)
    assert f"{failed}: " in mesh.log("n2") and "keeping the last good keys" in mesh.log("n2")
    assert [s for s, _ in mesh.get({"X-B-Token": f"Token {b}"}, {"Authorization": f"Bearer {token()}"})] \
        == ["200", "200"]


def test_missing_token_denied_only_when_a_policy_requires_a_request_principal(mesh: JwtMesh) -> None:
    mesh.apply(NEED_PRINCIPAL)
    try:
        got = mesh.get({}, {"Authorization": f"Bearer {token()}"}, {"Authorization": "Basic YTpi"})
        assert [s for s, _ in got] == ["403", "200", "403"], got
        assert got[0][1] == "RBAC: access denied\n"
        r = mesh.bed.cli("explain", "--from", "frontend/n1-p1", "GET", f"http://{VIP}/orders",
                         "--registry-dir", mesh.bed.registry_dir, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "jwt:        at backend/n2-p1: RequestAuthentication backend/api-jwt" in r.stdout, r.stdout
        assert "a token is required" in r.stdout, r.stdout
    finally:
        mesh.delete("backend/api-need-jwt")
    assert mesh.get({})[0][0] == "200"
