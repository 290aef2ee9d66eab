"""RequestAuthentication enforced at the destination, on loopback: a real HTTP client through
outbound -> HBONE (mTLS) -> inbound to a pod on another node, and to a same-node pod (judged by
the source agent), with a RequestAuthentication and an AuthorizationPolicy that requires a
request principal: no token 403, a bad token 401 with Envoy's challenge, a valid one 200 and
the pod never sees the token (forwardOriginalToken false, Istio's default)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from agent.control.authz import AuthorizationPolicy, Rule, Source
from agent.control.reqauthn import JwtRule, RequestAuthentication
from agent.dataplane.route import Directory
from tests.component.harness import VIP, http_pod, http_service, metric, run, two_node_mesh, workload
from tests.component.test_http_loopback import CLIENT, keepalive_requests

ISS = "https://issuer.example"
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [{**json.loads(ECAlgorithm.to_jwk(KEY.public_key())), "kid": "k1"}]})
WEB = {"app": "web"}


def token(key: Any = KEY, **claims: Any) -> str:
    c = {"iss": ISS, "sub": "alice", "aud": "web", "exp": time.time() + 300, **claims}
    return jwt.encode(c, key, algorithm="ES256", headers={"kid": "k1"})


def test_jwt_at_the_destination_remote_and_same_node() -> None:
    ws = [workload("client", CLIENT, "n1", sa="client"),
          workload("web-1", "127.0.0.31", "n2", sa="web", labels=WEB),
          workload("web-2", "127.0.0.32", "n1", sa="web", labels=WEB)]
    pods = [http_pod("127.0.0.31", 9000, "web-1"), http_pod("127.0.0.32", 9000, "web-2")]
    rule = JwtRule(ISS, audiences=("web",), jwks=JWKS, output_payload_to_header="x-jwt")
    ra = RequestAuthentication("web-jwt", "default", (("app", "web"),), (rule,))
    need = AuthorizationPolicy("need-jwt", "default", "ALLOW", (("app", "web"),),
                               (Rule(sources=(Source(request_principals=(f"{ISS}/*",)),)),))

    async def go() -> None:
        async with two_node_mesh(ws, [http_service()]) as mesh:
            mesh.original_dst[(CLIENT, 0)] = (VIP, 80)
            n1, n2 = mesh.nodes["n1"], mesh.nodes["n2"]
            snap = mesh.directory.snapshot
            mesh.directory = Directory.build(dataclasses.replace(
                snap, revision=snap.revision + 1, request_authentications={("default", "web-jwt"): ra},
                authorization_policies={("default", "need-jwt"): need}))

            def get(headers: dict[str, str] | None = None, path: str = "/") -> tuple[int, dict[str, Any],
                                                                                   dict[str, str]]:
                (out,) = keepalive_requests(n1.outbound_port, 1, path, "GET", headers)
                return out

            pods_seen: dict[int, set[str]] = {}
            for _ in range(2):  # round robin: once to each pod
                status, doc, _ = await asyncio.to_thread(get)
                assert (status, doc["raw"]) == (403, "RBAC: access denied\n")  # no token: no principal
                bad = {"expired": token(exp=time.time() - 120), "tampered": token(key=OTHER),
                       "wrong issuer": token(iss="https://evil.example"), "malformed": "abc"}
                reasons = {"expired": "Jwt is expired", "tampered": "Jwt verification fails",
                           "wrong issuer": "Jwt issuer is not configured",
                           "malformed": "Jwt is not in the form of Header.Payload.Signature with two "
                                        "dots and 3 sections"}
                for name, t in bad.items():
                    status, doc, headers = await asyncio.to_thread(
                        get, {"Authorization": f"Bearer {t}"}, "/p?q=1")
                    assert (status, doc["raw"]) == (401, reasons[name] + "\n"), name
                    assert headers["www-authenticate"] == \
                        'Bearer realm="http://web.default/p", error="invalid_token"', name
                status, doc, _ = await asyncio.to_thread(get, {"Authorization": f"Bearer {token(aud='x')}"})
                assert (status, doc["raw"]) == (403, "Audiences in Jwt are not allowed\n")
                # valid: 200; the pod sees no Authorization header, and the verified payload
                status, doc, _ = await asyncio.to_thread(
                    get, {"Authorization": f"Bearer {token()}", "X-Jwt": "spoofed"})
                assert status == 200, doc
                assert "authorization" not in doc["headers"], doc
                payload = doc["headers"]["x-jwt"]
                assert json.loads(jwt.utils.base64url_decode(payload))["sub"] == "alice"
                pods_seen.setdefault(status, set()).add(doc["pod"])
            assert pods_seen[200] == {"web-1", "web-2"}  # remote (inbound) and same node (outbound)
            # counted as the destination answered: 401s with no flag, 403 RBAC for the missing token
            assert metric(n2, "istio_requests_total", reporter="destination", response_code="401",
                          response_flags="-") == 4
            assert metric(n2, "nodemesh_authz_decisions_total", policy="default/need-jwt", action="ALLOW",
                          result="allowed") == 1
            # no RequestAuthentication any more: the token is not read, so no principal: 403
            snap = mesh.directory.snapshot
            mesh.directory = Directory.build(dataclasses.replace(
                snap, revision=snap.revision + 1, request_authentications={}))
            for _ in range(2):
                status, _, _ = await asyncio.to_thread(get, {"Authorization": f"Bearer {token()}"})
                assert status == 403

    try:
        run(go())
    finally:
        for p in pods:
            p.shutdown()
            p.server_close()
