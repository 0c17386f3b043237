"""The NetHSM backend when things go wrong: wrong credentials and roles, missing keys,
a locked HSM, dead or restarted servers, silent and failing servers.

Everything runs against real servers on loopback: the bridge (``hsmbridge
serve`` over the session's SoftHSM2 token) and small recording TLS servers.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from nethsm_fixtures import RecordingTLSServer, free_port, make_certificate, open_nethsm

import hsmbridge
from hsmbridge import (
    EC,
    HSM,
    RSA,
    AuthenticationError,
    HSMUnavailable,
    KeyInfo,
    KeyNotFound,
    PermissionDenied,
    RateLimited,
)
from hsmbridge.nethsm import NetHSM, NetHSMKey
from hsmbridge.server.run import start_in_thread
from hsmbridge.server.testing import BridgeServer, start_bridge

MECH = "rsa-pkcs1-sha256"


@pytest.fixture(scope="module")
def bridge(pkcs11_hsm: HSM) -> Iterator[BridgeServer]:
    """A bridge of this module's own, so its rate limits and keys touch no other test."""
    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-faults-"))
    server = start_bridge(pkcs11_hsm, directory, True)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def own_bridge(pkcs11_hsm: HSM, tmp_path: Path) -> Iterator[BridgeServer]:
    """A bridge a test may lock, stop and restart."""
    server = start_bridge(pkcs11_hsm, tmp_path / "state", True)
    yield server
    server.stop()


def verifies(key: NetHSMKey, signature: bytes, message: bytes) -> bool:
    public = key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


def fake_key(hsm: NetHSM) -> NetHSMKey:
    """A handle on key 'k1' of a server that is not a NetHSM (no request is made here)."""
    info = KeyInfo("k1", "k1", RSA(2048), frozenset({"sign"}))
    return NetHSMKey(hsm, info, ("RSA_Signature_PKCS1",))


# -- 401 / 429 / 403 / 404 ------------------------------------------------------------------


def test_wrong_password_then_rate_limit(bridge: BridgeServer) -> None:
    password = "not-the-passphrase-42"
    hsm = hsmbridge.open(
        f"nethsm://intruder@{bridge.hostport}",
        password=password,
        fingerprint=bridge.fingerprint,
        retries=0,
    )
    with pytest.raises(AuthenticationError) as first:
        hsm.list_keys()
    assert type(first.value) is AuthenticationError and first.value.status == 401
    assert "'intruder'" in first.value.message and "password" in first.value.message
    with pytest.raises(RateLimited) as second:  # a second try right after a failed login
        hsm.list_keys()
    assert second.value.status == 429
    for exc in (first.value, second.value):
        assert password not in exc.message and password not in repr(exc)
    hsm.close()


def test_errors_name_the_role_an_operation_needs(bridge: BridgeServer, unique_label: str) -> None:
    operator = open_nethsm(bridge, "operator")
    admin_only = hsmbridge.open(
        f"nethsm://admin@{bridge.hostport}",
        password=bridge.admin.passphrase,
        fingerprint=bridge.fingerprint,
    )
    assert isinstance(admin_only, NetHSM)
    with pytest.raises(PermissionDenied) as gen:
        operator.generate_key(RSA(2048), unique_label)
    assert gen.value.status == 403
    assert (
        "Administrator role" in gen.value.message and "admin=(user, password)" in gen.value.message
    )
    key = admin_only.generate_key(RSA(2048), unique_label, usage={"sign", "decrypt"})
    try:
        with pytest.raises(PermissionDenied) as sig:
            key.sign(b"x", MECH)
        assert sig.value.status == 403
        assert sig.value.message.startswith("signing")
        assert "needs the Operator role" in sig.value.message
        assert "open the HSM as an operator user" in sig.value.message
        with pytest.raises(PermissionDenied, match="Operator role"):
            key.decrypt(b"\x01" * 256, "rsa-pkcs1", allow_pkcs1v15=True)
        # the operator finds the key and signs; listing works for both roles
        found = operator.get_key(unique_label)
        assert verifies(key, found.sign(b"by operator", MECH), b"by operator")
        assert unique_label in {i.label for i in operator.list_keys()}
        with pytest.raises(PermissionDenied, match="Administrator role"):
            found.delete()
    finally:
        key.delete()
        operator.close()
        admin_only.close()


