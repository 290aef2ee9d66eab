"""Request normalisation before authorization, as Istio documents it. Pure.

How this works: the destination's authorization (issue 13) matches policies
against the *normalised* request, and the same normalised path is what is
forwarded, so the app and the policy see one path. :func:`normalize_path`
takes a request target in origin form (``/path?query#fragment``, characters
being the bytes as the HTTP parsers decode them, latin-1) and, per Istio's
mesh-wide ``pathNormalization`` (:class:`PathNormalization`):

1. drops a fragment (``#`` and all after it, query included; CVE-2021-39156,
   Envoy strips it in every mode) and splits the path from the query at the
   first ``?``; the query is kept byte for byte and never normalised;
2. refuses with :class:`NormalizationError` (400), in every mode: a path not
   starting with ``/``; ``%00``; a ``%`` not followed by two hex digits; a
   space or a control character;
3. NONE stops here. The other modes, in Istio's documented order:
   DECODE_AND_MERGE_SLASHES first decodes ``%2F``/``%2f`` to ``/`` and
   ``%5C``/``%5c`` to ``\\`` (Envoy's ``path_with_escaped_slashes_action:
   UNESCAPE_AND_FORWARD``); then, like Envoy's ``normalize_path`` (Chromium's
   path canonicaliser): ``\\`` becomes ``/``; escapes of unreserved characters
   (ALPHA, DIGIT, ``-._~``) are decoded, once, never twice (``%252e`` stays);
   every other escape is kept; ``"<>^`{|}`` and non-ASCII are escaped; the
   segments ``.`` and ``..`` (also ``%2e``, ``.%2E``, …) are removed as RFC 3986
   §5.2.4 does, ``..`` never climbing above the root; MERGE_SLASHES and
   DECODE_AND_MERGE_SLASHES last merge runs of ``/`` into one.

:func:`check_method` refuses a method that is not upper case (400), and
:func:`join_headers` gives the view ``request.headers[...]`` conditions match:
lower-case names, duplicate values joined with ``,`` in order (as Envoy's
``getAllOfHeaderAsString``; HTTP/2 cookie crumbs are the h2 layer's to
reassemble with ``; `` before this).

Where this differs from Envoy (each on purpose; none lets through what Envoy refuses):

- Escapes that are kept are written with upper-case hex (RFC 3986 §6.2.2.1);
  Envoy keeps the client's case, so there a DENY on ``/a%2Fb`` misses
  ``/a%2fb``. Here both are ``/a%2Fb``.
- A malformed escape (``%zz``, ``%4``, a trailing ``%``) is 400; Chromium
  passes it through (and then has to guard against nested escapes such as
  ``%%300``). Also in NONE: a target that is not a valid path is refused in
  every mode, like ``%00``, which Istio refuses always.
- A path that does not start with ``/`` is 400. Istio's table shows ``\\da``
  becoming ``/da`` (Chromium's output); Envoy's connection manager refuses
  such a path (404) before normalising. ``*`` (asterisk form) is accepted only
  when the caller says the method is OPTIONS (``allow_asterisk``).
- Merging turns an all-slash path (``//``) into ``/``; current Envoy's
  ``mergeSlashes`` keeps the leading and trailing slash (``//``).

Like Envoy: ``;`` path parameters are not interpreted, so ``/a/..;/b`` keeps
its ``..;`` segment (a Tomcat backend reads it as ``..``: protect such a
service with ALLOW policies, as Istio's best practices advise); a trailing
``.`` in a name (``/admin.``) is part of the name.

Cost: linear in the target: ``str`` methods, regexes whose alternatives are
fixed-length (no backtracking to exploit), and at most one loop over segments.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable


class PathNormalization(enum.Enum):
    """Istio's ``meshConfig.pathNormalization.normalization`` values (default BASE)."""

    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


