"""One-time keys in a NetHSM, with the API's own objects (docs/design.md, "One-time keys").

- the key: key ID ``otk.NAME.KID``, label ``otk@POOLED`` (Unix seconds),
  decrypt only, made by one ``POST /keys/generate``;
- the *issued* record: the key's certificate (``PUT /keys/{id}/cert``), the
  expiry certificate plain keys get from ``expires_in`` (``notAfter`` =
  ``expires_at``), written by the one process that pooled the key before it
  hands it out;
- the *claim* of its one decrypt: a small EC key with ID ``otk.NAME.KID.used``
  and label ``used@CLAIMED+EXPIRES``. Key IDs are unique: of processes
  generating it at once the NetHSM lets exactly one succeed (409 for the
  others), the compare-and-swap key rings use too, and the claim stays, so
  the kid is known as used until a sweep after its expiry.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import TYPE_CHECKING

from ..api import EC, RSA, Key
from ..errors import HSMError, KeyExists, KeyNotFound, MechanismNotSupported
from ..mechanisms import Mechanism
from ..onetime import STALE_CLAIM, OneTimeStore, PoolKey, StoredKey
from ..rings import from_instant
from . import vocabulary

if TYPE_CHECKING:
    from .backend import NetHSM

_POOLED_RE = re.compile(r"otk@([0-9]{1,12})")
_USED_RE = re.compile(r"used@([0-9]{1,12})\+([0-9]{1,12})")
#: the claim key: the cheapest key there is to generate
CLAIM_SPEC = EC("P-256")


def key_id(name: str, kid: str) -> str:
    return f"otk.{name}.{kid}"


class NetHSMOneTimeStore(OneTimeStore):
    def __init__(self, hsm: NetHSM) -> None:
        self.hsm = hsm

    def generate(self, name: str, kid: str, spec: RSA, pooled: int, mechanism: Mechanism) -> Key:
        """A NetHSM cannot say its mechanisms in advance, and ``hsmbridge serve`` gives a key
        only those its token performs: a key without ``mechanism`` is refused here."""
        key = self.hsm.generate_with_id(
            spec, key_id(name, kid), f"otk@{pooled}", frozenset({"decrypt"}),
            f"generating one-time key {kid}",
        )  # fmt: skip
        offered = vocabulary.offered_mechanisms(spec, key.mechanisms, sign=False)
        if mechanism.value not in offered:
            with contextlib.suppress(HSMError):
                key.delete()
            raise MechanismNotSupported(
                f"{self.hsm.description} makes keys that decrypt only {', '.join(offered)}, "
                f"not {mechanism.value}; make the pool with the alg= of one of those"
            )
        return key

    def mark_issued(self, name: str, key: Key, expires_at: int) -> None:
        self.hsm.rings.write_expiry(key, from_instant(expires_at))  # type: ignore[arg-type]

    def issued(self, name: str, kid: str) -> int | None:
        """From the key's certificate; else (the key is used and gone, or going right
        now) from its claim key, and the claim then says it is used."""
        with contextlib.suppress(KeyNotFound):
            validity = self.hsm.rings.validity_of(self.key(name, kid))  # type: ignore[arg-type]
            if validity is not None and validity.not_after is not None:
                return int(validity.not_after.timestamp())
        claim = self._claim_of(name, kid)
        return claim[1] if claim is not None else None

    def _claim_of(self, name: str, kid: str) -> tuple[int, int] | None:
        """(claimed, expires_at) of the kid's claim key, if any."""
        data = self.hsm._fetch(key_id(name, kid) + ".used")
        match = _USED_RE.fullmatch(str((data or {}).get("label", "")))
        return (int(match[1]), int(match[2])) if match else None

    def claim(self, name: str, kid: str, expires_at: int) -> float | None:
        now = int(time.time())  # real time: claims go stale by wall clock
        try:
            self.hsm.generate_with_id(
                CLAIM_SPEC, key_id(name, kid) + ".used", f"used@{now}+{expires_at}",
                frozenset({"sign"}), f"claiming one-time key {kid}",
            )  # fmt: skip
        except KeyExists:
            claim = self._claim_of(name, kid)
            return float(claim[0]) if claim is not None else 0.0
        return None

    def key(self, name: str, kid: str) -> Key:
        return self.hsm.get_key(key_id=key_id(name, kid))

    def destroy_key(self, name: str, kid: str) -> None:
        with contextlib.suppress(KeyNotFound):
            self.key(name, kid).delete()

    def forget(self, name: str, kid: str) -> None:
        self.destroy_key(name, kid)
        with contextlib.suppress(KeyNotFound):
            self.hsm.get_key(key_id=key_id(name, kid) + ".used").delete()

    def discard(self, key: Key) -> None:
        with contextlib.suppress(KeyNotFound):
            key.delete()

    def contents(self, name: str) -> tuple[list[PoolKey], list[StoredKey]]:
        prefix = f"otk.{name}."
        pool: list[PoolKey] = []
        stored: dict[str, StoredKey] = {}
        claims: dict[str, tuple[int, int]] = {}
        for info in self.hsm.list_keys():
            rest = info.id[len(prefix) :] if info.id.startswith(prefix) else ""
            kid, _, used = rest.partition(".")
            if not kid or used not in ("", "used"):
                continue
            if used:
                match = _USED_RE.fullmatch(info.label)
                if match:
                    claims[kid] = (int(match[1]), int(match[2]))
                continue
            pooled = _POOLED_RE.fullmatch(info.label)
            expires_at = self.issued(name, kid)
            if expires_at is None and pooled:
                pool.append(PoolKey(kid, int(pooled[1])))
            elif expires_at is not None:
                stored[kid] = StoredKey(kid, expires_at, True)
        for kid, (claimed, expires_at) in claims.items():
            old = time.time() - claimed > STALE_CLAIM
            stored[kid] = StoredKey(kid, expires_at, kid in stored, 1, old)
        return pool, list(stored.values())
