"""apply_peer_auth forgets what it set for an address a pod no longer has (or a pod no longer
enrolled), so the eBPF policy map never keeps a deleted pod's entry (no root: a recording
fake stands in for the maps and the pod's interfaces)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from agent import node
from agent.config import MeshConfig, PeerAuthConfig
from agent.control.snapshot import Snapshot
from agent.dataplane.route import Directory
from bpf import peerauth


class FakeDataplane:
    def __init__(self) -> None:
        self.policies: dict[str, str] = {}

    def set_peer_auth(self, address: str, mode: str, *_: Any, **__: Any) -> None:
        self.policies[address] = mode

    def remove_peer_auth(self, address: str) -> bool:
        return self.policies.pop(address, None) is not None

    def attach_pod_filters(self, *_: Any) -> None:
        pass


def test_addresses_a_pod_lost_and_pods_no_longer_enrolled_are_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    links = {"/run/netns/a": ("10.244.1.2", "10.244.1.3"), "/run/netns/b": ("10.244.1.4",)}
    monkeypatch.setattr(node, "pod_interfaces", lambda ns: [peerauth.PodLink("eth0", 7, links[ns], ())])
    monkeypatch.setattr(peerauth, "host_peer", lambda *a: "veth0")
    monkeypatch.setattr(peerauth, "remove_pod_side_filter", lambda *a: None)
    dp = FakeDataplane()
    cfg = SimpleNamespace(
        peer_authentication=PeerAuthConfig(mode="STRICT"),
        interception=SimpleNamespace(enroll=["/run/netns/a", "/run/netns/b"]),
        addresses=SimpleNamespace(proxy="10.244.1.1"),
        ports=SimpleNamespace(dns=15053),
        mesh=MeshConfig(),
    )
    agent: Any = SimpleNamespace(
        dataplane=dp,
        cfg=cfg,
        directory=SimpleNamespace(current=Directory.build(Snapshot(1))),
        peer_auth_errors={},
        peer_auth_addresses={},
        peer_auth_lock=threading.Lock(),
    )
    node.apply_peer_auth(agent)
    assert dp.policies == {"10.244.1.2": "STRICT", "10.244.1.3": "STRICT", "10.244.1.4": "STRICT"}
    links["/run/netns/a"] = ("10.244.1.2",)  # pod a lost an address
    node.apply_peer_auth(agent)
    assert set(dp.policies) == {"10.244.1.2", "10.244.1.4"}
    cfg.interception.enroll = ["/run/netns/a"]  # pod b is gone (reload)
    node.apply_peer_auth(agent)
    assert set(dp.policies) == {"10.244.1.2"}
    assert agent.peer_auth_errors == {}
