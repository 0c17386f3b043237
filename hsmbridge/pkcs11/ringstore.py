"""Key-ring versions and key lifetimes in a PKCS#11 token.

Objects (docs/design.md, "Key rings"):

- a version's key pair: labels ``NAME@VERSION``, a random CKA_ID,
  CKA_START_DATE = the day it becomes primary, set when it is generated (day
  resolution, for other tools). Its end is known only later, from its
  successor, and keys are never modified after creation: SoftHSM2 loses or
  half-writes an object whose process is killed inside C_SetAttributeValue or
  C_CopyObject (the SIGKILL test caught both), so a version's end lives in the
  records only;
- its *record*: a CKO_DATA object (the class PKCS#11 has for an
  application's data), CKA_APPLICATION ``hsmbridge``, CKA_LABEL
  ``hsmbridge-ring:NAME:VERSION``, CKA_VALUE a small JSON object with the
  exact instants and the key's CKA_ID in hex. The link is not the data
  object's own CKA_ID: CKO_DATA has no CKA_ID attribute (PKCS#11 v2.40
  section 4.5 gives it CKA_APPLICATION, CKA_OBJECT_ID and CKA_VALUE only) and
  SoftHSM2 refuses one with CKR_ATTRIBUTE_TYPE_INVALID;
- a plain key made with ``expires_in``: CKA_END_DATE on both halves and a
  CKO_DATA record labelled ``hsmbridge-expiry:KEYIDHEX``, written *before*
  the key, so a key never exists without its lifetime.

Rotation (PKCS#11 has no compare-and-swap, and C_CreateObject happily makes
two objects with one label, so the protocol detects the duplicate):

1. *claim*: create the record of version N+1 (C_CreateObject is atomic);
2. *check*: read every record of version N+1. Others that are committed, or
   that are claims younger than :data:`STALE_CLAIM`, mean a race: a process
   that sees any withdraws its claim; if it saw only uncommitted claims it
   retries after a random pause, unless version N+1 got committed meanwhile
   (then it raises KeyExists). A process that sees only its own claim wins:
   any later claimant will see it. Claims of dead processes (same host, PID
   gone) or older than :data:`STALE_CLAIM` are removed, not counted;
3. *commit*: generate the key pair under the claim's CKA_ID. A version
   exists only when both its record and its private key do, so a process
   killed before this leaves a claim nobody counts, and one killed after it
   leaves a complete version: the old state or the new, never a mix. The
   crashed claim is removed by the next rotation.

After a commit the ring's *head* (one CKO_DATA object labelled
``hsmbridge-ring-head:NAME:NEWEST``) is advanced by changing its label.
It is only a hint: other processes read that one attribute every second
instead of searching the token (searches are linear in its objects), and
still read every record at least every 30 s, so a process killed before
advancing the head delays others' view of its rotation, nothing more.

Sweeping destroys the key first, then the record; a record whose key is gone
is not a version (its successor alone decides everything newer), and the next
sweep removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import pkcs11.exceptions as p11x
from pkcs11 import Attribute, KeyType, ObjectClass

from ..api import Key, KeySpec, Validity
from ..errors import HSMError, KeyExists, KeyNotFound
from ..rings import RingStore, VersionRecord, expiry_validity, from_instant, version_label
from .errormap import translate

if TYPE_CHECKING:
    from .backend import Pkcs11HSM
    from .key import Pkcs11Key
    from .templates import Template

#: CKA_APPLICATION of every data object hsmbridge writes
APPLICATION = "hsmbridge"
RING_PREFIX = "hsmbridge-ring:"
EXPIRY_PREFIX = "hsmbridge-expiry:"
HEAD_PREFIX = "hsmbridge-ring-head:"
#: seconds after which a claim without a key is taken for a crashed rotation
STALE_CLAIM = 300.0
#: how often a rotation that collided with another one claims again
CLAIM_ATTEMPTS = 20
#: how long after claiming the claim is checked again for rivals (seconds)
CLAIM_RECHECK_SECONDS = 0.05


def abandoned(claim: dict[str, Any]) -> bool:
    """Whether a claim without a key was left by a crash: its process (on this
    host) is gone, or it is older than :data:`STALE_CLAIM`."""
    if time.time() - float(claim.get("claimed", 0)) > STALE_CLAIM:
        return True
    if claim.get("host") != socket.gethostname() or not isinstance(claim.get("pid"), int):
        return False
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _complete(public: Any) -> bool:
    """Whether a public key object holds its key (a process killed while SoftHSM2
    writes it can leave one without)."""
    attr = Attribute.EC_POINT if public.key_type == KeyType.EC else Attribute.MODULUS
    try:
        return bool(public[attr]) and bool(public[Attribute.LABEL])
    except (p11x.PKCS11Error, ValueError):
        return False


def _head_version(label: str) -> int:
    return int(label.rsplit(":", 1)[1])


def record_label(ring: str, version: int) -> str:
    return f"{RING_PREFIX}{ring}:{version}"


def expiry_label(key_id: bytes) -> str:
    return f"{EXPIRY_PREFIX}{key_id.hex()}"


def day_of(when: datetime) -> date:
    """The UTC day of an instant (PKCS#11 dates have no time of day)."""
    return when.astimezone(UTC).date()


@dataclass(frozen=True)
class _Data:
    """A data object hsmbridge wrote, read back."""

    obj: Any
    label: str
    key_id: bytes
    value: dict[str, Any]


def read_data(session: Any, label: str | None = None) -> list[_Data]:
    """hsmbridge's data objects (all, or those labelled ``label``), values parsed."""
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.TOKEN: True,
        Attribute.APPLICATION: APPLICATION,
    }
    if label is not None:
        template[Attribute.LABEL] = label
    for attempt in range(5):
        found = []
        try:
            for obj in session.get_objects(template):
                with contextlib.suppress(p11x.PKCS11Error, ValueError, KeyError, TypeError):
                    value = json.loads(bytes(obj[Attribute.VALUE]))
                    key_id = bytes.fromhex(value["key_id"])
                    found.append(_Data(obj, obj[Attribute.LABEL], key_id, value))
            return found
        except p11x.ObjectHandleInvalid:  # destroyed by another process mid-search
            if attempt == 4:
                raise translate(
                    p11x.ObjectHandleInvalid(), what="reading hsmbridge's data objects"
                ) from None
        except p11x.PKCS11Error as exc:
            raise translate(exc, what="reading hsmbridge's data objects") from None
    return []


