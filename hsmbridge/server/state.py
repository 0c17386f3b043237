"""The bridge's own state: system state, users, key metadata, in SQLite or PostgreSQL.

Keys themselves stay in the HSM; the database maps a NetHSM key id to the
backend key (its PKCS#11 id) and keeps what NetHSM knows about a key that a
token does not (mechanisms, label, tags, certificate). One transaction per
request keeps it consistent across crashes. Key creation and deletion are
two-phase (a ``pending``/``deleting`` row is committed before the HSM is
touched, owned by the replica doing it) so :meth:`Store.unfinished` can finish
or undo them: only rows whose owner stopped heartbeating, never a key another
live replica is still creating.

:class:`Store` holds everything both engines share (the SQL, written with
``?`` placeholders and portable ``ON CONFLICT`` clauses, the caches, record <->
row conversion, migrations); :class:`SQLiteStore` here and
:class:`~hsmbridge.server.state_pg.PostgresStore` supply the connection.

Every signature needs its caller's user record and its key record, so both are
cached in memory; the database stays the source of truth. All writes go
through :meth:`Store.transaction`, which drops the caches when it ends, and a
cache is filled only under the lock transactions hold, so a reader can never
put back a record older than the last commit. With several replicas, each
commit also tells the others to drop theirs (:meth:`Store.invalidate`).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, cast

from ..errors import ConfigurationError

#: Versioned schema steps, applied in order on start and recorded in
#: ``schema_migrations``. ``{bytes}`` and ``{bigint}`` are the engine's type names.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "settings, users and keys",
        """
        CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS users (
            id TEXT PRIMARY KEY,
            real_name TEXT NOT NULL,
            role TEXT NOT NULL,
            pass_hash TEXT NOT NULL,
            tags TEXT NOT NULL DEFAULT '[]'
        );
        CREATE TABLE IF NOT EXISTS keys (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            mechanisms TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            tags TEXT NOT NULL DEFAULT '[]',
            backend_id TEXT NOT NULL UNIQUE,
            backend_label TEXT NOT NULL,
            cert {bytes},
            cert_type TEXT,
            operations {bigint} NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'ready'
        );
        """,
    ),
    (
        2,
        "replicas and the owners of unfinished keys",
        """
        CREATE TABLE replicas (id TEXT PRIMARY KEY, heartbeat DOUBLE PRECISION NOT NULL);
        ALTER TABLE keys ADD COLUMN owner TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        3,
        "namespaces",
        """
        CREATE TABLE namespaces (id TEXT PRIMARY KEY);
        """,
    ),
)

#: Seconds without a heartbeat after which a replica's unfinished keys are cleaned up.
#: Replicas heartbeat every 2 s (:meth:`Store.heartbeat`), so only a dead (or frozen
#: for this long) replica loses its half-made keys. ``HSMBRIDGE_REPLICA_LEASE`` sets it.
LEASE_SECONDS = 30.0
LEASE_ENV = "HSMBRIDGE_REPLICA_LEASE"


def lease_seconds() -> float:
    """The replica lease: :data:`LEASE_SECONDS`, or ``$HSMBRIDGE_REPLICA_LEASE`` (>= 5 s)."""
    value = os.environ.get(LEASE_ENV)
    if value is None:
        return LEASE_SECONDS
    try:
        lease = float(value)
    except ValueError:
        lease = -1.0
    if not 5.0 <= lease <= 3600.0:
        raise ConfigurationError(
            f"{LEASE_ENV} must be a number of seconds between 5 and 3600 (heartbeats come "
            f"every 2 s), got {value[:20]!r}"
        )
    return lease


