"""Errors of the namespace layer.

``TopologyError`` is bad input found before anything is created; ``KernelError``
is the kernel refusing an operation, with its errno kept.
"""

from __future__ import annotations


class NetnsError(Exception):
    """Base of every error raised by the netns package."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class TopologyError(NetnsError):
    """The requested topology is invalid; nothing was created."""

    def __init__(self, message: str, *, where: str = "", hint: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.where = where
        self.reason = message

    def located(self, source: str) -> TopologyError:
        """The same error, with the file it came from in front of the field path."""
        return TopologyError(
            self.reason, where=f"{source}: {self.where}" if self.where else source, hint=self.hint
        )


class KernelError(NetnsError):
    """The kernel refused an operation. ``errno`` is the kernel's error code."""

    def __init__(self, message: str, *, errno: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno


class NotFoundError(NetnsError):
    """A named testbed, node or pod does not exist."""
