"""Passphrases and HTTP Basic authentication.

Passphrases are stored only as argon2id hashes. Verifying argon2 costs tens of
milliseconds and megabytes on purpose, which a signing service cannot pay per
request; so after one successful verification the bridge remembers an HMAC of
the credentials under a per-process random key (never the passphrase) and
accepts the same credentials by comparing HMACs.

Like the appliance, a login attempt within one second after a failed one (same
client and user) is answered 429 without looking at the passphrase.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .errors import ApiError

PASSPHRASE_MIN = 10
FAILED_LOGIN_DELAY = 1.0

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile defaults


def hash_passphrase(passphrase: str) -> str:
    return _hasher.hash(passphrase)


def verify_passphrase(stored_hash: str, passphrase: str) -> bool:
    try:
        return bool(_hasher.verify(stored_hash, passphrase))
    except (VerificationError, InvalidHashError):
        return False


def check_passphrase_strength(passphrase: object, what: str = "passphrase") -> str:
    if not isinstance(passphrase, str) or len(passphrase) < PASSPHRASE_MIN:
        raise ApiError(400, f"{what} must be a string of at least {PASSPHRASE_MIN} characters")
    return passphrase


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, passphrase) from an ``Authorization: Basic`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, passphrase = decoded.partition(":")
    return (user, passphrase) if sep else None


class CredentialCache:
    """Which (user, passphrase) pairs were verified, as keyed HMACs, plus failed logins.

    An entry is bound to the stored hash it was verified against, so a changed
    passphrase or a recreated user invalidates it without any bookkeeping.
    Lookups take no lock (a dict read is atomic); only writers serialise.
    """

    def __init__(self, delay: float = FAILED_LOGIN_DELAY) -> None:
        #: seconds after a failed login during which the same client and user get 429
        self.delay = delay
        self._key = os.urandom(32)
        self._verified: dict[str, tuple[bytes, str]] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _mac(self, user: str, passphrase: str) -> bytes:
        msg = user.encode() + b"\0" + passphrase.encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def known(self, user: str, passphrase: str, stored_hash: str) -> bool:
        entry = self._verified.get(user)
        return (
            entry is not None
            and entry[1] == stored_hash
            and hmac.compare_digest(entry[0], self._mac(user, passphrase))
        )

    def remember(self, user: str, passphrase: str, stored_hash: str) -> None:
        mac = self._mac(user, passphrase)
        with self._lock:
            self._verified[user] = (mac, stored_hash)

    def check_rate(self, client: str, user: str) -> None:
        last = self._failed.get((client, user))
        if last is not None and time.monotonic() - last < self.delay:
            raise ApiError(
                429,
                "too many failed logins: wait one second after a failed login before retrying",
                {"Retry-After": "1"},
            )

    def record_failure(self, client: str, user: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._failed[(client, user)] = now
            if len(self._failed) > 10000:  # drop stale entries, bounded memory
                self._failed = {k: t for k, t in self._failed.items() if now - t < self.delay}
