"""Passphrases: argon2id behind a gate, a cache of verified logins, and login throttling.

Passphrases are stored only as argon2id hashes. Verifying one costs tens of
milliseconds of CPU and ``argon2_memory_kib`` of memory on purpose, which
makes every unchecked login attempt an amplifier. So:

- After one successful verification the credentials are remembered as an HMAC
  under a per-process random key (never the passphrase), bound to the stored
  hash; the same credentials are then accepted by comparing HMACs and are
  never throttled, whoever else fails from the same address.
- At most ``argon2_concurrency`` argon2 computations run at once; a
  verification beyond that is answered 503 at once (a hash for an
  administrator's change waits for a slot a few seconds). Hashing memory is
  thus at most ``argon2_concurrency x argon2_memory_kib``, and stored hashes
  with larger parameters are refused rather than computed. Hashes use one
  lane (``argon2_parallelism`` 1), so one computation is one thread and the
  bound is a bound on cores too; hashes made with other parameters (four
  lanes, by older versions) are re-hashed at their next successful check.
- Every unverified check first reserves, atomically, a slot: one check at a
  time per (client, user) — a concurrent attempt with the same passphrase
  waits for that check's result, one with another passphrase gets 429 — none
  within ``failed_login_delay`` after a failure for that pair (the
  appliance's rule), and one token from the client's failure budget
  (``failure_burst`` tokens, ``failure_refill_per_s`` back per second),
  whatever user names it tries. A check that succeeds gives its token back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from .errors import ApiError
from .limits import Limits

log = logging.getLogger("hsmbridge.server")

_T = TypeVar("_T")

PASSPHRASE_MIN = 10
#: seconds an administrator's passphrase change waits for an argon2 slot
HASH_WAIT = 10.0


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


def _utf8(passphrase: str) -> bytes:
    try:
        return passphrase.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "a passphrase must be valid Unicode text") from None


def _too_many(message: str, retry_after: float = 1.0) -> ApiError:
    return ApiError(429, message, {"Retry-After": str(max(1, math.ceil(retry_after)))})


def _busy() -> ApiError:
    return ApiError(
        503,
        "the server is busy checking passphrases; retry in a second",
        {"Retry-After": "1"},
    )


@dataclass
class _Attempt:
    """One passphrase check in progress; identical concurrent attempts wait for its result."""

    mac: bytes
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool | None = None  # None: it was not checked (server busy)


class _FailureBudget:
    """Token buckets per client: a check takes a token, a successful one gives it back.

    Not thread-safe by itself: :class:`Passphrases` calls it under its lock.
    """

    def __init__(self, limits: Limits) -> None:
        self.burst = float(limits.failure_burst)
        self.rate = limits.failure_refill_per_s
        self.max_clients = limits.max_tracked_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, as of)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, client: str, now: float) -> float | None:
        """None if a token was taken, else the seconds until one is back."""
        tokens = self._tokens(client, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_clients:
            self._prune(now)
        return None

    def give_back(self, client: str, now: float) -> None:
        tokens = min(self.burst, self._tokens(client, now) + 1.0)
        if tokens >= self.burst:
            self._buckets.pop(client, None)
        else:
            self._buckets[client] = (tokens, now)

    def _prune(self, now: float) -> None:
        full = [c for c in self._buckets if self._tokens(c, now) >= self.burst]
        for client in full:
            del self._buckets[client]
        excess = len(self._buckets) - self.max_clients
        for client in list(self._buckets)[: max(0, excess)]:  # oldest entries first
            del self._buckets[client]


class Passphrases:
    """argon2id hashing and checking for one server, with its login cache and throttles."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        #: seconds after a failed check during which the same client and user get 429
        self.delay = limits.failed_login_delay
        self._hasher = argon2.PasswordHasher(
            time_cost=limits.argon2_time_cost,
            memory_cost=limits.argon2_memory_kib,
            parallelism=limits.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._gate = threading.BoundedSemaphore(limits.argon2_concurrency)
        self._key = os.urandom(32)
        self._lock = threading.Lock()
        self._verified: dict[str, tuple[bytes, str]] = {}  # user -> (HMAC, stored hash)
        self._in_flight: dict[tuple[str, str], _Attempt] = {}
        self._failed: dict[tuple[str, str], float] = {}  # (client, user) -> last failure
        self._budget = _FailureBudget(limits)
        #: checked against for unknown users, so they cost what known ones do
        self._dummy_hash = self.hash("hsmbridge-no-such-user")

    # -- hashing ---------------------------------------------------------------------

    def hash(self, passphrase: str) -> str:
        """An argon2id hash (waits up to :data:`HASH_WAIT` s for an argon2 slot, else 503)."""
        secret = _utf8(passphrase)
        return self.gated(lambda: self._hasher.hash(secret))

    def gated(self, kdf: Callable[[], _T]) -> _T:
        """Run another passphrase KDF (the backup key's scrypt, 16 MiB) in an argon2 slot:
        it costs as much, so the same bound holds (waits up to :data:`HASH_WAIT` s, else 503)."""
        if not self._gate.acquire(timeout=HASH_WAIT):
            raise _busy()
        try:
            return kdf()
        finally:
            self._gate.release()

    def _upgraded(
        self, passphrase: str, stored_hash: str, upgrade: Callable[[str], bool] | None
    ) -> str:
        """The hash to remember: a re-hash with this server's parameters if stored."""
        if upgrade is None or not self._hasher.check_needs_rehash(stored_hash):
            return stored_hash
        if not self._gate.acquire(blocking=False):
            return stored_hash  # next time
        try:
            new_hash = self._hasher.hash(_utf8(passphrase))
        finally:
            self._gate.release()
        if not upgrade(new_hash):
            return stored_hash
        log.info("re-hashed a passphrase with the server's argon2 parameters")
        return new_hash

    def _verify(self, stored_hash: str, passphrase: str) -> bool:
        """argon2 verification; the caller holds a gate slot."""
        try:
            params = argon2.extract_parameters(stored_hash)
        except InvalidHashError:
            return False
        if (
            params.memory_cost > self.limits.argon2_memory_kib
            or params.time_cost > self.limits.argon2_time_cost
        ):
            log.error("a stored passphrase hash asks for more than the argon2 limits; refused")
            return False
        try:
            return bool(self._hasher.verify(stored_hash, _utf8(passphrase)))
        except (VerificationError, InvalidHashError):
            return False

    # -- the login cache ---------------------------------------------------------------

    def _mac(self, user: str, passphrase: str) -> bytes:
        msg = user.encode("utf-8", "surrogatepass") + b"\0" + _utf8(passphrase)
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def known(self, user: str, passphrase: str, stored_hash: str) -> bool:
        """Were these credentials verified against this stored hash? (No argon2, no lock.)"""
        entry = self._verified.get(user)
        return (
            entry is not None
            and entry[1] == stored_hash
            and hmac.compare_digest(entry[0], self._mac(user, passphrase))
        )

    # -- checking ----------------------------------------------------------------------

    def check(
        self,
        client: str,
        subject: str,
        passphrase: str,
        stored_hash: str | None,
        *,
        remember: bool = True,
        upgrade: Callable[[str], bool] | None = None,
    ) -> bool:
        """Is ``passphrase`` right for ``subject`` (a user, or ``<unlock>``)?

        ``stored_hash`` None means the subject does not exist: the check costs the
        same and fails. 429 when throttled, 503 when every argon2 slot is busy.
        A right passphrase whose hash has other parameters than this server's is
        re-hashed (when a slot is free) and handed to ``upgrade``, which stores
        it and says whether it did.
        """
        if stored_hash is not None and remember and self.known(subject, passphrase, stored_hash):
            return True
        mac = self._mac(subject, passphrase)
        attempt, mine = self._reserve(client, subject, mac)
        if not mine:
            attempt.done.wait(timeout=60)
            if attempt.ok is None:
                raise _busy()
            return attempt.ok
        ok: bool | None = None
        try:
            if not self._gate.acquire(blocking=False):
                raise _busy()
            try:
                ok = self._verify(stored_hash or self._dummy_hash, passphrase)
                ok = ok and stored_hash is not None
            finally:
                self._gate.release()
            if ok and stored_hash is not None:
                stored_hash = self._upgraded(passphrase, stored_hash, upgrade)
                if remember:
                    with self._lock:
                        self._verified[subject] = (mac, stored_hash)
            return ok
        finally:
            self._finish(client, subject, attempt, ok)

    def record_failure(self, client: str, subject: str) -> None:
        """A failed check made elsewhere (another replica): throttle the pair here too."""
        now = time.monotonic()
        with self._lock:
            self._failed[(client, subject)] = now

    def _reserve(self, client: str, subject: str, mac: bytes) -> tuple[_Attempt, bool]:
        """(attempt, True) if this caller checks; (attempt, False) to wait for an identical one."""
        pair = (client, subject)
        now = time.monotonic()
        with self._lock:
            current = self._in_flight.get(pair)
            if current is not None:
                if hmac.compare_digest(current.mac, mac):
                    return current, False
                raise _too_many(
                    "too many login attempts: another one for this user from your address "
                    "is being checked"
                )
            last = self._failed.get(pair)
            if last is not None and now - last < self.delay:
                raise _too_many(
                    "too many failed logins: wait one second after a failed login before retrying",
                    self.delay - (now - last),
                )
            wait = self._budget.take(client, now)
            if wait is not None:
                raise _too_many(
                    "too many failed logins from your address: wait before retrying", wait
                )
            attempt = self._in_flight[pair] = _Attempt(mac)
            return attempt, True

    def _finish(self, client: str, subject: str, attempt: _Attempt, ok: bool | None) -> None:
        pair = (client, subject)
        now = time.monotonic()
        with self._lock:
            self._in_flight.pop(pair, None)
            if ok is False:
                self._failed[pair] = now
                if len(self._failed) > self.limits.max_tracked_clients:
                    self._failed = {p: t for p, t in self._failed.items() if now - t < self.delay}
            else:  # verified, or never checked: the token was not spent on a failure
                self._budget.give_back(client, now)
        attempt.ok = ok
        attempt.done.set()
