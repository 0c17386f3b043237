"""Finding keys in a token: listings in a constant number of searches, and a
validated handle cache for ``get_key``.

A listing is one C_FindObjects search for private token keys (``CKA_TOKEN``
true, so session objects never appear) and one attribute read per key (two for
RSA keys that may decrypt: their CKA_ALLOWED_MECHANISMS, read on its own, tell
raw-decryption keys apart). A key's size comes from its private object:
``CKA_MODULUS`` for RSA, and ``CKA_EC_PARAMS`` for EC, which PKCS#11 puts on EC
private keys too. Only EC private keys without it (a token may omit it) need
their public halves: then one more search reads every EC public key and pairs
them in memory by ``CKA_ID`` and key type. Searching for each key's public half
instead made a listing quadratic, since a SoftHSM2 search scans every object.

Attributes are read with python-pkcs11's ``Object.get_attributes`` (two
C_GetAttributeValue calls, lengths then values, for all of them) rather than
``obj[attr]`` (two calls per attribute): on 2,000 SoftHSM2 private keys, seven
attributes in bulk took 0.23 s of CPU, five one by one 0.31 s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11.exceptions as p11x
from pkcs11 import Attribute, KeyType, ObjectClass

from ..api import RSA, KeyInfo, KeySpec
from ..errors import AmbiguousKey, HSMError, InvalidInput, KeyNotFound, MechanismNotSupported
from ..mechanisms import DECRYPT_MECHANISMS, RAW_USAGE, Mechanism
from . import ec, rsa
from .errormap import SESSION_BROKEN, translate
from .templates import unpack_mechanisms

#: What a listing reads from each private key (absent ones are left out).
PRIVATE_FIELDS = (
    Attribute.LABEL,
    Attribute.ID,
    Attribute.KEY_TYPE,
    Attribute.SIGN,
    Attribute.DECRYPT,
    Attribute.MODULUS,
    Attribute.EC_PARAMS,
)
#: What a cache hit re-reads: a key's identity and everything in its KeyInfo
#: that can change (the size cannot: CKA_MODULUS and CKA_EC_PARAMS are fixed).
IDENTITY_FIELDS = (
    Attribute.CLASS,
    Attribute.TOKEN,
    Attribute.LABEL,
    Attribute.ID,
    Attribute.KEY_TYPE,
    Attribute.SIGN,
    Attribute.DECRYPT,
)
#: What get_key's search reads: both of the above.
LOOKUP_FIELDS = tuple(dict.fromkeys((*PRIVATE_FIELDS, *IDENTITY_FIELDS)))
USABLE_TYPES = (KeyType.RSA, *ec.KEY_TYPES)
#: Labels a KeyNotFound message names at most.
LABELS_IN_MESSAGE = 20
#: Objects per C_FindObjects call (python-pkcs11's default is 10).
SEARCH_BATCH = 256

T = TypeVar("T")


def read(obj: Any, fields: Sequence[Attribute]) -> dict[Attribute, Any]:
    """The ``fields`` ``obj`` has (absent or sensitive ones left out), read at once.

    Tokens that answer a bulk read wrongly are read attribute by attribute,
    as python-pkcs11 itself does when it builds an object.
    """
    try:
        return dict(obj.get_attributes(list(fields)))
    except SESSION_BROKEN:
        raise
    except p11x.PKCS11Error:
        values: dict[Attribute, Any] = {}
        for field in fields:
            with contextlib.suppress(p11x.AttributeTypeInvalid, p11x.AttributeSensitive):
                values[field] = obj[field]
        return values


@dataclass(frozen=True)
class PrivateKey:
    """A private key object from a search and the attributes read from it."""

    obj: Any
    attrs: Mapping[Attribute, Any]

    @property
    def handle(self) -> int:
        return int(self.obj.handle)

    @property
    def label(self) -> str:
        return str(self.attrs.get(Attribute.LABEL) or "")

    @property
    def id(self) -> bytes:
        return bytes(self.attrs.get(Attribute.ID) or b"")

    @property
    def key_type(self) -> Any:
        return self.attrs.get(Attribute.KEY_TYPE)


#: searches broken by a concurrent deletion are started again this many times in all
SEARCH_ATTEMPTS = 5


def private_keys(
    session: Any, template: Mapping[Attribute, Any], fields: Sequence[Attribute] = PRIVATE_FIELDS
) -> Generator[PrivateKey, None, None]:
    """RSA and curve (EC, Ed25519) private token keys matching ``template``: one search, one read
    of ``fields`` (which include CKA_KEY_TYPE) each.

    Close the iterator if you stop early: the search stays open until then.
    """
    query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.TOKEN: True, **template}
    seen: set[int] = set()  # handles already yielded, if the search has to start again
    for attempt in range(SEARCH_ATTEMPTS):
        try:
            with contextlib.closing(session.get_objects(query, batch_size=SEARCH_BATCH)) as found:
                for obj in found:
                    handle = int(obj.handle)
                    if handle in seen:
                        continue
                    seen.add(handle)
                    try:
                        attrs = read(obj, fields)
                    except p11x.ObjectHandleInvalid:  # deleted by another process meanwhile
                        continue
                    if attrs.get(Attribute.KEY_TYPE) in USABLE_TYPES:
                        yield PrivateKey(obj, attrs)
            return
        except (p11x.ObjectHandleInvalid, p11x.KeyHandleInvalid) as exc:
            # python-pkcs11 reads each found object's class inside the search; an
            # object another process deleted just then breaks the search itself
            # (seen in benchmarks/soak.py with forked workers): search again.
            if attempt == SEARCH_ATTEMPTS - 1:
                raise translate(exc, what="searching keys") from None
        except p11x.PKCS11Error as exc:
            raise translate(exc, what="searching keys") from None


def pick_public(candidates: Sequence[tuple[T, Any]], label: str) -> T | None:
    """Of (public key, its label) pairs sharing a private key's id and type: the
    one with the private key's label, else the first (other applications may
    reuse an id)."""
    for public, public_label in candidates:
        if public_label == label:
            return public
    return candidates[0][0] if candidates else None


def public_half(priv: Any) -> Any:
    """The public key object paired with ``priv`` (same CKA_ID and key type; if
    other applications reused the id, the one with the same label), or priv itself."""
    mine = read(priv, (Attribute.ID, Attribute.LABEL, Attribute.KEY_TYPE))
    key_id = mine.get(Attribute.ID)
    if key_id:
        query = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.ID: key_id,
            Attribute.KEY_TYPE: mine.get(Attribute.KEY_TYPE),
        }
        found = [
            (pub, read(pub, (Attribute.LABEL,)).get(Attribute.LABEL))
            for pub in priv.session.get_objects(query)
        ]
        chosen = pick_public(found, mine.get(Attribute.LABEL) or "")
        if chosen is not None:
            return chosen
    return priv  # RSA private keys carry modulus and exponent; EC ones may carry EC_PARAMS


def _ec_publics(session: Any) -> dict[tuple[bytes, Any], list[tuple[Mapping[Attribute, Any], Any]]]:
    """Every curve public key's attributes with its label, by CKA_ID and key type: one search."""
    by_id: dict[tuple[bytes, Any], list[tuple[Mapping[Attribute, Any], Any]]] = {}
    query = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    fields = (Attribute.ID, Attribute.LABEL, Attribute.KEY_TYPE, Attribute.EC_PARAMS)
    try:
        for pub in session.get_objects(query, batch_size=SEARCH_BATCH):
            attrs = read(pub, fields)
            if attrs.get(Attribute.KEY_TYPE) not in ec.KEY_TYPES:
                continue
            key = (bytes(attrs.get(Attribute.ID) or b""), attrs.get(Attribute.KEY_TYPE))
            by_id.setdefault(key, []).append((attrs, attrs.get(Attribute.LABEL)))
    except p11x.PKCS11Error as exc:
        raise translate(exc, what="searching public keys") from None
    return by_id


