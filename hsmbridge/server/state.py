"""The bridge's own state in SQLite: system state, users, key metadata.

Keys themselves stay in the HSM; this database maps a NetHSM key id to the
backend key (its PKCS#11 id) and keeps what NetHSM knows about a key that a
token does not (mechanisms, label, tags, certificate). WAL mode and one
transaction per request keep it consistent across crashes. Key creation and
deletion are two-phase (a ``pending``/``deleting`` row is committed before the
HSM is touched) so :meth:`Store.unfinished` can finish or undo them on start.

Every signature needs its caller's user record and its key record, so both are
cached in memory; the database stays the source of truth. All writes go
through :meth:`Store.transaction`, which drops the caches when it ends, and a
cache is filled only under the lock transactions hold, so a reader can never
put back a record older than the last commit.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

SCHEMA = """
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
    cert BLOB,
    cert_type TEXT,
    operations INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'ready'
);
"""


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

    ``status`` is ``pending`` (being created), ``ready`` or ``deleting``.
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


#: Unwritten operation counts above which counting flushes by itself (bounded memory).
MAX_PENDING_OPS = 100_000


class Store:
    """One SQLite connection shared by all request threads behind a lock.

    SQLite serialises writers anyway; one connection and a lock keep every
    request's reads and writes in a single transaction without busy retries.
    The signing path takes no lock at all: cached records are read with plain
    dict lookups and operations are counted by appending to a deque.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._ops: deque[str] = deque()  # backend ids of operations not yet written
        self._users: dict[str, UserRecord] = {}  # id -> record, as in the database
        self._keys: dict[str, KeyRecord] = {}  # id -> ready record (operations as written)
        self._closed = False

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit: everything inside commits together or not at all.

        The caches are dropped when it ends, committed or not (under the lock,
        so no reader refills them from the state before this commit).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                self._users.clear()
                self._keys.clear()

    def close(self) -> None:
        """Write pending counts and close; idempotent."""
        with self._lock:
            if self._closed:
                return
            self.flush_operations()
            self._db.close()
            self._closed = True

    # -- settings ------------------------------------------------------------------

    def set_settings(self, **values: str) -> None:
        """Write settings in one transaction."""
        with self.transaction() as tx:
            for name, value in values.items():
                Store.set_setting(tx, name, value)

    def get_setting(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row["value"])

    @staticmethod
    def set_setting(tx: sqlite3.Connection, name: str, value: str) -> None:
        tx.execute(
            "INSERT INTO settings(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
            (name, value),
        )

    # -- users ---------------------------------------------------------------------

    def cached_user(self, user_id: str) -> UserRecord | None:
        """The user's record if it is in the cache (no I/O, no lock), else None."""
        return self._users.get(user_id)

    def get_user(self, user_id: str) -> UserRecord | None:
        """The user's record (shared and frozen), or None."""
        user = self._users.get(user_id)
        if user is not None:
            return user
        with self._lock:
            row = self._db.execute("SELECT * FROM users WHERE id=?", (user_id,)).fetchone()
            if row is None:
                return None  # misses are not cached: unknown ids must not grow memory
            user = self._users[user_id] = _user(row)
            return user

    def list_users(self) -> list[str]:
        with self._lock:
            return [r["id"] for r in self._db.execute("SELECT id FROM users ORDER BY id")]

    def add_user(self, user: UserRecord) -> bool:
        """Insert a new user; False (and nothing written) if the id is taken."""
        with self.transaction() as tx:
            cursor = tx.execute(
                "INSERT OR IGNORE INTO users(id, real_name, role, pass_hash, tags) "
                "VALUES(?, ?, ?, ?, ?)",
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

    def provision(self, admin: UserRecord, unlock_hash: str) -> None:
        """The first administrator and the unlock passphrase, in one transaction."""
        with self.transaction() as tx:
            Store.put_user(tx, admin)
            Store.set_setting(tx, "unlock_hash", unlock_hash)
            Store.set_setting(tx, "provisioned", "1")

    @staticmethod
    def put_user(tx: sqlite3.Connection, user: UserRecord) -> None:
        tx.execute(
            "INSERT OR REPLACE INTO users(id, real_name, role, pass_hash, tags) "
            "VALUES(?, ?, ?, ?, ?)",
            (user.id, user.real_name, user.role, user.pass_hash, json.dumps(user.tags)),
        )

    # -- keys ----------------------------------------------------------------------

    def key_for_use(self, key_id: str) -> KeyRecord | None:
        """The ready key's cached record, shared: read it, never change it.

        For the crypto path; its ``operations`` leave out uncounted uses.
        """
        rec = self._keys.get(key_id)
        if rec is not None:
            return rec
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM keys WHERE id=? AND status='ready'", (key_id,)
            ).fetchone()
            if row is None:
                return None
            rec = self._keys[key_id] = _key(row)
            return rec

    def get_key(self, key_id: str) -> KeyRecord | None:
        """A private copy of the ready key's record, with its exact operation count."""
        with self._lock:
            cached = self.key_for_use(key_id)
            if cached is None:
                return None
            unwritten = list(self._ops).count(cached.backend_id)
            return replace(cached, operations=cached.operations + unwritten)

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM keys WHERE status='ready' ORDER BY id")
            return [_key(r) for r in rows]

    def unfinished(self) -> list[KeyRecord]:
        """Keys whose creation or deletion was interrupted (a crash mid-request)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM keys WHERE status!='ready'")
            return [_key(r) for r in rows]

    def register_key(self, rec: KeyRecord) -> bool:
        """Insert a new key record; False (and nothing written) if its id is taken."""
        with self.transaction() as tx:
            if Store.exists_key(tx, rec.id):
                return False
            Store.put_key(tx, rec)
            return True

    def save_key(self, rec: KeyRecord) -> None:
        """Write a key record's fields (not its operation count, see :meth:`put_key`)."""
        with self.transaction() as tx:
            Store.put_key(tx, rec)

    def remove_key(self, key_id: str) -> None:
        with self.transaction() as tx:
            Store.delete_key(tx, key_id)

    def move_key(self, old_id: str, new_id: str) -> bool:
        """Give a key a new id, keeping its backend key and count; False if ``new_id`` is taken.

        Raises KeyError when ``old_id`` is gone (deleted meanwhile).
        """
        with self.transaction() as tx:
            if Store.exists_key(tx, new_id):
                return False
            row = tx.execute("SELECT * FROM keys WHERE id=?", (old_id,)).fetchone()
            if row is None:
                raise KeyError(old_id)
            Store.delete_key(tx, old_id)
            Store.put_key(tx, replace(_key(row), id=new_id))
            return True

    @staticmethod
    def exists_key(tx: sqlite3.Connection, key_id: str) -> bool:
        return tx.execute("SELECT 1 FROM keys WHERE id=?", (key_id,)).fetchone() is not None

    @staticmethod
    def put_key(tx: sqlite3.Connection, rec: KeyRecord) -> None:
        """Insert a key, or update an existing one's fields except its operation count.

        The count in the database only grows by :meth:`flush_operations`; a
        record read with unwritten uses added must not write those in twice.
        """
        tx.execute(
            "INSERT INTO keys(id, type, mechanisms, label, tags, backend_id, "
            "backend_label, cert, cert_type, operations, status) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET type=excluded.type, "
            "mechanisms=excluded.mechanisms, label=excluded.label, tags=excluded.tags, "
            "backend_id=excluded.backend_id, backend_label=excluded.backend_label, "
            "cert=excluded.cert, cert_type=excluded.cert_type, status=excluded.status",
            (
                rec.id,
                rec.type,
                json.dumps(rec.mechanisms),
                rec.label,
                json.dumps(rec.tags),
                rec.backend_id,
                rec.backend_label,
                rec.cert,
                rec.cert_type,
                rec.operations,
                rec.status,
            ),
        )

    @staticmethod
    def delete_key(tx: sqlite3.Connection, key_id: str) -> None:
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

    def total_operations(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(operations), 0) AS n FROM keys").fetchone()
            return int(row["n"]) + len(self._ops)


def _user(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        row["id"], row["real_name"], row["role"], row["pass_hash"], tuple(json.loads(row["tags"]))
    )


def _key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        type=row["type"],
        mechanisms=tuple(json.loads(row["mechanisms"])),
        backend_id=row["backend_id"],
        backend_label=row["backend_label"],
        label=row["label"],
        tags=tuple(json.loads(row["tags"])),
        cert=row["cert"],
        cert_type=row["cert_type"],
        operations=row["operations"],
        status=row["status"],
    )
