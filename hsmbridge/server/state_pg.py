"""The bridge's state in PostgreSQL, shared by several ``hsmbridge serve`` replicas.

The SQL is :class:`~hsmbridge.server.state.Store`'s; this module adds the
connection (psycopg 3), migrations under an advisory lock (replicas may start
together) and cache invalidation across replicas: every committing transaction
sends ``NOTIFY hsmbridge`` and a listener thread in every replica drops its
caches when one arrives, a few milliseconds after the commit. While the
listener is disconnected the caches are bypassed, so no replica serves a
record another one changed. Failed logins travel the same channel, so the
one-second throttle holds on every replica.

The password never appears in the connection string (it would show in ``ps``
and logs): libpq takes it from ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from ..errors import ConfigurationError, HSMUnavailable
from .state import Cursor, Store, Tx

log = logging.getLogger("hsmbridge.server")

CHANNEL = "hsmbridge"
#: pg_advisory_xact_lock key serialising migrations of replicas starting together
MIGRATION_LOCK = 0x68736D62  # "hsmb"


@lru_cache(maxsize=256)
def _sql(sql: str) -> str:
    """``?`` placeholders (the shared SQL) as psycopg's ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx:
    """A psycopg connection inside a transaction, taking the shared ``?`` SQL."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        return self._conn.execute(_sql(sql), tuple(params))  # type: ignore[no-any-return]

    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any:
        with self._conn.cursor() as cur:
            cur.executemany(_sql(sql), [tuple(p) for p in params])


def check_conninfo(conninfo: str) -> dict[str, Any]:
    """The connection parameters; a password in them is refused (use PGPASSWORD/.pgpass)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigurationError(
            "PostgreSQL state needs psycopg: pip install 'hsmbridge[server,postgres]'"
        ) from None
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:  # psycopg.ProgrammingError; its message may quote the string
        raise ConfigurationError(
            "--database is not a valid PostgreSQL URI or connection string "
            "(e.g. postgresql://hsmbridge@db.example/hsmbridge)"
        ) from None
    if "password" in params:
        raise ConfigurationError(
            "the --database URI must not contain a password (it would show in ps and logs): "
            "set PGPASSWORD or PGPASSFILE, or use ~/.pgpass"
        )
    return params


class PostgresStore(Store):
    """One connection for requests plus one listening for other replicas' changes."""

    NOW_SQL = "extract(epoch from clock_timestamp())"
    TYPES = {"bytes": "BYTEA", "bigint": "BIGINT"}

    def __init__(self, conninfo: str) -> None:
        super().__init__()
        params = check_conninfo(conninfo)
        self._conninfo = conninfo
        self._where = (
            f"PostgreSQL database {params.get('dbname', '(default)')} "
            f"on {params.get('host', '(local socket)')}"
        )
        self._caching = False  # until the listener listens
        self._stop = threading.Event()
        self._db = self._connect()
        with self._lock, self._begin() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            self._migrate(tx, self.applied_version(tx))
        self.heartbeat()
        self._listening = threading.Event()
        self._listener = threading.Thread(
            target=self._listen, name="hsmbridge-state-listener", daemon=True
        )
        self._listener.start()
        self._listening.wait(10)

    @property
    def description(self) -> str:
        return self._where

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self._conninfo, autocommit=True, row_factory=dict_row)
        except psycopg.OperationalError as exc:
            raise HSMUnavailable(
                f"cannot connect to the {self._where}: {str(exc).strip()}; check that it "
                "runs and that PGPASSWORD/.pgpass hold this user's password"
            ) from None

    def _connection(self) -> Any:
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.OperationalError as exc:
            raise HSMUnavailable(
                f"the {self._where} failed: {str(exc).strip()}; the request was not "
                "completed, retry it"
            ) from None

    @contextmanager
    def _begin(self) -> Iterator[Tx]:
        with self._unavailable():
            conn = self._connection()
            with conn.transaction():
                yield _PgTx(conn)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._unavailable():
            return self._connection().execute(_sql(sql), tuple(params)).fetchall()  # type: ignore[no-any-return]

    def _notify(self, tx: Tx, payload: str) -> None:
        tx.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))

    def share_failed_login(self, client: str, user: str) -> None:
        payload = json.dumps(["login-failed", client, user[:256]])
        with self._lock:
            self._query("SELECT pg_notify(?, ?) AS sent", (CHANNEL, payload))

    # -- caches across replicas ----------------------------------------------------

    def _listen(self) -> None:
        """Drop the caches whenever any replica commits; reconnect when the link drops."""
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.invalidate()  # whatever changed while not listening
                    self._caching = True
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._received(note.payload)
            except psycopg.Error as exc:
                self._caching = False
                self.invalidate()
                log.warning("lost the change feed of the %s: %s", self._where, exc)
                self._stop.wait(1.0)

    def _received(self, payload: str) -> None:
        if payload == "changed":
            self.invalidate()
            return
        try:
            kind, client, user = json.loads(payload)
        except ValueError:
            return
        if kind == "login-failed" and self.on_failed_login is not None:
            self.on_failed_login(client, user)

    def _close(self) -> None:
        self._stop.set()
        self._listener.join(5)
        self._db.close()
