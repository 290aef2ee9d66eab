"""The request's headers as authorization conditions see them: one header read without joining
them all, repeats joined with ",", bytes (HTTP/1.1) and text (HTTP/2) alike."""

from __future__ import annotations

from agent.dataplane.authorize import LazyHeaders


def test_one_header_read_as_the_whole_join_would_give_it() -> None:
    raw_h1 = [(b"host", b"web"), (b"x-tenant", b"a"), (b"accept", b"*/*"), (b"x-tenant", b"b")]
    raw_h2 = [(":path", "/"), ("x-tenant", "a"), ("x-tenant", "b")]
    for raw in (raw_h1, raw_h2):
        h = LazyHeaders(raw)  # type: ignore[arg-type]
        assert h.get("x-tenant") == "a,b" and h["x-tenant"] == "a,b"
        assert h.get("x-missing") is None and h.get("x-missing", "-") == "-"
        assert "x-missing" not in h
        joined = dict(h)  # the full join agrees, and is used once built
        assert joined["x-tenant"] == "a,b" and ":path" not in joined
        assert h.get("x-tenant") == "a,b"
