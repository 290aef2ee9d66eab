"""Typed access to the pinned maps: what the long-running agent uses.

How this works: :meth:`Dataplane.open` opens the maps pinned by the loader
(:mod:`bpf.loader`) with ``BPF_OBJ_GET``; every operation is one bpf(2) call
through :mod:`bpf.syscall` with keys and values packed from the ctypes
mirrors in :mod:`bpf.layout`. BCC is never imported here, so the agent does
not carry LLVM. Input is validated completely before the first map write:
bad input raises :class:`BpfConfigError` and leaves the maps as they were.

The proxy learns where an accepted connection was going with
:meth:`Dataplane.lookup_original_dst` (peer = the pod's ip:port, local = the
proxy's ip:15001), or :meth:`Dataplane.original_dst_of` on the socket itself.

Peer authentication (see :mod:`bpf.peerauth`): per pod, :meth:`Dataplane.set_peer_auth`
then :meth:`Dataplane.attach_pod_filters` on its host-side veth;
:meth:`Dataplane.peer_auth_counters`.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from bpf import peerauth, pins, syscall
from bpf.config import DEFAULT_BPFFS_ROOT, CaptureConfig, RedirectTarget
from bpf.errors import BpfConfigError, BpfError
from bpf.layout import (
    COUNTERS,
    INBOUND_TC,
    MAP_NAMES,
    PEER_AUTH_MODES,
    PEER_AUTH_UDP,
    SOURCE_TC,
    Cidr,
    Orig,
    PeerAuth,
    PeerStats,
    PodIf,
    PortKey,
    SrcKey,
    Target,
    Tuple,
    as_buffer,
    ip4_from_map,
    ip4_to_map,
    port_from_map,
    port_to_map,
)

SO_NETNS_COOKIE = 71  # asm-generic/socket.h, Linux 5.14+
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def _own_cookie() -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def netns_file(netns: str | int) -> str:
    """``/proc/<pid>/ns/net`` for a PID, else the path given (e.g. /run/netns/<name>)."""
    if isinstance(netns, bool) or (isinstance(netns, int) and netns <= 0):
        raise BpfConfigError(f"expected a PID or a netns path, got {netns!r}", where="netns")
    return f"/proc/{netns}/ns/net" if isinstance(netns, int) else netns


def netns_cookie(netns: str | int) -> int:
    """The cookie the kernel gives the network namespace (what the programs key on)."""
    path = netns_file(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BpfConfigError(
            f"network namespace {path} cannot be opened: {e.strerror}", where="netns",
            hint="give /run/netns/<name>, /proc/<pid>/ns/net, or a live PID",
        ) from None
    cookies: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:  # setns on a throwaway thread only
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise BpfConfigError(
                    f"{path} is not a network namespace ({os.strerror(err)})", where="netns"
                )
            cookies.append(_own_cookie())
        except BaseException as e:
            errors.append(e)

    try:
        t = threading.Thread(target=worker, name="nodemesh-netns-cookie")
        t.start()
        t.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]
    return cookies[0]


@dataclass(frozen=True, slots=True)
class OriginalDst:
    ip: str
    port: int
    netns_cookie: int  # the enrolled pod the connection came from (host: its cgroup id)
    host: bool = False  # from a host service enrolled by cgroup (bpf/hostcg.py)


@dataclass(frozen=True, slots=True)
class MapFill:
    entries: int
    max_entries: int


class Dataplane:
    """The pinned maps of one installed data path (use as a context manager)."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        self._max: dict[str, int] = {}
        self._ncpu = _possible_cpus()
        self.lookup_misses = 0  # proxy lookups that found no record (see counters())
        self._ports_of: dict[int, set[bytes]] | None = None  # pod -> its nm_peer_port keys
        self._ports_read = threading.Lock()  # the one walk: a scrape may race apply_peer_auth to it
        try:
            for name in MAP_NAMES:
                fd = syscall.obj_get(pins.map_pin(pin_dir, name))
                self._fds[name] = fd
                self._max[name] = int(syscall.map_info(fd)["max_entries"])
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, bpffs_root: str = DEFAULT_BPFFS_ROOT) -> Dataplane:
        return cls(pins.installed_dir(bpffs_root))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Dataplane:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            raise BpfError(f"map {name} is closed", errno=errno_mod.EBADF)
        return self._fds[name]

    # --- enrollment -------------------------------------------------------

    def enroll(self, netns: str | int, target: RedirectTarget) -> int:
        """Capture the pod in ``netns`` (path or PID); returns its netns cookie."""
        if not isinstance(target, RedirectTarget):
            raise BpfConfigError(f"expected a RedirectTarget, got {target!r}", where="target")
        cookie = netns_cookie(netns)
        if cookie == _own_cookie():
            raise BpfConfigError(
                f"{netns_file(netns)} is this process's own network namespace; enrolling it "
                "would capture the proxy's own connections", where="netns",
            )
        value = Target(ip4_to_map(target.proxy_ip4), port_to_map(target.proxy_port),
                       port_to_map(target.dns_port) if target.dns_port else 0)
        syscall.map_update(self._fd("nm_enrolled"), as_buffer(ctypes.c_uint64(cookie)),
                           as_buffer(value))
        return cookie

    def unenroll(self, netns: str | int) -> bool:
        """Stop capturing ``netns``; False if it was not enrolled."""
        return self.unenroll_cookie(netns_cookie(netns))

    def unenroll_cookie(self, cookie: int) -> bool:
        """For pods whose netns is already gone: remove by the cookie enroll returned."""
        return syscall.map_delete(self._fd("nm_enrolled"), as_buffer(ctypes.c_uint64(cookie)))

    def enrolled(self) -> dict[int, RedirectTarget]:
        fd = self._fd("nm_enrolled")
        out: dict[int, RedirectTarget] = {}
        for raw in syscall.map_keys(fd, 8, self._max["nm_enrolled"]):
            key = ctypes.create_string_buffer(raw, 8)
            val = syscall.map_lookup(fd, key, ctypes.sizeof(Target))
            if val is None:
                continue
            t = Target.from_buffer_copy(val)
            out[int.from_bytes(raw, "little")] = RedirectTarget(
                ip4_from_map(t.proxy_ip4), port_from_map(t.proxy_port),
                port_from_map(t.dns_port))
        return out

    def enroll_host_cgroup(self, cgroup_id: int, target: RedirectTarget) -> None:
        """Capture the processes of the host cgroup ``cgroup_id`` (its programs' links are
        :mod:`bpf.hostcg`'s; the refusal of the agent's own cgroup too)."""
        if not isinstance(target, RedirectTarget):
            raise BpfConfigError(f"expected a RedirectTarget, got {target!r}", where="target")
        value = Target(ip4_to_map(target.proxy_ip4), port_to_map(target.proxy_port),
                       port_to_map(target.dns_port) if target.dns_port else 0)
        syscall.map_update(self._fd("nm_host_cg"), as_buffer(ctypes.c_uint64(cgroup_id)),
                           as_buffer(value))

    def unenroll_host_cgroup(self, cgroup_id: int) -> bool:
        return syscall.map_delete(self._fd("nm_host_cg"), as_buffer(ctypes.c_uint64(cgroup_id)))

    def host_cgroups(self) -> list[int]:
        """The cgroup ids of the enrolled host services."""
        return [int.from_bytes(raw, "little") for raw in
                syscall.map_keys(self._fd("nm_host_cg"), 8, self._max["nm_host_cg"])]

    # --- capture config ---------------------------------------------------

    def set_capture(self, cfg: CaptureConfig) -> None:
        """Make the capture CIDRs and excluded ports exactly ``cfg``."""
        if not isinstance(cfg, CaptureConfig):
            raise BpfConfigError(f"expected a CaptureConfig, got {cfg!r}", where="capture")
        if len(set(cfg.networks)) > self._max["nm_capture"]:
            raise BpfConfigError(f"{len(cfg.networks)} CIDRs exceed the map size "
                                 f"{self._max['nm_capture']}", where="cidrs")
        if len(set(cfg.excluded_ports)) > self._max["nm_excl_ports"]:
            raise BpfConfigError(f"{len(cfg.excluded_ports)} ports exceed the map size "
                                 f"{self._max['nm_excl_ports']}", where="excluded_ports")
        want_cidrs = {bytes(Cidr(n.prefixlen, ip4_to_map(str(n.network_address))))
                      for n in cfg.networks}
        want_ports = {bytes(ctypes.c_uint16(p)) for p in cfg.excluded_ports}
        one = as_buffer(ctypes.c_uint8(1))
        for name, want, size in (("nm_capture", want_cidrs, ctypes.sizeof(Cidr)),
                                 ("nm_excl_ports", want_ports, 2)):
            fd = self._fd(name)
            have = set(syscall.map_keys(fd, size, self._max[name]))
            for k in sorted(want - have):  # add first: kept entries never disappear
                syscall.map_update(fd, ctypes.create_string_buffer(k, size), one)
            for k in sorted(have - want):
                syscall.map_delete(fd, ctypes.create_string_buffer(k, size))

    def capture(self) -> CaptureConfig:
        cidrs = []
        for raw in syscall.map_keys(self._fd("nm_capture"), ctypes.sizeof(Cidr),
                                    self._max["nm_capture"]):
            c = Cidr.from_buffer_copy(raw)
            cidrs.append(f"{ip4_from_map(c.ip4)}/{c.prefixlen}")
        ports = [int.from_bytes(raw, "little") for raw in
                 syscall.map_keys(self._fd("nm_excl_ports"), 2, self._max["nm_excl_ports"])]
        return CaptureConfig(tuple(sorted(cidrs, key=ipaddress.ip_network)),
                             tuple(sorted(ports)))

    # --- the proxy's lookup -----------------------------------------------

    def lookup_original_dst(self, peer: tuple[str, int], local: tuple[str, int]
                            ) -> OriginalDst | None:
        """Where the pod at ``peer`` meant to go when it reached the proxy at ``local``.

        None (and ``lookup_misses`` counted) if there is no record: the
        connection was not captured, or its record was evicted (LRU).
        """
        try:
            key = Tuple(ip4_to_map(peer[0]), ip4_to_map(local[0]),
                        port_to_map(peer[1]), port_to_map(local[1]))
        except (ValueError, OverflowError, TypeError, IndexError):
            raise BpfConfigError(f"expected IPv4 (ip, port) pairs, got {peer!r}, {local!r}",
                                 where="lookup") from None
        raw = syscall.map_lookup(self._fd("nm_orig_tuple"), as_buffer(key), ctypes.sizeof(Orig))
        if raw is None:
            self.lookup_misses += 1
            return None
        o = Orig.from_buffer_copy(raw)
        return OriginalDst(ip4_from_map(o.ip4), port_from_map(o.port), o.netns_cookie, bool(o.host))

    def original_dst_of(self, sock: socket.socket) -> OriginalDst | None:
        """The original destination of a connection the proxy accepted."""
        peer = sock.getpeername()
        local = sock.getsockname()
        if sock.family == socket.AF_INET6:  # dual-stack listener: v4-mapped peers
            peer = (str(ipaddress.IPv6Address(peer[0]).ipv4_mapped or peer[0]), peer[1])
            local = (str(ipaddress.IPv6Address(local[0]).ipv4_mapped or local[0]), local[1])
        return self.lookup_original_dst((peer[0], peer[1]), (local[0], local[1]))

    # --- peer authentication (bpf/peerauth.py) ------------------------------

    def set_peer_auth(self, pod_ip: str, mode: str, allowed_source: str, *,
                      proxy_mark: int = peerauth.DEFAULT_PROXY_MARK, udp: str = "allow",
                      dns_port: int = peerauth.DEFAULT_DNS_PORT,
                      ports: tuple[tuple[int, str], ...] = ()) -> None:
        """Set the pod's mode: DISABLE, PERMISSIVE or STRICT; the next opening packet sees it.

        ``allowed_source`` is the node proxy's address as the pod sees it (its
        gateway), ``proxy_mark`` the SO_MARK of the proxy's sockets, ``udp``
        (allow | deny) what a STRICT pod does with UDP, ``ports`` (port, mode)
        pairs overriding ``mode`` for those destination ports (exactly these:
        others the pod had are removed). The pod's counters are created at zero
        if missing and kept.
        """
        policy = peerauth.PeerAuthPolicy(pod_ip, mode, allowed_source, proxy_mark, udp, dns_port,
                                         ports)
        key = as_buffer(ctypes.c_uint32(policy.key()))
        try:
            syscall.map_update(self._fd("nm_peer_stats"), key, as_buffer(PeerStats()),
                               syscall.BPF_NOEXIST)
        except BpfError as e:
            if e.errno != errno_mod.EEXIST:
                raise
        old = syscall.map_lookup(self._fd("nm_peer_auth"), key, ctypes.sizeof(PeerAuth))
        had_ports = old is not None and PeerAuth.from_buffer_copy(old).ports != 0
        entries = [(as_buffer(k), as_buffer(ctypes.c_uint32(m))) for k, m in policy.port_entries()]
        keep = {bytes(k) for k, _ in entries}
        have = self._pod_ports(policy.key())
        if entries and not had_ports:  # left by an interrupted run: unread until the pod entry says so
            self._drop_ports(have, keep)
        fd = self._fd("nm_peer_port")
        before = [(k, syscall.map_lookup(fd, k, 4)) for k, _ in entries]
        done = 0
        try:
            for k, v in entries:  # the port modes first: the pod's entry then points to them
                syscall.map_update(fd, k, v)
                done += 1
            syscall.map_update(self._fd("nm_peer_auth"), key, as_buffer(policy.value()))
        except BaseException:  # nothing half-applied: the port modes the pod had come back
            for k, was in before[:done]:
                if was is None:
                    syscall.map_delete(fd, k)
                else:
                    syscall.map_update(fd, k, ctypes.create_string_buffer(was, len(was)))
            raise
        have |= keep
        if had_ports:
            self._drop_ports(have, keep)

    def _pod_ports(self, pod: int) -> set[bytes]:
        """The ``nm_peer_port`` keys of ``pod``: the map is walked once, then this set follows
        what this process writes (the agent is the map's one writer), so a pod's update costs
        its own ports, not the whole map."""
        with self._ports_read:
            if self._ports_of is None:
                found: dict[int, set[bytes]] = {}
                for raw in syscall.map_keys(self._fd("nm_peer_port"), ctypes.sizeof(PortKey),
                                            self._max["nm_peer_port"]):
                    found.setdefault(PortKey.from_buffer_copy(raw).pod_ip4, set()).add(bytes(raw))
                self._ports_of = found
            return self._ports_of.setdefault(pod, set())

    def _drop_ports(self, have: set[bytes], keep: set[bytes]) -> None:
        for raw in sorted(have - keep):
            syscall.map_delete(self._fd("nm_peer_port"), ctypes.create_string_buffer(raw, len(raw)))
            have.discard(raw)

    def peer_auth(self, pod_ip: str) -> peerauth.PeerAuthPolicy | None:
        key = peerauth.pod_key(pod_ip)
        raw = syscall.map_lookup(self._fd("nm_peer_auth"), as_buffer(ctypes.c_uint32(key)),
                                 ctypes.sizeof(PeerAuth))
        if raw is None:
            return None
        v = PeerAuth.from_buffer_copy(raw)
        modes = {n: m for m, n in PEER_AUTH_MODES.items()}
        udps = {n: u for u, n in PEER_AUTH_UDP.items()}
        ports: list[tuple[int, str]] = []
        for k in sorted(self._pod_ports(key).copy()) if v.ports else ():  # (a scrape's thread too)
            m = syscall.map_lookup(self._fd("nm_peer_port"), ctypes.create_string_buffer(k, len(k)), 4)
            if m is not None:
                ports.append((port_from_map(PortKey.from_buffer_copy(k).port),
                              modes.get(int.from_bytes(m, "little"), "DISABLE")))
        return peerauth.PeerAuthPolicy(ip4_from_map(key), modes.get(v.mode, "DISABLE"),
                                       ip4_from_map(v.allowed_ip4), int(v.proxy_mark),
                                       udps.get(v.udp, "allow"), port_from_map(v.dns_port),
                                       tuple(ports))

    def remove_peer_auth(self, pod_ip: str) -> bool:
        """Forget the pod (policy, port modes and counters), e.g. when it is deleted."""
        pod = peerauth.pod_key(pod_ip)
        key = as_buffer(ctypes.c_uint32(pod))
        had = syscall.map_delete(self._fd("nm_peer_auth"), key)
        self._drop_ports(self._pod_ports(pod), set())
        if self._ports_of is not None:
            del self._ports_of[pod]
        return syscall.map_delete(self._fd("nm_peer_stats"), key) or had

    def peer_auth_counters(self, pod_ip: str) -> dict[str, int]:
        """Connection attempts to the pod: ``proxied``, ``plaintext``, ``refused``."""
        key = as_buffer(ctypes.c_uint32(peerauth.pod_key(pod_ip)))
        raw = syscall.map_lookup(self._fd("nm_peer_stats"), key, ctypes.sizeof(PeerStats))
        s = PeerStats.from_buffer_copy(raw) if raw is not None else PeerStats()
        return {"proxied": int(s.proxied), "plaintext": int(s.plaintext),
                "refused": int(s.refused)}

    @property
    def version(self) -> str:
        return os.path.basename(os.path.normpath(self.pin_dir))

    def _set_sources(self, ifindex: int, keys: list[SrcKey]) -> None:
        """Make the pod's allowed sources exactly ``keys`` (new ones first, then stale ones go)."""
        fd = self._fd("nm_pod_src")
        want = {bytes(k) for k in keys}
        for k in keys:
            syscall.map_update(fd, as_buffer(k), as_buffer(ctypes.c_uint8(1)))
        for raw in syscall.map_keys(fd, ctypes.sizeof(SrcKey), self._max["nm_pod_src"]):
            if SrcKey.from_buffer_copy(raw).ifindex == ifindex and bytes(raw) not in want:
                syscall.map_delete(fd, ctypes.create_string_buffer(bytes(raw), len(raw)))

    def attach_pod_filters(self, netns: str, ifname: str, pod_ip: str,
                           sources: list[str]) -> bool:
        """Bind the pod's host-side veth ``ifname`` in ``netns`` (the node's netns, a name or
        a path): its policy is ``pod_ip``'s, it may send only from ``sources`` (every
        address of the pod, IPv6 link-local included). Then attach both host-side
        programs. Idempotent: False if this version's filters were already there.
        """
        peerauth.pod_key(pod_ip)
        ifindex = peerauth.host_ifindex(netns, ifname)
        keys = peerauth.source_keys(ifindex, sources)
        self._set_sources(ifindex, keys)
        syscall.map_update(self._fd("nm_pod_if"), as_buffer(ctypes.c_uint32(ifindex)),
                           as_buffer(PodIf(ip4_to_map(pod_ip))))
        fds: list[int] = []
        try:
            filters = []
            for prog, parent in ((SOURCE_TC, peerauth.INGRESS_PARENT),
                                 (INBOUND_TC, peerauth.EGRESS_PARENT)):
                fds.append(syscall.obj_get(pins.prog_pin(self.pin_dir, prog)))
                filters.append(peerauth.HostFilter(prog, parent, fds[-1]))
            return peerauth.attach_host_filters(netns, ifname, filters, self.version)
        finally:
            for fd in fds:
                os.close(fd)

    def detach_pod_filters(self, netns: str, ifname: str) -> bool:
        """Remove both host-side filters and the veth's map entries; False if not attached."""
        path, name = peerauth.netns_path(netns), peerauth.check_ifname(ifname)
        try:
            ifindex = peerauth.host_ifindex(path, name)
        except BpfConfigError:  # the veth is gone: its filters went with it
            return False
        had = peerauth.detach_host_filters(path, name)
        self._set_sources(ifindex, [])
        syscall.map_delete(self._fd("nm_pod_if"), as_buffer(ctypes.c_uint32(ifindex)))
        return had

    # --- observability ----------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs, plus the proxy's ``lookup_miss``."""
        fd = self._fd("nm_counters")
        out: dict[str, int] = {}
        for i, name in enumerate(COUNTERS):
            raw = syscall.map_lookup(fd, as_buffer(ctypes.c_uint32(i)), 8 * self._ncpu)
            vals = (ctypes.c_uint64 * self._ncpu).from_buffer_copy(raw) if raw else ()
            out[name] = sum(int(v) for v in vals)
        out["lookup_miss"] = self.lookup_misses
        return out

    def fill(self) -> dict[str, MapFill]:
        """Entries in use per hash map (walks keys; bounded by max_entries)."""
        out: dict[str, MapFill] = {}
        for name in MAP_NAMES:
            if name == "nm_counters":
                continue
            info = syscall.map_info(self._fd(name))
            n = len(syscall.map_keys(self._fd(name), int(info["key_size"]), self._max[name]))
            out[name] = MapFill(n, self._max[name])
        return out


