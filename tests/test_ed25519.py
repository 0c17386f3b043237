"""Ed25519 beyond the conformance suite: import, keys other tools made, both PKCS#11
engines and hsmbridge.aio (the bridge server's Curve25519 keys: tests/test_server_sdk.py).

Signatures are checked with ``cryptography`` and ``openssl pkeyutl -verify -rawin``
(tests/oracles.py); the facts these rest on are docs/design.md, fact 19.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from asn1crypto import core as asn1_core
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from oracles import ed25519_verifies
from pkcs11 import Attribute, KeyType
from pkcs11 import Mechanism as CKM

import hsmbridge
import hsmbridge.aio
from hsmbridge import Ed25519, InvalidInput, Mechanism
from hsmbridge.api import parse_key_spec
from hsmbridge.nethsm import vocabulary
from hsmbridge.pkcs11 import Pkcs11HSM
from hsmbridge.testing import SoftToken

ED25519 = Mechanism.ED25519
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def test_spec_mechanism_and_vocabulary() -> None:
    assert parse_key_spec("ed25519") == Ed25519() and str(Ed25519()) == "ed25519"
    assert (Ed25519().size, Ed25519().field_bytes, Ed25519().curve) == (256, 32, "Ed25519")
    with pytest.raises(InvalidInput, match=r"use Ed25519\(\)"):
        hsmbridge.EC("Ed25519")
    assert (ED25519.family, ED25519.hash_name, ED25519.key_type) == ("eddsa", None, "ed25519")
    assert vocabulary.type_of(Ed25519()) == "Curve25519"
    assert vocabulary.spec_for("Curve25519", None) == Ed25519()
    assert vocabulary.mode_for(ED25519) == ("EdDSA_Signature", "EdDSA")
    assert vocabulary.mechanisms_for(Ed25519(), {"sign"}) == ["EdDSA_Signature"]
    assert vocabulary.check_mechanisms("Curve25519", ["EdDSA_Signature"]) == ["EdDSA_Signature"]
    with pytest.raises(InvalidInput, match="do not fit a Curve25519 key"):
        vocabulary.check_mechanisms("Curve25519", ["ECDSA_Signature"])
    with pytest.raises(InvalidInput, match="cannot decrypt"):
        hsmbridge.api.normalize_usage({"sign", "decrypt"}, Ed25519())


def test_import_signs_as_the_original_key(
    hsm: hsmbridge.HSM, unique_label: str, tmp_path: Path
) -> None:
    """Both backends (PKCS#11 C_CreateObject from the seed; NetHSM's KeyPrivateData)."""
    original = ed25519.Ed25519PrivateKey.generate()
    key = hsm.import_key(original, unique_label)
    try:
        assert key.spec == Ed25519()
        assert key.public_key_der() == original.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        message = b"imported ed25519 " + unique_label.encode()
        signature = key.sign(message, "ed25519")
        assert signature == original.sign(message)  # EdDSA is deterministic (RFC 8032)
        assert ed25519_verifies(original.public_key(), signature, message, tmp_path)
        assert not ed25519_verifies(original.public_key(), signature, message + b"!", tmp_path)
        found = hsm.get_key(unique_label)
        assert found.spec == Ed25519() and found.info.to_dict()["type"] == "ed25519"
        assert [i.spec for i in hsm.list_keys() if i.label == unique_label] == [Ed25519()]
    finally:
        key.delete()


@pytest.mark.parametrize(
    "ec_params",
    [
        asn1_core.ObjectIdentifier("1.3.101.112").dump(),
        asn1_core.PrintableString("edwards25519").dump(),
    ],
    ids=["oid", "printable-string"],
)
def test_key_made_by_another_tool_is_found_and_signs(
    pkcs11_hsm: hsmbridge.HSM, unique_label: str, ec_params: bytes, tmp_path: Path
) -> None:
    """CKA_EC_PARAMS may name the curve by OID or, per PKCS#11 3.0, as a printable string."""
    assert isinstance(pkcs11_hsm, Pkcs11HSM)
    key_id = uuid.uuid4().bytes
    with pkcs11_hsm.pool.admin() as session:
        session.generate_keypair(
            KeyType.EC_EDWARDS,
            mechanism=CKM.EC_EDWARDS_KEY_PAIR_GEN,
            store=True,
            label=unique_label,
            id=key_id,
            public_template={Attribute.EC_PARAMS: ec_params},
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
    key = pkcs11_hsm.get_key(unique_label)
    try:
        assert key.spec == Ed25519() and key.id == key_id.hex()
        public = key.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        signature = key.sign(b"other tool", "ed25519")
        assert ed25519_verifies(public, signature, b"other tool", tmp_path)
    finally:
        key.delete()


def test_both_pkcs11_engines_sign(softhsm_token: SoftToken, unique_label: str) -> None:
    """The native engine (CKM_EDDSA passed through, 64-byte buffer) and the Python one."""
    native = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    python = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, native=False)
    try:
        key = native.generate_key(Ed25519(), unique_label)
        messages = [f"message {i}".encode() for i in range(50)]
        public = key.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        for handle in (native, python):
            same = handle.get_key(unique_label)
            for message, sig in zip(messages, same.sign_batch(messages, "ed25519"), strict=True):
                public.verify(sig, message)
            assert list(same.sign_many(messages, "ed25519", window=7)) == same.sign_batch(
                messages, "ed25519"
            )
        assert ED25519 in native.supported_mechanisms()  # type: ignore[attr-defined]
        key.delete()
    finally:
        python.close()
        native.close()


def test_aio_signs_ed25519(pkcs11_hsm: hsmbridge.HSM, unique_label: str) -> None:
    key = pkcs11_hsm.generate_key(Ed25519(), unique_label)
    messages = [f"async {i}".encode() for i in range(100)]

    async def main() -> list[bytes]:
        view = hsmbridge.aio.AsyncHSM.wrap(pkcs11_hsm)
        akey = await view.get_key(unique_label)
        with pytest.raises(InvalidInput, match="no digest"):
            await akey.sign(b"\x00" * 64, "ed25519", prehashed=True)
        out = await asyncio.gather(*(akey.sign(m, "ed25519") for m in messages))
        await view.close()
        return list(out)

    try:
        public = key.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        for message, sig in zip(messages, asyncio.run(main()), strict=True):
            public.verify(sig, message)
    finally:
        key.delete()
