"""The bridge server's protocol rules, over raw HTTPS: states, roles, errors, persistence.

These talk to the server with ``requests`` to see exact statuses and bodies
(the SDK hides some). Servers that get provisioned, locked or restarted come
from ``bridge_factory`` so the session's shared server stays Operational.
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

import hsmbridge
from hsmbridge.server.state import KeyRecord, Store
from hsmbridge.server.testing import TIMEOUT, BridgeServer

pytest_plugins = ["server_fixtures"]

Factory = Callable[..., BridgeServer]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def message_of(r: requests.Response) -> str:
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"message"} and isinstance(body["message"], str), body
    return str(body["message"])


def gen_ec(s: requests.Session, url: str, key_id: str | None = None, **extra: Any) -> str:
    body: dict[str, Any] = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], **extra}
    if key_id:
        body["id"] = key_id
    r = s.post(f"{url}/keys/generate", json=body, timeout=TIMEOUT)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def sign_ec(s: requests.Session, url: str, key_id: str, digest: bytes) -> requests.Response:
    return s.post(
        f"{url}/keys/{key_id}/sign",
        json={"mode": "ECDSA", "message": base64.b64encode(digest).decode()},
        timeout=TIMEOUT,
    )


def test_lifecycle_states(bridge_factory: Factory) -> None:
    bridge = bridge_factory(provision=False)
    url, s = bridge.url, bridge.session()
    assert s.get(f"{url}/health/state", timeout=TIMEOUT).json() == {"state": "Unprovisioned"}
    assert s.get(f"{url}/health/alive", timeout=TIMEOUT).status_code == 200
    assert s.get(f"{url}/health/ready", timeout=TIMEOUT).status_code == 412
    r = s.get(f"{url}/keys", auth=("admin", "whatever-pass"), timeout=TIMEOUT)
    assert r.status_code == 412 and "Unprovisioned" in message_of(r)
    good: dict[str, Any] = {
        "unlockPassphrase": bridge.unlock_passphrase,
        "adminPassphrase": bridge.admin.passphrase,
        "systemTime": "2026-01-01T00:00:00Z",
    }
    for bad, expected in (
        ({**good, "adminPassphrase": "short"}, "at least 10"),
        ({**good, "systemTime": "yesterday"}, "date-time"),
        ({**good, "extra": 1}, "unknown properties: extra"),
        ({k: v for k, v in good.items() if k != "systemTime"}, "missing required"),
    ):
        r = s.post(f"{url}/provision", json=bad, timeout=TIMEOUT)
        assert r.status_code == 400 and expected in message_of(r)
    r = s.post(f"{url}/provision", data=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400 and "JSON" in message_of(r)
    assert s.post(f"{url}/provision", json=good, timeout=TIMEOUT).status_code == 204
    assert s.post(f"{url}/provision", json=good, timeout=TIMEOUT).status_code == 412
    assert s.get(f"{url}/health/ready", timeout=TIMEOUT).status_code == 200
    assert s.get(f"{url}/health/alive", timeout=TIMEOUT).status_code == 412

    s.auth = bridge.admin.auth
    assert s.post(f"{url}/lock", timeout=TIMEOUT).status_code == 204
    assert s.get(f"{url}/health/state", timeout=TIMEOUT).json() == {"state": "Locked"}
    r = s.get(f"{url}/keys", timeout=TIMEOUT)
    assert r.status_code == 412 and "Locked" in message_of(r)
    r = s.post(f"{url}/unlock", json={"passphrase": "wrong-unlock-pass"}, timeout=TIMEOUT)
    assert r.status_code == 403 and "wrong unlock passphrase" in message_of(r)
    bridge.server.bridge.passphrases.delay = 0  # the 429 window is tested below
    r = s.post(f"{url}/unlock", json={"passphrase": bridge.unlock_passphrase}, timeout=TIMEOUT)
    assert r.status_code == 204
    assert s.get(f"{url}/keys", timeout=TIMEOUT).json() == []


def test_authentication_roles_and_rate_limit(bridge_server: BridgeServer) -> None:
    url = bridge_server.url
    s = bridge_server.session()
    r = s.get(f"{url}/keys", timeout=TIMEOUT)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert "authentication required" in message_of(r)
    r = s.get(f"{url}/keys", auth=bridge_server.metrics.auth, timeout=TIMEOUT)
    assert r.status_code == 403 and "Administrator or Operator" in message_of(r)
    r = s.post(f"{url}/random", json={"length": 8}, auth=bridge_server.admin.auth, timeout=TIMEOUT)
    assert r.status_code == 403
    r = s.get(f"{url}/users/admin", auth=bridge_server.operator.auth, timeout=TIMEOUT)
    assert r.status_code == 403 and "their own user" in message_of(r)
    r = s.get(f"{url}/users/operator", auth=bridge_server.operator.auth, timeout=TIMEOUT)
    assert r.json() == {"realName": "operator", "role": "Operator"}

    # a login right after a failed one is refused without checking it (429)
    creds = bridge_server.server.bridge.passphrases
    user = uid("victim")
    s.auth = bridge_server.admin.auth
    r = s.put(
        f"{url}/users/{user}",
        json={"realName": "v", "role": "Operator", "passphrase": "victim-passphrase"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 201
    old_delay = creds.delay
    creds.delay = 3600.0  # make "within the window" independent of machine speed
    try:
        r = s.get(f"{url}/users/{user}", auth=(user, "wrong-passphrase"), timeout=TIMEOUT)
        assert r.status_code == 401 and "invalid user or passphrase" in message_of(r)
        r = s.get(f"{url}/users/{user}", auth=(user, "victim-passphrase"), timeout=TIMEOUT)
        assert r.status_code == 429 and "failed login" in message_of(r)
        # other users are not affected
        assert s.get(f"{url}/users/{user}", timeout=TIMEOUT).status_code == 200
        creds.delay = 0.0  # the window has passed
        r = s.get(f"{url}/users/{user}", auth=(user, "victim-passphrase"), timeout=TIMEOUT)
        assert r.status_code == 200
    finally:
        creds.delay = old_delay
        s.delete(f"{url}/users/{user}", timeout=TIMEOUT)


def test_error_bodies_and_validation(bridge_server: BridgeServer) -> None:
    url = bridge_server.url
    s = bridge_server.session(bridge_server.admin)
    cases = [
        (s.get(f"{url}/no/such/thing", timeout=TIMEOUT), 404, "no such endpoint"),
        (s.post(f"{url}/system/update", data=b"x", timeout=TIMEOUT), 501, "not implemented"),
        (s.get(f"{url}/cluster/members", timeout=TIMEOUT), 501, "clustering"),
        (s.put(f"{url}/config/time", json={"time": "x"}, timeout=TIMEOUT), 400, "RFC 3339"),
        (s.get(f"{url}/keys/-bad", timeout=TIMEOUT), 400, "invalid"),
        (s.get(f"{url}/keys/{'a' * 129}", timeout=TIMEOUT), 400, "invalid"),
        (s.get(f"{url}/keys/{uid('missing')}", timeout=TIMEOUT), 404, "not found"),
        (s.get(f"{url}/users/ns1~alice", timeout=TIMEOUT), 404, "not found"),
        (
            s.post(
                f"{url}/keys/generate",
                json={"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "colour": "red"},
                timeout=TIMEOUT,
            ),
            400,
            "unknown properties: colour",
        ),
        (
            s.post(
                f"{url}/keys/generate",
                json={"type": "EC_P256", "mechanisms": ["RSA_Signature_PKCS1"]},
                timeout=TIMEOUT,
            ),
            400,
            "do not fit",
        ),
        (
            s.post(f"{url}/keys/generate", json={"type": "RSA", "mechanisms": []}, timeout=TIMEOUT),
            400,
            "length",
        ),
        (
            s.post(
                f"{url}/keys/generate",
                json={"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "id": "a/b"},
                timeout=TIMEOUT,
            ),
            400,
            "KeyID 'a/b' is invalid",
        ),
        (s.post(f"{url}/random", json={"length": 0}, timeout=TIMEOUT), 403, "Operator"),
        (s.delete(f"{url}/users/admin", timeout=TIMEOUT), 400, "yourself"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (r.request.method, r.request.url, r.text)
        assert text in message_of(r), (r.request.url, r.text)
    op = bridge_server.session(bridge_server.operator)
    r = op.post(f"{url}/random", json={"length": 2000}, timeout=TIMEOUT)
    assert r.status_code == 400 and "1024" in message_of(r)


def test_generate_without_id_location_and_label(bridge_server: BridgeServer) -> None:
    url = bridge_server.url
    s = bridge_server.session(bridge_server.admin)
    r = s.post(
        f"{url}/keys/generate",
        json={"type": "EC_P384", "mechanisms": ["ECDSA_Signature"], "label": "l" * 33},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400 and "32 bytes" in message_of(r)
    r = s.post(
        f"{url}/keys/generate",
        json={"type": "EC_P384", "mechanisms": ["ECDSA_Signature"], "label": "✓ label"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 201
    key_id = r.json()["id"]
    assert r.headers["location"] == f"{url}/keys/{key_id}"
    try:
        body = s.get(r.headers["location"], timeout=TIMEOUT).json()
        assert body["label"] == "✓ label" and body["restrictions"] == {}
        assert (
            s.put(
                f"{url}/keys/{key_id}/label", json={"label": "✓ label"}, timeout=TIMEOUT
            ).status_code
            == 304
        )
        r = s.put(f"{url}/keys/{key_id}/restrictions/tags/a", timeout=TIMEOUT)
        assert r.status_code == 204
        assert s.put(f"{url}/keys/{key_id}/restrictions/tags/a", timeout=TIMEOUT).status_code == 304
        r = s.put(f"{url}/keys/{key_id}/restrictions/tags/-x", timeout=TIMEOUT)
        assert r.status_code == 400
        body = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"], "id": key_id}
        r = s.post(f"{url}/keys/generate", json=body, timeout=TIMEOUT)
        assert r.status_code == 409 and "already exists" in message_of(r)
    finally:
        assert s.delete(f"{url}/keys/{key_id}", timeout=TIMEOUT).status_code == 204
    assert s.delete(f"{url}/keys/{key_id}", timeout=TIMEOUT).status_code == 404


def test_passphrases_are_stored_as_argon2id(bridge_server: BridgeServer) -> None:
    db = bridge_server.state_dir / "hsmbridge-server.sqlite3"
    with sqlite3.connect(db) as conn:
        hashes_ = [row[0] for row in conn.execute("SELECT pass_hash FROM users")]
        settings = dict(conn.execute("SELECT name, value FROM settings").fetchall())
    assert hashes_ and all(h.startswith("$argon2id$") for h in hashes_)
    assert settings["unlock_hash"].startswith("$argon2id$")
    raw = b"".join(p.read_bytes() for p in bridge_server.state_dir.glob("hsmbridge-server*"))
    for secret in (
        bridge_server.admin.passphrase,
        bridge_server.operator.passphrase,
        bridge_server.unlock_passphrase,
    ):
        assert secret.encode() not in raw


def test_restart_keeps_everything_and_comes_up_locked(bridge_factory: Factory) -> None:
    bridge = bridge_factory()
    url = bridge.url
    s = bridge.session(bridge.admin)
    key_id = gen_ec(s, url, uid("persist"), label="kept", restrictions={"tags": ["t1"]})
    pem = s.get(f"{url}/keys/{key_id}/public.pem", timeout=TIMEOUT).text
    assert s.put(f"{url}/users/operator/tags/t1", timeout=TIMEOUT).status_code == 204
    op = bridge.session(bridge.operator)
    digest = hashlib.sha256(b"persist").digest()
    assert sign_ec(op, url, key_id, digest).status_code == 200

    bridge.restart()
    url = bridge.url
    s, op = bridge.session(bridge.admin), bridge.session(bridge.operator)
    assert s.get(f"{url}/health/state", timeout=TIMEOUT).json() == {"state": "Locked"}
    r = s.post(f"{url}/unlock", json={"passphrase": bridge.unlock_passphrase}, timeout=TIMEOUT)
    assert r.status_code == 204
    body = s.get(f"{url}/keys/{key_id}", timeout=TIMEOUT).json()
    assert body["label"] == "kept" and body["restrictions"] == {"tags": ["t1"]}
    assert body["operations"] == 1
    assert s.get(f"{url}/keys/{key_id}/public.pem", timeout=TIMEOUT).text == pem
    assert s.get(f"{url}/users/operator/tags", timeout=TIMEOUT).json() == ["t1"]
    r = sign_ec(op, url, key_id, digest)
    assert r.status_code == 200
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(
        base64.b64decode(r.json()["signature"]),
        digest,
        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
    )
    # unattended boot: a restart comes up Operational
    r = s.put(f"{url}/config/unattended-boot", json={"status": "on"}, timeout=TIMEOUT)
    assert r.status_code == 204
    bridge.restart()
    s = bridge.session(bridge.admin)
    assert s.get(f"{bridge.url}/health/state", timeout=TIMEOUT).json() == {"state": "Operational"}
    assert s.delete(f"{bridge.url}/keys/{key_id}", timeout=TIMEOUT).status_code == 204


def test_interrupted_create_and_delete_are_cleaned_up(
    bridge_factory: Factory, pkcs11_hsm: hsmbridge.HSM
) -> None:
    """A crash between the token and the database: restart removes the half-made keys."""
    bridge = bridge_factory()
    store = bridge.server.bridge.store
    orphans = {}
    for status in ("pending", "deleting"):
        backend_id = uuid.uuid4().hex
        pkcs11_hsm.generate_key(hsmbridge.EC("P-256"), uid("orphan"), key_id=backend_id)
        rec = KeyRecord(uid(status), "EC_P256", ["ECDSA_Signature"], backend_id, "x", status=status)
        with store.transaction() as tx:
            Store.put_key(tx, rec)
        orphans[rec.id] = backend_id
    s = bridge.session(bridge.admin)
    listed = s.get(f"{bridge.url}/keys", timeout=TIMEOUT).json()
    assert not {k["id"] for k in listed} & set(orphans)  # never visible
    bridge.restart()
    for backend_id in orphans.values():
        with pytest.raises(hsmbridge.KeyNotFound):
            pkcs11_hsm.get_key(key_id=backend_id)
    assert bridge.server.bridge.store.unfinished() == []


def test_concurrent_keep_alive_clients(bridge_server: BridgeServer) -> None:
    """Many clients at once: every request answered, every signature valid."""
    url = bridge_server.url
    admin = bridge_server.session(bridge_server.admin)
    key_id = gen_ec(admin, url, uid("conc"))
    pub = serialization.load_pem_public_key(
        admin.get(f"{url}/keys/{key_id}/public.pem", timeout=TIMEOUT).content
    )
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    errors: list[str] = []

    def client(n: int) -> None:
        with bridge_server.session(bridge_server.operator) as s:
            for i in range(10):
                digest = hashlib.sha256(f"{n}-{i}".encode()).digest()
                r = sign_ec(s, url, key_id, digest)
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                sig = base64.b64decode(r.json()["signature"])
                try:
                    pub.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                except Exception as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert admin.get(f"{url}/keys/{key_id}", timeout=TIMEOUT).json()["operations"] == 240
    admin.delete(f"{url}/keys/{key_id}", timeout=TIMEOUT)
