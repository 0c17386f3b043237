"""Key rings: a named, versioned key whose whole lifecycle lives in the HSM.

A ring is a list of *versions*, each a key pair in the HSM plus one immutable
:class:`VersionRecord`: its number, ``not_before`` (when it becomes primary)
and ``grace`` (how long the versions before it keep working once it is
primary). Everything else is derived, so a rotation writes exactly one new
record and nothing is ever updated in place (docs/design.md, "Key rings"):

- ``not_after`` of version *n* is the earliest ``not_before + grace`` of
  the versions after it (None for the newest version: it never expires by
  itself). So a rotation's grace bounds *every* older version — a rotation
  with no grace (a compromised key) ends them all — and older versions never
  outlive newer ones: expired versions are always the oldest, and sweeping
  them changes nothing about the rest;
- the *primary* is the newest version whose ``not_before`` has passed;
- a version is ``expired`` from its ``not_after``, ``pending`` before its
  ``not_before``, else ``grace`` (older than the primary, still usable).

Two primaries or none cannot happen: the primary is a function of the
records, and a crashed rotation leaves either no new record or a complete
one. Instants are whole seconds (NetHSM labels hold them), read from the
HSM handle's clock (``hsmbridge.open(..., clock=)``).

Backends keep records in their own objects, behind :class:`RingStore`:
``hsmbridge.pkcs11.ringstore`` (CKO_DATA objects and key dates) and
``hsmbridge.nethsm.ringstore`` (key IDs and labels).
"""

from __future__ import annotations

import abc
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .api import Clock, Key, KeySpec, Validity, normalize_usage
from .errors import (
    DecryptionFailed,
    InvalidInput,
    KeyExpired,
    KeyNotFound,
    KeyNotYetValid,
)
from .mechanisms import Mechanism, parse_mechanism

if TYPE_CHECKING:
    from .api import HSM

#: ring names double as parts of NetHSM key IDs and PKCS#11 labels
RING_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}")
#: longest grace or activation delay (NetHSM labels hold 9 digits of seconds)
MAX_SECONDS = 999_999_999
#: how long a ring's records are reused before the HSM is asked again (seconds;
#: one cheap look for the next version, see RingStore.may_have); a rotation by
#: another process is seen within this time
REFRESH = 1.0
#: the longest a ring goes without reading all its records again (seconds), in
#: case the cheap look missed a change (a rotating process killed in between)
FULL_READ = 30.0

__all__ = ["Clock", "KeyRing", "KeyVersion", "RingStore", "VersionRecord"]


