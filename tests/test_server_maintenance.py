"""Backup and restore (NetHSM's format), factory reset, reboot and shutdown, through the
official SDK against servers in this process."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import nethsm
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from nethsm.backup import EncryptedBackup

from hsmbridge.api import RSA
from hsmbridge.server.limits import Limits
from hsmbridge.server.testing import TIMEOUT, BridgeServer

pytest_plugins = ["server_fixtures"]

BACKUP_PASS = "backup-passphrase-0"


def _wait_state(bridge: BridgeServer, state: str, timeout: float = 30) -> None:
    """Until the server (possibly restarted, possibly with a new certificate) is ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with bridge.session() as s:
                if s.get(f"{bridge.url}/health/state", timeout=2).json()["state"] == state:
                    return
        except (OSError, ValueError):  # includes requests errors; the cert may be remade
            pass
        assert time.monotonic() < deadline, f"the server did not come back {state}"
        time.sleep(0.05)


def test_backup_restores_onto_a_fresh_state_dir_over_the_same_token(
    bridge_factory: Callable[..., BridgeServer],
) -> None:
    source = bridge_factory()
    admin = source.sdk("admin")
    with pytest.raises(nethsm.NetHSMError):  # no backup passphrase yet
        admin.add_user("B", nethsm.Role.BACKUP, "backup-user-pass", "backup")
        nethsm.NetHSM(
            source.hostport, nethsm.Authentication("backup", "backup-user-pass"),
            ca_certs=source.ca_file,
        ).backup()  # fmt: skip
    admin.set_backup_passphrase(BACKUP_PASS)
    rsa_id = admin.generate_key(
        nethsm.KeyType.RSA, [nethsm.KeyMechanism.RSA_DECRYPTION_OAEP_SHA1], 2048, "restored-rsa"
    )
    aes_id = admin.generate_key(
        nethsm.KeyType.GENERIC,
        [nethsm.KeyMechanism.AES_ENCRYPTION_CBC, nethsm.KeyMechanism.AES_DECRYPTION_CBC],
        256,
        "restored-aes",
    )
    admin.add_key_tag(rsa_id, "berlin")
    admin.add_operator_tag("operator", "berlin")
    operator = source.sdk("operator")
    iv = nethsm.Base64.encode(b"\x07" * 16)
    sealed = operator.encrypt(
        aes_id, nethsm.Base64.encode(b"sixteen byte msg"), nethsm.EncryptMode.AES_CBC, iv
    )
    public = serialization.load_pem_public_key(admin.get_key_public_key(rsa_id).encode())
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    ciphertext = public.encrypt(b"secret", oaep)  # type: ignore[union-attr]

    backup_client = nethsm.NetHSM(
        source.hostport,
        nethsm.Authentication("backup", "backup-user-pass"),
        ca_certs=source.ca_file,
    )
    data = backup_client.backup()
    entries = EncryptedBackup.parse(data).decrypt(BACKUP_PASS).data  # the official reader
    assert {f"/key/{rsa_id}", f"/key/{aes_id}", "/user/admin", "/config/unlock_hash"} <= set(
        entries
    )
    assert source.admin.passphrase.encode() not in b"".join(entries.values())  # hashes only
    with pytest.raises(ValueError):
        EncryptedBackup.parse(data).decrypt("not-the-passphrase")

    target = bridge_factory(provision=False)  # fresh state directory, same token
    fresh = nethsm.NetHSM(target.hostport, ca_certs=target.ca_file)
    with pytest.raises(nethsm.NetHSMError):
        fresh.restore(data, "not-the-passphrase", datetime.datetime.now(datetime.UTC))
    fresh.restore(data, BACKUP_PASS, datetime.datetime.now(datetime.UTC))
    assert fresh.get_state() == nethsm.State.LOCKED
    fresh.unlock(source.unlock_passphrase)
    restored_admin = target.sdk("admin")
    assert sorted(restored_admin.list_keys()) == sorted([rsa_id, aes_id])
    assert restored_admin.get_key(rsa_id).tags == ["berlin"]
    restored_operator = target.sdk("operator")  # the restored user, same passphrase
    plain = restored_operator.decrypt(
        rsa_id, nethsm.Base64.encode(ciphertext), nethsm.DecryptMode.OAEP_SHA1
    )
    assert plain.decode() == b"secret"
    opened = restored_operator.decrypt(aes_id, sealed.encrypted, nethsm.DecryptMode.AES_CBC, iv)
    assert opened.decode() == b"sixteen byte msg"
    for client in (admin, operator, backup_client, fresh, restored_admin, restored_operator):
        client.close()
    with source.session(source.admin) as s:  # the source still owns its keys: clean up once
        for key_id in (rsa_id, aes_id):
            assert s.delete(f"{source.url}/keys/{key_id}", timeout=TIMEOUT).status_code == 204


