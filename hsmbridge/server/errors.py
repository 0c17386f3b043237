"""HTTP errors of the bridge, and the one mapping from hsmbridge errors to statuses.

Every error response is ``{"message": ...}`` (NetHSM's ErrorResponse). Handlers
raise :class:`ApiError` for protocol problems; backend :class:`HSMError`s are
translated by :func:`status_for` and nowhere else.
"""

from __future__ import annotations

from ..errors import (
    AmbiguousKey,
    AuthenticationError,
    BatchItemError,
    ConfigurationError,
    DecryptionFailed,
    HSMError,
    HSMUnavailable,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    MechanismNotSupported,
    PermissionDenied,
    RateLimited,
)


class ApiError(Exception):
    """An HTTP error with a NetHSM-style JSON body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found")


def not_implemented(what: str) -> ApiError:
    return ApiError(501, f"{what} is not implemented by hsmbridge serve")


# Order matters: subclasses before their bases.
_STATUS: tuple[tuple[type[HSMError], int], ...] = (
    (RateLimited, 429),
    (AuthenticationError, 401),
    (PermissionDenied, 403),
    (KeyNotFound, 404),
    (KeyExists, 409),
    (AmbiguousKey, 409),
    (MechanismNotSupported, 400),
    (InvalidInput, 400),
    (DecryptionFailed, 400),
    (HSMUnavailable, 503),
    (ConfigurationError, 500),
)


def status_for(exc: HSMError) -> int:
    """The HTTP status NetHSM would answer for this hsmbridge error."""
    if isinstance(exc, BatchItemError):
        return status_for(exc.cause)
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return exc.status if exc.status and 400 <= exc.status < 600 else 500


def from_hsm_error(exc: HSMError) -> ApiError:
    cause = exc.cause if isinstance(exc, BatchItemError) else exc
    return ApiError(status_for(cause), cause.message)
