"""The bridge's core: system state, authentication, and key lookup over one HSM.

Everything here is synchronous and thread-safe; the web layer runs it in a
thread pool so blocking HSM and argon2 calls never stall the event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from ..api import HSM, Key, SecretKey
from ..errors import HSMError, HSMUnavailable, KeyExists, KeyNotFound
from ..nethsm import vocabulary
from . import namespaces, statedir
from .auth import Passphrases, parse_basic
from .control import Control
from .errors import ApiError, bad_request, not_found
from .limits import DEFAULT, Limits
from .metrics import HttpMetrics
from .state import SQLITE_FILE, KeyRecord, UserRecord, open_store

log = logging.getLogger("hsmbridge.server")

# Matched with fullmatch: ``$`` would also match before a trailing newline.
ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
USER_ID_RE = re.compile(r"([a-zA-Z0-9][a-zA-Z0-9_.-]*~)?[a-zA-Z0-9][a-zA-Z0-9_.-]*")

_K = TypeVar("_K", Key, SecretKey)

UNPROVISIONED, LOCKED, OPERATIONAL = "Unprovisioned", "Locked", "Operational"
ROLES = ("Administrator", "Operator", "Metrics", "Backup")


@dataclass
class Req:
    """What a handler needs from an HTTP request (already read off the socket)."""

    method: str
    path: Mapping[str, str]
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    client: str
    base_url: str
    form: dict[str, str | bytes] | None = None
    user: UserRecord | None = None

    def json_object(self, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
        """The body as a JSON object with exactly the allowed properties (else 400)."""
        data = parse_json(self.body)
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object")
        unknown = set(data) - required - optional
        if unknown:
            raise bad_request(f"unknown properties: {', '.join(sorted(unknown))}")
        missing = required - set(data)
        if missing:
            raise bad_request(f"missing required properties: {', '.join(sorted(missing))}")
        return data


def parse_json(body: bytes | str, what: str = "the request body", limits: Limits = DEFAULT) -> Any:
    """JSON text as Python data; 400 for anything but valid JSON of valid Unicode.

    Nesting deeper than ``max_json_depth`` and strings with lone surrogates
    (``"\\ud800"``, which no encoder can write back) are malformed input too.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    try:
        data = json.loads(body or "null")
        if b"\\u" in raw or b"\xed" in raw:  # the only ways to spell a surrogate
            json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates raise
    except RecursionError:
        raise bad_request(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeError):
        raise bad_request(f"{what} is not valid JSON (UTF-8, no lone surrogates)") from None
    nesting = raw.count(b"[") + raw.count(b"{")  # an upper bound of the depth, in C
    if nesting > limits.max_json_depth and _depth(data) > limits.max_json_depth:
        raise bad_request(f"{what} is nested deeper than {limits.max_json_depth} levels")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of JSON data (1 for a scalar), level by level without recursion."""
    depth, level = 0, [value]
    while level:
        depth += 1
        children: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                children.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                children.extend(v for v in item if isinstance(v, dict | list))
        level = children
    return depth


def check_id(value: str, what: str = "KeyID") -> str:
    if not (1 <= len(value) <= 128) or not ID_RE.fullmatch(value):
        raise bad_request(
            f"{what} {value[:130]!r} is invalid: 1-128 characters of [a-zA-Z0-9_.-], "
            "starting with a letter or digit"
        )
    return value


def check_user_id(value: str) -> str:
    if not (1 <= len(value) <= 128) or not USER_ID_RE.fullmatch(value):
        raise bad_request(f"UserID {value[:130]!r} is invalid")
    return value


def _credentials(authorization: str | None) -> tuple[str, str]:
    creds = parse_basic(authorization)
    if creds is None:
        raise ApiError(
            401,
            "authentication required: send HTTP Basic credentials",
            {"WWW-Authenticate": 'Basic realm="NetHSM"'},
        )
    return creds


def _with_role(user: UserRecord, roles: tuple[str, ...]) -> UserRecord:
    if user.role not in roles:
        raise ApiError(
            403, f"access denied: this needs the role {' or '.join(roles)}, not {user.role}"
        )
    return user


class Bridge:
    """NetHSM semantics over an :class:`hsmbridge.HSM` and a :class:`Store`."""

    def __init__(
        self,
        hsm: HSM,
        state_dir: Path,
        tls_cert: Path | None = None,
        limits: Limits = DEFAULT,
        database: str | None = None,
    ) -> None:
        self.hsm = hsm
        self.state_dir = state_dir
        self.tls_cert = tls_cert
        self.limits = limits
        statedir.prepare(state_dir)
        if not database:  # SQLite gives -wal and -shm the mode of the database file
            statedir.create_private(state_dir / SQLITE_FILE)
        self.store = open_store(database, state_dir)
        self.passphrases = Passphrases(limits)
        self.store.on_failed_login = self.passphrases.record_failure
        self.control = Control()
        self.http_metrics = HttpMetrics()
        self.started = time.time()
        self._keys: dict[str, Key] = {}
        self._secrets: dict[str, SecretKey] = {}
        self._keys_lock = threading.Lock()
        # The first replica to start comes up Locked (or Operational with unattended
        # boot), like the appliance; a replica joining live others takes their state.
        others = set(self.store.live_replicas()) - {self.store.replica_id}
        if self.store.get_setting("provisioned") == "1" and (
            not others or self.store.get_setting("state") is None
        ):
            boot = OPERATIONAL if self.store.get_setting("unattended_boot") == "on" else LOCKED
            self.store.set_settings(state=boot)
        self.reconcile()

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Unprovisioned, Locked or Operational: one state for every replica of a database."""
        if self.store.get_setting("provisioned") != "1":
            return UNPROVISIONED
        return self.store.get_setting("state") or LOCKED

    def require_state(self, *states: str) -> None:
        state = self.state
        if state not in states:
            raise ApiError(
                412,
                f"precondition failed: the bridge is {state}, this needs " + " or ".join(states),
            )

    def set_state(self, expected: str, new: str) -> None:
        """Move from ``expected`` to ``new`` (atomic: of two replicas racing, one wins)."""
        self.require_state(expected)
        if not self.store.swap_setting("state", expected, new):
            self.require_state(expected)  # another replica changed it meanwhile: say to what
            raise ApiError(412, f"precondition failed: the bridge is no longer {expected}")

    # -- authentication ----------------------------------------------------------

    def cached_login(self, authorization: str | None, roles: tuple[str, ...]) -> UserRecord | None:
        """The caller if these credentials were verified before, else None (then
        :meth:`authenticate`). Memory lookups and one HMAC: safe on the event loop."""
        user_id, passphrase = _credentials(authorization)
        user = self.store.cached_user(user_id)
        if user is None or not self.passphrases.known(user_id, passphrase, user.pass_hash):
            return None
        return _with_role(user, roles)

    def authenticate(
        self, authorization: str | None, client: str, roles: tuple[str, ...]
    ) -> UserRecord:
        """The caller, checked against ``roles`` (403); 401 if unknown, 429 when
        throttled, 503 when every argon2 slot is busy."""
        user_id, passphrase = _credentials(authorization)
        user = self.store.get_user(user_id)
        stored = user.pass_hash if user else None

        def upgrade(new_hash: str) -> bool:  # called only for a right passphrase
            return stored is not None and self.store.replace_hash(user_id, stored, new_hash)

        ok = self.passphrases.check(client, user_id, passphrase, stored, upgrade=upgrade)
        if not ok or user is None:
            self.store.share_failed_login(client, user_id)  # the other replicas throttle too
            raise ApiError(
                401, "invalid user or passphrase", {"WWW-Authenticate": 'Basic realm="NetHSM"'}
            )
        return _with_role(user, roles)

    def failed_login(self, client: str, user: str) -> None:
        """Throttle ``client`` and ``user`` for a second, on every replica."""
        self.passphrases.record_failure(client, user)
        self.store.share_failed_login(client, user)

    # -- keys ------------------------------------------------------------------------

    def key_record(self, key_id: str, namespace: str = "") -> KeyRecord:
        """A private copy of the key's record (404 if there is none), to change or report.

        ``namespace`` is the caller's (see :mod:`.namespaces`); ``key_id`` is the plain ID.
        """
        check_id(key_id)
        rec = self.store.get_key(namespaces.scoped(namespace, key_id))
        if rec is None:
            raise not_found(f"key {key_id}")
        return rec

    def key_for_use(self, key_id: str, namespace: str = "") -> KeyRecord:
        """The key's shared cached record (404 if there is none); never change it."""
        # A cached id was valid when it was stored; no plain ID holds the separator, so
        # no caller can name another namespace's key.
        rec = None
        if namespaces.SEPARATOR not in key_id:
            rec = self.store.key_for_use(namespaces.scoped(namespace, key_id))
        if rec is None:
            check_id(key_id)
            raise not_found(f"key {key_id}")
        return rec

    def backend_key(self, rec: KeyRecord) -> Key:
        """The hsmbridge key behind a record (looked up once, then cached by backend id).

        Moving a key keeps its backend id; deleting it drops the entry (:meth:`forget_key`).
        """
        key = self._keys.get(rec.backend_id)  # lock-free read; writers hold _keys_lock
        if key is None:
            key = self._look_up(rec, self.hsm.get_key, "backend key")
            with self._keys_lock:
                self._keys[rec.backend_id] = key
        return key

    def _look_up(self, rec: KeyRecord, lookup: Callable[..., _K], what: str) -> _K:
        """``lookup(key_id=...)`` of a record's backend key; 404 if the token lost it."""
        try:
            return lookup(key_id=rec.backend_id)
        except KeyNotFound:
            raise ApiError(
                404,
                f"key {rec.id} is registered but its {what} is gone from "
                f"{self.hsm.description}; delete it and generate a new one",
            ) from None

    def forget_key(self, backend_id: str) -> None:
        with self._keys_lock:
            self._keys.pop(backend_id, None)
            self._secrets.pop(backend_id, None)

    def secret_key(self, rec: KeyRecord) -> SecretKey:
        """The AES key behind a Generic key's record (looked up once, then cached)."""
        key = self._secrets.get(rec.backend_id)
        if key is None:
            key = self._look_up(rec, self.hsm.get_secret_key, "AES key")
            with self._keys_lock:
                self._secrets[rec.backend_id] = key
        return key

    def create_key(self, rec: KeyRecord, make: Callable[[str], Key | SecretKey]) -> bool:
        """Create a key two-phase; False if its id is taken.

        The ``pending`` record (owned by this replica) is committed first, so a
        crash during ``make(backend_label)`` is undone by :meth:`reconcile` on
        any replica once this one's lease runs out. A backend label taken in the
        token (e.g. by a moved key) gets a suffix.
        """
        registered = self.store.register_key(rec)
        if registered is None:
            return False
        rec = registered
        try:
            try:
                key = make(rec.backend_label)
            except KeyExists:
                rec = replace(rec, backend_label=f"{rec.id}.{rec.backend_id[:8]}")
                key = make(rec.backend_label)
        except BaseException:
            self.store.remove_key(rec.id, rec.backend_id)
            raise
        if not self.store.finish_key(rec):
            # this replica was taken for dead and its pending key cleaned up meanwhile
            self.destroy_backend_key(rec)
            raise HSMUnavailable(
                f"creating key {rec.id} took longer than the replica lease and was undone; "
                "retry the request"
            )
        with self._keys_lock:
            if isinstance(key, Key):
                self._keys[rec.backend_id] = key
            else:
                self._secrets[rec.backend_id] = key
        return True

    def delete_key(self, rec: KeyRecord) -> None:
        """Delete a key two-phase: mark it ``deleting``, destroy it in the HSM, drop the record."""
        if not self.store.mark_deleting(rec):
            raise not_found(f"key {rec.id}")  # another request deleted or moved it meanwhile
        self.destroy_backend_key(rec)
        self.store.remove_key(rec.id, rec.backend_id)

    def delete_namespace(self, namespace: str) -> None:
        """Delete a namespace and every key in it (its users stay, as on the appliance)."""
        for rec in self.store.list_keys():
            if namespaces.namespace_of(rec.id) == namespace:
                self.delete_key(rec)
        self.store.remove_namespace(namespace)

    def check_tags(self, user: UserRecord | None, rec: KeyRecord) -> None:
        """An operator may use a tagged key only if it shares one of its tags."""
        if user is None or not rec.tags or user.role != "Operator":
            return
        if not set(rec.tags) & set(user.tags):
            raise ApiError(
                403,
                f"access denied: key {rec.id} is restricted to tags {', '.join(rec.tags)} "
                f"and user {user.id} has none of them",
            )

    def usable_by(self, user: UserRecord | None, rec: KeyRecord) -> bool:
        try:
            self.check_tags(user, rec)
        except ApiError:
            return False
        return True

    def destroy_backend_key(self, rec: KeyRecord) -> None:
        """Delete a record's key from the HSM (one lookup, by the record's type); a key
        already gone is fine."""
        self.forget_key(rec.backend_id)
        with contextlib.suppress(KeyNotFound):
            if rec.type == vocabulary.GENERIC:  # an AES key
                self.hsm.get_secret_key(key_id=rec.backend_id).delete()
            else:
                self.hsm.get_key(key_id=rec.backend_id).delete()

    def reconcile(self) -> None:
        """Finish or undo key creations and deletions that a dead replica left unfinished.

        Only rows whose owner stopped heartbeating: never a key another live
        replica is creating or deleting.
        """
        for rec in self.store.unfinished():
            try:
                self.destroy_backend_key(rec)
            except HSMError as exc:
                log.warning("could not clean up key %s (%s): %s", rec.id, rec.status, exc.message)
                continue
            self.store.remove_key(rec.id, rec.backend_id)
            log.info("removed key %s left %s by an interrupted request", rec.id, rec.status)

    def maintain(self) -> None:
        """Periodic upkeep: write operation counts, heartbeat, clean up after dead replicas."""
        self.store.flush_operations()
        self.store.heartbeat()
        self.reconcile()

    # -- users -----------------------------------------------------------------------

    def new_user(self, user_id: str, real_name: str, role: str, passphrase: str) -> UserRecord:
        return UserRecord(user_id, real_name, role, self.passphrases.hash(passphrase))

    def provision(self, admin: UserRecord, unlock_hash: str) -> None:
        """Store the first administrator and unlock passphrase; Unprovisioned -> Operational."""
        self.require_state(UNPROVISIONED)
        if not self.store.provision(admin, unlock_hash, OPERATIONAL):
            self.require_state(UNPROVISIONED)  # another replica provisioned first: 412

    def close(self) -> None:
        self.store.close()
