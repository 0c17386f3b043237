"""One-time keys in a PKCS#11 token (docs/design.md, "One-time keys").

Objects, all token objects, none ever modified (SoftHSM2 half-writes an
object whose process is killed inside C_SetAttributeValue; see
:mod:`.ringstore`):

- the key pair: label ``otk.NAME.KID.POOLED`` (``POOLED``: Unix seconds it
  was pooled), CKA_ID = the kid's 16 bytes, decrypt only, sensitive and
  non-extractable like every key;
- the *ticket*: a CKO_DATA object labelled ``hsmbridge-otk-ticket:KID``,
  written with the key, when it is pooled (so that issuing writes one object,
  not two). Destroying it is the claim on the key's one decrypt:
  C_DestroyObject of one object by several processes at once succeeds in
  exactly one (docs/design.md, fact 21), and a destroyed object is gone for
  every process at once, unlike a new one (fact 20: a process can miss
  objects other processes made, so a claim that others must *find* is not
  safe on SoftHSM2);
- the *issued* record: CKO_DATA ``hsmbridge-otk-issued:KID`` with
  ``{"name", "expires_at"}``, written after the ticket, by the one process
  that pooled the key, before it hands the key out;
- the *used* record: CKO_DATA ``hsmbridge-otk-used:KID`` (claimant's host, PID,
  time), written by the process that destroyed the ticket, so that others
  can say when the key was used and a sweep can finish a decrypt whose
  process died.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pkcs11.exceptions as p11x

from ..api import RSA, Key
from ..errors import HSMError, KeyNotFound
from ..mechanisms import Mechanism
from ..onetime import OneTimeStore, PoolKey, StoredKey
from .ringstore import abandoned, read_data, write_data

if TYPE_CHECKING:
    from .backend import Pkcs11HSM

ISSUED_PREFIX = "hsmbridge-otk-issued:"
TICKET_PREFIX = "hsmbridge-otk-ticket:"
USED_PREFIX = "hsmbridge-otk-used:"


def key_label(name: str, kid: str, pooled: int) -> str:
    return f"otk.{name}.{kid}.{pooled}"


class Pkcs11OneTimeStore(OneTimeStore):
    def __init__(self, hsm: Pkcs11HSM) -> None:
        self.hsm = hsm
        # tickets this process wrote, by kid: its own decrypts destroy them without a search
        self._tickets: dict[str, Any] = {}

    def generate(self, name: str, kid: str, spec: RSA, pooled: int, mechanism: Mechanism) -> Key:
        # the token's mechanisms were checked when the pool was made (OneTimeKeys._choose_alg)
        key = self.hsm.generate_dated(
            spec, key_label(name, kid, pooled), usage="decrypt", key_id=kid, fresh=True
        )
        # The ticket now, off the issue() path. A pool key is never decrypted (no issued
        # record); killed before issue, key and ticket are an orphan that sweeps destroy.
        try:
            with self.hsm.pool.admin() as session:  # the ticket is destroyed through it
                ticket = write_data(
                    session, TICKET_PREFIX + kid, bytes.fromhex(kid), {"name": name}
                )
        except HSMError:
            self.discard(key)
            raise
        self._tickets[kid] = ticket
        return key

    def mark_issued(self, name: str, key: Key, expires_at: int) -> None:
        with self.hsm.pool.admin() as session:  # one write: the ticket exists since pooling
            write_data(
                session,
                ISSUED_PREFIX + key.id,
                bytes.fromhex(key.id),
                {"name": name, "expires_at": expires_at},
            )

    def issued(self, name: str, kid: str) -> int | None:
        with self.hsm.pool.admin() as session:
            found = [
                int(d.value["expires_at"])
                for d in read_data(session, ISSUED_PREFIX + kid)
                if d.value.get("name") == name and isinstance(d.value.get("expires_at"), int)
            ]
        return min(found, default=None)

    def _tickets_of(self, session: Any, kid: str) -> Iterator[Any]:
        """``kid``'s ticket as this process wrote it (no search), then as a search finds
        it: a caller stops at the first it destroys, so the search runs only when there
        is no cached ticket or destroying it failed (say, its session was reopened)."""
        mine = self._tickets.pop(kid, None)
        if mine is not None:
            yield mine
        yield from (d.obj for d in read_data(session, TICKET_PREFIX + kid))

    def claim(self, name: str, kid: str, expires_at: int) -> float | None:
        with self.hsm.pool.admin() as session:
            for ticket in self._tickets_of(session, kid):
                try:
                    ticket.destroy()  # exactly one process succeeds (fact 21)
                except p11x.PKCS11Error:
                    continue
                value = {
                    "name": name,
                    "claimed": time.time(),  # real time: claims go stale by wall clock
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                }
                write_data(session, USED_PREFIX + kid, bytes.fromhex(kid), value)
                return None
            used = [float(d.value.get("claimed", 0)) for d in read_data(session, USED_PREFIX + kid)]
        return min(used, default=0.0)

    def key(self, name: str, kid: str) -> Key:
        key = self.hsm.get_key(key_id=kid)
        if not key.label.startswith(f"otk.{name}.{kid}."):
            raise KeyNotFound(f"key {kid} is not a one-time key of pool {name!r}")
        return key

    def destroy_key(self, name: str, kid: str) -> None:
        with contextlib.suppress(KeyNotFound):
            self.key(name, kid).delete()

    def forget(self, name: str, kid: str) -> None:
        self._tickets.pop(kid, None)
        self.destroy_key(name, kid)
        with self.hsm.pool.admin() as session:
            for prefix in (TICKET_PREFIX, USED_PREFIX, ISSUED_PREFIX):  # the record last
                for data in read_data(session, prefix + kid):
                    with contextlib.suppress(p11x.PKCS11Error):
                        data.obj.destroy()

    def discard(self, key: Key) -> None:
        with contextlib.suppress(KeyNotFound):
            key.delete()
        if key.id not in self._tickets:
            return  # no ticket of this process's pool (a claimed key's went with the claim)
        with self.hsm.pool.admin() as session:
            for ticket in self._tickets_of(session, key.id):
                with contextlib.suppress(p11x.PKCS11Error):
                    ticket.destroy()
                    return

    def contents(self, name: str) -> tuple[list[PoolKey], list[StoredKey]]:
        prefix = f"otk.{name}."
        keys: dict[str, int] = {}
        for info in self.hsm.list_keys():
            parts = info.label[len(prefix) :].split(".")
            if info.label.startswith(prefix) and len(parts) == 2 and parts[1].isdigit():
                keys[parts[0]] = int(parts[1])
        issued: dict[str, int] = {}
        claims: dict[str, list[dict[str, Any]]] = {}
        with self.hsm.pool.admin() as session:
            for data in read_data(session):
                kid = data.key_id.hex()
                if data.value.get("name") != name:
                    continue
                if data.label == ISSUED_PREFIX + kid:
                    issued[kid] = int(data.value.get("expires_at", 0))
                elif data.label == USED_PREFIX + kid:
                    claims.setdefault(kid, []).append(data.value)
        pool = [PoolKey(kid, pooled) for kid, pooled in keys.items() if kid not in issued]
        stored = [
            StoredKey(
                kid,
                issued.get(kid, 0),  # claims without a record: a sweep raced a decrypt
                kid in keys,
                len(claims.get(kid, [])),
                all(abandoned(c) for c in claims.get(kid, [])),
            )
            for kid in issued.keys() | claims.keys()
        ]
        return pool, stored
