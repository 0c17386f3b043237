"""Replicas sharing PostgreSQL behind HAProxy: the invariants hold across them.

Real components only: the ``cluster`` fixture (tests/replica_fixtures.py)
runs PostgreSQL, three ``hsmbridge serve`` processes over the session's
SoftHSM2 token and HAProxy; SIGKILL is a real crash.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import hsmbridge
from benchmarks.cluster import Cluster, Postgres, Replica
from hsmbridge.errors import ConfigurationError
from hsmbridge.nethsm import NetHSM
from hsmbridge.server.bridge import Bridge
from hsmbridge.server.state import MIGRATIONS, KeyRecord, SQLiteStore, open_store
from hsmbridge.server.state_pg import PostgresStore
from hsmbridge.server.testing import Credentials

TIMEOUT = 30
BATCH = 5000


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def session(cluster: Cluster, who: Credentials | None = None) -> requests.Session:
    return cluster.session(who)


def gen_ec(s: requests.Session, url: str, key_id: str) -> requests.Response:
    body = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "id": key_id}
    return s.post(f"{url}/keys/generate", json=body, timeout=TIMEOUT)


def pg_rows(postgres: Postgres, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with postgres.connect() as conn:
        return list(conn.execute(sql, params).fetchall())


def restart(cluster: Cluster, replica: Replica) -> None:
    replica.start()
    replica.wait_ready()
    cluster.wait_balanced()


# -- storage: migrations, constraints --------------------------------------------------


def test_sqlite_migrates_a_pre_migration_database(tmp_path: Path) -> None:
    """A database written before versioned migrations gets every step, data kept."""
    path = tmp_path / "hsmbridge-server.sqlite3"
    with sqlite3.connect(path) as db:  # the schema as it was, without schema_migrations
        db.executescript(MIGRATIONS[0][2].format(bytes="BLOB", bigint="INTEGER"))
        db.execute("INSERT INTO settings VALUES('provisioned', '1')")
    store = SQLiteStore(path)
    try:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.get_setting("provisioned") == "1"
        assert store.register_key(KeyRecord("k1", "EC_P256", ("ECDSA_Signature",), "b1", "k1"))
        assert store.register_key(KeyRecord("k1", "EC_P256", (), "b2", "k1")) is None
    finally:
        store.close()
    store = SQLiteStore(path)  # a second start applies nothing twice
    assert store.schema_version() == len(MIGRATIONS)
    store.close()


def test_postgres_migrations_and_unique_ids(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(postgres.passfile))
    stores = [PostgresStore(postgres.url) for _ in range(2)]  # concurrent starts: one migrates
    try:
        versions = pg_rows(postgres, "SELECT version FROM schema_migrations ORDER BY version")
        assert [v for (v,) in versions] == [v for v, _, _ in MIGRATIONS]
        key_id = uid("k")
        recs = [
            KeyRecord(key_id, "EC_P256", ("ECDSA_Signature",), uuid.uuid4().hex, key_id)
            for _ in stores
        ]
        with ThreadPoolExecutor(2) as pool:
            won = list(
                pool.map(lambda sr: sr[0].register_key(sr[1]), zip(stores, recs, strict=True))
            )
        assert sum(r is not None for r in won) == 1  # the primary key decides, not a check
        stores[0].remove_key(key_id)
    finally:
        for store in stores:
            store.close()


def test_recovery_never_removes_a_reused_id(tmp_path: Path) -> None:
    """Two replicas recovering one stale key: the slower one must not delete the id's new key."""
    store = SQLiteStore(tmp_path / "s.sqlite3")
    try:
        stale = KeyRecord("k", "EC_P256", (), "old-backend", "k", status="pending")
        with store.transaction() as tx:
            store.put_key(tx, stale)
        (listed,) = store.unfinished()  # both replicas list it
        store.remove_key(listed.id, listed.backend_id)  # the first cleans up
        fresh = store.register_key(KeyRecord("k", "EC_P256", (), "new-backend", "k"))
        assert fresh is not None and store.finish_key(fresh)  # the id is reused
        store.remove_key(listed.id, listed.backend_id)  # the second, late
        assert store.get_key("k") is not None
    finally:
        store.close()