def check_ring_name(name: object) -> str:
    if not isinstance(name, str) or not RING_NAME_RE.fullmatch(name):
        raise InvalidInput(
            f"ring name {name!r} is invalid: 1-64 letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def to_instant(when: datetime) -> int:
    """A datetime as whole Unix seconds (the resolution records keep)."""
    if when.tzinfo is None:
        raise InvalidInput("the clock must return timezone-aware datetimes (e.g. UTC)")
    return math.floor(when.timestamp())


def from_instant(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _seconds(value: timedelta, what: str) -> int:
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise InvalidInput(f"{what} must be a datetime.timedelta of zero or more, got {value!r}")
    seconds = math.ceil(value.total_seconds())
    if seconds > MAX_SECONDS:
        raise InvalidInput(f"{what} is longer than {MAX_SECONDS} seconds")
    return seconds


@dataclass(frozen=True, order=True)
class VersionRecord:
    """What the HSM stores for one ring version (the rest is derived)."""

    ring: str
    version: int
    #: when it becomes primary, Unix seconds
    not_before: int
    #: seconds the older versions keep working after ``not_before``
    grace: int
    #: the version's key pair (PKCS#11 CKA_ID hex / NetHSM key ID)
    key_id: str


@dataclass(frozen=True)
class KeyVersion:
    """One version of a ring, or (``version`` None) a plain key with a lifetime."""

    version: int | None
    kid: str
    #: ``pending`` | ``primary`` | ``grace`` | ``expired``
    state: str
    not_before: datetime | None
    not_after: datetime | None
    key_id: str
    label: str
    ring: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ring": self.ring,
            "version": self.version,
            "kid": self.kid,
            "state": self.state,
            "not_before": self.not_before.isoformat() if self.not_before else None,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "key_id": self.key_id,
            "label": self.label,
        }


class RingStore(abc.ABC):
    """How a backend keeps ring versions and plain keys' lifetimes in the HSM."""

    @abc.abstractmethod
    def records(self, ring: str | None = None) -> list[VersionRecord]:
        """Committed versions (their key exists) of ``ring``, or of every ring."""

    @abc.abstractmethod
    def create_version(self, record: VersionRecord, spec: KeySpec, usage: frozenset[str]) -> Key:
        """Generate the version's key and store its record, atomically.

        Raises :class:`KeyExists` when that version number is taken (another
        process rotated first). ``record.key_id`` is ignored; the key's is used.
        """

    @abc.abstractmethod
    def version_key(self, record: VersionRecord) -> Key:
        """The version's key (:class:`KeyNotFound` once destroyed)."""

    @abc.abstractmethod
    def destroy_version(self, record: VersionRecord) -> None:
        """Destroy the version's key, then its record; repeatable after a crash."""

    def may_have(self, ring: str, version: int) -> bool:
        """A cheap check between full reads: could ``version`` of ``ring`` exist now?

        Versions are only ever added as newest+1 (removals are of expired
        versions, which time alone already marks), so a ring whose next
        version is absent is unchanged.
        """
        return True

    def tidy(self, ring: str) -> None:  # noqa: B027
        """Remove what interrupted rotations and sweeps left (after a sweep); optional."""

    def ring_names(self) -> list[str]:
        return sorted({r.ring for r in self.records()})

    @abc.abstractmethod
    def expiring_keys(self) -> list[Key]:
        """Plain keys made with ``expires_in`` (their ``validity`` set)."""

    @abc.abstractmethod
    def destroy_key(self, key: Key) -> None:
        """Destroy a plain key and its lifetime record."""


def version_label(ring: str, version: int) -> str:
    """The label of a version's key: ``NAME@VERSION``, as the command line spells it."""
    return f"{ring}@{version}"


@dataclass(frozen=True)
class _Entry:
    record: VersionRecord
    not_before: datetime
    not_after: datetime | None


def _schedule(records: Iterable[VersionRecord]) -> list[_Entry]:
    """Records (any order) to entries, oldest first, with their derived ``not_after``."""
    ordered = sorted(records, key=lambda r: r.version)
    out = []
    end: int | None = None  # the earliest not_before + grace of the versions after
    for rec in reversed(ordered):
        after = from_instant(end) if end is not None else None
        out.append(_Entry(rec, from_instant(rec.not_before), after))
        limit = rec.not_before + rec.grace
        end = limit if end is None else min(end, limit)
    return out[::-1]


def _primary_index(entries: list[_Entry], now: datetime) -> int | None:
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].not_before <= now:
            return i
    return None


def _state(entries: list[_Entry], i: int, primary: int | None, now: datetime) -> str:
    entry = entries[i]
    if entry.not_after is not None and now >= entry.not_after:
        return "expired"
    if i == primary:
        return "primary"
    if now < entry.not_before:
        return "pending"
    return "grace"


