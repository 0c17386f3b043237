"""Generic (AES) keys: made in the token, AES-CBC without padding as the appliance does."""

from __future__ import annotations

import base64

import nethsm
import pytest

from hsmbridge import HSM
from hsmbridge.errors import InvalidInput
from hsmbridge.server.testing import TIMEOUT, BridgeServer

pytest_plugins = ["server_fixtures"]

AES_MECHS = [nethsm.KeyMechanism.AES_ENCRYPTION_CBC, nethsm.KeyMechanism.AES_DECRYPTION_CBC]


def test_secret_key_in_the_token(pkcs11_hsm: HSM, unique_label: str) -> None:
    key = pkcs11_hsm.generate_secret_key(128, unique_label)
    try:
        iv, block = b"\x01" * 16, b"A" * 16
        two = key.encrypt_cbc(block * 2, iv)
        assert two[:16] == key.encrypt_cbc(block, iv)  # CBC: the first block alone
        assert two[16:] != two[:16]  # chained, not ECB
        assert key.encrypt_cbc(block, b"\x02" * 16) != two[:16]  # the IV matters
        assert key.decrypt_cbc(two, iv) == block * 2
        for bad in (b"", b"x" * 15):
            with pytest.raises(InvalidInput, match="16-byte blocks"):
                key.encrypt_cbc(bad, iv)
        with pytest.raises(InvalidInput, match="IV"):
            key.decrypt_cbc(two, b"short")
        found = pkcs11_hsm.get_secret_key(key_id=key.id)
        assert (found.bits, found.label) == (128, unique_label)
        assert found.decrypt_cbc(two, iv) == block * 2
    finally:
        key.delete()
    with pytest.raises(Exception, match="no AES key"):
        pkcs11_hsm.get_secret_key(key_id=key.id)


def test_generic_keys_through_the_sdk(bridge_server: BridgeServer, unique_label: str) -> None:
    admin, operator = bridge_server.sdk("admin"), bridge_server.sdk("operator")
    key_id = admin.generate_key(nethsm.KeyType.GENERIC, AES_MECHS, 256, unique_label)
    only_decrypt = admin.generate_key(
        nethsm.KeyType.GENERIC, [nethsm.KeyMechanism.AES_DECRYPTION_CBC], 128, unique_label + "d"
    )
    try:
        info = admin.get_key(key_id)
        assert info.type == nethsm.KeyType.GENERIC and info.public_key is None
        message = nethsm.Base64.encode(b"0123456789abcdef" * 3)
        sealed = operator.encrypt(key_id, message, nethsm.EncryptMode.AES_CBC)  # server picks IV
        assert len(base64.b64decode(sealed.iv.data)) == 16
        opened = operator.decrypt(key_id, sealed.encrypted, nethsm.DecryptMode.AES_CBC, sealed.iv)
        assert opened.data == message.data
        with pytest.raises(nethsm.NetHSMError):
            operator.encrypt(only_decrypt, message, nethsm.EncryptMode.AES_CBC)
        with pytest.raises(nethsm.NetHSMError):  # no public key to hand out
            admin.get_key_public_key(key_id)
        with bridge_server.session(bridge_server.operator) as s:
            url = f"{bridge_server.url}/keys/{key_id}"
            for path, body in (
                ("encrypt", {"mode": "AES_CBC", "message": "c2hvcnQ="}),  # not whole blocks
                ("decrypt", {"mode": "AES_CBC", "encrypted": sealed.encrypted.data}),  # no IV
                ("sign", {"mode": "PKCS1", "message": message.data}),
            ):
                r = s.post(f"{url}/{path}", json=body, timeout=TIMEOUT)
                assert r.status_code == 400 and r.json()["message"], (path, r.text)
        with bridge_server.session(bridge_server.admin) as s:
            r = s.post(
                f"{bridge_server.url}/keys/generate",
                json={"type": "Generic", "mechanisms": ["AES_Encryption_CBC"], "length": 100},
                timeout=TIMEOUT,
            )
            assert r.status_code == 400 and "AES" in r.json()["message"]
    finally:
        admin.delete_key(key_id)
        admin.delete_key(only_decrypt)
        admin.close()
        operator.close()
