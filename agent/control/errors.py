"""Errors of the control plane (registry, validation, backends).

Every message says what was expected, what was seen and where. Foreign
exceptions (OSError, yaml, json, http) are converted once, at the backend or
parser boundary.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of all control-plane errors."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(RegistryError):
    """A document given by a user is invalid: file, line, field path and reason."""

    def __init__(
        self, reason: str, *, file: str = "<input>", line: int | None = None,
        path: str = "", hint: str | None = None,
    ):
        where = file if line is None else f"{file}:{line}"
        at = f" at {path}" if path else ""
        super().__init__(f"{where}{at}: {reason}", hint=hint)
        self.reason = reason
        self.file = file
        self.line = line
        self.path = path


class SettingError(RegistryError):
    """A backend setting that cannot work: an etcd URL, a TLS file."""


class StateCorruptError(RegistryError):
    """The embedded backend's state file cannot be read back."""


class BackendUnavailable(RegistryError):
    """The backend (etcd) cannot be reached; callers keep their last snapshot."""


class ConflictError(RegistryError):
    """Someone else committed between our read and our write; retry."""


class NotFound(RegistryError):
    """No such resource."""
