"""One exception tree for every backend.

Every failure hsmbridge raises is an :class:`HSMError`. Messages say what was
wrong and what to do about it. They never contain a PIN, a password or a
plaintext: callers pass secrets in, never out, and tests assert this.
"""

from __future__ import annotations


class HSMError(Exception):
    """Base of every error hsmbridge raises."""

    #: HTTP status when the error came from (or maps to) a NetHSM REST answer.
    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigurationError(HSMError):
    """The URI, options or environment given to hsmbridge are wrong."""


class ModuleLoadError(ConfigurationError):
    """The PKCS#11 module could not be loaded or initialised."""


class TokenNotFound(ConfigurationError):
    """No token matches the URI's token/serial/slot-id attributes."""


class AuthenticationError(HSMError):
    """The PIN, password or user was refused."""


class PermissionDenied(HSMError):
    """The credentials are valid but the user's role may not do this."""


class RateLimited(AuthenticationError):
    """Too many failed logins in a short time; wait and retry."""


class KeyNotFound(HSMError):
    """No key matches the label or id asked for."""


class AmbiguousKey(HSMError):
    """More than one key matches; ask by id, or make labels unique."""


class KeyExists(HSMError):
    """A key with this label or id already exists."""


class KeyNotExtractable(HSMError):
    """The private key cannot leave the HSM (private numbers, private bytes, key exchange)."""


class KeyExpired(HSMError):
    """The key (or key-ring version) is past its ``not_after``: rotate, or use a newer version."""


class KeyNotYetValid(HSMError):
    """The key (or a pending key-ring version) is used before its ``not_before``."""


class PoolExhausted(HSMError):
    """No pre-generated one-time key was ready in time: issue() outran the refill."""


class MechanismNotSupported(HSMError):
    """The HSM or the key cannot do this mechanism (the message lists what it can)."""


class InvalidInput(HSMError):
    """The data, key type or parameters cannot be used for this operation."""


class DecryptionFailed(HSMError):
    """The ciphertext did not decrypt: corrupt, or made for another key or padding."""


class HSMUnavailable(HSMError):
    """The HSM is unreachable, locked, not operational, or the session broke."""


class BatchItemError(HSMError):
    """One item of a batch failed; ``index`` says which and ``cause`` why."""

    def __init__(self, index: int, cause: HSMError) -> None:
        super().__init__(f"batch item {index} failed: {cause.message}", status=cause.status)
        self.index = index
        self.cause = cause


__all__ = [
    "AmbiguousKey",
    "AuthenticationError",
    "BatchItemError",
    "ConfigurationError",
    "DecryptionFailed",
    "HSMError",
    "HSMUnavailable",
    "InvalidInput",
    "KeyExists",
    "KeyExpired",
    "KeyNotExtractable",
    "KeyNotFound",
    "KeyNotYetValid",
    "MechanismNotSupported",
    "ModuleLoadError",
    "PermissionDenied",
    "PoolExhausted",
    "RateLimited",
    "TokenNotFound",
]
