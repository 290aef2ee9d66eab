"""Istio's RequestAuthentication from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``security.istio.io/v1``, ``v1beta1``), ``kind`` and
``metadata`` and hands the ``spec`` mapping here. A field Istio has and nodemesh
does not implement (``targetRef(s)``) is refused by name; what Istio would only find out
when a request comes is checked now: an inline ``jwks`` must be a JSON Web Key
Set of public RSA, EC or OKP keys with known algorithms
(:func:`agent.control.reqauthn.parse_jwks`), a ``jwksUri`` an ``http`` or
``https`` URL with a host (plain http is accepted, as Istio does, for in-mesh
issuers), exactly one of the two (nodemesh does no OpenID discovery from the
issuer), header and cookie names valid, issuers unique within a resource, each
``outputClaimToHeaders`` header named once, ``timeout`` a positive Istio duration.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from agent.control.reqauthn import (
    DEFAULT_TIMEOUT_S,
    HeaderLocation,
    JwtRule,
    RequestAuthentication,
    parse_jwks,
)
from agent.control.validate import _Doc, _map, _tname
from agent.control.validate_authz import non_empty_string, workload_selector
from agent.control.validate_istio import _HEADER_NAME_RE, _fields, _list, _timeout

_TARGET = ("is not supported: RequestAuthentications apply to workloads by selector (nodemesh has "
           "no waypoints or gateways to attach them to)")
_SPEC_REFUSED = {"targetRef": _TARGET, "targetRefs": _TARGET}
_RULE_FIELDS = ("issuer", "audiences", "jwks", "jwksUri", "fromHeaders", "fromParams", "fromCookies",
                "forwardOriginalToken", "outputPayloadToHeader", "outputClaimToHeaders", "timeout")
_CLAIM_RE = re.compile(r"[^\s.]+(\.[^\s.]+)*\Z")  # a.b.c: claim c of claim b of claim a
_MAX_JWKS_CHARS = 64 * 1024


def request_authentication(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> RequestAuthentication:
    _fields(doc, spec, "spec", ("selector", "jwtRules"), _SPEC_REFUSED)
    selector = workload_selector(doc, spec)
    rules = []
    seen: dict[str, int] = {}
    for i, r in enumerate(_list(doc, spec, "jwtRules", "spec")):
        path = f"spec.jwtRules[{i}]"
        rule = _rule(doc, _map(doc, r, path), path)
        if rule.issuer in seen:
            raise doc.fail(f"{path}.issuer", f"issuer {rule.issuer!r} is already in "
                           f"jwtRules[{seen[rule.issuer]}]", hint="one rule per issuer")
        seen[rule.issuer] = i
        rules.append(rule)
    return RequestAuthentication(name, ns, selector, tuple(rules), f"{doc.file}:{doc.start_line}")


def _rule(doc: _Doc, m: Mapping[str, Any], path: str) -> JwtRule:
    _fields(doc, m, path, _RULE_FIELDS)
    issuer = m.get("issuer")
    if issuer is None:
        raise doc.fail(f"{path}.issuer", "missing required field 'issuer'")
    issuer = non_empty_string(doc, issuer, f"{path}.issuer")
    audiences = tuple(non_empty_string(doc, a, f"{path}.audiences[{i}]")
                      for i, a in enumerate(_list(doc, m, "audiences", path)))
    jwks = m.get("jwks")
    uri = m.get("jwksUri")
    if jwks is not None and uri is not None:
        raise doc.fail(f"{path}.jwksUri", "give jwks or jwksUri, not both")
    if jwks is None and uri is None:
        raise doc.fail(path, "needs jwks or jwksUri (nodemesh does not discover keys from the "
                       "issuer's OpenID configuration)", hint="jwksUri: https://issuer.example/.well-known/jwks.json")
    if jwks is not None:
        jwks = non_empty_string(doc, jwks, f"{path}.jwks")
        if len(jwks) > _MAX_JWKS_CHARS:
            raise doc.fail(f"{path}.jwks", f"is {len(jwks)} characters (at most {_MAX_JWKS_CHARS})")
        try:
            parse_jwks(jwks)
        except ValueError as e:
            raise doc.fail(f"{path}.jwks", f"the JWKS {e}") from None
    if uri is not None:
        uri = _uri(doc, uri, f"{path}.jwksUri")
    headers = []
    for i, h in enumerate(_list(doc, m, "fromHeaders", path)):
        hpath = f"{path}.fromHeaders[{i}]"
        hm = _map(doc, h, hpath)
        _fields(doc, hm, hpath, ("name", "prefix"))
        if hm.get("name") is None:
            raise doc.fail(f"{hpath}.name", "missing required field 'name'")
        prefix = hm.get("prefix", "")
        if not isinstance(prefix, str):
            raise doc.fail(f"{hpath}.prefix", f"expected a string, got {_tname(prefix)} {prefix!r}")
        headers.append(HeaderLocation(_header(doc, hm["name"], f"{hpath}.name"), prefix))
    params = tuple(non_empty_string(doc, p, f"{path}.fromParams[{i}]")
                   for i, p in enumerate(_list(doc, m, "fromParams", path)))
    forward = m.get("forwardOriginalToken", False)
    if not isinstance(forward, bool):
        raise doc.fail(f"{path}.forwardOriginalToken",
                       f"expected true or false, got {_tname(forward)} {forward!r}")
    output = m.get("outputPayloadToHeader")
    output = "" if output is None else _header(doc, output, f"{path}.outputPayloadToHeader")
    cookies = tuple(_cookie(doc, c, f"{path}.fromCookies[{i}]")
                    for i, c in enumerate(_list(doc, m, "fromCookies", path)))
    claims = _claim_headers(doc, m, path, output)
    timeout_s = DEFAULT_TIMEOUT_S
    if m.get("timeout") is not None:
        t = _timeout(doc, m, path)
        if t is None:
            raise doc.fail(f"{path}.timeout", "a JWKS fetch needs a timeout above 0s", hint="like 5s")
        timeout_s = t
    return JwtRule(issuer, audiences, jwks or "", uri or "", tuple(headers), params, forward, output,
                   cookies, claims, timeout_s)


def _cookie(doc: _Doc, v: Any, path: str) -> str:
    s = non_empty_string(doc, v, path)
    if not _HEADER_NAME_RE.match(s):  # (a cookie name is an RFC 7230 token, as a header name)
        raise doc.fail(path, f"{s!r} is not a cookie name")
    return s


def _claim_headers(
    doc: _Doc, m: Mapping[str, Any], path: str, payload_header: str,
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, o in enumerate(_list(doc, m, "outputClaimToHeaders", path)):
        opath = f"{path}.outputClaimToHeaders[{i}]"
        om = _map(doc, o, opath)
        _fields(doc, om, opath, ("header", "claim"))
        for key in ("header", "claim"):
            if om.get(key) is None:
                raise doc.fail(f"{opath}.{key}", f"missing required field '{key}'")
        header = _header(doc, om["header"], f"{opath}.header")
        if header in seen:
            raise doc.fail(f"{opath}.header", f"header {header!r} is already set by "
                           f"outputClaimToHeaders[{seen[header]}]", hint="each header once (Istio's rule)")
        if header == payload_header or header.startswith(":") or header in ("host", "authorization"):
            raise doc.fail(f"{opath}.header", f"{header!r} cannot carry a claim")
        claim = non_empty_string(doc, om["claim"], f"{opath}.claim")
        if not _CLAIM_RE.match(claim):
            raise doc.fail(f"{opath}.claim", f"{claim!r} is not a claim name (no spaces; '.' only "
                           "between the names of a nested claim)")
        seen[header] = i
        out.append((header, claim))
    return tuple(out)


def _header(doc: _Doc, v: Any, path: str) -> str:
    s = non_empty_string(doc, v, path)
    if not _HEADER_NAME_RE.match(s):
        raise doc.fail(path, f"{s!r} is not an HTTP header name")
    return s.lower()


def _uri(doc: _Doc, v: Any, path: str) -> str:
    s = non_empty_string(doc, v, path)
    try:
        u = urllib.parse.urlsplit(s)
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise doc.fail(path, f"{s!r} is not a URL ({e})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise doc.fail(path, f"{s!r}: expected an http or https URL with a host",
                       hint="e.g. https://issuer.example/.well-known/jwks.json")
    if u.username is not None or u.fragment or not s.isascii() or any(c.isspace() for c in s):
        raise doc.fail(path, f"{s!r}: a JWKS URL has no user, fragment, spaces or non-ASCII characters")
    return s
