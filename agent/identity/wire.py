"""The CA service protocol, sans-I/O: one JSON object per line, over mutual TLS 1.3.

Requests (node agent → CA service)::

    {"v": 1, "op": "sign", "csr": "<PEM CSR with one SPIFFE URI SAN>", "ttl_s": 86400}
    {"v": 1, "op": "bundle"}

Responses (one line each, in order)::

    {"v": 1, "ok": true, "cert": "<PEM leaf>", "chain": ["<PEM root>"]}
    {"v": 1, "ok": true, "bundle": "<PEM roots>"}
    {"v": 1, "ok": false, "error": "<code>", "message": "<what was expected, what was seen>"}

Error codes: ``bad_request`` (not our JSON), ``bad_csr`` (CSR or TTL refused),
``not_placed`` (the registry does not place that workload on the asking node),
``unauthenticated`` (the client cert is not a node of this trust domain),
``internal``. A line is at most :data:`MAX_LINE_BYTES`; a connection may carry
several requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.identity.errors import CaServiceError

VERSION = 1
MAX_LINE_BYTES = 64 * 1024
ERROR_CODES = frozenset({"bad_request", "bad_csr", "not_placed", "unauthenticated", "internal"})


@dataclass(frozen=True, slots=True)
class SignRequest:
    csr_pem: bytes
    ttl_s: int


@dataclass(frozen=True, slots=True)
class BundleRequest:
    pass


Request = SignRequest | BundleRequest


@dataclass(frozen=True, slots=True)
class SignResponse:
    cert_pem: bytes
    chain_pem: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BundleResponse:
    bundle_pem: bytes


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"expected an error code in {sorted(ERROR_CODES)}, got {self.code!r}")


Response = SignResponse | BundleResponse | ErrorResponse


def _line(doc: dict[str, Any]) -> bytes:
    data = json.dumps({"v": VERSION, **doc}, separators=(",", ":"), sort_keys=True).encode("ascii") + b"\n"
    if len(data) > MAX_LINE_BYTES:
        raise CaServiceError(f"CA protocol: line of {len(data)} bytes exceeds {MAX_LINE_BYTES}",
                             code="internal")
    return data


def _object(line: bytes, what: str) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES:
        raise CaServiceError(f"{what}: expected at most {MAX_LINE_BYTES} bytes, got {len(line)}",
                             code="bad_request")
    try:
        doc = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CaServiceError(f"{what}: expected one ASCII JSON object per line ({e})", code="bad_request") \
            from None
    if not isinstance(doc, dict):
        raise CaServiceError(f"{what}: expected a JSON object, got {type(doc).__name__}", code="bad_request")
    if doc.get("v") != VERSION:
        raise CaServiceError(f"{what}: expected protocol version {VERSION}, got {doc.get('v')!r}",
                             code="bad_request")
    return doc


def _str(doc: dict[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value.isascii():
        raise CaServiceError(f"{what}: expected ASCII string field {key!r}, got {type(value).__name__}",
                             code="bad_request")
    return value


def encode_request(req: Request) -> bytes:
    if isinstance(req, SignRequest):
        return _line({"op": "sign", "csr": req.csr_pem.decode("ascii"), "ttl_s": req.ttl_s})
    return _line({"op": "bundle"})


def decode_request(line: bytes) -> Request:
    doc = _object(line, "CA request")
    op = doc.get("op")
    if op == "bundle":
        return BundleRequest()
    if op != "sign":
        raise CaServiceError(f"CA request: expected op 'sign' or 'bundle', got {op!r}", code="bad_request")
    ttl = doc.get("ttl_s")
    if not isinstance(ttl, int) or isinstance(ttl, bool):
        raise CaServiceError(f"CA request: expected integer ttl_s, got {ttl!r}", code="bad_request")
    return SignRequest(csr_pem=_str(doc, "csr", "CA request").encode("ascii"), ttl_s=ttl)


def encode_response(resp: Response) -> bytes:
    if isinstance(resp, SignResponse):
        return _line({"ok": True, "cert": resp.cert_pem.decode("ascii"),
                      "chain": [c.decode("ascii") for c in resp.chain_pem]})
    if isinstance(resp, BundleResponse):
        return _line({"ok": True, "bundle": resp.bundle_pem.decode("ascii")})
    return _line({"ok": False, "error": resp.code, "message": resp.message})


def decode_response(line: bytes) -> Response:
    doc = _object(line, "CA response")
    if doc.get("ok") is False:
        code = doc.get("error")
        return ErrorResponse(code if code in ERROR_CODES else "internal", str(doc.get("message", ""))[:1000])
    if doc.get("ok") is not True:
        raise CaServiceError(f"CA response: expected ok true/false, got {doc.get('ok')!r}",
                             code="bad_request")
    if "bundle" in doc:
        return BundleResponse(_str(doc, "bundle", "CA response").encode("ascii"))
    chain = doc.get("chain")
    if not isinstance(chain, list) or not all(isinstance(c, str) and c.isascii() for c in chain):
        raise CaServiceError("CA response: expected 'chain' as a list of PEM strings", code="bad_request")
    cert = _str(doc, "cert", "CA response").encode("ascii")
    return SignResponse(cert, tuple(c.encode("ascii") for c in chain))