def test_database_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="PGPASSWORD"):
        open_store("postgresql://hsmbridge:secret@localhost/hsmbridge", tmp_path)
    with pytest.raises(ConfigurationError, match="postgresql://") as info:
        open_store("mysql://x@y/z", tmp_path)
    assert "secret" not in str(info.value)


# -- invariants across replicas ---------------------------------------------------------


def test_user_deleted_on_one_replica_cannot_log_in_on_another(cluster: Cluster) -> None:
    a, b = cluster.replicas[0], cluster.replicas[1]
    user, passphrase = uid("u"), "passphrase-0123"
    with session(cluster, cluster.admin) as admin:
        body = {"realName": user, "role": "Operator", "passphrase": passphrase}
        assert admin.put(f"{a.url}/users/{user}", json=body, timeout=TIMEOUT).status_code == 201
        with session(cluster, Credentials(user, passphrase)) as s:  # b caches user, credential
            assert s.get(f"{b.url}/keys", timeout=TIMEOUT).status_code == 200
            assert admin.delete(f"{a.url}/users/{user}", timeout=TIMEOUT).status_code == 204
            within_a_second(lambda: s.get(f"{b.url}/keys", timeout=TIMEOUT).status_code == 401)
            assert s.get(f"{b.url}/keys", timeout=TIMEOUT).status_code in (401, 429)


def within_a_second(check: Any) -> None:
    """``check()`` becomes true within one second (other replicas hear of a commit by NOTIFY)."""
    deadline = time.monotonic() + 1.0
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("another replica did not see the change within 1 s")
        time.sleep(0.01)


def test_locking_one_replica_locks_all(cluster: Cluster) -> None:
    a, b, c = cluster.replicas
    with session(cluster, cluster.admin) as admin:

        def state(r: Replica) -> str:
            return str(admin.get(f"{r.url}/health/state", timeout=TIMEOUT).json()["state"])

        assert admin.post(f"{a.url}/lock", timeout=TIMEOUT).status_code == 204
        try:
            for r in (b, c):
                within_a_second(lambda r=r: state(r) == "Locked")
            assert admin.post(f"{b.url}/lock", timeout=TIMEOUT).status_code == 412
        finally:
            body = {"passphrase": cluster.unlock_passphrase}
            assert admin.post(f"{c.url}/unlock", json=body, timeout=TIMEOUT).status_code == 204
        within_a_second(lambda: state(a) == "Operational")
    cluster.wait_balanced()


def test_failed_login_throttles_on_every_replica(cluster: Cluster) -> None:
    """A failure on one replica throttles unverified attempts on the others; credentials
    verified before are never throttled by someone else's failures (issue 13)."""
    a, b = cluster.replicas[0], cluster.replicas[1]
    with session(cluster, Credentials("operator", "wrong-passphrase")) as bad:
        assert bad.get(f"{a.url}/keys", timeout=TIMEOUT).status_code == 401
        time.sleep(0.3)  # the NOTIFY reaches the other replicas in milliseconds
        # one attempt only: had B checked it, B's own failure would make later ones 429
        assert bad.get(f"{b.url}/keys", timeout=TIMEOUT).status_code == 429
    time.sleep(1.1)
    with session(cluster, cluster.operator) as good:
        assert good.get(f"{b.url}/keys", timeout=TIMEOUT).status_code == 200


