"""Errors of the eBPF layer.

``BpfError`` is the kernel (or BCC) refusing something, with ``errno`` kept;
``BpfConfigError`` is bad input refused before anything in the kernel changed;
``NotInstalledError`` means no pinned data path was found where one was asked for.
"""

from __future__ import annotations

import errno as errno_mod


class BpfError(Exception):
    """The kernel or the compiler refused an operation; ``errno`` is the kernel's code."""

    def __init__(self, message: str, *, errno: int = 0, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.hint = hint


class BpfConfigError(BpfError):
    """Invalid input (address, port, CIDR, netns, build flag); nothing was changed."""

    def __init__(self, message: str, *, where: str = "", hint: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message, errno=errno_mod.EINVAL,
                         hint=hint)
        self.where = where


class NotInstalledError(BpfError):
    """No (complete) data path is pinned under the given bpffs directory."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, errno=errno_mod.ENOENT, hint=hint)


class CompileError(BpfError):
    """BCC could not compile or load the programs (headers, kernel, verifier)."""
