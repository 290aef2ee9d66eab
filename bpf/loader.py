"""Compile, attach and pin the data path; or adopt the one already in place.

How this works: :func:`install` is a short-lived step (it imports BCC, hence
LLVM). It computes the version of the sources and ``-D`` flags; if
``<root>/<version>/`` is complete and its links are attached to the requested
cgroup, it *adopts* it: nothing is compiled or attached, maps and their
records stay. Otherwise it removes any half-made directory, compiles all hooks
as one BCC module (header first, then one ``.c`` per hook, so every map exists
once), loads each program, creates one cgroup BPF link per hook, pins the maps,
the tc programs (attached later by the agent, per pod, see
:mod:`bpf.peerauth`) and then the links. Other versions under the root are removed after the new
one is attached (upgrade). A lock on the root directory serialises loaders.

Cgroup links are multi-attach: like ``BPF_F_ALLOW_MULTI`` programs they run
alongside other programs on the same cgroup (systemd, Cilium); unlike
``bpf_prog_attach`` their lifetime is the pin, so a crash before pinning
leaves nothing attached.

Run it as ``python -m bpf.loader install --cgroup <path> [--bpffs-root DIR]``;
``uninstall`` and ``status`` also exist for scripts (``nodemesh`` has both).
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from bpf import pins, syscall
from bpf.config import DEFAULT_BPFFS_ROOT, SOURCES_DIR, BuildConfig
from bpf.errors import BpfConfigError, BpfError, CompileError
from bpf.layout import HOOKS, MAP_NAMES, TC_PROGRAMS

HEADER = "nodemesh.h"


def sources() -> str:
    """The one translation unit: the shared header, then each hook's ``.c``.

    BCC rewrites map calls (``m.lookup(...)``) only in its main file, so the
    header's inline helpers must be part of it; the ``#include`` lines in the
    ``.c`` files then hit the include guard.
    """
    parts = []
    for name in (HEADER, *(f"{h.name}.c" for h in HOOKS),
                 *(f"{p.name}.c" for p in TC_PROGRAMS)):
        with open(os.path.join(SOURCES_DIR, name)) as f:
            parts.append(f"/* ---- {name} ---- */\n{f.read()}\n")
    return "".join(parts)


def resolve_cgroup(cgroup: str, *, allow_root: bool = False) -> str:
    """Absolute path of a cgroup v2 directory (given absolute or relative to the mount)."""
    mount = pins.cgroup2_mount()
    path = os.path.realpath(cgroup if os.path.isabs(cgroup) else os.path.join(mount, cgroup))
    if os.path.commonpath([mount, path]) != mount:
        raise BpfConfigError(f"{path} is not inside the cgroup v2 mount {mount}", where="cgroup")
    if not os.path.exists(os.path.join(path, "cgroup.procs")):
        raise BpfConfigError(f"cgroup {path} does not exist", where="cgroup")
    if path == mount and not allow_root:
        raise BpfConfigError(
            f"{path} is the root cgroup: every process on the host would be affected",
            where="cgroup", hint="pass allow_root_cgroup / --allow-root-cgroup on a real node",
        )
    return path


@contextmanager
def _locked(root: str) -> Iterator[None]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class InstallResult:
    version: str
    pin_dir: str
    cgroup: str
    adopted: bool  # True: found attached and pinned, nothing compiled or attached
    removed_versions: tuple[str, ...]


def _check_headers() -> None:
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(os.path.join(build, "include")):
        raise CompileError(
            f"kernel headers for {os.uname().release} are missing ({build} has no include/)",
            errno=errno_mod.ENOENT,
            hint="run scripts/setup.sh (installs linux-headers and links generic ones if "
            "this kernel has no package)",
        )


def compile_programs(build: BuildConfig) -> Any:
    """Compile every hook with BCC; returns the ``bcc.BPF`` module (maps created)."""
    _check_headers()
    try:
        from bcc import BPF
    except ImportError as e:
        raise CompileError(
            f"BCC's Python module cannot be imported ({e})", errno=errno_mod.ENOENT,
            hint="run scripts/setup.sh (installs python3-bpfcc) and use .venv/bin/python",
        ) from None
    try:
        return BPF(text=sources().encode(), cflags=[f"-I{SOURCES_DIR}", *build.cflags()])
    except Exception as e:
        raise CompileError(
            f"BCC could not compile {SOURCES_DIR}/*.c: {e} (compiler messages above)",
            hint="check the kernel headers with: nodemesh check; scripts/setup.sh installs them",
        ) from None


def _fresh_install(build: BuildConfig, pin_dir: str, cgroup: str) -> None:
    module = compile_programs(build)
    cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    links: list[tuple[str, int]] = []
    try:
        progs = []
        for hook in HOOKS:
            try:
                fn = module.load_func(hook.func.encode(), hook.prog_type, attach_type=hook.attach_type)
            except Exception as e:
                raise CompileError(f"the kernel refused program {hook.func}: {e}") from None
            progs.append((hook, int(fn.fd)))
        tc_fds = []
        for prog in TC_PROGRAMS:
            try:
                fn = module.load_func(prog.func.encode(), prog.prog_type)
            except Exception as e:
                raise CompileError(f"the kernel refused program {prog.func}: {e}") from None
            tc_fds.append((pins.prog_pin(pin_dir, prog), int(fn.fd)))
        for hook, pfd in progs:
            links.append((pins.link_pin(pin_dir, hook),
                          syscall.link_create(pfd, cfd, hook.attach_type,
                                              f"attach {hook.func} to {cgroup}")))
        os.makedirs(pin_dir)
        for name in MAP_NAMES:
            syscall.obj_pin(int(module[name.encode()].map_fd), pins.map_pin(pin_dir, name))
        for path, pfd in tc_fds:  # not attached here: the agent attaches them per pod
            syscall.obj_pin(pfd, path)
        for path, lfd in links:  # last: a directory with every link pin is complete
            syscall.obj_pin(lfd, path)
    finally:
        for _, lfd in links:
            os.close(lfd)  # pinned links stay attached; unpinned ones detach here
        os.close(cfd)
        module.cleanup()


def install(cgroup: str, *, bpffs_root: str = DEFAULT_BPFFS_ROOT,
            build: BuildConfig | None = None, allow_root_cgroup: bool = False) -> InstallResult:
    """Attach the data path to ``cgroup`` and pin it under ``bpffs_root``, or adopt it."""
    build = build or BuildConfig()
    cg = resolve_cgroup(cgroup, allow_root=allow_root_cgroup)
    version = build.version(sources().encode())
    pin_dir = os.path.join(bpffs_root, version)
    os.makedirs(bpffs_root, exist_ok=True)
    with _locked(bpffs_root):
        if pins.is_complete(pin_dir):
            states = pins.hook_states(pin_dir)
            if all(s.attached and s.cgroup == cg for s in states):
                return InstallResult(version, pin_dir, cg, True, ())
            where = sorted({s.cgroup or "(gone)" for s in states})
            if all(s.attached for s in states):
                raise BpfError(
                    f"the data path {pin_dir} is attached to {', '.join(where)}, not {cg}",
                    errno=errno_mod.EEXIST, hint="nodemesh uninstall first to move it",
                )
        try:
            pins.remove_dir(pin_dir)  # a crashed or detached install
            _fresh_install(build, pin_dir, cg)
        except BaseException:
            pins.remove_dir(pin_dir)
            raise
        removed = []
        for d in pins.version_dirs(bpffs_root):
            if d != pin_dir:
                pins.remove_dir(d)
                removed.append(os.path.basename(d))
        return InstallResult(version, pin_dir, cg, False, tuple(removed))


def uninstall(bpffs_root: str = DEFAULT_BPFFS_ROOT) -> list[str]:
    """Detach and unpin every version under ``bpffs_root``; returns the pins removed."""
    if not os.path.isdir(bpffs_root):
        return []
    with _locked(bpffs_root):
        removed = [p for d in pins.version_dirs(bpffs_root) for p in pins.remove_dir(d)]
    pins.uninstall(bpffs_root)
    return removed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpf.loader", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("install", help="attach and pin (or adopt what is pinned)")
    ins.add_argument("--cgroup", required=True)
    ins.add_argument("--allow-root-cgroup", action="store_true")
    ins.add_argument("--max-records", type=int, default=BuildConfig().max_records)
    ins.add_argument("--max-enrolled", type=int, default=BuildConfig().max_enrolled)
    uni = sub.add_parser("uninstall", help="detach and unpin")
    for sp in (ins, uni):
        sp.add_argument("--bpffs-root", default=DEFAULT_BPFFS_ROOT)
    args = p.parse_args(argv)
    try:
        if args.cmd == "install":
            build = BuildConfig(max_records=args.max_records, max_enrolled=args.max_enrolled)
            res = install(args.cgroup, bpffs_root=args.bpffs_root, build=build,
                          allow_root_cgroup=args.allow_root_cgroup)
            print(json.dumps(asdict(res)))
        else:
            print(json.dumps({"removed": uninstall(args.bpffs_root)}))
    except BpfError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 2 if isinstance(e, BpfConfigError) else 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
