"""Backups of the bridge's state in the appliance's encrypted backup format.

The format is NetHSM's (version 0, as the official SDK's ``nethsm.backup``
reads it): ``_NETHSM_BACKUP_`` and a version byte, then length-prefixed
fields — the scrypt salt, the encrypted version, the encrypted domain key and
one encrypted item per entry, each AES-256-GCM under ``scrypt(passphrase,
salt, n=16384, r=8, p=16)`` with the appliance's associated data.

**What a backup holds** (the entry names are the appliance's where it has them):

- ``/key/<id>``: every key's record — type, mechanisms, label, tags,
  certificate, operation count and which token key it is (its CKA_ID). *Not*
  the key itself: keys are generated non-extractable and stay in the token,
  so restoring brings a key back only over the token that still holds it;
- ``/user/<id>``: users with their role, tags and argon2id passphrase hash;
- ``/namespace/<id>``: namespaces;
- ``/config/<name>``: the unlock passphrase's argon2id hash, unattended boot,
  logging, network and the cluster CA certificate.

Not in it: the TLS key and certificate (files of the state directory), the
clock offset and the backup key itself. The domain key is empty (the bridge
has none; the token protects the keys).

The backup key (salt and derived key, never the passphrase) is kept in the
state database so the Backup user can take backups without the passphrase,
as on the appliance. Whoever can read that database can decrypt backups, but
a backup holds nothing the database does not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import bad_request
from .state import KeyRecord, Store, UserRecord

HEADER = b"_NETHSM_BACKUP_"
VERSION = 0
#: settings a backup carries (and a restore onto an Unprovisioned bridge brings back)
CONFIG_SETTINGS = ("unlock_hash", "unattended_boot", "logging", "network", "cluster_ca")
_NONCE = 12
_MAX_FIELD = (1 << 24) - 1


@dataclass(frozen=True)
class BackupKey:
    """The scrypt salt and the AES key derived from the backup passphrase."""

    salt: bytes
    key: bytes = field(repr=False)

    @staticmethod
    def derive(passphrase: str, salt: bytes | None = None) -> BackupKey:
        salt = os.urandom(16) if salt is None else salt
        key = hashlib.scrypt(
            passphrase.encode(), salt=salt, n=16384, r=8, p=16, dklen=32, maxmem=64 << 20
        )
        return BackupKey(salt, key)

    def matches(self, passphrase: str) -> bool:
        return hmac.compare_digest(BackupKey.derive(passphrase, self.salt).key, self.key)


def stored_key(store: Store) -> BackupKey | None:
    raw = store.get_setting("backup_key")
    if raw is None:
        return None
    salt, key = raw.split(":")
    return BackupKey(bytes.fromhex(salt), bytes.fromhex(key))


def store_key(store: Store, key: BackupKey) -> None:
    store.set_settings(backup_key=f"{key.salt.hex()}:{key.key.hex()}")


# -- the container format -----------------------------------------------------------


def _field(data: bytes) -> bytes:
    if len(data) > _MAX_FIELD:
        raise bad_request("a backup entry is larger than the format allows (16 MiB)")
    return struct.pack(">BH", len(data) >> 16, len(data) & 0xFFFF) + data


def _take(data: memoryview) -> tuple[bytes, memoryview]:
    if len(data) < 3:
        raise bad_request("the backup is truncated")
    high, low = struct.unpack(">BH", data[:3])
    size = (high << 16) + low
    if len(data) < 3 + size:
        raise bad_request("the backup is truncated")
    return data[3 : 3 + size].tobytes(), data[3 + size :]


def _seal(key: bytes, adata: bytes, plain: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plain, adata)


def _open(key: bytes, adata: bytes, sealed: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], adata)
    except (InvalidTag, ValueError):
        raise bad_request(
            "the backup cannot be decrypted: wrong backup passphrase or a damaged file"
        ) from None


def encrypt(entries: dict[str, bytes], key: BackupKey) -> bytes:
    parts = [
        HEADER,
        bytes([VERSION]),
        _field(key.salt),
        _field(_seal(key.key, b"backup-version", bytes([VERSION]))),
        _field(_seal(key.key, b"domain-key", b"")),
    ]
    for name, value in entries.items():
        parts.append(_field(_seal(key.key, b"backup", _field(name.encode()) + value)))
    return b"".join(parts)


def decrypt(data: bytes, key_for: Callable[[bytes], BackupKey]) -> dict[str, bytes]:
    """The entries of a backup (400 if it is not one of ours or the passphrase is wrong).

    ``key_for(salt)`` derives the key from the passphrase (the caller bounds that work).
    """
    view = memoryview(data)
    if len(view) < len(HEADER) + 1 or view[: len(HEADER)] != HEADER:
        raise bad_request("the file is not a NetHSM backup (no _NETHSM_BACKUP_ header)")
    if view[len(HEADER)] != VERSION:
        raise bad_request(
            f"backup version {view[len(HEADER)]} is not supported; hsmbridge restores "
            f"version {VERSION}, the format its own backups have"
        )
    view = view[len(HEADER) + 1 :]
    salt, view = _take(view)
    sealed_version, view = _take(view)
    _, view = _take(view)  # the domain key: empty in the bridge's backups
    key = key_for(salt).key
    if _open(key, b"backup-version", sealed_version) != bytes([VERSION]):
        raise bad_request("the backup's inner and outer versions differ")
    entries: dict[str, bytes] = {}
    while view:
        sealed, view = _take(view)
        name, rest = _take(memoryview(_open(key, b"backup", sealed)))
        entries[name.decode("utf-8", "replace")] = rest.tobytes()
    return entries


# -- the bridge's state as entries --------------------------------------------------


@dataclass(frozen=True)
class Contents:
    """What a restore brings back, parsed from a backup's entries."""

    settings: dict[str, str]
    users: list[UserRecord]
    keys: list[KeyRecord]
    namespaces: list[str]