def test_missing_and_deleted_keys(bridge: BridgeServer, unique_label: str) -> None:
    hsm = open_nethsm(bridge)
    other = open_nethsm(bridge)
    with pytest.raises(KeyNotFound) as missing:
        hsm.get_key(key_id=uuid.uuid4().hex)
    assert "key ids present" in missing.value.message
    key = hsm.generate_key(EC("P-256"), unique_label)
    other.get_key(key_id=key.id).delete()  # deleted through another handle
    with pytest.raises(KeyNotFound) as gone:
        key.sign(b"x", "ecdsa-sha256")
    assert gone.value.status == 404 and key.id in gone.value.message
    with pytest.raises(KeyNotFound):
        key.delete()
    assert hsm.stats["retries"] == 0  # a 404 is an answer, not a fault to retry
    hsm.close()
    other.close()


def test_locked_hsm_is_unavailable_until_unlocked(
    own_bridge: BridgeServer, unique_label: str
) -> None:
    hsm = open_nethsm(own_bridge, retries=1, backoff=0.01)
    key = hsm.generate_key(RSA(2048), unique_label)
    with own_bridge.session(own_bridge.admin) as s:
        assert s.post(f"{own_bridge.url}/lock", timeout=30).status_code == 204
    with pytest.raises(HSMUnavailable) as locked:
        key.sign(b"x", MECH)
    assert locked.value.status == 412 and "not Operational" in locked.value.message
    assert hsm.stats["retries"] == 1  # sign is safe to repeat: retried once, then given up
    before = hsm.stats["requests"]
    with pytest.raises(HSMUnavailable):
        key.delete()  # not repeated: one request
    assert hsm.stats["requests"] == before + 1
    with own_bridge.session() as s:
        body = {"passphrase": own_bridge.unlock_passphrase}
        assert s.post(f"{own_bridge.url}/unlock", json=body, timeout=30).status_code == 204
    assert verifies(key, key.sign(b"unlocked", MECH), b"unlocked")
    key.delete()
    hsm.close()


# -- dead, restarted, silent and failing servers ---------------------------------------------


def test_failover_past_a_dead_instance(bridge: BridgeServer, unique_label: str) -> None:
    dead = free_port()
    hsm = hsmbridge.open(
        f"nethsm://admin@127.0.0.1:{dead},{bridge.hostport}",
        password=bridge.admin.passphrase,
        operator=bridge.operator.auth,
        fingerprint=bridge.fingerprint,
    )
    assert isinstance(hsm, NetHSM)
    key = hsm.generate_key(RSA(2048), unique_label)  # not sent to the dead one: safe to move on
    messages = [b"failover %d" % i for i in range(30)]
    signatures = key.sign_batch(messages, MECH, threads=4)
    assert all(verifies(key, s, m) for s, m in zip(signatures, messages, strict=True))
    assert hsm.stats["failovers"] >= 1
    key.delete()
    hsm.close()

    all_dead = hsmbridge.open(
        f"nethsm://admin@127.0.0.1:{dead},127.0.0.1:{free_port()}",
        password="whatever-pass",
        fingerprint=bridge.fingerprint,
        retries=2,
        backoff=0.01,
    )
    with pytest.raises(HSMUnavailable, match="cannot reach"):
        all_dead.list_keys()
    all_dead.close()