def _needs_public(key: PrivateKey) -> bool:
    return key.key_type in ec.KEY_TYPES and Attribute.EC_PARAMS not in key.attrs


def _spec(key: PrivateKey, public: Mapping[Attribute, Any] | None) -> KeySpec:
    if key.key_type == KeyType.RSA:
        if Attribute.MODULUS not in key.attrs:
            raise InvalidInput(f"RSA key {key.label!r} shows no CKA_MODULUS; it cannot be used")
        return rsa.spec_of(key.attrs)
    source = key.attrs if Attribute.EC_PARAMS in key.attrs else public
    if source is None or Attribute.EC_PARAMS not in source:
        raise InvalidInput(
            f"EC key {key.label!r} shows no CKA_EC_PARAMS and has no public half; "
            "its curve is unknown"
        )
    return ec.spec_of(source)


def info_of(key: PrivateKey, public: Mapping[Attribute, Any] | None = None) -> KeyInfo:
    """The KeyInfo of a private key; ``public``: its public half's attributes, for
    EC keys whose private object lacks CKA_EC_PARAMS."""
    spec = _spec(key, public)
    usage = set()
    if key.attrs.get(Attribute.SIGN, False):
        usage.add("sign")
    # SoftHSM2 defaults CKA_DECRYPT to true on curve keys
    if isinstance(spec, RSA) and key.attrs.get(Attribute.DECRYPT, False):
        usage |= _decrypt_usages(allowed_of(key.obj))
    return KeyInfo(key.label, key.id.hex(), spec, frozenset(usage))