class KeyRing:
    """A named, versioned key in one HSM (``hsm.key_ring(name)``).

    Its records are read from the HSM at most every :data:`REFRESH` seconds
    (and always before a rotation or sweep), so every process sharing the
    HSM sees the same versions, primary and deadlines.
    """

    def __init__(self, hsm: HSM, name: str) -> None:
        self.hsm = hsm
        self.name = check_ring_name(name)
        self._store = hsm.ring_store()
        self._entries: list[_Entry] = []
        self._read_at = self._full_read_at = -math.inf
        self._keys: dict[int, Key] = {}
        self._kids: dict[str, int] = {}  # kid -> version, kept after a sweep
        self._swept: set[int] = set()

    def __repr__(self) -> str:
        return f"<KeyRing {self.name!r} in {self.hsm.description}>"

    # -- reading -------------------------------------------------------------------

    def _read(self, force: bool = False) -> list[_Entry]:
        if not force and time.monotonic() - self._read_at <= REFRESH:
            return self._entries
        newest = self._entries[-1].record.version if self._entries else 0
        if (
            force
            or not self._entries
            or time.monotonic() - self._full_read_at > FULL_READ
            or self._store.may_have(self.name, newest + 1)
        ):
            entries = _schedule(self._store.records(self.name))
            self._full_read_at = time.monotonic()
            known = {e.record.version for e in entries}
            self._swept |= {v for v in self._keys if v not in known}
            for entry in entries:  # a rotation elsewhere moves the predecessor's not_after
                key = self._keys.get(entry.record.version)
                if key is not None:
                    key.validity = self._validity(entry)
            self._entries = entries
        self._read_at = time.monotonic()
        return self._entries

    def _validity(self, entry: _Entry) -> Validity:
        name = f"version {entry.record.version} of ring {self.name!r}"
        return Validity(entry.not_before, entry.not_after, self.hsm.clock, name)

    def _key(self, entry: _Entry) -> Key:
        version = entry.record.version
        key = self._keys.get(version)
        if key is None:
            key = self._store.version_key(entry.record)
            key.validity = self._validity(entry)
            key.version, key.ring = version, self.name
            self._keys[version] = key
            self._kids[key.kid] = version
        return key

    def _entries_or_fail(self) -> list[_Entry]:
        entries = self._read()
        if not entries:
            raise KeyNotFound(
                f"key ring {self.name!r} has no versions in {self.hsm.description}; "
                f"create it with key_ring({self.name!r}).rotate(RSA(2048), usage=...)"
            )
        return entries

    @property
    def primary(self) -> Key:
        """The key that signs now: ``.version``, ``.kid``, ``.not_before``, ``.not_after``."""
        entries = self._entries_or_fail()
        now = self.hsm.clock()
        i = _primary_index(entries, now)
        if i is None:
            first = entries[0]
            raise KeyNotYetValid(
                f"key ring {self.name!r} has no primary before "
                f"{first.not_before.isoformat()} (version {first.record.version} is pending)"
            )
        return self._key(entries[i])

    def version(self, number: int) -> Key:
        """The key of version ``number`` (``NAME@VERSION``); checked for validity when used."""
        entries = self._entries_or_fail()
        for entry in entries:
            if entry.record.version == number:
                return self._key(entry)
        newest = entries[-1].record.version
        if 1 <= number < newest:
            raise KeyExpired(
                f"version {number} of ring {self.name!r} expired and was destroyed by a sweep; "
                f"use the primary or a version from {entries[0].record.version} to {newest}"
            )
        raise KeyNotFound(
            f"key ring {self.name!r} has no version {number}; its versions go up to {newest}"
        )

    def versions(self) -> list[KeyVersion]:
        """Every version still in the HSM, oldest first, with its state now."""
        entries = self._read()
        now = self.hsm.clock()
        primary = _primary_index(entries, now)
        out = []
        for i, entry in enumerate(entries):
            try:
                out.append(self._describe(entry, _state(entries, i, primary, now)))
            except KeyNotFound:  # destroyed by a sweep elsewhere, its record not yet
                self._swept.add(entry.record.version)
        return out

    def _describe(self, entry: _Entry, state: str) -> KeyVersion:
        key = self._key(entry)
        return KeyVersion(
            entry.record.version,
            key.kid,
            state,
            entry.not_before,
            entry.not_after,
            key.id,
            key.label,
            self.name,
        )

    # -- using -----------------------------------------------------------------------

    def sign(self, data: bytes, mechanism: str | Mechanism, **options: Any) -> bytes:
        """Sign with the primary (options as :meth:`Key.sign`)."""
        return self.primary.sign(data, mechanism, **options)

    def decrypt(
        self,
        ciphertext: bytes,
        mechanism: str | Mechanism,
        *,
        kid: str | None = None,
        allow_pkcs1v15: bool = False,
    ) -> bytes:
        """Decrypt with version ``kid``; without one, OAEP only: primary, then grace versions.

        Trying PKCS#1 v1.5 on key after key would tell the sender which keys
        reject the padding: a padding oracle (Bleichenbacher). OAEP failures
        reveal nothing useful, so only OAEP may be tried across versions.
        """
        mech = parse_mechanism(mechanism, sign=False)
        if kid is not None:
            return self._by_kid(kid).decrypt(ciphertext, mech, allow_pkcs1v15=allow_pkcs1v15)
        if mech.family != "oaep":
            raise InvalidInput(
                f"decrypting with ring {self.name!r} without a kid tries several keys, which "
                f"{mech.value} must not do (a padding oracle); pass kid=, or use RSA-OAEP"
            )
        entries = self._entries_or_fail()
        now = self.hsm.clock()
        primary = _primary_index(entries, now)
        order = [i for i in range(len(entries) - 1, -1, -1) if i == primary] + [
            i
            for i in range(len(entries) - 1, -1, -1)
            if i != primary and _state(entries, i, primary, now) == "grace"
        ]
        if not order:
            self.primary  # raises the reason there is no usable version  # noqa: B018
        for i in order:
            try:
                return self._key(entries[i]).decrypt(ciphertext, mech)
            except DecryptionFailed:
                continue
        tried = ", ".join(str(entries[i].record.version) for i in order)
        raise DecryptionFailed(
            f"no usable version of ring {self.name!r} (tried {tried}) decrypts the ciphertext; "
            "it is corrupt, made for an expired version, or for another key"
        )

    def _by_kid(self, kid: str) -> Key:
        for force in (False, True):
            entries = self._read(force)
            version = self._kids.get(kid)
            if version is None:
                for entry in entries:  # learn every version's kid (public keys are cached)
                    self._key(entry)
                version = self._kids.get(kid)
            if version is not None:
                if version in self._swept:
                    raise KeyExpired(
                        f"version {version} of ring {self.name!r} (kid {kid}) expired and was "
                        "destroyed by a sweep"
                    )
                return self._keys[version]
        raise KeyNotFound(f"key ring {self.name!r} has no version with kid {kid!r}")

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """JWK Set of the pending, primary and grace versions (newest first), kid = RFC 7638."""
        entries = self._read()
        now = self.hsm.clock()
        primary = _primary_index(entries, now)
        return {
            "keys": [
                self._key(entries[i]).public_key_jwk()
                for i in range(len(entries) - 1, -1, -1)
                if _state(entries, i, primary, now) != "expired"
            ]
        }

    def upload_json(self, min_bits: int = 2048) -> str:
        """The primary's ``{"public_key": PEM}`` upload body (re-upload after rotating)."""
        return self.primary.upload_json(min_bits=min_bits)

    # -- changing ---------------------------------------------------------------------

    def rotate(
        self,
        spec: KeySpec | None = None,
        *,
        usage: Iterable[str] | str | None = None,
        grace: timedelta = timedelta(0),
        activate_in: timedelta = timedelta(0),
    ) -> KeyVersion:
        """Add a version, primary after ``activate_in``; older ones work ``grace`` longer.

        The first rotation needs ``spec`` (and ``usage``); later ones reuse the
        newest version's unless given. If another process rotates at the same
        time, exactly one wins; the other gets :class:`KeyExists`.
        """
        grace_s, delay_s = _seconds(grace, "grace"), _seconds(activate_in, "activate_in")
        entries = self._read(force=True)
        if spec is None:
            if not entries:
                raise InvalidInput(
                    f"key ring {self.name!r} is new: its first rotate needs a key spec, "
                    "e.g. rotate(RSA(2048), usage={'sign', 'decrypt'})"
                )
            newest = self._key(entries[-1])
            spec = newest.spec
            uses = newest.info.usage if usage is None else normalize_usage(usage, spec)
        else:
            uses = normalize_usage(usage, spec)
        number = entries[-1].record.version + 1 if entries else 1
        start = to_instant(self.hsm.clock()) + delay_s
        record = VersionRecord(self.name, number, start, grace_s, "")
        self._store.create_version(record, spec, uses)
        entries = self._read(force=True)
        now = self.hsm.clock()
        primary = _primary_index(entries, now)
        [i] = [i for i, e in enumerate(entries) if e.record.version == number]
        return self._describe(entries[i], _state(entries, i, primary, now))

    def sweep(self, *, dry_run: bool = False) -> list[KeyVersion]:
        """Destroy the expired versions in the HSM (key, then record); returns them."""
        entries = self._read(force=True)
        now = self.hsm.clock()
        primary = _primary_index(entries, now)
        gone = [
            self._describe(e, "expired")
            for i, e in enumerate(entries)
            if _state(entries, i, primary, now) == "expired"
        ]
        if not dry_run:
            by_version = {e.record.version: e.record for e in entries}
            for version in gone:
                assert version.version is not None
                self._store.destroy_version(by_version[version.version])
                self._swept.add(version.version)
            self._store.tidy(self.name)
            self._read(force=True)
        return gone


def sweep(hsm: HSM, *, dry_run: bool = False) -> list[KeyVersion]:
    """``hsm.sweep()``: every ring's expired versions, then expired plain keys."""
    store = hsm.ring_store()
    gone: list[KeyVersion] = []
    for name in store.ring_names():
        gone += KeyRing(hsm, name).sweep(dry_run=dry_run)
    now = hsm.clock()
    for key in store.expiring_keys():
        validity = key.validity
        if validity is None or validity.not_after is None or now < validity.not_after:
            continue
        gone.append(
            KeyVersion(None, key.kid, "expired", None, validity.not_after, key.id, key.label)
        )
        if not dry_run:
            store.destroy_key(key)
    return gone


def expiry_validity(hsm: HSM, label: str, not_after: datetime) -> Validity:
    """The validity of a plain key made with ``expires_in``."""
    return Validity(None, not_after, hsm.clock, f"key {label!r}")


def expiry_of(hsm: HSM, expires_in: timedelta) -> datetime:
    """The whole-second instant ``expires_in`` from now on the handle's clock."""
    return from_instant(to_instant(hsm.clock()) + _seconds(expires_in, "expires_in"))