def entries_of(store: Store) -> dict[str, bytes]:
    """The backup entries of the bridge's current state (see the module docstring)."""
    entries: dict[str, bytes] = {}
    for name in CONFIG_SETTINGS:
        value = store.get_setting(name)
        if value is not None:
            entries[f"/config/{name}"] = value.encode()
    for user_id in store.list_users():
        user = store.get_user(user_id)
        if user is not None:
            entries[f"/user/{user.id}"] = json.dumps(asdict(user)).encode()
    for ns in store.list_namespaces():
        entries[f"/namespace/{ns}"] = b""
    for rec in store.list_keys():
        full = store.get_key(rec.id) or rec  # with the uses not yet written
        data: dict[str, Any] = asdict(full)
        data["cert"] = None if full.cert is None else base64.b64encode(full.cert).decode()
        entries[f"/key/{full.id}"] = json.dumps(data).encode()
    return entries


def contents_of(entries: dict[str, bytes]) -> Contents:
    """Parse a backup's entries (400 if one is malformed)."""
    settings: dict[str, str] = {}
    users: list[UserRecord] = []
    keys: list[KeyRecord] = []
    namespaces: list[str] = []
    try:
        for name, value in entries.items():
            kind, _, ident = name[1:].partition("/")
            if kind == "config" and ident in CONFIG_SETTINGS:
                settings[ident] = value.decode()
            elif kind == "user":
                data = json.loads(value)
                users.append(UserRecord(**{**data, "tags": tuple(data["tags"])}))
            elif kind == "namespace":
                namespaces.append(ident)
            elif kind == "key":
                data = json.loads(value)
                cert = None if data["cert"] is None else base64.b64decode(data["cert"])
                keys.append(
                    KeyRecord(
                        **{
                            **data,
                            "mechanisms": tuple(data["mechanisms"]),
                            "tags": tuple(data["tags"]),
                            "cert": cert,
                            "status": "ready",
                            "owner": "",
                        }
                    )
                )
    except (ValueError, TypeError, KeyError) as exc:
        raise bad_request(f"the backup holds a malformed entry: {exc}") from None
    return Contents(settings, users, keys, namespaces)
