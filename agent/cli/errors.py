"""One place that maps errors to messages and exit codes (see README: exit codes).

Exit codes: 0 ok; 1 a check failed (``check``, ``status``); 2 bad input
(arguments, config, topology); 3 not found; 4 the kernel or system refused;
5 internal error (a bug: please report it).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from netns.errors import KernelError, NetnsError, NotFoundError, TopologyError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_SYSTEM = 4
EXIT_INTERNAL = 5

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An error a user can fix; carries an exit code and an optional hint."""

    def __init__(self, message: str, *, code: int = EXIT_BAD_INPUT, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


def _exit_code(e: BaseException) -> int:
    if isinstance(e, UserError):
        return e.code
    if isinstance(e, TopologyError):
        return EXIT_BAD_INPUT
    if isinstance(e, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(e, KernelError | PermissionError | OSError):
        return EXIT_SYSTEM
    if isinstance(e, NetnsError):
        return EXIT_SYSTEM
    return EXIT_INTERNAL


# Other packages' exceptions -> exit code, the most specific of a family first.
# Named, not imported: commands are loaded lazily, and an exception can only be an
# instance of a class whose module is loaded, so the classes are looked up in
# sys.modules when an error happens. Every command gets the same codes.
_CODES: tuple[tuple[str, str, int], ...] = (
    ("agent.config", "ConfigError", EXIT_BAD_INPUT),
    ("agent.node", "AgentError", EXIT_SYSTEM),
    ("agent.identity.errors", "CaNotFoundError", EXIT_NOT_FOUND),  # a CaFileError too
    ("agent.identity.errors", "IdentityError", EXIT_BAD_INPUT),
    ("bpf.errors", "BpfConfigError", EXIT_BAD_INPUT),
    ("bpf.errors", "NotInstalledError", EXIT_NOT_FOUND),
    ("bpf.errors", "BpfError", EXIT_SYSTEM),
    ("agent.control.errors", "InputError", EXIT_BAD_INPUT),
    ("agent.control.errors", "SettingError", EXIT_BAD_INPUT),
    ("agent.control.errors", "StateCorruptError", EXIT_BAD_INPUT),
    ("agent.control.errors", "NotFound", EXIT_NOT_FOUND),
    ("agent.control.errors", "RegistryError", EXIT_SYSTEM),  # unreachable etcd included
)


def exit_code(e: BaseException) -> int:
    for module, name, code in _CODES:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return code
    return _exit_code(e)


def fail(e: BaseException) -> None:
    code = exit_code(e)
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    if code == EXIT_INTERNAL:
        msg = f"internal error: {type(e).__name__}: {msg}"
    click.echo(f"error: {msg}", err=True)
    hint = getattr(e, "hint", None)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(code)


def handled(fn: F) -> F:
    """Decorator for click commands: known errors become a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:
            fail(e)

    return wrapper  # type: ignore[return-value]


def require_root() -> None:
    import os

    if os.geteuid() != 0:
        raise UserError(
            "this command needs root (it creates network namespaces and cgroups)",
            code=EXIT_SYSTEM,
            hint="run it with sudo",
        )