def write_data(
    session: Any,
    label: str,
    key_id: bytes,
    value: dict[str, Any],
    *,
    modifiable: bool = False,
) -> Any:
    """Create one immutable (unless ``modifiable``) data object: one atomic C_CreateObject."""
    try:
        return session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: modifiable,
                Attribute.APPLICATION: APPLICATION,
                Attribute.LABEL: label,
                Attribute.VALUE: json.dumps(
                    {**value, "key_id": key_id.hex()}, sort_keys=True
                ).encode(),
            }
        )
    except p11x.PKCS11Error as exc:
        raise translate(exc, what=f"writing {label!r}") from None


class Pkcs11RingStore(RingStore):
    def __init__(self, hsm: Pkcs11HSM) -> None:
        self.hsm = hsm
        self._committed: set[bytes] = set()  # CKA_IDs known to have a key (never un-commit)
        self._heads: dict[str, Any] = {}  # ring -> its head object

    # -- data objects ------------------------------------------------------------------

    def _has_key(self, session: Any, key_id: bytes) -> bool:
        """Whether the version is committed: both halves of its key pair exist (a
        process killed inside C_GenerateKeyPair can leave SoftHSM2 with one)."""
        if key_id in self._committed:
            return True
        public = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
        try:
            both = bool(self.hsm._find(session, {Attribute.ID: key_id})) and any(
                _complete(pub) for pub in session.get_objects(public)
            )
        except p11x.PKCS11Error as exc:
            raise translate(exc, what="looking for a ring version's key") from None
        if both:
            self._committed.add(key_id)
        return both

    def _remove_orphans(self, label: str) -> None:
        """Destroy key objects labelled ``label`` left by a rotation killed mid-generation
        (we hold the only live claim on that version, so none is anyone's)."""
        with self.hsm.pool.admin() as session:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in list(
                    session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label})
                ):
                    with contextlib.suppress(p11x.PKCS11Error):
                        obj.destroy()

    @staticmethod
    def _record(data: _Data) -> VersionRecord | None:
        v = data.value
        try:
            return VersionRecord(
                str(v["ring"]), int(v["version"]), int(v["not_before"]), int(v["grace"]),
                data.key_id.hex(),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None

    def _ring_data(self, session: Any) -> list[tuple[_Data, VersionRecord]]:
        out = []
        for data in read_data(session):
            if data.label.startswith(RING_PREFIX):
                record = self._record(data)
                if record is not None:
                    out.append((data, record))
        return out

    # -- RingStore -----------------------------------------------------------------------

    def records(self, ring: str | None = None) -> list[VersionRecord]:
        with self.hsm.pool.admin() as session:
            return [
                record
                for data, record in self._ring_data(session)
                if (ring is None or record.ring == ring) and self._has_key(session, data.key_id)
            ]

    def may_have(self, ring: str, version: int) -> bool:
        """Read the label of the ring's head object (one attribute of a known object:
        no search, which SoftHSM2 makes linear in the token's objects, fact 11)."""
        with self.hsm.pool.admin() as session:
            head = self._heads.get(ring)
            if head is None:
                heads = self._find_heads(session, ring)
                if not heads:  # no head (yet, or lost): look for the record itself
                    return bool(read_data(session, label=record_label(ring, version)))
                head = self._heads[ring] = heads[0].obj
            try:
                return _head_version(head[Attribute.LABEL]) >= version
            except (p11x.PKCS11Error, ValueError):
                self._heads.pop(ring, None)  # destroyed or unreadable: find it again
                return True

    def _find_heads(self, session: Any, ring: str) -> list[_Data]:
        prefix = f"{HEAD_PREFIX}{ring}:"
        return [d for d in read_data(session) if d.label.startswith(prefix)]

    def _advance_head(self, ring: str, version: int) -> None:
        """After a commit: the head's label says ``version`` (a hint for other processes).

        The label, because SoftHSM2 makes a data object's CKA_VALUE read-only.
        """
        label = f"{HEAD_PREFIX}{ring}:{version}"
        with self.hsm.pool.admin() as session:
            heads = self._find_heads(session, ring)
            if not heads:
                write_data(session, label, b"", {"ring": ring}, modifiable=True)
            for head in heads:
                with contextlib.suppress(p11x.PKCS11Error, ValueError):
                    if _head_version(head.label) < version:
                        head.obj[Attribute.LABEL] = label

    def create_version(self, record: VersionRecord, spec: KeySpec, usage: frozenset[str]) -> Key:
        key_id = os.urandom(16)
        label = record_label(record.ring, record.version)
        value = {
            "ring": record.ring,
            "version": record.version,
            "not_before": record.not_before,
            "grace": record.grace,
            "claimed": time.time(),  # real time: claims go stale by wall clock, not by tests
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        claim = self._claim(record, label, key_id, value)
        try:
            self._remove_orphans(version_label(record.ring, record.version))
            key = self.hsm.generate_dated(
                spec,
                version_label(record.ring, record.version),
                usage=usage,
                key_id=key_id.hex(),
                start=from_instant(record.not_before),
            )
        except HSMError:
            with contextlib.suppress(Exception), self.hsm.pool.admin():
                claim.destroy()
            raise
        with self.hsm.pool.admin() as session:
            if not any(d.key_id == key_id for d in read_data(session, label=label)):
                key.delete()  # our claim was taken for a crashed one and removed
                raise KeyExists(
                    f"rotating ring {record.ring!r} took longer than {STALE_CLAIM:.0f} s and "
                    "another process took over version {record.version}; read the ring again"
                )
            self._committed.add(key_id)
        self._advance_head(record.ring, record.version)
        return key

    def _claim(
        self, record: VersionRecord, label: str, key_id: bytes, value: dict[str, Any]
    ) -> Any:
        """Steps 1 and 2 of the protocol: our claim object once it is the only live one."""
        conflict = KeyExists(
            f"version {record.version} of ring {record.ring!r} was just created by another "
            "process (a concurrent rotation); read ring.versions() and rotate again if needed"
        )
        for _ in range(CLAIM_ATTEMPTS):
            with self.hsm.pool.admin() as session:
                if any(
                    r.version >= record.version
                    for d, r in self._ring_data(session)
                    if r.ring == record.ring and self._has_key(session, d.key_id)
                ):
                    raise conflict
                claim = write_data(session, label, key_id, value)
            # SoftHSM2 shows another process's new object only a moment after it
            # is made (the twin check in backend.py found it too): look again after a pause.
            live = False
            for pause in (0.0, CLAIM_RECHECK_SECONDS):
                time.sleep(pause)
                with self.hsm.pool.admin() as session:
                    live = self._live_rivals(session, label, key_id, claim, conflict)
                if live:
                    break
            if not live:
                return claim
            with contextlib.suppress(p11x.PKCS11Error), self.hsm.pool.admin():
                claim.destroy()
            time.sleep(random.uniform(0.01, 0.2))
        raise KeyExists(
            f"could not rotate ring {record.ring!r}: {CLAIM_ATTEMPTS} attempts collided with "
            "other processes rotating it; try again"
        )

    def _live_rivals(
        self, session: Any, label: str, key_id: bytes, claim: Any, conflict: KeyExists
    ) -> bool:
        """Whether other live claims on ``label`` exist; a committed one withdraws ours."""
        live = False
        for rival in read_data(session, label=label):
            if rival.key_id == key_id:
                continue
            if self._has_key(session, rival.key_id):
                claim.destroy()
                raise conflict
            if abandoned(rival.value):
                with contextlib.suppress(p11x.PKCS11Error):
                    rival.obj.destroy()
            else:
                live = True
        return live

    def version_key(self, record: VersionRecord) -> Key:
        try:
            return self.hsm.get_key(key_id=record.key_id)
        except KeyNotFound:
            self._committed.discard(bytes.fromhex(record.key_id))  # swept meanwhile
            raise

    def destroy_version(self, record: VersionRecord) -> None:
        key_id = bytes.fromhex(record.key_id)
        with contextlib.suppress(KeyNotFound):
            self.hsm.get_key(key_id=record.key_id).delete()
        with self.hsm.pool.admin() as session:
            label = record_label(record.ring, record.version)
            for data in read_data(session, label=label):
                if data.key_id != key_id:
                    continue
                with contextlib.suppress(p11x.PKCS11Error):
                    data.obj.destroy()

    def tidy(self, ring: str) -> None:
        """Remove records without a key: left by an interrupted sweep (older than the
        newest version) or by a crashed rotation (an abandoned claim)."""
        with self.hsm.pool.admin() as session:
            mine = [(d, r) for d, r in self._ring_data(session) if r.ring == ring]
            keyed = {id(d): self._has_key(session, d.key_id) for d, _ in mine}
            newest = max((r.version for d, r in mine if keyed[id(d)]), default=0)
            for data, record in mine:
                if not keyed[id(data)] and (record.version < newest or abandoned(data.value)):
                    with contextlib.suppress(p11x.PKCS11Error):
                        data.obj.destroy()

    # -- plain keys' lifetimes -------------------------------------------------------------

    def expiry_templates(
        self, session: Any, key_id: bytes, not_after: datetime, templates: tuple[Template, ...]
    ) -> Any:
        """Before a key with ``expires_in`` is made: its record, and END_DATE in its templates."""
        for template in templates:
            template[Attribute.END_DATE] = day_of(not_after)
        return write_data(
            session, expiry_label(key_id), key_id, {"not_after": int(not_after.timestamp())}
        )

    def validity_of(self, key: Pkcs11Key) -> Validity | None:
        """A plain key's lifetime: its END_DATE says whether to look for the record.

        The public half's date is read: SoftHSM2 answers CKR_GENERAL_ERROR for
        dates of private objects.
        """
        with self.hsm.pool.admin() as session:
            try:
                self.hsm._public_object(key._object_in(session))[Attribute.END_DATE]
            except (p11x.PKCS11Error, ValueError, KeyError):
                return None  # no (or an empty) END_DATE: no lifetime
            for data in read_data(session, label=expiry_label(bytes.fromhex(key.id))):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    return expiry_validity(
                        self.hsm, key.label, from_instant(int(data.value["not_after"]))
                    )
        return None

    def expiring_keys(self) -> list[Key]:
        keys: list[Key] = []
        with self.hsm.pool.admin() as session:
            records = [d for d in read_data(session) if d.label.startswith(EXPIRY_PREFIX)]
        for data in records:
            try:
                key = self.hsm.get_key(key_id=data.key_id.hex())
            except KeyNotFound:  # deleted by other means: drop the lifetime record
                with contextlib.suppress(Exception), self.hsm.pool.admin():
                    data.obj.destroy()
                continue
            if key.validity is not None:
                keys.append(key)
        return keys

    def destroy_key(self, key: Key) -> None:
        key.delete()
        with self.hsm.pool.admin() as session:
            for data in read_data(session, label=expiry_label(bytes.fromhex(key.id))):
                with contextlib.suppress(p11x.PKCS11Error):
                    data.obj.destroy()