def test_server_restart_mid_stream_and_non_retryable_operations(
    pkcs11_hsm: HSM, own_bridge: BridgeServer, unique_label: str
) -> None:
    with own_bridge.session(own_bridge.admin) as s:  # restarts come up Operational
        r = s.put(f"{own_bridge.url}/config/unattended-boot", json={"status": "on"}, timeout=30)
        assert r.status_code == 204
    hsm = open_nethsm(own_bridge, retries=12, backoff=0.05)
    key = hsm.generate_key(RSA(2048), unique_label)
    port = own_bridge.server.port

    def restart() -> None:
        own_bridge.server = start_in_thread(pkcs11_hsm, own_bridge.state_dir, port=port)

    # 1. with the server down, state-changing calls fail at once with a clear error
    own_bridge.server.stop()
    before = hsm.stats["requests"]
    with pytest.raises(HSMUnavailable, match="cannot reach") as down:
        key.delete()
    assert "check that the NetHSM is running" in down.value.message
    assert hsm.stats["requests"] == before + 1  # tried once, not repeated
    restart()

    # 2. the server stops between two windows of a stream and comes back while retrying
    messages = [b"restart %d" % i for i in range(24)]
    restarter = threading.Timer(0.3, restart)

    def source() -> Iterator[bytes]:
        for i, message in enumerate(messages):
            if i == 8:  # the first window is done: stop the server, restart it shortly
                own_bridge.server.stop()
                restarter.start()
            yield message

    signatures = list(key.sign_many(source(), MECH, window=8, threads=4))
    restarter.join()
    assert all(verifies(key, s, m) for s, m in zip(signatures, messages, strict=True))
    assert hsm.stats["retries"] >= 1  # the second window really met a stopped server
    key.delete()
    hsm.close()


def test_unanswered_and_failing_requests(tmp_path: Path) -> None:
    cert, key_file, fingerprint = make_certificate(tmp_path)
    retries = 2
    with RecordingTLSServer(cert, key_file, answer=False) as silent:
        hsm = hsmbridge.open(
            f"nethsm://operator@127.0.0.1:{silent.port}",
            password="operator-pass",
            fingerprint=fingerprint,
            retries=retries,
            backoff=0.01,
        )
        assert isinstance(hsm, NetHSM)
        key = fake_key(hsm)
        with pytest.raises(HSMUnavailable):
            key.sign(b"x", MECH)
        silent.settle()
        assert len(silent.requests) == retries + 1  # sign: sent again after the failure
        with pytest.raises(HSMUnavailable, match="may have reached the NetHSM"):
            key.delete()
        silent.settle()
        assert len(silent.requests) == retries + 2  # delete: sent once, never repeated
        assert silent.requests[-1].startswith(b"DELETE /api/v1/keys/k1 ")
        hsm.close()

    body = json.dumps({"message": "busy"}).encode()
    with RecordingTLSServer(cert, key_file, status=503, body=body) as failing:
        hsm = hsmbridge.open(
            f"nethsm://operator@127.0.0.1:{failing.port}",
            password="operator-pass",
            fingerprint=fingerprint,
            retries=retries,
            backoff=0.01,
        )
        assert isinstance(hsm, NetHSM)
        key = fake_key(hsm)
        with pytest.raises(HSMUnavailable) as info:
            key.sign(b"x", MECH)
        assert info.value.status == 503 and "busy" in info.value.message
        failing.settle()
        assert len(failing.requests) == retries + 1
        with pytest.raises(HSMUnavailable):
            key.delete()
        failing.settle()
        assert len(failing.requests) == retries + 2
        hsm.close()


def test_a_silent_server_times_out() -> None:
    """A server that accepts TCP and never speaks: bounded by the read timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        hsm = hsmbridge.open(
            f"nethsm://operator@127.0.0.1:{port}",
            password="operator-pass",
            fingerprint="00" * 32,
            timeout=(0.5, 0.5),
            retries=1,
            backoff=0.01,
        )
        with pytest.raises(HSMUnavailable, match="in time"):
            hsm.list_keys()
        hsm.close()