@dataclass(frozen=True)
class UserRecord:
    """A user as stored; shared by every request, so never changed (``replace`` it)."""

    id: str
    real_name: str
    role: str
    pass_hash: str = field(repr=False)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyRecord:
    """A key's metadata as stored; shared by every request, so never changed (``replace`` it).

    ``status`` is ``pending`` (being created), ``ready`` or ``deleting``;
    ``owner`` is the replica creating or deleting it.
    """

    id: str
    type: str
    mechanisms: tuple[str, ...]
    backend_id: str
    backend_label: str
    label: str = ""
    tags: tuple[str, ...] = ()
    cert: bytes | None = None
    cert_type: str | None = None
    operations: int = 0
    status: str = "ready"
    owner: str = ""


#: Unwritten operation counts above which counting flushes by itself (bounded memory).
MAX_PENDING_OPS = 100_000

Row = Mapping[str, Any]


class Cursor(Protocol):
    """What both engines' cursors offer (rows read by column name)."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """An open transaction: SQL with ``?`` placeholders, on either engine."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...


class Store(ABC):
    """The state behind one lock: a connection per store, shared by request threads.

    The signing path takes no lock at all: cached records are read with plain
    dict lookups and operations are counted by appending to a deque.
    """

    #: The engine's SQL for "now" in seconds since the epoch (the database's clock).
    NOW_SQL = ""
    TYPES: Mapping[str, str] = {}

    def __init__(self) -> None:
        self.replica_id = secrets.token_hex(8)
        self.lease = lease_seconds()
        self._lock = threading.RLock()
        self._ops: deque[str] = deque()  # backend ids of operations not yet written
        self._users: dict[str, UserRecord] = {}  # id -> record, as in the database
        self._keys: dict[str, KeyRecord] = {}  # id -> ready record (operations as written)
        self._settings: dict[str, str | None] = {}  # name -> value, as in the database
        self._namespaces: dict[str, bool] = {}  # name -> whether it exists, as in the database
        self._closed = False
        #: False while changes by other replicas might go unseen: every read goes to the database
        self._caching = True
        #: called with (client, user) when another replica saw a failed login
        self.on_failed_login: Callable[[str, str], None] | None = None
        #: committed write transactions since this store was opened (metric ``kv write``)
        self.writes = 0

    # -- engine --------------------------------------------------------------------

    @abstractmethod
    def _begin(self) -> AbstractContextManager[Tx]:
        """The engine's transaction (under ``_lock``): yields a :class:`Tx`."""

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read outside any transaction (under ``_lock``)."""

    @abstractmethod
    def _close(self) -> None: ...

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the state is, for humans (never a password)."""

    def _notify(self, tx: Tx, payload: str) -> None:  # noqa: B027 (a no-op unless shared)
        """Tell other replicas, when ``tx`` commits (a single store has none)."""

    def share_failed_login(self, client: str, user: str) -> None:  # noqa: B027
        """Let every replica throttle this client and user (a single store has no others)."""

    def _migrate(self, tx: Tx, applied: int) -> None:
        """Apply the steps after version ``applied`` in ``tx``."""
        for version, name, sql in MIGRATIONS:
            if version <= applied:
                continue
            for statement in sql.format(**self.TYPES).split(";"):
                if statement.strip():
                    tx.execute(statement)
            tx.execute("INSERT INTO schema_migrations(version, name) VALUES(?, ?)", (version, name))

    @staticmethod
    def applied_version(tx: Tx) -> int:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL)"
        )
        row = tx.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations").fetchone()
        return int(row["v"])

    def schema_version(self) -> int:
        return int(self._query("SELECT MAX(version) AS v FROM schema_migrations")[0]["v"])

    # -- transactions and caches ---------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One atomic unit: everything inside commits together or not at all.

        The caches are dropped when it ends, committed or not (under the lock,
        so no reader refills them from the state before this commit), and other
        replicas are told to drop theirs.
        """
        with self._lock:
            try:
                with self._begin() as tx:
                    yield tx
                    self._notify(tx, "changed")
                self.writes += 1
            finally:
                self.invalidate()

    def invalidate(self) -> None:
        """Drop the cached users, keys, settings and namespaces (another replica changed
        them)."""
        with self._lock:
            self._users.clear()
            self._keys.clear()
            self._settings.clear()
            self._namespaces.clear()

    def close(self) -> None:
        """Write pending counts, leave the replica list and close; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.flush_operations()
            with self.transaction() as tx:
                tx.execute("DELETE FROM replicas WHERE id=?", (self.replica_id,))
        self._close()  # outside the lock: a listener thread may be waiting for it

    # -- replicas ------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Say this replica is alive (its unfinished keys are its own for a lease).

        Replicas silent for two leases leave the list (a missing owner is a dead one).
        """
        with self._lock, self._begin() as tx:
            tx.execute(
                f"INSERT INTO replicas(id, heartbeat) VALUES(?, {self.NOW_SQL}) "
                "ON CONFLICT(id) DO UPDATE SET heartbeat=excluded.heartbeat",
                (self.replica_id,),
            )
            tx.execute(
                f"DELETE FROM replicas WHERE heartbeat < {self.NOW_SQL} - ?", (2 * self.lease,)
            )

    def live_replicas(self) -> list[str]:
        with self._lock:
            rows = self._query(
                f"SELECT id FROM replicas WHERE heartbeat > {self.NOW_SQL} - ? ORDER BY id",
                (self.lease,),
            )
        return [r["id"] for r in rows]

    # -- settings ------------------------------------------------------------------

    def set_settings(self, **values: str) -> None:
        """Write settings in one transaction."""
        with self.transaction() as tx:
            for name, value in values.items():
                Store.set_setting(tx, name, value)

    def get_setting(self, name: str) -> str | None:
        """A setting's value (cached: a fixed set of names, so misses are cached too)."""
        if self._caching and name in self._settings:
            return self._settings[name]
        with self._lock:
            rows = self._query("SELECT value FROM settings WHERE name=?", (name,))
            value = None if not rows else str(rows[0]["value"])
            if self._caching:
                self._settings[name] = value
            return value

    def swap_setting(self, name: str, expected: str, new: str) -> bool:
        """Set ``name`` to ``new`` only if it is ``expected`` now (atomic across replicas)."""
        with self.transaction() as tx:
            cursor = tx.execute(
                "UPDATE settings SET value=? WHERE name=? AND value=?", (new, name, expected)
            )
            return cursor.rowcount == 1

    @staticmethod
    def set_setting(tx: Tx, name: str, value: str) -> None:
        tx.execute(
            "INSERT INTO settings(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    # -- users ---------------------------------------------------------------------

    def cached_user(self, user_id: str) -> UserRecord | None:
        """The user's record if it is in the cache (no I/O, no lock), else None."""
        return self._users.get(user_id) if self._caching else None

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user's record (shared and frozen), or None."""
        user = self._users.get(user_id) if self._caching else None
        if user is not None:
            return user
        with self._lock:
            rows = self._query("SELECT * FROM users WHERE id=?", (user_id,))
            if not rows:
                return None  # misses are not cached: unknown ids must not grow memory
            user = _user(rows[0])
            if self._caching:
                self._users[user_id] = user
            return user

    def list_users(self) -> list[str]:
        with self._lock:
            return [r["id"] for r in self._query("SELECT id FROM users ORDER BY id")]

    def add_user(self, user: UserRecord) -> bool:
        """Insert a new user; False (and nothing written) if the id is taken."""
        with self.transaction() as tx:
            cursor = tx.execute(
                "INSERT INTO users(id, real_name, role, pass_hash, tags) "
                "VALUES(?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (user.id, user.real_name, user.role, user.pass_hash, json.dumps(user.tags)),
            )
            return cursor.rowcount == 1

    def update_user(self, user: UserRecord) -> None:
        with self.transaction() as tx:
            Store.put_user(tx, user)

    def replace_hash(self, user_id: str | None, old: str, new: str) -> bool:
        """Swap a passphrase hash (a user's; the unlock passphrase's for None) for a
        re-hash of the same passphrase, unless it changed meanwhile."""
        with self.transaction() as tx:
            if user_id is None:
                cursor = tx.execute(
                    "UPDATE settings SET value=? WHERE name='unlock_hash' AND value=?", (new, old)
                )
            else:
                cursor = tx.execute(
                    "UPDATE users SET pass_hash=? WHERE id=? AND pass_hash=?", (new, user_id, old)
                )
            return cursor.rowcount == 1

    def delete_user(self, user_id: str) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM users WHERE id=?", (user_id,))

    def provision(self, admin: UserRecord, unlock_hash: str, state: str) -> bool:
        """The first administrator, unlock passphrase and state, in one transaction.

        False (nothing written) if another replica provisioned first.
        """
        with self.transaction() as tx:
            cursor = tx.execute(
                "INSERT INTO settings(name, value) VALUES('provisioned', '1') "
                "ON CONFLICT(name) DO NOTHING"
            )
            if cursor.rowcount != 1:
                return False
            Store.put_user(tx, admin)
            Store.set_setting(tx, "unlock_hash", unlock_hash)
            Store.set_setting(tx, "state", state)
            return True

    @staticmethod
    def put_user(tx: Tx, user: UserRecord) -> None:
        tx.execute(
            "INSERT INTO users(id, real_name, role, pass_hash, tags) VALUES(?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET real_name=excluded.real_name, "
            "role=excluded.role, pass_hash=excluded.pass_hash, tags=excluded.tags",
            (user.id, user.real_name, user.role, user.pass_hash, json.dumps(user.tags)),
        )

    # -- keys ----------------------------------------------------------------------

    def key_for_use(self, key_id: str) -> KeyRecord | None:
        """The ready key's cached record, shared: read it, never change it.

        For the crypto path; its ``operations`` leave out uncounted uses.
        """
        rec = self._keys.get(key_id) if self._caching else None
        if rec is not None:
            return rec
        with self._lock:
            rows = self._query("SELECT * FROM keys WHERE id=? AND status='ready'", (key_id,))
            if not rows:
                return None
            rec = _key(rows[0])
            if self._caching:
                self._keys[key_id] = rec
            return rec

    def get_key(self, key_id: str) -> KeyRecord | None:
        """A private copy of the ready key's record, with this replica's exact count."""
        with self._lock:
            cached = self.key_for_use(key_id)
            if cached is None:
                return None
            unwritten = list(self._ops).count(cached.backend_id)
            return replace(cached, operations=cached.operations + unwritten)

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._query("SELECT * FROM keys WHERE status='ready' ORDER BY id")
            return [_key(r) for r in rows]

    def unfinished(self) -> list[KeyRecord]:
        """Keys whose creation or deletion was interrupted: their owner stopped heartbeating.

        A key another live replica is creating or deleting is never listed.
        """
        with self._lock:
            rows = self._query(
                "SELECT * FROM keys WHERE status!='ready' AND owner!=? AND owner NOT IN "
                f"(SELECT id FROM replicas WHERE heartbeat > {self.NOW_SQL} - ?)",
                (self.replica_id, self.lease),
            )
            return [_key(r) for r in rows]

    def register_key(self, rec: KeyRecord) -> KeyRecord | None:
        """Insert a new ``pending`` key record owned by this replica; None if its id is taken.

        The id's uniqueness is the table's primary key, not a check before the
        insert. :meth:`finish_key` makes it ready once the HSM holds the key.
        """
        rec = replace(rec, owner=self.replica_id, status="pending")
        with self.transaction() as tx:
            cursor = tx.execute(
                f"INSERT INTO keys({_KEY_COLUMNS}) VALUES({_KEY_MARKS}) ON CONFLICT(id) DO NOTHING",
                _key_row(rec),
            )
            return rec if cursor.rowcount == 1 else None

    def finish_key(self, rec: KeyRecord) -> bool:
        """Make this replica's pending key ready; False if recovery removed it meanwhile."""
        with self.transaction() as tx:
            cursor = tx.execute(
                "UPDATE keys SET status='ready', owner='', backend_label=? "
                "WHERE id=? AND backend_id=? AND status='pending'",
                (rec.backend_label, rec.id, rec.backend_id),
            )
            return cursor.rowcount == 1

    def mark_deleting(self, rec: KeyRecord) -> bool:
        """Mark a ready key ``deleting`` (owned by this replica); False if it is gone."""
        with self.transaction() as tx:
            cursor = tx.execute(
                "UPDATE keys SET status='deleting', owner=? "
                "WHERE id=? AND backend_id=? AND status='ready'",
                (self.replica_id, rec.id, rec.backend_id),
            )
            return cursor.rowcount == 1

    def save_key(self, rec: KeyRecord) -> None:
        """Write a ready key's fields (not its status, owner or operation count).

        A key deleted meanwhile (by any replica) stays deleted.
        """
        with self.transaction() as tx:
            tx.execute(
                "UPDATE keys SET type=?, mechanisms=?, label=?, tags=?, backend_label=?, "
                "cert=?, cert_type=? WHERE id=? AND backend_id=? AND status='ready'",
                (
                    rec.type,
                    json.dumps(rec.mechanisms),
                    rec.label,
                    json.dumps(rec.tags),
                    rec.backend_label,
                    rec.cert,
                    rec.cert_type,
                    rec.id,
                    rec.backend_id,
                ),
            )

    def remove_key(self, key_id: str, backend_id: str | None = None) -> None:
        """Delete a key's record; with ``backend_id``, only if it is still that key's.

        Recovery and two-phase deletes pass it: meanwhile another replica may
        have given the id to a new key, whose record must stay.
        """
        with self.transaction() as tx:
            if backend_id is None:
                Store.delete_key(tx, key_id)
            else:
                tx.execute("DELETE FROM keys WHERE id=? AND backend_id=?", (key_id, backend_id))

    def move_key(self, old_id: str, new_id: str) -> bool:
        """Give a key a new id, keeping its backend key and count; False if ``new_id`` is taken.

        Raises KeyError when ``old_id`` is gone (deleted meanwhile).
        """

        class Taken(Exception):
            pass

        try:
            with self.transaction() as tx:
                row = tx.execute(
                    "SELECT * FROM keys WHERE id=? AND status='ready'", (old_id,)
                ).fetchone()
                # the delete, not the read, decides: a concurrent mover or deleter loses
                if (
                    row is None
                    or tx.execute(
                        "DELETE FROM keys WHERE id=? AND status='ready'", (old_id,)
                    ).rowcount
                    != 1
                ):
                    raise KeyError(old_id)
                cursor = tx.execute(
                    f"INSERT INTO keys({_KEY_COLUMNS}) VALUES({_KEY_MARKS}) "
                    "ON CONFLICT(id) DO NOTHING",
                    _key_row(replace(_key(row), id=new_id)),
                )
                if cursor.rowcount != 1:
                    raise Taken
        except Taken:
            return False
        return True

    @staticmethod
    def exists_key(tx: Tx, key_id: str) -> bool:
        return tx.execute("SELECT 1 FROM keys WHERE id=?", (key_id,)).fetchone() is not None

    @staticmethod
    def put_key(tx: Tx, rec: KeyRecord) -> None:
        """Insert a key, or update an existing one's fields except its operation count.

        The count in the database only grows by :meth:`flush_operations`; a
        record read with unwritten uses added must not write those in twice.
        """
        tx.execute(
            f"INSERT INTO keys({_KEY_COLUMNS}) VALUES({_KEY_MARKS}) "
            "ON CONFLICT(id) DO UPDATE SET type=excluded.type, "
            "mechanisms=excluded.mechanisms, label=excluded.label, tags=excluded.tags, "
            "backend_id=excluded.backend_id, backend_label=excluded.backend_label, "
            "cert=excluded.cert, cert_type=excluded.cert_type, status=excluded.status, "
            "owner=excluded.owner",
            _key_row(rec),
        )

    @staticmethod
    def delete_key(tx: Tx, key_id: str) -> None:
        tx.execute("DELETE FROM keys WHERE id=?", (key_id,))

    def count_operation(self, rec: KeyRecord) -> None:
        """Count a key use in memory; written by :meth:`flush_operations`.

        A database write per signature would cost more than the signature, so
        a crash can lose the counts since the last flush (never key data).
        ``deque.append`` is atomic, so concurrent signatures share no lock.
        Uses are counted by backend id, which a move does not change.
        """
        self._ops.append(rec.backend_id)
        if len(self._ops) > MAX_PENDING_OPS:
            self.flush_operations()

    def flush_operations(self) -> None:
        """Add the counted uses to the database (an increment: replicas add theirs)."""
        with self._lock:
            if not self._ops:
                return
            pending: Counter[str] = Counter()
            for _ in range(len(self._ops)):  # later appends wait for the next flush
                pending[self._ops.popleft()] += 1
            with self.transaction() as tx:
                tx.executemany(
                    "UPDATE keys SET operations = operations + ? WHERE backend_id=?",
                    [(n, b) for b, n in pending.items()],
                )

    # -- namespaces ----------------------------------------------------------------

    def list_namespaces(self) -> list[str]:
        with self._lock:
            return [r["id"] for r in self._query("SELECT id FROM namespaces ORDER BY id")]

    def namespace_exists(self, namespace: str) -> bool:
        """Whether ``namespace`` exists (cached, as the settings are: every request of a
        namespace's user asks)."""
        if self._caching and namespace in self._namespaces:
            return self._namespaces[namespace]
        with self._lock:
            exists = bool(self._query("SELECT 1 FROM namespaces WHERE id=?", (namespace,)))
            if self._caching:
                self._namespaces[namespace] = exists
            return exists

    def add_namespace(self, namespace: str) -> bool:
        """Create a namespace; False (and nothing written) if it exists."""
        with self.transaction() as tx:
            return Store.put_namespace(tx, namespace)

    def remove_namespace(self, namespace: str) -> None:
        with self.transaction() as tx:
            tx.execute("DELETE FROM namespaces WHERE id=?", (namespace,))

    @staticmethod
    def put_namespace(tx: Tx, namespace: str) -> bool:
        cursor = tx.execute(
            "INSERT INTO namespaces(id) VALUES(?) ON CONFLICT(id) DO NOTHING", (namespace,)
        )
        return cursor.rowcount == 1

    # -- factory reset and restore ---------------------------------------------------

    def all_keys(self) -> list[KeyRecord]:
        """Every key record, whatever its status or owner (for a factory reset)."""
        with self._lock:
            return [_key(r) for r in self._query("SELECT * FROM keys ORDER BY id")]

    def wipe(self) -> None:
        """Forget everything: settings, users, namespaces, key records (a factory reset).

        The replica list and the schema stay: they are the deployment, not its state.
        """
        with self._lock:
            self._ops.clear()
            with self.transaction() as tx:
                for table in ("settings", "users", "keys", "namespaces"):
                    tx.execute(f"DELETE FROM {table}")

    def restore(
        self,
        settings: dict[str, str],
        users: list[UserRecord],
        keys: list[KeyRecord],
        namespaces: list[str],
        *,
        expected: str | None,
        state: str,
    ) -> bool:
        """Add (or replace) restored settings, users, key records and namespaces, and move
        to ``state``, in one transaction.

        ``expected`` None restores onto an unprovisioned store and provisions it (as
        :meth:`provision`); else the state must still be ``expected``. False (nothing
        written) if another request or replica changed the state first.
        """
        with self.transaction() as tx:
            if expected is None:
                cursor = tx.execute(
                    "INSERT INTO settings(name, value) VALUES('provisioned', '1') "
                    "ON CONFLICT(name) DO NOTHING"
                )
            else:
                cursor = tx.execute(
                    "UPDATE settings SET value=? WHERE name='state' AND value=?", (state, expected)
                )
            if cursor.rowcount != 1:
                return False
            for name, value in settings.items():
                Store.set_setting(tx, name, value)
            Store.set_setting(tx, "state", state)
            for user in users:
                Store.put_user(tx, user)
            for ns in namespaces:
                Store.put_namespace(tx, ns)
            for rec in keys:
                tx.execute("DELETE FROM keys WHERE id=? OR backend_id=?", (rec.id, rec.backend_id))
                Store.put_key(tx, rec)  # a new row: with the backup's operation count
            return True

    def total_operations(self) -> int:
        with self._lock:
            rows = self._query("SELECT COALESCE(SUM(operations), 0) AS n FROM keys")
            return int(rows[0]["n"]) + len(self._ops)


_KEY_FIELDS = tuple(f.name for f in fields(KeyRecord))
_KEY_COLUMNS = ", ".join(_KEY_FIELDS)
_KEY_MARKS = ", ".join("?" for _ in _KEY_FIELDS)


def _key_row(rec: KeyRecord) -> tuple[Any, ...]:
    """A record as the values of ``_KEY_COLUMNS`` (lists as JSON)."""
    values = {
        name: json.dumps(v) if isinstance(v, tuple | list) else v
        for name in _KEY_FIELDS
        for v in (getattr(rec, name),)
    }
    return tuple(values[name] for name in _KEY_FIELDS)


def _user(row: Row) -> UserRecord:
    return UserRecord(
        row["id"], row["real_name"], row["role"], row["pass_hash"], tuple(json.loads(row["tags"]))
    )


def _key(row: Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        type=row["type"],
        mechanisms=tuple(json.loads(row["mechanisms"])),
        backend_id=row["backend_id"],
        backend_label=row["backend_label"],
        label=row["label"],
        tags=tuple(json.loads(row["tags"])),
        cert=None if row["cert"] is None else bytes(row["cert"]),
        cert_type=row["cert_type"],
        operations=int(row["operations"]),
        status=row["status"],
        owner=row["owner"],
    )


class SQLiteStore(Store):
    """One SQLite file: the embedded default, for exactly one bridge process.

    SQLite serialises writers anyway; one connection and a lock keep every
    request's reads and writes in a single transaction without busy retries.
    WAL mode keeps it consistent across crashes.
    """

    NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"
    TYPES = {"bytes": "BLOB", "bigint": "INTEGER"}

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock, self._begin() as tx:
            self._migrate(tx, self.applied_version(tx))
            # one process per file: whoever ran before is gone, its unfinished keys are stale
            tx.execute("DELETE FROM replicas")
        self.heartbeat()

    @property
    def description(self) -> str:
        return f"SQLite {self.path}"

    @contextmanager
    def _begin(self) -> Iterator[Tx]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield cast(Tx, self._db)  # sqlite3's execute takes the same arguments
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._db.execute(sql, params).fetchall()

    def _close(self) -> None:
        self._db.close()


#: the SQLite database in the state directory
SQLITE_FILE = "hsmbridge-server.sqlite3"


def open_store(database: str | None, state_dir: Path) -> Store:
    """The store for ``--database``: SQLite in ``state_dir`` by default, else PostgreSQL."""
    if not database:
        return SQLiteStore(state_dir / SQLITE_FILE)
    if database.startswith(("postgresql://", "postgres://")):
        from .state_pg import PostgresStore

        return PostgresStore(database)
    raise ConfigurationError(
        "--database (HSMBRIDGE_DATABASE) must be a postgresql:// URI, e.g. "
        "postgresql://hsmbridge@db.example/hsmbridge (leave it unset for SQLite in the "
        "state directory)"
    )
