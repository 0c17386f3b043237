"""Key separation is enforced by the token, not by hsmbridge's good manners.

Anyone holding the PIN can talk to the token with another PKCS#11 program.
These tests are that program (python-pkcs11 on a session of its own, and
OpenSC's pkcs11-tool): the tricks that would turn a sign-only key into a
decryption key, or use it outside its mechanisms, must fail in the token.
And deleting a key must end every use of it, whoever holds a handle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pkcs11.exceptions as p11x
import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import Mechanism as CKM
from test_pkcs11 import objects, tool

import hsmbridge
from hsmbridge import EC, RSA, InvalidInput, KeyNotFound
from hsmbridge.pkcs11 import Pkcs11HSM, Pkcs11Key
from hsmbridge.pkcs11.templates import MAPPER
from hsmbridge.softhsm import find_softhsm_module
from hsmbridge.testing import SoftToken

pytest.importorskip("hsmbridge._native", reason="the native engine is not built")


@pytest.fixture
def session(pkcs11_hsm: Pkcs11HSM) -> Iterator[Any]:
    """A session of 'another program' on the same token (it inherits the login)."""
    s = pkcs11_hsm.token.open(rw=True, attribute_mapper=MAPPER)
    yield s
    s.close()


@pytest.fixture
def signer(pkcs11_hsm: Pkcs11HSM, unique_label: str) -> Iterator[Pkcs11Key]:
    key = pkcs11_hsm.generate_key(RSA(2048), unique_label, usage={"sign"})
    assert isinstance(key, Pkcs11Key)
    yield key
    key.delete()


def raw_call(session: Any, obj: Any, op: str, ckm: CKM, data: bytes) -> bytes | int:
    """One raw C_SignInit/C_Sign or C_DecryptInit/C_Decrypt on the object.

    python-pkcs11 offers no ``sign``/``decrypt`` on objects whose flags say
    no, so the native engine makes the calls: the output, or the CK_RV.
    """
    from hsmbridge import _native

    module = os.path.realpath(os.environ.get("PKCS11_MODULE") or find_softhsm_module())
    [out] = _native.run_batch(
        module, 0 if op == "sign" else 1, [int(session.handle)], int(obj.handle), int(ckm),
        None, [data], 256, True, False,
    )  # fmt: skip
    return out  # type: ignore[no-any-return]


def private_of(session: Any, key: hsmbridge.Key) -> Any:
    [obj] = session.get_objects(
        {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: bytes.fromhex(key.id)}
    )
    return obj


def test_attributes_as_another_program_reads_them(session: Any, signer: Pkcs11Key) -> None:
    obj = private_of(session, signer)
    assert obj[Attribute.SIGN] is True and obj[Attribute.DECRYPT] is False
    assert obj[Attribute.SIGN_RECOVER] is False and obj[Attribute.UNWRAP] is False
    assert obj[Attribute.MODIFIABLE] is False and obj[Attribute.COPYABLE] is False
    assert obj[Attribute.SENSITIVE] is True and obj[Attribute.EXTRACTABLE] is False
    assert sorted(obj[Attribute.ALLOWED_MECHANISMS]) == sorted(
        [int(CKM.RSA_PKCS), int(CKM.RSA_PKCS_PSS)]
    )


def test_a_sign_only_key_cannot_be_turned_into_a_decryption_key(
    session: Any, signer: Pkcs11Key
) -> None:
    obj = private_of(session, signer)
    with pytest.raises(p11x.PKCS11Error):
        obj[Attribute.DECRYPT] = True
    with pytest.raises(p11x.PKCS11Error):
        obj[Attribute.ALLOWED_MECHANISMS] = [CKM.RSA_X_509]
    for template in ({}, {Attribute.TOKEN: False}, {Attribute.DECRYPT: True}):
        with pytest.raises(p11x.PKCS11Error):
            obj.copy(template)
    # raw RSA "signing" is decryption by another name
    with pytest.raises(p11x.PKCS11Error):
        obj.sign(b"\x00" * 256, mechanism=CKM.RSA_X_509)
    # C_DecryptInit straight on the key (python-pkcs11 offers no decrypt on it)
    public = signer.public_key()
    ciphertext = public.encrypt(b"secret", padding.PKCS1v15())  # type: ignore[union-attr]
    rv = raw_call(session, obj, "decrypt", CKM.RSA_PKCS, ciphertext)
    assert isinstance(rv, int), "the token decrypted with a sign-only key"
    assert obj[Attribute.DECRYPT] is False  # nothing changed


def test_mechanisms_outside_the_usage_are_refused(
    session: Any, pkcs11_hsm: Pkcs11HSM, unique_label: str
) -> None:
    key = pkcs11_hsm.generate_key(RSA(2048), unique_label, usage={"decrypt"})
    try:
        obj = private_of(session, key)
        assert sorted(obj[Attribute.ALLOWED_MECHANISMS]) == sorted(
            [int(CKM.RSA_PKCS), int(CKM.RSA_PKCS_OAEP)]
        )
        assert isinstance(raw_call(session, obj, "sign", CKM.RSA_PKCS, b"\x30" * 51), int)
        assert isinstance(raw_call(session, obj, "sign", CKM.RSA_X_509, b"\x00" * 256), int)
        assert isinstance(raw_call(session, obj, "decrypt", CKM.RSA_X_509, b"\x00" * 256), int)
    finally:
        key.delete()
    ec_key = pkcs11_hsm.generate_key(EC("P-256"), unique_label + "-ec")
    try:
        obj = private_of(session, ec_key)
        assert obj[Attribute.ALLOWED_MECHANISMS] == [int(CKM.ECDSA)]
        assert obj[Attribute.DERIVE] is False
        with pytest.raises(p11x.PKCS11Error):
            obj.sign(b"x" * 32, mechanism=CKM.ECDSA_SHA256)  # not an allowed mechanism
    finally:
        ec_key.delete()


def test_pkcs11_tool_shows_the_allowed_mechanisms(
    softhsm_token: SoftToken, signer: Pkcs11Key
) -> None:
    listing = tool(softhsm_token, "--list-objects", "--type", "privkey")
    [found] = [o for o in objects(listing) if o.get("label") == signer.label]
    assert found["allowed mechanisms"] == "RSA-PKCS,RSA-PKCS-PSS"
    assert "never extractable" in found["access"]


# -- deleting ends every use ---------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_sign_racing_delete_cannot_outlive_it(
    softhsm_token: SoftToken, unique_label: str, native: bool
) -> None:
    with hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, native=native) as hsm:
        key = hsm.generate_key(EC("P-256"), unique_label)
        other = hsm.get_key(key_id=key.id)  # a second handle on the same key
        stop = threading.Event()
        after_delete: list[object] = []
        deleted = threading.Event()

        def sign_forever() -> None:
            while not stop.is_set():
                was_deleted = deleted.is_set()
                try:
                    other.sign_batch([b"m"] * 8, "ecdsa-sha256", threads=2)
                    outcome: object = "signed"
                except hsmbridge.HSMError as exc:
                    outcome = exc
                if was_deleted:
                    after_delete.append(outcome)

        signers = [threading.Thread(target=sign_forever) for _ in range(2)]
        for t in signers:
            t.start()
        key.delete()
        deleted.set()
        while len(after_delete) < 20:
            threading.Event().wait(0.01)
        stop.set()
        for t in signers:
            t.join()
        assert "signed" not in after_delete
        with pytest.raises(KeyNotFound):
            other.sign(b"m", "ecdsa-sha256")


CHILD = """
import sys, time, hsmbridge
hsm = hsmbridge.open(sys.argv[1], pin=sys.argv[2])
key = hsm.get_key(key_id=sys.argv[3])
key.sign_batch([b"warm"] * 100, "ecdsa-sha256")
print("ready", flush=True)
sys.stdin.readline()  # the parent deletes the key now
try:
    key.sign_batch([b"after"] * 100, "ecdsa-sha256")
    print("signed")
