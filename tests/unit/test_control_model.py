"""Model invariants the registry's fast paths rely on."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.control.model import (
    CheckSpec,
    Health,
    Workload,
    canonical_ip,
    workload_from_doc,
)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_canonical_ipv4_is_recognised_as_is(n: int) -> None:
    text = str(ipaddress.IPv4Address(n))
    assert canonical_ip(text) == text


@given(st.text(alphabet="0123456789.:abcdefx \n", max_size=20))
def test_canonical_ip_agrees_with_ipaddress(text: str) -> None:
    try:
        want: str | None = str(ipaddress.ip_address(text))
    except ValueError:
        want = None
    if want is None:
        with pytest.raises(ValueError):
            canonical_ip(text)
    else:
        assert canonical_ip(text) == want


def test_non_canonical_addresses_are_rewritten_or_refused() -> None:
    assert canonical_ip("fe80::0:1") == "fe80::1"
    for bad in ("010.0.0.1", "256.0.0.1", "1.2.3", "1.2.3.4\n", " 1.2.3.4"):
        with pytest.raises(ValueError):
            canonical_ip(bad)


names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)


@given(name=names, ns=names, node=st.sampled_from(["", "n1"]), sa=st.sampled_from(["default", "api"]),
       labels=st.dictionaries(names, names, max_size=3),
       ports=st.dictionaries(names, st.integers(min_value=1, max_value=65535), max_size=3),
       weight=st.integers(min_value=1, max_value=10000), locality=st.sampled_from(["", "r/z"]),
       health=st.sampled_from(list(Health)), checks=st.booleans())
def test_stored_form_decodes_to_the_same_workload(
        name: str, ns: str, node: str, sa: str, labels: dict[str, str], ports: dict[str, int],
        weight: int, locality: str, health: Health, checks: bool) -> None:
    w = Workload(name, ns, "10.1.2.3", node=node, service_account=sa, labels=labels, ports=ports,
                 weight=weight, locality=locality, health=health,
                 checks=(CheckSpec("c", "tcp", "10.1.2.3:80"),) if checks else ())
    stored = json.dumps(w.to_stored(), separators=(",", ":"))
    assert workload_from_doc(json.loads(stored)) == w
    assert workload_from_doc(w.to_doc()) == w  # the full form (older stores) still decodes


def test_stored_workload_with_wrong_shapes_is_refused() -> None:
    base = {"name": "a", "namespace": "b", "address": "10.0.0.1"}
    for bad in ({"labels": ["x"]}, {"ports": "80"}, {"health": "sick"}, {"address": "10.0.0"}):
        with pytest.raises((ValueError, TypeError, KeyError)):
            workload_from_doc({**base, **bad})
