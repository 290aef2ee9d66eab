"""Pre-flight checks (`nodemesh check`), in the spirit of `linkerd check --pre`.

Each check returns a :class:`CheckResult`; none changes the system: BPF
programs are loaded into the kernel to prove the program type and attach type
are supported, and closed again without being attached anywhere.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from netns import cgroup
from netns.errors import NetnsError


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""


# Hooks the mesh needs: (function name, program type, attach type), from uapi/linux/bpf.h.
_BPF_PROG_TYPE_SOCK_OPS = 13
_BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
MESH_HOOKS: tuple[tuple[str, str, int, int], ...] = (
    ("connect4", "cgroup/connect4", _BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 10),
    ("connect6", "cgroup/connect6", _BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 11),
    ("sendmsg4", "cgroup/sendmsg4", _BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 14),
    ("recvmsg4", "cgroup/recvmsg4", _BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 19),
    ("getpeername4", "cgroup/getpeername4", _BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 29),
    ("getpeername6", "cgroup/getpeername6", _BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 30),
    ("sockops", "sock_ops", _BPF_PROG_TYPE_SOCK_OPS, 3),
)

_TRIVIAL = "\n".join(
    f"int nm_{fn}({'struct bpf_sock_ops' if pt == _BPF_PROG_TYPE_SOCK_OPS else 'struct bpf_sock_addr'}"
    " *ctx) { return 1; }"
    for fn, _, pt, _ in MESH_HOOKS
)


def check_root() -> CheckResult:
    ok = os.geteuid() == 0
    return CheckResult(
        "root", ok, "running as root" if ok else f"running as uid {os.geteuid()}", "run with sudo"
    )


def check_linux() -> CheckResult:
    ok = platform.system() == "Linux"
    return CheckResult("linux", ok, f"{platform.system()} {platform.release()}")


def check_cgroup2() -> CheckResult:
    try:
        mount = cgroup.cgroup2_mount()
    except NetnsError as e:
        return CheckResult("cgroup v2", False, e.message, e.hint or "")
    mode = "unified" if mount == "/sys/fs/cgroup" else "hybrid"
    return CheckResult("cgroup v2", True, f"mounted at {mount} ({mode})")


def check_bpffs() -> CheckResult:
    with open("/proc/mounts") as f:
        ok = any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f)
    return CheckResult(
        "bpffs",
        ok,
        "mounted at /sys/fs/bpf" if ok else "/sys/fs/bpf is not a bpf filesystem",
        "mount -t bpf bpffs /sys/fs/bpf (scripts/setup.sh does this)",
    )


def check_headers() -> CheckResult:
    build = f"/lib/modules/{platform.release()}/build"
    ok = os.path.exists(os.path.join(build, "include/generated/autoconf.h"))
    detail = f"{build} -> {os.path.realpath(build)}" if ok else f"{build} is missing"
    return CheckResult(
        "kernel headers", ok, detail, "run scripts/setup.sh (installs or links kernel headers)"
    )


def check_bpftool() -> CheckResult:
    path = shutil.which("bpftool")
    return CheckResult("bpftool", path is not None, path or "not found", "apt-get install bpftool")


def check_btf() -> CheckResult:
    # Optional: BCC does not need BTF, so a missing one is reported, not failed.
    present = os.path.exists("/sys/kernel/btf/vmlinux")
    return CheckResult(
        "kernel BTF",
        True,
        "/sys/kernel/btf/vmlinux" if present else "absent (optional)",
    )


def check_bcc_and_hooks() -> list[CheckResult]:
    """Compile a trivial program with BCC, then load one per mesh hook."""
    try:
        from bcc import BPF
    except ImportError as e:
        return [
            CheckResult(
                "BCC",
                False,
                f"cannot import bcc: {e}",
                "apt-get install python3-bpfcc, then run scripts/setup.sh to link it into .venv",
            )
        ]
    try:
        prog = BPF(text=_TRIVIAL)
    except Exception as e:
        return [
            CheckResult(
                "BCC compile",
                False,
                f"BCC could not compile a trivial program: {e}",
                "kernel headers missing or broken: run scripts/setup.sh",
            )
        ]
    results = [CheckResult("BCC compile", True, "compiled a trivial program")]
    try:
        for fn, label, prog_type, attach_type in MESH_HOOKS:
            try:
                prog.load_func(f"nm_{fn}", prog_type, attach_type=attach_type)
                results.append(CheckResult(f"BPF hook {label}", True, "kernel loads this program type"))
            except Exception as e:
                results.append(
                    CheckResult(
                        f"BPF hook {label}",
                        False,
                        f"kernel refused: {e}",
                        "nodemesh needs Linux >= 5.8 with CONFIG_CGROUP_BPF=y",
                    )
                )
    finally:
        prog.cleanup()
    return results


CHECKS: tuple[Callable[[], CheckResult], ...] = (
    check_linux,
    check_root,
    check_cgroup2,
    check_bpffs,
    check_headers,
    check_bpftool,
    check_btf,
)


def run_all() -> list[CheckResult]:
    results = [c() for c in CHECKS]
    if results[1].ok:  # loading BPF programs needs root
        results.extend(check_bcc_and_hooks())
    else:
        results.append(CheckResult("BPF hooks", False, "not checked: needs root", "run with sudo"))
    return results