#: CKM of decryption with padding (CKM_RSA_PKCS, CKM_RSA_PKCS_OAEP), and of raw decryption
_PADDED = frozenset(int(rsa.mechanism(m)[0]) for m in DECRYPT_MECHANISMS if m.usage == "decrypt")
_RAW = int(rsa.mechanism(Mechanism.RSA_RAW)[0])


def allowed_of(obj: Any) -> frozenset[int] | None:
    """A key's CKA_ALLOWED_MECHANISMS; None where it sets no limit (absent or empty) or
    cannot be read.

    Read on its own, for RSA keys that may decrypt, never in the bulk reads:
    p11-kit 0.24's RPC (p11-kit-client) answers CKR_DEVICE_ERROR for a list of two
    or more mechanisms, and CKR_FUNCTION_FAILED for a read that also asks for an
    attribute the key lacks (measured); the session stays usable.
    """
    try:
        value = obj.get_attributes([Attribute.ALLOWED_MECHANISMS]).get(Attribute.ALLOWED_MECHANISMS)
    except p11x.PKCS11Error:
        return None
    if isinstance(value, (bytes, bytearray)):  # a session without hsmbridge's mapper
        value = unpack_mechanisms(bytes(value))
    return frozenset(int(m) for m in value) if value else None


def _decrypt_usages(allowed: frozenset[int] | None) -> set[str]:
    """The decrypt usages of an RSA key with CKA_DECRYPT: ``decrypt`` unless its
    CKA_ALLOWED_MECHANISMS leave out every padded decryption, and ``decrypt-raw``
    only where they list CKM_RSA_X_509 (a key whose token sets no limit is not
    taken as made for raw decryption)."""
    if allowed is None:
        return {"decrypt"}
    uses = {"decrypt"} if allowed & _PADDED else set()
    if _RAW in allowed:
        uses.add(RAW_USAGE)
    return uses


def check_kept_to_raw(priv: Any, what: str) -> None:
    """A new raw-decryption key must read back CKA_ALLOWED_MECHANISMS [CKM_RSA_X_509];
    a module that dropped the list gets the key destroyed and MechanismNotSupported."""
    kept = allowed_of(priv)
    if kept == frozenset({_RAW}):
        return
    pub = public_half(priv)
    if pub is not priv:
        pub.destroy()
    priv.destroy()
    raise MechanismNotSupported(
        f"{what} failed: the module did not keep CKA_ALLOWED_MECHANISMS [CKM_RSA_X_509] on "
        "the key (it read back as "
        f"{sorted(kept) if kept else 'no limit'}), so it would not be kept to raw decryption; "
        "the key was destroyed"
    )


def info_with_public(key: PrivateKey) -> KeyInfo:
    """KeyInfo of one key, searching for its public half only if it must."""
    if not _needs_public(key):
        return info_of(key)
    pub = public_half(key.obj)
    return info_of(key, None if pub is key.obj else read(pub, (Attribute.EC_PARAMS,)))


def list_infos(session: Any) -> list[KeyInfo]:
    """Every usable key pair, by label then id: at most two searches."""
    keys = list(private_keys(session, {}))
    publics = _ec_publics(session) if any(_needs_public(k) for k in keys) else {}
    infos = []
    for key in keys:
        public = None
        if _needs_public(key):
            mates = publics.get((key.id, key.key_type), []) if key.id else []
            public = pick_public(mates, key.label)
        with contextlib.suppress(HSMError):  # unsupported curves and the like are not listed
            infos.append(info_of(key, public))
    return sorted(infos, key=lambda i: (i.label, i.id))


def some_labels(session: Any, limit: int = LABELS_IN_MESSAGE) -> list[str]:
    """Up to ``limit`` labels of keys present, sorted, for a KeyNotFound message.

    One search that stops after ``limit`` keys, so a miss costs a search, not a listing.
    """
    labels: list[str] = []
    found = private_keys(session, {})
    with contextlib.closing(found):
        for key in found:
            with contextlib.suppress(HSMError):  # keys a listing leaves out are left out here
                if not _needs_public(key):
                    _spec(key, None)
                labels.append(key.label)
            if len(labels) >= limit:
                break
    return sorted(labels)


