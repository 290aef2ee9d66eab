"""Validated configuration of the data path: pure values, no I/O.

Three kinds, each refused whole with :class:`BpfConfigError` when invalid:

* :class:`BuildConfig` becomes the ``-D`` flags of the one BCC compile (map
  sizes, the DNS port); it is also part of the pin directory's version, so a
  loader built differently never adopts maps of another layout.
* :class:`RedirectTarget` is the value of an ``enrolled`` entry: where an
  enrolled pod's captured connections and DNS queries go.
* :class:`CaptureConfig` selects destinations: CIDRs (service VIPs, pod
  CIDRs) minus excluded ports.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field

from bpf.errors import BpfConfigError

DATAPATH_VERSION = 1  # bump when the map layout changes incompatibly
OUTBOUND_PORT = 15001
DNS_PORT = 15053
SOURCES_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BPFFS_ROOT = "/sys/fs/bpf/nodemesh"


def _int_in(value: object, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BpfConfigError(f"expected an integer in [{lo}, {hi}], got {value!r}", where=where)
    return value


def _port(value: object, where: str, *, allow_zero: bool = False) -> int:
    return _int_in(value, 0 if allow_zero else 1, 65535, where)


@dataclass(frozen=True, slots=True)
class BuildConfig:
    max_enrolled: int = 4096
    max_records: int = 65536
    max_cidrs: int = 256
    max_excluded_ports: int = 64
    dns_port: int = 53  # the port queries are sent to (not the node DNS port)
    max_host_cgroups: int = 64  # host services enrolled by cgroup (bpf/hostcg.py)

    def __post_init__(self) -> None:
        _int_in(self.max_enrolled, 1, 1 << 20, "max_enrolled")
        _int_in(self.max_records, 16, 1 << 24, "max_records")
        _int_in(self.max_cidrs, 1, 1 << 16, "max_cidrs")
        _int_in(self.max_excluded_ports, 1, 65535, "max_excluded_ports")
        _port(self.dns_port, "dns_port")
        _int_in(self.max_host_cgroups, 1, 1 << 16, "max_host_cgroups")

    def cflags(self) -> list[str]:
        """The -D flags: integers only, each validated above."""
        return [
            f"-DNM_MAX_ENROLLED={self.max_enrolled:d}",
            f"-DNM_MAX_RECORDS={self.max_records:d}",
            f"-DNM_MAX_CIDRS={self.max_cidrs:d}",
            f"-DNM_MAX_PORTS={self.max_excluded_ports:d}",
            f"-DNM_DNS_PORT={self.dns_port:d}",
            f"-DNM_MAX_HOST_CG={self.max_host_cgroups:d}",
        ]

    def version(self, sources: bytes) -> str:
        """Pin directory name: layout version plus a digest of sources and flags."""
        h = hashlib.sha256(sources)
        h.update("\0".join(self.cflags()).encode())
        return f"v{DATAPATH_VERSION}-{h.hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class RedirectTarget:
    proxy_ip4: str
    proxy_port: int = OUTBOUND_PORT
    dns_port: int = DNS_PORT  # 0: leave DNS alone

    def __post_init__(self) -> None:
        try:
            addr = ipaddress.IPv4Address(self.proxy_ip4)
        except ValueError:
            raise BpfConfigError(
                f"expected an IPv4 address, got {self.proxy_ip4!r}", where="proxy_ip4"
            ) from None
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            raise BpfConfigError(
                f"{addr} cannot be a proxy address (the pod reaches it over its netns's routes)",
                where="proxy_ip4",
            )
        _port(self.proxy_port, "proxy_port")
        _port(self.dns_port, "dns_port", allow_zero=True)


def _network(cidr: object, where: str) -> ipaddress.IPv4Network:
    if not isinstance(cidr, str):
        raise BpfConfigError(f"expected a CIDR string, got {cidr!r}", where=where)
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise BpfConfigError(
            f"{cidr!r} is not a network ({e})", where=where,
            hint="give the network address and length, e.g. 10.96.0.0/16",
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise BpfConfigError(f"{cidr!r}: only IPv4 networks are captured", where=where)
    return net


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    cidrs: tuple[str, ...]
    excluded_ports: tuple[int, ...] = ()
    networks: tuple[ipaddress.IPv4Network, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.cidrs, str):
            raise BpfConfigError("expected a list of CIDRs, got one string", where="cidrs")
        nets = tuple(_network(c, f"cidrs[{i}]") for i, c in enumerate(self.cidrs))
        for i, p in enumerate(self.excluded_ports):
            _port(p, f"excluded_ports[{i}]")
        object.__setattr__(self, "networks", nets)
