"""SPIFFE IDs: strict parsing, formatting, node IDs, SNI names."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.identity.errors import IdentityError, SpiffeIdError
from agent.identity.spiffe import (
    NodeId,
    SpiffeId,
    ca_service_uri,
    parse_node_id,
    parse_workload_id,
    sni_name,
)


def test_round_trip() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
    assert sid == SpiffeId("cluster.local", "default", "web")
    assert str(sid) == sid.uri == "spiffe://cluster.local/ns/default/sa/web"
    assert parse_node_id("spiffe://td/node/n1") == NodeId("td", "n1")
    assert ca_service_uri("td") == "spiffe://td/ca"


@pytest.mark.parametrize("bad", [
    "",
    "spiffe://",
    "spiffe://cluster.local",
    "spiffe://cluster.local/",
    "SPIFFE://cluster.local/ns/a/sa/b",
    "spiffe://Cluster.local/ns/a/sa/b",
    "spiffe://cluster.local:8443/ns/a/sa/b",
    "spiffe://user@cluster.local/ns/a/sa/b",
    "spiffe://cluster.local/ns/a/sa/b/",
    "spiffe://cluster.local/ns//sa/b",
    "spiffe://cluster.local/ns/../sa/b",
    "spiffe://cluster.local/ns/a/sa/b?x=1",
    "spiffe://cluster.local/ns/a/sa/b#frag",
    "spiffe://cluster.local/ns/a/sa/b\n",
    "spiffe://cluster.local/ns/a%20b/sa/b",
    "spiffe://cluster.local/ns/ä/sa/b",
    "spiffe://cluster.local/node/n1",
    "spiffe://cluster.local/sa/b/ns/a",
    "https://cluster.local/ns/a/sa/b",
    "spiffe://cluster.local/ns/a/sa/" + "b" * 3000,
])
def test_rejects_malformed(bad: str) -> None:
    with pytest.raises(SpiffeIdError, match="expected"):
        parse_workload_id(bad)


def test_dataclass_validates_fields() -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId("cluster.local", "a/b", "c")
    with pytest.raises(SpiffeIdError):
        SpiffeId("UPPER", "a", "c")
    with pytest.raises(SpiffeIdError):
        NodeId("td", "..")


@given(st.text(max_size=120))
def test_arbitrary_text_parses_or_raises_identity_error(text: str) -> None:
    try:
        sid = parse_workload_id(text)
    except IdentityError:
        return
    assert sid.uri == text


@given(st.from_regex(re.compile(r"spiffe://[a-z0-9.-]{1,20}/ns/[A-Za-z0-9._-]{1,20}/sa/[A-Za-z0-9._-]{1,20}",
                                re.ASCII), fullmatch=True))
def test_near_valid_ids_round_trip_or_raise(text: str) -> None:
    try:
        sid = parse_workload_id(text)
    except IdentityError:
        assert "/./" in text + "/" or "/../" in text + "/"
        return
    assert parse_workload_id(sid.uri) == sid


def test_sni_names_are_dns_safe_and_distinct() -> None:
    a = sni_name(SpiffeId("cluster.local", "default", "web"))
    b = sni_name(SpiffeId("cluster.local", "default", "web2"))
    assert a != b
    assert re.fullmatch(r"[0-9a-f]{32}\.sni\.nodemesh", a, re.ASCII)
    assert len(a) < 64 and "web" not in a  # identities do not show on the wire