def test_same_ids_created_on_two_replicas_at_once(cluster: Cluster) -> None:
    """One wins, the other gets 409, for key ids and user ids alike."""
    a, b = cluster.replicas[0], cluster.replicas[1]
    key_id, user = uid("k"), uid("u")
    body = {"realName": user, "role": "Operator", "passphrase": "passphrase-0123"}
    with session(cluster, cluster.admin) as sa, session(cluster, cluster.admin) as sb:

        def both(call: Any) -> list[int]:
            with ThreadPoolExecutor(2) as pool:
                return sorted(pool.map(call, ((sa, a), (sb, b))))

        keys = both(lambda sr: gen_ec(sr[0], sr[1].url, key_id).status_code)
        users = both(
            lambda sr: (
                sr[0].put(f"{sr[1].url}/users/{user}", json=body, timeout=TIMEOUT).status_code
            )
        )
        assert keys == [201, 409] and users == [201, 409]
        assert sa.delete(f"{b.url}/keys/{key_id}", timeout=TIMEOUT).status_code == 204
        assert sa.delete(f"{a.url}/users/{user}", timeout=TIMEOUT).status_code == 204


def test_recovery_spares_a_key_a_live_replica_is_creating(
    postgres: Postgres, pkcs11_hsm: hsmbridge.HSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pending key of a heartbeating replica survives another's recovery; a stale one not."""
    monkeypatch.setenv("PGPASSFILE", str(postgres.passfile))
    monkeypatch.setenv("HSMBRIDGE_REPLICA_LEASE", "5")
    creator = PostgresStore(postgres.url)
    key_id, backend_id = uid("k"), uuid.uuid4().hex
    rec = creator.register_key(
        KeyRecord(key_id, "EC_P256", ("ECDSA_Signature",), backend_id, key_id, status="pending")
    )
    assert rec is not None
    pkcs11_hsm.generate_key(hsmbridge.EC("P-256"), key_id, key_id=backend_id)
    other = Bridge(pkcs11_hsm, tmp_path, database=postgres.url)  # recovers on start
    try:
        other.reconcile()
        assert pkcs11_hsm.get_key(key_id=backend_id)  # the live creator's key is untouched
        with postgres.connect() as conn:  # the creator stops heartbeating (frozen or dead)
            conn.execute("UPDATE replicas SET heartbeat = heartbeat - 60 WHERE id=%s", (
                creator.replica_id,))  # fmt: skip
        other.reconcile()
        with pytest.raises(hsmbridge.KeyNotFound):
            pkcs11_hsm.get_key(key_id=backend_id)
        assert pg_rows(postgres, "SELECT id FROM keys WHERE id=%s", key_id) == []
        assert not creator.finish_key(rec)  # a creator that wakes up finds it undone
    finally:
        other.close()
        creator.close()


# -- failover: SIGKILL in the middle of a batch --------------------------------------------


def _batch_survives_a_kill(cluster: Cluster, hsm: NetHSM, victim: Replica) -> None:
    """5,000 signatures while ``victim`` is SIGKILLed: all there, in order, each valid.

    The kill comes once the client has sent a third of the batch (its request
    counter), and the client's retry counter proves requests in flight were hit.
    """
    key = hsm.generate_key(hsmbridge.EC("P-256"), uid("fail"))
    try:
        public = serialization.load_pem_public_key(key.public_key_pem().encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        messages = [f"failover {i}".encode() for i in range(BATCH)]
        start = dict(hsm.stats)

        def kill_mid_batch() -> None:
            deadline = time.monotonic() + 60
            while hsm.stats["requests"] - start["requests"] < BATCH // 3:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
            victim.kill()

        killer = threading.Thread(target=kill_mid_batch)
        killer.start()
        signatures = key.sign_batch(messages, "ecdsa-sha256")
        killer.join()
        assert victim.process.poll() is not None, "the batch ended before the kill"
        assert (
            hsm.stats["retries"] + hsm.stats["failovers"] > start["retries"] + start["failovers"]
        ), "the kill hit no request in flight"
        assert len(signatures) == BATCH
        for message, signature in zip(messages, signatures, strict=True):
            try:
                public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                pytest.fail(f"the signature of {message!r} does not verify")
    finally:
        restart(cluster, victim)
        key.delete()


def test_batch_through_several_instances_survives_a_killed_replica(cluster: Cluster) -> None:
    hostports = ",".join(r.hostport for r in cluster.replicas)
    hsm = hsmbridge.open(
        f"nethsm://admin@{hostports}",
        password=cluster.admin.passphrase,
        operator=cluster.operator.auth,
        fingerprint=cluster.fingerprint,
    )
    assert isinstance(hsm, NetHSM)
    try:
        _batch_survives_a_kill(cluster, hsm, cluster.replicas[2])
    finally:
        hsm.close()


def test_batch_through_haproxy_survives_a_killed_replica(
    cluster: Cluster, replicas_hsm: NetHSM
) -> None:
    _batch_survives_a_kill(cluster, replicas_hsm, cluster.replicas[1])


def test_generate_in_flight_on_a_killed_replica_leaves_nothing(
    cluster: Cluster, postgres: Postgres, pkcs11_hsm: hsmbridge.HSM
) -> None:
    """SIGKILL during an RSA-4096 generation: after the lease no key and no record remain."""
    victim = cluster.replicas[2]
    key_id = uid("inflight")
    body = {"type": "RSA", "length": 4096, "mechanisms": ["RSA_Signature_PKCS1"], "id": key_id}

    def generate() -> None:
        with session(cluster, cluster.admin) as s, pytest.raises(requests.RequestException):
            s.post(f"{victim.url}/keys/generate", json=body, timeout=TIMEOUT)

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        rows: list[tuple[Any, ...]] = []
        while not rows and time.monotonic() < deadline:
            rows = pg_rows(postgres, "SELECT backend_id FROM keys WHERE id=%s", key_id)
        assert rows, "the generate request never registered its pending key"
        victim.kill()  # the token is generating the key pair now
        thread.join(TIMEOUT)
        (backend_id,) = rows[0]
        deadline = time.monotonic() + 30  # lease (5 s) + a maintenance round (2 s) + slack
        while pg_rows(postgres, "SELECT 1 FROM keys WHERE id=%s", key_id):
            assert time.monotonic() < deadline, "no replica cleaned up the dead one's pending key"
            time.sleep(0.2)
        with pytest.raises(hsmbridge.KeyNotFound):
            pkcs11_hsm.get_key(key_id=backend_id)
        with session(cluster, cluster.admin) as s:
            assert s.get(f"{cluster.url}/keys/{key_id}", timeout=TIMEOUT).status_code == 404
    finally:
        thread.join(TIMEOUT)
        restart(cluster, victim)


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_namespaces_restore_and_wipe_on_both_engines(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 3 (namespaces) and the restore/factory-reset writes, on either engine."""
    if engine == "postgres":
        postgres: Postgres = request.getfixturevalue("postgres")
        monkeypatch.setenv("PGPASSFILE", str(postgres.passfile))
        name = uid("parity").replace("-", "_")
        with postgres.connect("postgres") as conn:  # its own database: wipe() empties it
            conn.execute(f"CREATE DATABASE {name}")
        store = open_store(f"postgresql://hsmbridge@/{name}?host={postgres.socket_dir}", tmp_path)
    else:
        store = open_store(None, tmp_path)
    try:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.add_namespace("ns1") and not store.add_namespace("ns1")
        assert store.list_namespaces() == ["ns1"] and store.namespace_exists("ns1")
        rec = KeyRecord("ns1~k", "Generic", ("AES_Encryption_CBC",), "b1", "ns1~k", operations=7)
        args: dict[str, Any] = {"users": [], "keys": [rec], "namespaces": ["ns2"]}
        assert store.restore({"unlock_hash": "h"}, **args, expected=None, state="Locked")
        assert not store.restore({}, **args, expected=None, state="Locked")  # provisioned
        assert not store.restore({}, **args, expected="Operational", state="Locked")
        restored = store.get_key("ns1~k")
        assert restored is not None and restored.operations == 7
        assert store.get_setting("state") == "Locked" and store.list_namespaces() == [
            "ns1",
            "ns2",
        ]
        store.wipe()
        assert store.all_keys() == [] and store.list_namespaces() == []
        assert store.get_setting("provisioned") is None
    finally:
        store.close()
