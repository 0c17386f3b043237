"""hsmbridge: one API over keys that live inside an HSM.

import hsmbridge
from hsmbridge import RSA, EC, Ed25519

hsm = hsmbridge.open("pkcs11:token=ci?module-path=/usr/lib/softhsm/libsofthsm2.so")
key = hsm.generate_key(RSA(2048), label="payments-2026", usage={"sign", "decrypt"})
print(key.public_key_pem())
signature = key.sign(b"message", "rsa-pkcs1-sha256")
"""

from __future__ import annotations

import os
from typing import Any

from .api import EC, HSM, RSA, Ed25519, Key, KeyInfo, KeySpec, parse_key_spec
from .errors import (
    AmbiguousKey,
    AuthenticationError,
    BatchItemError,
    ConfigurationError,
    DecryptionFailed,
    HSMError,
    HSMUnavailable,
    InvalidInput,
    KeyExists,
    KeyExpired,
    KeyNotExtractable,
    KeyNotFound,
    KeyNotYetValid,
    MechanismNotSupported,
    ModuleLoadError,
    PermissionDenied,
    PoolExhausted,
    RateLimited,
    TokenNotFound,
)
from .mechanisms import Mechanism
from .onetime import OneTimeKey, OneTimeKeys
from .rings import KeyRing, KeyVersion

__version__ = "0.1.0"

HSM_ENV = "HSMBRIDGE_HSM"


def open(uri: str | None = None, **options: Any) -> HSM:
    """Open an HSM by URI: ``pkcs11:...`` (RFC 7512) or ``nethsm://USER@HOST:PORT``.

    Without a URI, ``HSMBRIDGE_HSM`` is used. Options: ``pin=`` (PKCS#11),
    ``max_sessions=`` (or ``x-max-sessions`` in the URI); for NetHSM ``password=``,
    ``verify=``, ``timeout=``. A PKCS#11 URI naming a key (``object=``, ``id=``)
    makes it ``hsm.key``.
    Every backend takes ``clock=``: a callable returning the current time as an aware
    ``datetime``, which key lifetimes and key rings use (tests move it instead of sleeping).
    """
    clock = options.pop("clock", None)
    hsm = _open(uri, **options)
    if clock is not None:
        hsm.clock = clock
    return hsm


def _open(uri: str | None, **options: Any) -> HSM:
    uri = uri or os.environ.get(HSM_ENV)
    if not uri:
        raise ConfigurationError(
            f"no HSM given; pass a URI such as 'pkcs11:token=NAME?module-path=/path/module.so' "
            f"or 'nethsm://operator@host:8443', or set {HSM_ENV}"
        )
    if uri.startswith("pkcs11:"):
        from .pkcs11.opening import open_pkcs11
        from .uri import parse_pkcs11_uri

        pin = options.pop("pin", None)
        if pin is not None and not isinstance(pin, str):
            raise ConfigurationError(f"pin= must be a str, not {type(pin).__name__}")
        parsed = parse_pkcs11_uri(uri, pin=pin)
        return open_pkcs11(parsed, **options)
    if uri.startswith("nethsm://"):
        try:
            from .nethsm import NetHSM
        except ImportError:
            raise ConfigurationError("the NetHSM backend is not available in this build") from None
        return NetHSM.from_uri(uri, **options)  # type: ignore[no-any-return]
    # The URI is not quoted: a mistyped one may carry a PIN or password.
    raise ConfigurationError(
        "unknown HSM URI scheme; use 'pkcs11:...' (RFC 7512) or 'nethsm://USER@HOST:PORT'"
    )


__all__ = [
    "EC",
    "HSM",
    "RSA",
    "AmbiguousKey",
    "AuthenticationError",
    "BatchItemError",
    "ConfigurationError",
    "DecryptionFailed",
    "Ed25519",
    "HSMError",
    "HSMUnavailable",
    "InvalidInput",
    "Key",
    "KeyExists",
    "KeyExpired",
    "KeyInfo",
    "KeyNotExtractable",
    "KeyNotFound",
    "KeyNotYetValid",
    "KeyRing",
    "KeySpec",
    "KeyVersion",
    "Mechanism",
    "MechanismNotSupported",
    "ModuleLoadError",
    "OneTimeKey",
    "OneTimeKeys",
    "PermissionDenied",
    "PoolExhausted",
    "RateLimited",
    "TokenNotFound",
    "open",
    "parse_key_spec",
]
