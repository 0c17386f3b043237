"""python-pkcs11 exceptions and raw CK_RV codes to hsmbridge's exception tree."""

from __future__ import annotations

import pkcs11.exceptions as p11x

from ..errors import (
    AuthenticationError,
    DecryptionFailed,
    HSMError,
    HSMUnavailable,
    InvalidInput,
    KeyNotFound,
    MechanismNotSupported,
    PermissionDenied,
)

#: Errors after which a session must not be reused.
SESSION_BROKEN = (
    p11x.SessionHandleInvalid,
    p11x.SessionClosed,
    p11x.DeviceError,
    p11x.DeviceRemoved,
    p11x.DeviceMemory,
    p11x.TokenNotPresent,
    p11x.TokenNotRecognised,
    p11x.UserNotLoggedIn,
    # An operation left active after a failure the module did not end (tpm2-pkcs11
    # 1.9 after a bad padding), which the native engine's finishing call did not clear.
    p11x.OperationActive,
)

#: CK_RV values the native engine reports, by python-pkcs11 exception class.
_RV_TO_EXC: dict[int, type[p11x.PKCS11Error]] = {
    0x05: p11x.GeneralError,
    0x06: p11x.FunctionFailed,
    0x07: p11x.ArgumentsBad,
    0x20: p11x.DataInvalid,
    0x21: p11x.DataLenRange,
    0x30: p11x.DeviceError,
    0x31: p11x.DeviceMemory,
    0x32: p11x.DeviceRemoved,
    0x40: p11x.EncryptedDataInvalid,
    0x41: p11x.EncryptedDataLenRange,
    0x60: p11x.KeyHandleInvalid,
    0x63: p11x.KeyTypeInconsistent,
    0x68: p11x.FunctionRejected,  # CKR_KEY_FUNCTION_NOT_PERMITTED
    0x70: p11x.MechanismInvalid,
    0x71: p11x.MechanismParamInvalid,
    0x82: p11x.ObjectHandleInvalid,
    0x90: p11x.OperationActive,
    0x91: p11x.OperationNotInitialized,
    0xB0: p11x.SessionClosed,
    0xB3: p11x.SessionHandleInvalid,
    0xE0: p11x.TokenNotPresent,
    0x101: p11x.UserNotLoggedIn,
}


#: Return values of C_Initialize that have no python-pkcs11 exception class.
_INIT_RV_NAMES = {
    0x0A: "CKR_CANT_LOCK",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


def rv_name(rv: int) -> str:
    """A readable CK_RV for messages: ``0x191 CKR_CRYPTOKI_ALREADY_INITIALIZED``."""
    name = _INIT_RV_NAMES.get(rv) or getattr(_RV_TO_EXC.get(rv), "__name__", "")
    return f"CK_RV 0x{rv:x}" + (f" {name}" if name else "")


def exception_for_rv(rv: int) -> p11x.PKCS11Error:
    """A python-pkcs11 exception for a raw CK_RV (from the native engine)."""
    cls = _RV_TO_EXC.get(rv, p11x.PKCS11Error)
    return cls(f"CK_RV 0x{rv:08x}")


def translate(exc: Exception, *, what: str, key: str | None = None) -> HSMError:
    """Map a python-pkcs11 exception raised while doing ``what`` to an HSMError."""
    name = type(exc).__name__
    subject = f"key {key!r}" if key else "the token"
    if isinstance(exc, HSMError):
        return exc
    if isinstance(exc, (p11x.PinIncorrect, p11x.PinInvalid, p11x.PinLenRange)):
        return AuthenticationError(
            "the token refused the PIN; check pin-value, pin-source or HSMBRIDGE_PIN "
            "(repeated failures can lock the token)"
        )
    if isinstance(exc, p11x.PinLocked):
        return AuthenticationError(
            "the token's user PIN is locked after too many failures; reset it with the SO PIN"
        )
    if isinstance(exc, (p11x.PinExpired, p11x.UserPinNotInitialized)):
        return AuthenticationError(
            f"the token's user PIN must be (re)initialised before use ({name})"
        )
    if isinstance(exc, (p11x.EncryptedDataInvalid, p11x.EncryptedDataLenRange)):
        return DecryptionFailed(
            f"{what} with {subject} failed: the ciphertext is corrupt, was made for another "
            f"key, or used another padding ({name})"
        )
    if isinstance(exc, (p11x.DataLenRange, p11x.DataInvalid)):
        return InvalidInput(
            f"{what} with {subject}: the input has the wrong length or form ({name})"
        )
    if isinstance(exc, (p11x.KeyTypeInconsistent, p11x.KeyHandleInvalid, p11x.ObjectHandleInvalid)):
        if isinstance(exc, p11x.KeyTypeInconsistent):
            return InvalidInput(f"{what}: {subject} has the wrong type for this mechanism")
        return KeyNotFound(f"{subject} no longer exists in the token (deleted by another process?)")
    if isinstance(exc, (p11x.MechanismInvalid, p11x.MechanismParamInvalid, p11x.ArgumentsBad)):
        return MechanismNotSupported(
            f"{what}: the token rejected the mechanism or its parameters ({name})"
        )
    if isinstance(exc, p11x.FunctionRejected):
        return PermissionDenied(f"{what}: the token does not permit this operation with {subject}")
    if isinstance(exc, SESSION_BROKEN):
        return HSMUnavailable(
            f"{what} failed: the token session broke ({name}); the session was replaced, retry"
        )
    return HSMError(f"{what} with {subject} failed in the token ({name})")
