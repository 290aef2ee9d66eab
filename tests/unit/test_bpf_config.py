"""Pure tests of the bpf package: validation, layouts, source assembly (no root)."""

from __future__ import annotations

import ctypes
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpf import loader, pins
from bpf.config import SOURCES_DIR, BuildConfig, CaptureConfig, RedirectTarget
from bpf.errors import BpfConfigError, CompileError, NotInstalledError
from bpf.layout import (
    COUNTERS,
    HOOKS,
    MAP_NAMES,
    Cidr,
    Orig,
    Target,
    Tuple,
    ip4_from_map,
    ip4_to_map,
    port_from_map,
    port_to_map,
)
from bpf.maps import netns_cookie, netns_file


def _read(name: str) -> str:
    with open(os.path.join(SOURCES_DIR, name)) as f:
        return f.read()


HEADER = _read("nodemesh.h")


def test_build_flags_are_validated_integers() -> None:
    flags = BuildConfig(max_records=128).cflags()
    assert flags == ["-DNM_MAX_ENROLLED=4096", "-DNM_MAX_RECORDS=128", "-DNM_MAX_CIDRS=256",
                     "-DNM_MAX_PORTS=64", "-DNM_DNS_PORT=53", "-DNM_MAX_HOST_CG=64"]
    assert all(re.fullmatch(r"-DNM_[A-Z_]+=\d+", f, re.ASCII) for f in flags)
    for bad in ({"max_records": 0}, {"max_records": True}, {"max_records": "64"},
                {"dns_port": 70000}, {"max_enrolled": -1}):
        with pytest.raises(BpfConfigError):
            BuildConfig(**bad)  # type: ignore[arg-type]


def test_every_flag_the_header_needs_is_passed() -> None:
    needed = set(re.findall(r"defined\((NM_[A-Z_]+)\)", HEADER))
    given_flags = {f[2:].split("=")[0] for f in BuildConfig().cflags()}
    assert needed == given_flags


def test_version_follows_sources_and_flags() -> None:
    v = BuildConfig().version(b"src")
    assert v == BuildConfig().version(b"src")
    assert v != BuildConfig(max_records=128).version(b"src")
    assert v != BuildConfig().version(b"src2")
    assert re.fullmatch(r"v\d+-[0-9a-f]{12}", v)


def test_redirect_target_validation() -> None:
    assert RedirectTarget("10.244.1.1").proxy_port == 15001
    assert RedirectTarget("10.244.1.1", dns_port=0).dns_port == 0
    for kw in ({"proxy_ip4": "10.244.1"}, {"proxy_ip4": "::1"}, {"proxy_ip4": "127.0.0.1"},
               {"proxy_ip4": "0.0.0.0"}):
        with pytest.raises(BpfConfigError, match="proxy_ip4"):
            RedirectTarget(**kw)  # type: ignore[arg-type]
    for port in (0, 65536, -1, True):
        with pytest.raises(BpfConfigError, match="proxy_port"):
            RedirectTarget("10.244.1.1", proxy_port=port)
    with pytest.raises(BpfConfigError, match="dns_port"):
        RedirectTarget("10.244.1.1", dns_port=70000)


def test_capture_config_needs_networks() -> None:
    cfg = CaptureConfig(("10.96.0.0/16", "10.244.0.0/16"), (22,))
    assert [str(n) for n in cfg.networks] == ["10.96.0.0/16", "10.244.0.0/16"]
    with pytest.raises(BpfConfigError, match=r"cidrs\[0\].*not a network"):
        CaptureConfig(("10.96.0.1/16",))
    with pytest.raises(BpfConfigError, match="only IPv4"):
        CaptureConfig(("fd00::/8",))
    with pytest.raises(BpfConfigError, match="one string"):
        CaptureConfig("10.96.0.0/16")  # type: ignore[arg-type]
    with pytest.raises(BpfConfigError, match=r"excluded_ports\[1\]"):
        CaptureConfig(("10.96.0.0/16",), (22, 0))


@given(st.text(max_size=40))
def test_capture_cidr_parses_or_raises_our_error(text: str) -> None:
    try:
        cfg = CaptureConfig((text,))
    except BpfConfigError as e:
        assert e.errno != 0 and "cidrs[0]" in e.message
    else:
        assert str(cfg.networks[0]) == text or cfg.networks[0].with_prefixlen


def test_ctypes_layouts_have_the_c_sizes() -> None:
    assert [ctypes.sizeof(t) for t in (Target, Orig, Tuple, Cidr)] == [8, 16, 12, 8]
    assert Orig.netns_cookie.offset == 8


def test_counter_names_follow_the_enum() -> None:
    body = HEADER[HEADER.index("enum nm_counter {"):HEADER.index("NM_C_MAX")]
    enum = re.findall(r"NM_C_([A-Z_]+)", body)
    assert [c.lower() for c in enum] == list(COUNTERS)


def test_every_hook_has_its_file_and_function_and_every_map_is_declared() -> None:
    for hook in HOOKS:
        src = _read(f"{hook.name}.c")
        assert f"int {hook.func}(" in src
        assert '#include "nodemesh.h"' in src
    for name in MAP_NAMES:
        assert re.search(rf"\b{name}\b", HEADER)
    text = loader.sources()
    assert text.index("nodemesh.h") < min(text.index(f"{h.name}.c") for h in HOOKS)


def test_byte_order_helpers_round_trip() -> None:
    assert ip4_from_map(ip4_to_map("10.96.0.10")) == "10.96.0.10"
    assert ip4_to_map("1.2.3.4").to_bytes(4, "little") == bytes([1, 2, 3, 4])
    assert port_from_map(port_to_map(15001)) == 15001
    assert port_to_map(80).to_bytes(2, "little") == b"\x00\x50"


def test_netns_refs() -> None:
    assert netns_file(42) == "/proc/42/ns/net"
    assert netns_file("/run/netns/x") == "/run/netns/x"
    for bad in (0, -3, True):
        with pytest.raises(BpfConfigError):
            netns_file(bad)
    with pytest.raises(BpfConfigError, match="cannot be opened") as e:
        netns_cookie("/nonexistent/netns")
    assert e.value.errno != 0


def test_pin_directory_completeness(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    with pytest.raises(NotInstalledError):
        pins.installed_dir(root)
    d = os.path.join(root, "v1-abc")
    os.makedirs(d)
    for name in MAP_NAMES:
        open(pins.map_pin(d, name), "w").close()
    assert not pins.is_complete(d)  # maps but no links: a crashed install
    for hook in HOOKS:
        open(pins.link_pin(d, hook), "w").close()
    assert pins.is_complete(d)
    assert pins.installed_dir(root) == d


def test_attach_cgroup_is_checked() -> None:
    with pytest.raises(BpfConfigError, match="not inside"):
        loader.resolve_cgroup("/tmp")
    with pytest.raises(BpfConfigError, match="does not exist"):
        loader.resolve_cgroup("nodemesh-no-such-cgroup-xyz")
    with pytest.raises(BpfConfigError, match="root cgroup"):
        loader.resolve_cgroup(loader.pins.cgroup2_mount())


def test_missing_kernel_headers_say_what_and_how(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, "0.0.0-nodemesh-none",
                            real.version, real.machine))
    monkeypatch.setattr(os, "uname", lambda: fake)
    with pytest.raises(CompileError) as e:
        loader.compile_programs(BuildConfig())
    assert "0.0.0-nodemesh-none" in e.value.message and "headers" in e.value.message
    assert e.value.hint is not None and "scripts/setup.sh" in e.value.hint
