"""The bpf(2) system call, directly through ctypes: no BCC, no LLVM.

How this works: every command takes a ``union bpf_attr``; we pack the few
fields a command uses into a zeroed 128-byte buffer (the kernel requires the
unused tail to be zero) and call ``syscall(__NR_bpf, cmd, attr, size)``. The
long-running agent uses only this module and :mod:`bpf.maps`, so it never maps
LLVM into its address space; compiling is the loader's short-lived job.
Failures raise :class:`bpf.errors.BpfError` with the errno and what was asked.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from bpf.errors import BpfError

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}

MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE = 28
LINK_DETACH = 34

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

ATTR_SIZE = 128

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr() -> int:
    machine = platform.machine()
    if machine not in _NR_BPF:
        raise BpfError(f"bpf(2) syscall number unknown for machine {machine!r}")
    return _NR_BPF[machine]


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """Run one bpf(2) command; raise BpfError (with errno) describing ``what`` on failure."""
    ret = int(_libc.syscall(_nr(), ctypes.c_int(cmd), attr, ctypes.c_uint(ATTR_SIZE)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(f"{what}: {os.strerror(err)}", errno=err)
    return ret


def _attr(fmt: str, *values: int) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


# --- objects in bpffs -------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, _attr("=QI", _addr(p), fd), f"pin fd {fd} at {path}")


def obj_get(path: str) -> int:
    """Open a pinned map, program or link; the caller closes the returned fd."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(OBJ_GET, _attr("=QI", _addr(p), 0), f"open pinned object {path}")


# --- maps -------------------------------------------------------------------

def map_lookup(fd: int, key: ctypes.Array[ctypes.c_char], value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    attr = _attr("=I4xQQQ", fd, _addr(key), _addr(value), 0)
    ret = int(_libc.syscall(_nr(), ctypes.c_int(MAP_LOOKUP_ELEM), attr, ctypes.c_uint(ATTR_SIZE)))
    if ret < 0:
        err = ctypes.get_errno()
        if err == 2:  # ENOENT
            return None
        raise BpfError(f"lookup in map fd {fd}: {os.strerror(err)}", errno=err)
    return value.raw


def map_update(fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char],
               flags: int = BPF_ANY) -> None:
    bpf(MAP_UPDATE_ELEM, _attr("=I4xQQQ", fd, _addr(key), _addr(value), flags),
        f"update map fd {fd}")


def map_delete(fd: int, key: ctypes.Array[ctypes.c_char]) -> bool:
    """Delete ``key``; False if it was not there."""
    attr = _attr("=I4xQ", fd, _addr(key))
    ret = int(_libc.syscall(_nr(), ctypes.c_int(MAP_DELETE_ELEM), attr, ctypes.c_uint(ATTR_SIZE)))
    if ret < 0:
        err = ctypes.get_errno()
        if err == 2:
            return False
        raise BpfError(f"delete from map fd {fd}: {os.strerror(err)}", errno=err)
    return True


def map_keys(fd: int, key_size: int, limit: int) -> list[bytes]:
    """All keys (at most ``limit``: the map's max_entries bounds the walk)."""
    keys: list[bytes] = []
    cur: ctypes.Array[ctypes.c_char] | None = None
    while len(keys) < limit:
        nxt = ctypes.create_string_buffer(key_size)
        attr = _attr("=I4xQQ", fd, _addr(cur) if cur is not None else 0, _addr(nxt))
        ret = int(_libc.syscall(_nr(), ctypes.c_int(MAP_GET_NEXT_KEY), attr,
                                ctypes.c_uint(ATTR_SIZE)))
        if ret < 0:
            err = ctypes.get_errno()
            if err == 2:
                break
            raise BpfError(f"iterate map fd {fd}: {os.strerror(err)}", errno=err)
        keys.append(nxt.raw)
        cur = nxt
    return keys


# --- info -------------------------------------------------------------------

def _info(fd: int, size: int, what: str) -> bytes:
    info = ctypes.create_string_buffer(size)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, _addr(info)), what)
    return info.raw


def map_info(fd: int) -> dict[str, int | str]:
    raw = _info(fd, 80, f"info of map fd {fd}")
    typ, mid, ksize, vsize, max_entries, flags = struct.unpack_from("=6I", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return {"type": typ, "id": mid, "key_size": ksize, "value_size": vsize,
            "max_entries": max_entries, "flags": flags, "name": name}


def link_info(fd: int) -> dict[str, int]:
    """type, id, prog_id, and for cgroup links cgroup_id (0 once the cgroup is gone)."""
    raw = _info(fd, 64, f"info of link fd {fd}")
    typ, lid, prog_id = struct.unpack_from("=III", raw, 0)
    cgroup_id, attach_type = struct.unpack_from("=QI", raw, 16)
    return {"type": typ, "id": lid, "prog_id": prog_id, "cgroup_id": cgroup_id,
            "attach_type": attach_type}


# --- cgroup attachment ------------------------------------------------------

def link_create(prog_fd: int, cgroup_fd: int, attach_type: int, what: str) -> int:
    """A cgroup link: multi-attach, coexists with BPF_F_ALLOW_MULTI programs."""
    return bpf(LINK_CREATE, _attr("=IIII", prog_fd, cgroup_fd, attach_type, 0), what)


def prog_get_fd_by_id(prog_id: int) -> int:
    """An fd of the loaded program ``prog_id`` (e.g. from a pinned link's info)."""
    return bpf(PROG_GET_FD_BY_ID, _attr("=I", prog_id), f"open program id {prog_id}")


def link_detach(link_fd: int) -> None:
    bpf(LINK_DETACH, _attr("=I", link_fd), f"detach link fd {link_fd}")


def prog_query(cgroup_fd: int, attach_type: int, max_progs: int = 64) -> list[int]:
    """IDs of the programs attached to the cgroup itself for ``attach_type``."""
    ids = (ctypes.c_uint32 * max_progs)()
    attr = _attr("=IIIIQI", cgroup_fd, attach_type, 0, 0, ctypes.addressof(ids), max_progs)
    bpf(PROG_QUERY, attr, f"query programs of cgroup fd {cgroup_fd}")
    (count,) = struct.unpack_from("=I", attr, 24)
    return [int(ids[i]) for i in range(min(count, max_progs))]