except hsmbridge.BatchItemError as exc:
    print("refused" if isinstance(exc.cause, hsmbridge.KeyNotFound) else repr(exc))
"""


def test_a_key_deleted_by_another_process_stops_signing_here(
    softhsm_token: SoftToken, pkcs11_hsm: Pkcs11HSM, unique_label: str
) -> None:
    key = pkcs11_hsm.generate_key(EC("P-256"), unique_label)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, softhsm_token.uri, softhsm_token.pin, key.id],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **softhsm_token.env()},
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    key.delete()
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "refused"
    assert child.wait(timeout=60) == 0


def test_a_raw_decryption_key_does_raw_decryption_alone(
    session: Any, pkcs11_hsm: Pkcs11HSM, unique_label: str
) -> None:
    """The token itself keeps a 'decrypt-raw' key to CKM_RSA_X_509 decryption."""
    key = pkcs11_hsm.generate_key(RSA(2048), unique_label, usage="decrypt-raw")
    try:
        obj = private_of(session, key)
        assert obj[Attribute.ALLOWED_MECHANISMS] == [int(CKM.RSA_X_509)]
        assert obj[Attribute.DECRYPT] is True and obj[Attribute.SIGN] is False
        public = key.public_key()
        ciphertext = public.encrypt(b"secret", padding.PKCS1v15())  # type: ignore[union-attr]
        for op, ckm in (("decrypt", CKM.RSA_PKCS), ("decrypt", CKM.RSA_PKCS_OAEP)):
            assert isinstance(raw_call(session, obj, op, ckm, ciphertext), int)
        assert isinstance(raw_call(session, obj, "sign", CKM.RSA_X_509, b"\x00" * 256), int)
        block = raw_call(session, obj, "decrypt", CKM.RSA_X_509, ciphertext)
        assert isinstance(block, bytes) and block.endswith(b"\x00secret")
    finally:
        key.delete()


def test_raw_decryption_needs_a_key_the_token_keeps_to_it(
    session: Any, pkcs11_hsm: Pkcs11HSM, unique_label: str
) -> None:
    """A key another program made without CKA_ALLOWED_MECHANISMS decrypts, but not raw."""
    public_t = {Attribute.ENCRYPT: True, Attribute.ID: os.urandom(8), Attribute.LABEL: unique_label}
    private_t = {**public_t, Attribute.DECRYPT: True, Attribute.SIGN: False}
    del private_t[Attribute.ENCRYPT]
    pub, priv = session.generate_keypair(
        KeyType.RSA, 1024, store=True, public_template=public_t, private_template=private_t
    )
    try:
        key = pkcs11_hsm.get_key(unique_label)
        assert key.info.usage == {"decrypt"}
        with pytest.raises(InvalidInput, match="not made for raw decryption"):
            key.decrypt(b"\x01" * 128, "rsa-raw")
    finally:
        pub.destroy()
        priv.destroy()