def test_factory_reset_destroys_only_this_servers_keys(
    bridge_factory: Callable[..., BridgeServer],
) -> None:
    bridge = bridge_factory()
    admin = bridge.sdk("admin")
    admin.generate_key(nethsm.KeyType.EC_P256, [nethsm.KeyMechanism.ECDSA_SIGNATURE], 256, "mine")
    mine = bridge.server.bridge.store.get_key("mine")
    assert mine is not None
    other = bridge.hsm.generate_key(RSA(2048), f"not-the-servers-{time.time_ns()}")
    admin.factory_reset()
    admin.close()
    _wait_state(bridge, "Unprovisioned")
    with pytest.raises(Exception, match="no key"):
        bridge.hsm.get_key(key_id=mine.backend_id)
    assert bridge.hsm.get_key(key_id=other.id).id == other.id  # untouched
    other.delete()
    fresh = nethsm.NetHSM(bridge.hostport, ca_certs=bridge.ca_file)  # a new certificate
    fresh.provision("unlock-passphrase-1", "admin-passphrase-1")
    fresh.close()
    again = nethsm.NetHSM(
        bridge.hostport,
        nethsm.Authentication("admin", "admin-passphrase-1"),
        ca_certs=bridge.ca_file,
    )
    assert again.list_keys() == [] and again.list_users() == ["admin"]
    again.close()


def test_reboot_comes_back_locked_and_shutdown_stops(
    bridge_factory: Callable[..., BridgeServer],
) -> None:
    bridge = bridge_factory()
    admin = bridge.sdk("admin")
    admin.reboot()
    admin.close()
    _wait_state(bridge, "Locked")
    with bridge.session() as s:
        r = s.post(f"{bridge.url}/system/shutdown", timeout=TIMEOUT)  # public unless Operational
        assert r.status_code == 204, r.text
    deadline = time.monotonic() + 30
    while bridge.server.running:
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.05)


def test_restore_upload_is_authenticated_and_bounded(
    bridge_factory: Callable[..., BridgeServer],
) -> None:
    """Operational: credentials before the body is read; any state: the backup body cap."""
    limits = Limits(max_backup_body=4096)
    operational = bridge_factory(limits=limits)
    fresh = bridge_factory(provision=False, limits=limits)
    files = {"arguments": (None, '{"backupPassphrase": "x"}'), "backup_file": (None, b"x")}
    with operational.session() as s:
        r = s.post(f"{operational.url}/system/restore", files=files, timeout=TIMEOUT)
        assert r.status_code == 401, r.text
    with fresh.session() as s:
        big = {**files, "backup_file": (None, b"\0" * 8192)}
        r = s.post(f"{fresh.url}/system/restore", files=big, timeout=TIMEOUT)
        assert r.status_code == 413, r.text
        r = s.post(f"{fresh.url}/system/restore", files=files, timeout=TIMEOUT)
        assert r.status_code == 400 and "not a NetHSM backup" in r.json()["message"]
