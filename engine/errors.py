"""The one error taxonomy. Transports map `ErrorKind` to their status codes, once each."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    VALIDATION = "validation_error"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal_error"


class ServingError(Exception):
    """An error with a kind that every transport knows how to report."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class ValidationError(ServingError):
    kind = ErrorKind.VALIDATION


class PayloadTooLarge(ServingError):
    kind = ErrorKind.PAYLOAD_TOO_LARGE


class NotFound(ServingError):
    kind = ErrorKind.NOT_FOUND


class Overloaded(ServingError):
    kind = ErrorKind.OVERLOADED


class NotReady(ServingError):
    kind = ErrorKind.NOT_READY


class DeadlineExceeded(ServingError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    kind = ErrorKind.CANCELLED


class BundleError(Exception):
    """A model bundle that must not be served (bad hash, failed gate, missing file)."""