@dataclass(frozen=True)
class _Entry:
    key: PrivateKey  # the object is bound to the session it was found in
    info: KeyInfo
    identity: Mapping[Attribute, Any]
    searched_at: float


class KeyCache:
    """``get_key``'s answers for one HSM handle: (label, id) asked -> key handle and info.

    A hit is checked before it is returned, with one attribute read on the
    cached object: it must still be a private token key with the label, id,
    key type and usage it had. Another process deleting the key, relabelling
    it or changing its usage fails the check, and the question is searched
    again. Misses (KeyNotFound, AmbiguousKey) are never cached. This process's
    own generate and delete drop the entries they touch (:meth:`forget`,
    :meth:`forget_handle`).

    What a hit cannot notice: a second key with the same label (or id) that
    another process made after the entry was cached. A search would raise
    AmbiguousKey; the hit returns the first key. hsmbridge's generate_key
    refuses a label or id already present, so only another application, or two
    processes racing to generate one label, make such a pair. The staleness is
    bounded in time: an entry is trusted for ``max_age`` seconds after its
    search, then the next ``get_key`` searches again (a search is what every
    ``get_key`` cost before). On a token that reuses object handles, a key
    deleted and re-made elsewhere with the same label, id, type and usage
    would pass the check with the old size; SoftHSM2 never reuses handles.

    Entries exist only for keys found, so the table is bounded by the keys in
    the token times the three ways of asking (label, id, both). Thread-safe:
    the table has its own lock; searches and checks run on the caller's
    session, which the pool serialises.
    """

    def __init__(self, description: str, *, max_age: float = 30.0) -> None:
        self.description = description
        self.max_age = max_age
        self._entries: dict[tuple[str | None, bytes | None], _Entry] = {}
        self._lock = threading.Lock()

    def find(
        self, session: Any, label: str | None, key_id: bytes | None, wanted: str
    ) -> tuple[int, KeyInfo]:
        """(private key handle, KeyInfo) of the one key with this label and/or id;
        ``wanted`` says which, for messages."""
        asked = (label, key_id)
        with self._lock:
            entry = self._entries.get(asked)
        if entry is not None:
            if self._still_valid(session, entry):
                return entry.key.handle, entry.info
            with self._lock:
                if self._entries.get(asked) is entry:
                    del self._entries[asked]
        key, info = self._search(session, label, key_id, wanted)
        identity = {f: key.attrs[f] for f in IDENTITY_FIELDS if f in key.attrs}
        with self._lock:
            self._entries[asked] = _Entry(key, info, identity, time.monotonic())
        return key.handle, info

    def _still_valid(self, session: Any, entry: _Entry) -> bool:
        if entry.key.obj.session is not session:  # the session was replaced since
            return False
        if time.monotonic() - entry.searched_at > self.max_age:
            return False
        try:
            now = read(entry.key.obj, IDENTITY_FIELDS)
        except p11x.PKCS11Error:  # deleted (CKR_OBJECT_HANDLE_INVALID) or unreadable
            return False
        return now == entry.identity

    def _search(
        self, session: Any, label: str | None, key_id: bytes | None, wanted: str
    ) -> tuple[PrivateKey, KeyInfo]:
        template: dict[Attribute, Any] = {}
        if label is not None:
            template[Attribute.LABEL] = label
        if key_id is not None:
            template[Attribute.ID] = key_id
        found = list(private_keys(session, template, LOOKUP_FIELDS))
        if not found:
            known = some_labels(session)
            raise KeyNotFound(
                f"no key with {wanted} in {self.description}; keys present: "
                + (", ".join(repr(k) for k in known) or "none")
            )
        if len(found) > 1:
            ids = ", ".join(k.id.hex() or "(no id)" for k in found)
            raise AmbiguousKey(
                f"{len(found)} keys have {wanted} in {self.description} (ids: {ids}); "
                "ask by key_id or give the keys unique labels"
            )
        return found[0], info_with_public(found[0])

    def cached(self, label: str | None, key_id: bytes | None) -> bool:
        """Whether this question has an entry (checked or not)."""
        with self._lock:
            return (label, key_id) in self._entries

    def forget(self, label: str, key_id: bytes) -> None:
        """Drop the entries a new key with this label or id could change."""
        with self._lock:
            for asked in [a for a in self._entries if a[0] == label or a[1] == key_id]:
                del self._entries[asked]

    def forget_handle(self, handle: int) -> None:
        """Drop the entries that lead to a key being deleted."""
        with self._lock:
            for asked in [a for a, e in self._entries.items() if e.key.handle == handle]:
                del self._entries[asked]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
