"""The one error tree of taskorch. Every transport maps these codes; none invents its own.

A message says what was wrong and what to do about it. It never carries SQL, a stack trace or a
secret: transports show it to models and people as it is.
"""

from __future__ import annotations

from typing import Any


class TaskorchError(Exception):
    """Base of every error the service raises on purpose. `code` is stable and documented."""

    code = "INTERNAL_ERROR"
    retryable = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ValidationError(TaskorchError):
    """An argument is missing, of the wrong type, out of range or too large."""

    code = "VALIDATION_ERROR"


class NotFound(TaskorchError):
    code = "NOT_FOUND"


class Conflict(TaskorchError):
    """`expected_version` did not match: someone else changed the task first."""

    code = "CONFLICT"


class LeaseLost(TaskorchError):
    """The claim is no longer this worker's: the lease expired, the task was cancelled or reclaimed."""

    code = "LEASE_LOST"


class InvalidState(TaskorchError):
    """The transition is not allowed from the task's current status."""

    code = "INVALID_STATE"


class PayloadTooLarge(TaskorchError):
    code = "PAYLOAD_TOO_LARGE"


class Unauthorized(TaskorchError):
    code = "UNAUTHORIZED"


class Forbidden(TaskorchError):
    code = "FORBIDDEN"


class RateLimited(TaskorchError):
    code = "RATE_LIMITED"
    retryable = True


class StoreBusy(TaskorchError):
    """The database stayed locked longer than the busy timeout. Safe to retry."""

    code = "STORE_BUSY"
    retryable = True


class InternalError(TaskorchError):
    code = "INTERNAL_ERROR"


ERROR_CODES: tuple[str, ...] = (
    "VALIDATION_ERROR",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "NOT_FOUND",
    "CONFLICT",
    "LEASE_LOST",
    "INVALID_STATE",
    "PAYLOAD_TOO_LARGE",
    "RATE_LIMITED",
    "STORE_BUSY",
    "INTERNAL_ERROR",
)