class NormalizationError(ValueError):
    """A request refused before authorization; ``status`` is what the client gets (400)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


# Refused in every mode: a space or control character, a '%' not followed by two
# hex digits, or %00. Each alternative is fixed-length: the search is linear.
_INVALID = re.compile(r"[\x00-\x20\x7f]|%(?![0-9A-Fa-f]{2})|%00", re.ASCII)
# What canonicalisation rewrites: an escape, or a character Chromium escapes.
_REWRITE = re.compile(r"%[0-9A-Fa-f]{2}|[\"<>^`{|}\x80-\U0010ffff]")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPED_SLASHES = ("%2F", "%2f", "%5C", "%5c")


def _escape_table() -> dict[str, str]:
    """Every '%hh' spelling -> its canonical form: the character if unreserved, else '%HH'."""
    table: dict[str, str] = {}
    for v in range(256):
        canonical = chr(v) if v in _UNRESERVED else f"%{v:02X}"
        for hi in {f"{v >> 4:X}", f"{v >> 4:x}"}:
            for lo in {f"{v & 15:X}", f"{v & 15:x}"}:
                table[f"%{hi}{lo}"] = canonical
    return table


_ESCAPES = _escape_table()


def _rewrite(m: re.Match[str]) -> str:
    s = m.group()
    canonical = _ESCAPES.get(s)
    if canonical is not None:
        return canonical
    code = ord(s)
    raw = bytes([code]) if code < 256 else s.encode("utf-8", "surrogatepass")
    return "".join(f"%{b:02X}" for b in raw)


def normalize_path(target: str, mode: PathNormalization, *, allow_asterisk: bool = False) -> str:
    """The request target with its path normalised per ``mode`` and its query as sent.

    ``allow_asterisk``: the method is OPTIONS, so the asterisk form ``*`` is valid
    (RFC 9112 §3.2.4) and is returned unchanged. Raises :class:`NormalizationError`
    (400) for a target that is not a valid origin-form path (see the module doc).
    """
    hash_at = target.find("#")
    if hash_at >= 0:
        target = target[:hash_at]
    query_at = target.find("?")
    path, query = (target, "") if query_at < 0 else (target[:query_at], target[query_at:])
    if not path.startswith("/"):
        if target == "*" and allow_asterisk:
            return target
        seen = repr(target[:64]) if target else "an empty target"
        raise NormalizationError(400, f"expected a path starting with '/', got {seen}")
    bad = _INVALID.search(path)
    if bad is not None:
        at = bad.start()
        if bad.group() == "%00":
            raise NormalizationError(400, f"'%00' (NUL) in the path at offset {at}")
        if bad.group() == "%":
            seen = path[at:at + 3]
            raise NormalizationError(
                400, f"malformed percent-encoding {seen!r} at offset {at}: expected '%' and two hex digits"
            )
        seen = bad.group()
        raise NormalizationError(400, f"space or control character {seen!r} in the path at offset {at}")
    if mode is PathNormalization.NONE:
        return path + query
    if mode is PathNormalization.DECODE_AND_MERGE_SLASHES and "%" in path:
        # Valid escapes never overlap (checked above), so replacing is decoding once.
        for escaped in _ESCAPED_SLASHES:
            path = path.replace(escaped, "/")
    path = path.replace("\\", "/")
    if _REWRITE.search(path) is not None:
        path = _REWRITE.sub(_rewrite, path)
    segments = path.split("/")[1:]
    if "." in segments or ".." in segments:
        segments = _remove_dot_segments(segments)
    if mode is not PathNormalization.BASE and "" in segments[:-1]:
        kept = [s for s in segments if s]
        segments = [*kept, ""] if kept and not segments[-1] else kept or [""]
    return "/" + "/".join(segments) + query


def _remove_dot_segments(segments: list[str]) -> list[str]:
    """RFC 3986 §5.2.4 on the segments after the leading '/'; a final dot segment leaves a '/'."""
    out: list[str] = []
    last = len(segments) - 1
    for i, s in enumerate(segments):
        if s == "..":
            if out:
                out.pop()
        elif s != ".":
            out.append(s)
            continue
        if i == last:
            out.append("")
    return out


# Upper-case token characters (RFC 9110 tchar without a-z): what Istio accepts as a method.
_METHOD_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_method(method: str) -> None:
    """Raise :class:`NormalizationError` (400) unless ``method`` is a non-empty upper-case token."""
    if not method or not _METHOD_CHARS.issuperset(method):
        raise NormalizationError(400, f"expected an upper-case method token, got {method[:32]!r}")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def join_headers(headers: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, str]:
    """Header name (ASCII lower case) -> its values in order, joined with ','.

    Bytes are read as latin-1, as the HTTP parsers do.
    """
    joined: dict[str, str] = {}
    for name, value in headers:
        k = (name.decode("latin-1") if isinstance(name, bytes) else name).translate(_ASCII_LOWER)
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        prev = joined.get(k)
        joined[k] = v if prev is None else f"{prev},{v}"
    return joined
