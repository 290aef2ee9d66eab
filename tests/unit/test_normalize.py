"""Path and request normalisation (issue 13 point 3): Istio's table and its bypass CVEs.

The corpus gives, for each request target, the expected result in each of the
four modes (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES), or 400. Every
expected path is also checked against a character-by-character model of Envoy's
pipeline (unescape slashes, Chromium's path canonicaliser, merge slashes), so the
table and the model vouch for each other; Hypothesis then compares the module
with the model on generated targets and checks idempotence.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, from_mapping
from agent.dataplane.http.normalize import (
    NormalizationError,
    PathNormalization,
    check_method,
    join_headers,
    normalize_path,
)

MODES = (
    PathNormalization.NONE,
    PathNormalization.BASE,
    PathNormalization.MERGE_SLASHES,
    PathNormalization.DECODE_AND_MERGE_SLASHES,
)
E400 = 400


Want = str | int  # the normalised target, or the status of the refusal


def row(target: str, none: Want, base: Want, merge: Want, decode: Want, why: str) -> object:
    return pytest.param(target, (none, base, merge, decode), id=why)


def same(target: str, why: str) -> object:
    return row(target, target, target, target, target, why)


def refused(target: str, why: str) -> object:
    return row(target, E400, E400, E400, E400, why)


CORPUS = [
    # Istio's pathNormalization table (security best practices) and the normalisation reference page
    row("/a/../b", "/a/../b", "/b", "/b", "/b", "istio-table-dot-dot"),
    row("/a//b", "/a//b", "/a//b", "/a/b", "/a/b", "istio-table-merge"),
    row("/a%2fb", "/a%2fb", "/a%2Fb", "/a%2Fb", "/a/b", "istio-table-decode"),
    row("/../%2Fa../b", "/../%2Fa../b", "/%2Fa../b", "/%2Fa../b", "/a../b", "istio-table-none-example"),
    refused("../%2Fa../b", "istio-table-none-example-relative"),
    refused("\\da", "istio-table-backslash-first-refused"),
    row("/some%2fdata/%61%62%63", "/some%2fdata/%61%62%63", "/some%2Fdata/abc", "/some%2Fdata/abc",
        "/some/data/abc", "istio-ref-percent"),
    row("/some\\data", "/some\\data", "/some/data", "/some/data", "/some/data", "istio-ref-backslash"),
    row("/some//data///abc", "/some//data///abc", "/some//data///abc", "/some/data/abc", "/some/data/abc",
        "istio-ref-multiple-slashes"),
    row("/public/./data/abc/../xyz", "/public/./data/abc/../xyz", "/public/data/xyz", "/public/data/xyz",
        "/public/data/xyz", "istio-ref-dots"),
    same("/foo?v=1", "istio-ref-query-kept"),
    row("/%41%62%7e%5f%2D%30", "/%41%62%7e%5f%2D%30", "/Ab~_-0", "/Ab~_-0", "/Ab~_-0",
        "istio-ref-unreserved"),
    # CVE-2021-31920 (ISTIO-SECURITY-2021-005): escaped slashes and backslashes
    row("/public/..%2Fadmin", "/public/..%2Fadmin", "/public/..%2Fadmin", "/public/..%2Fadmin", "/admin",
        "cve-2021-31920-2F"),
    row("/public/..%2fadmin", "/public/..%2fadmin", "/public/..%2Fadmin", "/public/..%2Fadmin", "/admin",
        "cve-2021-31920-2f"),
    row("/public/..%5Cadmin", "/public/..%5Cadmin", "/public/..%5Cadmin", "/public/..%5Cadmin", "/admin",
        "cve-2021-31920-5C"),
    row("/public/..%5cadmin", "/public/..%5cadmin", "/public/..%5Cadmin", "/public/..%5Cadmin", "/admin",
        "cve-2021-31920-5c"),
    row("/api%2Fadmin", "/api%2Fadmin", "/api%2Fadmin", "/api%2Fadmin", "/api/admin",
        "cve-2021-31920-one-segment"),
    # CVE-2021-29492: Envoy's own advisory example
    row("/something%2F..%2Fadmin", "/something%2F..%2Fadmin", "/something%2F..%2Fadmin",
        "/something%2F..%2Fadmin", "/admin", "cve-2021-29492-envoy-escaped-slashes"),
    row("/a/%2e%2e%2f..%2fadmin", "/a/%2e%2e%2f..%2fadmin", "/a/..%2F..%2Fadmin", "/a/..%2F..%2Fadmin",
        "/admin", "cve-2021-31920-dots-and-slashes"),
    row("/%5C%5Cevil.com/", "/%5C%5Cevil.com/", "/%5C%5Cevil.com/", "/%5C%5Cevil.com/", "/evil.com/",
        "cve-2021-31920-escaped-backslashes"),
    row("/a%2F%2F../b", "/a%2F%2F../b", "/a%2F%2F../b", "/a%2F%2F../b", "/a/b",
        "decode-then-dots-then-merge"),
    row("/%252F", "/%252F", "/%252F", "/%252F", "/%252F", "decode-once-2F"),
    # CVE-2021-39156 (ISTIO-SECURITY-2021-008, GHSA-hqxw-mm44-gc4r): a fragment is dropped in every mode
    row("/admin#/../public", "/admin", "/admin", "/admin", "/admin", "cve-2021-39156-fragment-dots"),
    row("/user/profile#abc", "/user/profile", "/user/profile", "/user/profile", "/user/profile",
        "cve-2021-39156-fragment"),
    row("/a?x=1#frag", "/a?x=1", "/a?x=1", "/a?x=1", "/a?x=1", "cve-2021-39156-fragment-after-query"),
    row("/a#?x=1", "/a", "/a", "/a", "/a", "cve-2021-39156-fragment-before-query"),
    # CVE-2019-9901: dot segments
    row("/public/../admin", "/public/../admin", "/admin", "/admin", "/admin", "cve-2019-9901-dot-dot"),
    row("/public/../../admin", "/public/../../admin", "/admin", "/admin", "/admin",
        "cve-2019-9901-above-root"),
    row("/./admin", "/./admin", "/admin", "/admin", "/admin", "cve-2019-9901-dot"),
    row("/a/b/../../..", "/a/b/../../..", "/", "/", "/", "dots-to-root"),
    # escaped dots
    row("/public/%2e%2e/admin", "/public/%2e%2e/admin", "/admin", "/admin", "/admin", "escaped-dots-lower"),
    row("/public/%2E%2E/admin", "/public/%2E%2E/admin", "/admin", "/admin", "/admin", "escaped-dots-upper"),
    row("/public/.%2e/admin", "/public/.%2e/admin", "/admin", "/admin", "/admin", "escaped-dots-mixed"),
    row("/public/%2e/admin", "/public/%2e/admin", "/public/admin", "/public/admin", "/public/admin",
        "escaped-dot"),
    row("/public/%252e%252e/admin", "/public/%252e%252e/admin", "/public/%252e%252e/admin",
        "/public/%252e%252e/admin", "/public/%252e%252e/admin", "double-encoded-dots-not-decoded"),
    # Tomcat path parameters: not interpreted (as Envoy)
    row("/public/..;/admin", "/public/..;/admin", "/public/..;/admin", "/public/..;/admin",
        "/public/..;/admin", "dot-dot-semicolon-kept"),
    same("/admin;jsessionid=1", "path-parameter-kept"),
    # mixed-case escapes: kept ones become upper-case
    row("/a%3fb", "/a%3fb", "/a%3Fb", "/a%3Fb", "/a%3Fb", "escaped-question-mark"),
    row("/a%2Fb%2fc", "/a%2Fb%2fc", "/a%2Fb%2Fc", "/a%2Fb%2Fc", "/a/b/c", "mixed-case-slashes"),
    row("/%7E%7euser", "/%7E%7euser", "/~~user", "/~~user", "/~~user", "mixed-case-tilde"),
    # %00 and malformed escapes: 400 in every mode; the query is not looked at
    refused("/admin%00", "nul-escape"),
    refused("/a%00/../b", "nul-escape-before-dots"),
    refused("/a%2F%00", "nul-escape-after-slash"),
    same("/a?x=%00", "nul-escape-in-query-untouched"),
    refused("/a%zz", "malformed-escape"),
    refused("/a%4", "short-escape"),
    refused("/a%", "trailing-percent"),
    refused("/%%32%65", "nested-escape"),
    # backslashes
    row("/public\\..\\admin", "/public\\..\\admin", "/admin", "/admin", "/admin", "backslash-dots"),
    row("/\\admin", "/\\admin", "//admin", "/admin", "/admin", "backslash-after-slash"),
    row("/a\\\\b", "/a\\\\b", "/a//b", "/a/b", "/a/b", "two-backslashes"),
    # trailing dots
    row("/admin/.", "/admin/.", "/admin/", "/admin/", "/admin/", "trailing-dot-segment"),
    row("/admin/..", "/admin/..", "/", "/", "/", "trailing-dot-dot-segment"),
    row("/admin/%2e", "/admin/%2e", "/admin/", "/admin/", "/admin/", "trailing-escaped-dot"),
    same("/admin.", "trailing-dot-in-name"),
    same("/admin/...", "three-dots-a-name"),
    same("/.well-known/x", "dot-prefixed-name"),
    # slashes and dots together: RFC 3986 first, merging last (Istio's order)
    row("/a//../b", "/a//../b", "/a/b", "/a/b", "/a/b", "dots-before-merge"),
    row("//", "//", "//", "/", "/", "only-slashes"),
    row("/a//", "/a//", "/a//", "/a/", "/a/", "trailing-double-slash"),
    row("/a/../b?x=/../c//d", "/a/../b?x=/../c//d", "/b?x=/../c//d", "/b?x=/../c//d", "/b?x=/../c//d",
        "query-never-normalised"),
    # characters Chromium escapes; spaces and controls refused
    row('/a"b<c>', '/a"b<c>', "/a%22b%3Cc%3E", "/a%22b%3Cc%3E", "/a%22b%3Cc%3E", "escaped-specials"),
    row("/caf\xe9", "/caf\xe9", "/caf%E9", "/caf%E9", "/caf%E9", "latin-1-byte"),
    refused("/a b", "space"),
    refused("/a\tb", "tab"),
    refused("/a\x7f", "delete"),
    refused("/a\x00b", "nul-byte"),
    # not origin form
    refused("", "empty"),
    refused("*", "asterisk-without-options"),
    refused("http://evil/admin", "absolute-form"),
    refused("admin", "relative"),
    # very long paths
    same("/a" * 4000, "long-plain"),
    row("/.." * 2000 + "/admin", "/.." * 2000 + "/admin", "/admin", "/admin", "/admin", "long-dot-dots"),
    row("/" * 5000 + "admin", "/" * 5000 + "admin", "/" * 5000 + "admin", "/admin", "/admin", "long-slashes"),
    row("/%2e" * 3000 + "/x", "/%2e" * 3000 + "/x", "/x", "/x", "/x", "long-escaped-dots"),
]


# -- a character-by-character model of Envoy's pipeline (test oracle) ---------------------------------

_HEX = "0123456789abcdefABCDEF"
_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_CHROMIUM_ESCAPES = set('"#<>^`{|}')


def _model(target: str, mode: PathNormalization) -> Want:
    """Envoy: strip fragment; unescape slashes; Chromium canonicalisation; merge slashes.

    Plus this module's documented differences: 400 for what is not a valid path,
    upper-case hex in kept escapes, an all-slash path merged to '/'.
    """
    target = target.split("#", 1)[0]
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        return E400
    i = 0
    while i < len(path):
        c = path[i]
        if c <= " " or c == "\x7f":
            return E400
        if c == "%":
            if not (len(path) > i + 2 and path[i + 1] in _HEX and path[i + 2] in _HEX):
                return E400
            if path[i + 1 : i + 3] == "00":
                return E400
        i += 1
    if mode is PathNormalization.NONE:
        return path + sep + query
    if mode is PathNormalization.DECODE_AND_MERGE_SLASHES:
        out, i = "", 0
        while i < len(path):
            if path[i] == "%" and path[i + 1 : i + 3].upper() in ("2F", "5C"):
                out += "/" if path[i + 1 : i + 3].upper() == "2F" else "\\"
                i += 3
            else:
                out += path[i]
                i += 1
        path = out
    path = _chromium(path)
    if mode is not PathNormalization.BASE:
        merged: list[str] = []
        for c in path:
            if not (c == "/" and merged and merged[-1] == "/"):
                merged.append(c)
        path = "".join(merged)
    return path + sep + query


def _chromium(path: str) -> str:
    """Chromium's DoPartialPath, as Envoy's normalize_path runs it (valid input only)."""
    out: list[str] = []
    n = len(path)

    def dot_len(j: int) -> int:
        if j < n and path[j] == ".":
            return 1
        if path[j : j + 3].lower() == "%2e":
            return 3
        return 0

    def back_up() -> None:
        k = len(out) - 1
        if k == 0:
            return
        k -= 1
        while out[k] != "/" and k > 0:
            k -= 1
        del out[k + 1 :]

    i = 0
    while i < n:
        c = path[i]
        d = dot_len(i)
        if d:
            if out and out[-1] == "/":
                after = i + d
                if after == n or path[after] in "/\\":
                    i = after + (1 if after < n else 0)  # "." segment: skip it and its slash
                    continue
                d2 = dot_len(after)
                if d2 and (after + d2 == n or path[after + d2] in "/\\"):
                    back_up()
                    i = after + d2 + (1 if after + d2 < n else 0)
                    continue
            out.append(".")
            i += d
            continue
        if c == "\\":
            out.append("/")
        elif c == "%":
            v = int(path[i + 1 : i + 3], 16)
            out.append(chr(v) if chr(v) in _UNRESERVED else f"%{v:02X}")
            i += 3
            continue
        elif c in _CHROMIUM_ESCAPES or ord(c) > 0x7E:
            out.append("".join(f"%{b:02X}" for b in c.encode("latin-1")))
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _run(target: str, mode: PathNormalization) -> Want:
    try:
        return normalize_path(target, mode)
    except NormalizationError as e:
        assert e.status == 400
        assert e.reason
        return e.status


# -- the corpus ----------------------------------------------------------------------------------


def test_corpus_size() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize(("target", "expected"), CORPUS)
def test_corpus(target: str, expected: tuple[Want, ...]) -> None:
    got = tuple(_run(target, mode) for mode in MODES)
    assert got == expected
    assert tuple(_model(target, mode) for mode in MODES) == expected


@pytest.mark.parametrize(("target", "expected"), CORPUS)
def test_corpus_idempotent(target: str, expected: tuple[Want, ...]) -> None:
    for mode, want in zip(MODES, expected, strict=True):
        if isinstance(want, str):
            assert normalize_path(want, mode) == want


# -- reasons -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("/admin%00", "'%00' (NUL) in the path at offset 6"),
        ("/a%zz", "malformed percent-encoding '%zz' at offset 2: expected '%' and two hex digits"),
        ("/a%", "malformed percent-encoding '%' at offset 2: expected '%' and two hex digits"),
        ("/a b", "space or control character ' ' in the path at offset 2"),
        ("\\da", "expected a path starting with '/', got '\\\\da'"),
        ("", "expected a path starting with '/', got an empty target"),
        ("*", "expected a path starting with '/', got '*'"),
    ],
)
def test_refusal_reason(target: str, reason: str) -> None:
    for mode in MODES:
        with pytest.raises(NormalizationError) as e:
            normalize_path(target, mode)
        assert (e.value.status, e.value.reason) == (400, reason)


def test_asterisk_only_for_options() -> None:
    for mode in MODES:
        assert normalize_path("*", mode, allow_asterisk=True) == "*"
        with pytest.raises(NormalizationError):
            normalize_path("*?x", mode, allow_asterisk=True)
        with pytest.raises(NormalizationError):
            normalize_path("*", mode)


def test_hostile_input_is_linear() -> None:
    hostile = [
        "/" + "%" * 200_000,
        "/" + "%2" * 100_000 + "%",
        "/" + "./" * 100_000,
        "/" + "a/../" * 50_000,
        "/" + "%2e%2E/" * 30_000,
        "/" + "\\" * 200_000,
        "/" + "%5c" * 60_000,
        "/" + "%2f%2F" * 30_000 + "x",
    ]
    start = time.perf_counter()
    for target in hostile:
        for mode in MODES:
            _run(target, mode)
    assert time.perf_counter() - start < 2.0


# -- properties ----------------------------------------------------------------------------------

_PIECES = [
    "/", "/", "\\", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%25", "%41", "%7e", "%3f",
    "%00", "%", "%z", "a", "b", "~", ";", "?", "#", '"', "{", "\xe9", " ", "=", "*",
]
targets = st.builds(
    lambda lead, parts: lead + "".join(parts),
    st.sampled_from(["/", "/", "/", "", "\\", "*"]),
    st.lists(st.sampled_from(_PIECES), max_size=24),
)


@settings(max_examples=1500, deadline=None)
@given(targets, st.sampled_from(MODES))
def test_property_idempotent_and_rooted(target: str, mode: PathNormalization) -> None:
    got = _run(target, mode)
    assert got == _model(target, mode)
    if isinstance(got, int):
        return
    assert got.startswith("/")
    assert "#" not in got
    assert normalize_path(got, mode) == got
    path, _, query = got.partition("?")
    sent_query = target.split("#", 1)[0].partition("?")[2]
    assert query == sent_query
    if mode is not PathNormalization.NONE:
        assert "\\" not in path
        segments = path.split("/")
        assert "." not in segments and ".." not in segments
    if mode in (PathNormalization.MERGE_SLASHES, PathNormalization.DECODE_AND_MERGE_SLASHES):
        assert "//" not in path
    if mode is PathNormalization.DECODE_AND_MERGE_SLASHES:
        assert "%2F" not in path.upper() and "%5C" not in path.upper()


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40), st.sampled_from(MODES))
def test_property_any_text_normalises_or_400(target: str, mode: PathNormalization) -> None:
    got = _run(target, mode)
    if isinstance(got, str):
        assert got.startswith("/")
        assert normalize_path(got, mode) == got


# -- method and headers --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS", "PROPFIND", "M-SEARCH", "X_1"])
def test_method_accepted(method: str) -> None:
    check_method(method)


@pytest.mark.parametrize("method", ["get", "Get", "GEt", "", "GET ", "G\tET", "GÉT", "GET/", "(GET)"])
def test_method_refused(method: str) -> None:
    with pytest.raises(NormalizationError) as e:
        check_method(method)
    assert e.value.status == 400
    assert repr(method[:32]) in e.value.reason


def test_join_headers_case_insensitive_and_duplicates_joined_in_order() -> None:
    joined = join_headers(
        [
            (b"X-Role", b"user"),
            ("x-role", "admin"),
            (b"Content-Type", b"text/plain"),
            (b"x-ROLE", b"guest"),
            ("X-Empty", ""),
        ]
    )
    assert joined == {"x-role": "user,admin,guest", "content-type": "text/plain", "x-empty": ""}


def test_join_headers_lowers_ascii_only() -> None:
    assert join_headers([(b"X-\xc9", b"\xe9")]) == {"x-\xc9": "\xe9"}


# -- agent.yaml: http.path_normalization ---------------------------------------------------------

_BASE_CONFIG = {"node": "n1", "addresses": {"proxy": "127.0.0.1"}}


def test_config_default_is_base() -> None:
    assert from_mapping(_BASE_CONFIG).http.path_normalization is PathNormalization.BASE


@pytest.mark.parametrize("mode", MODES)
def test_config_accepts_istio_names(mode: PathNormalization) -> None:
    cfg = from_mapping({**_BASE_CONFIG, "http": {"path_normalization": mode.value}})
    assert cfg.http.path_normalization is mode


@pytest.mark.parametrize("bad", ["base", "MERGE", "", 1, None, ["BASE"]])
def test_config_refuses_other_values(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping({**_BASE_CONFIG, "http": {"path_normalization": bad}}, source="agent.yaml")
    assert "agent.yaml: http.path_normalization: expected one of NONE, BASE, MERGE_SLASHES, " \
           "DECODE_AND_MERGE_SLASHES, got " in str(e.value)