def datapath_status(bpffs_root: str) -> dict[str, Any]:
    """Hooks and where they are attached, enrolled pods, map fill, counters, as read from
    the pins (raises NotInstalledError if nothing is pinned). ``nodemesh status`` shows it."""
    pin_dir = pins.installed_dir(bpffs_root)
    hooks = pins.hook_states(pin_dir)
    with Dataplane(pin_dir) as dp:
        enrolled = len(dp.enrolled())
        host_cgroups = [pins.cgroup_path_of_id(i) or f"(removed, id {i})" for i in dp.host_cgroups()]
        fill = {name: {"entries": f.entries, "max_entries": f.max_entries} for name, f in dp.fill().items()}
        counters = dp.counters()
    counters.pop("lookup_miss", None)  # a proxy-side count: not known here
    return {
        "ok": all(h.attached for h in hooks),
        "bpffs_root": bpffs_root,
        "pin_dir": pin_dir,
        "hooks": [
            {
                "hook": h.hook,
                "attached": h.attached,
                "cgroup": h.cgroup,
                "prog_id": h.prog_id,
                "link_id": h.link_id,
                "programs_on_cgroup": h.programs_on_cgroup,
            }
            for h in hooks
        ],
        "enrolled": enrolled,
        "host_cgroups": host_cgroups,  # host services enrolled by cgroup (bpf/hostcg.py)
        "maps": fill,
        "counters": counters,
    }
