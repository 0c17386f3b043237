"""NetHSM-specific behaviour of the backend against the bridge server: key IDs and
labels, import, keys made by other clients (the official SDK), mechanisms a key
lacks, public key sources, and the connection pool under a batch."""

from __future__ import annotations

import uuid

import nethsm
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from nethsm_fixtures import bridge_of, open_nethsm

from hsmbridge import EC, RSA, KeyExists, MechanismNotSupported, PermissionDenied
from hsmbridge.mechanisms import Mechanism, signing_input
from hsmbridge.nethsm import NetHSM
from hsmbridge.server.testing import BridgeServer


@pytest.fixture(scope="module")
def bridge(nethsm_hsm: NetHSM) -> BridgeServer:
    """The server behind ``nethsm_hsm``."""
    return bridge_of(nethsm_hsm)


def pkcs1_verify(public: object, signature: bytes, message: bytes) -> None:
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def test_label_is_the_key_id_when_it_can_be(nethsm_hsm: NetHSM, unique_label: str) -> None:
    key = nethsm_hsm.generate_key(EC("P-256"), unique_label)
    spaced = nethsm_hsm.generate_key(EC("P-256"), f"{unique_label} spaced")
    long_id = unique_label + "-" + "x" * 40  # a valid key ID, too long for a NetHSM label
    long_key = nethsm_hsm.generate_key(EC("P-256"), long_id)
    try:
        assert key.id == unique_label
        assert spaced.id != spaced.label and spaced.label == f"{unique_label} spaced"
        assert long_key.id == long_id
        for made in (key, spaced, long_key):
            found = nethsm_hsm.get_key(made.label)
            assert (found.id, found.label) == (made.id, made.label)
        listed = {i.label: i.id for i in nethsm_hsm.list_keys()}
        assert listed[f"{unique_label} spaced"] == spaced.id and listed[long_id] == long_id
        with pytest.raises(KeyExists):
            nethsm_hsm.generate_key(RSA(2048), long_id)
    finally:
        for made in (key, spaced, long_key):
            made.delete()


def test_import_rsa_and_ec_keys(nethsm_hsm: NetHSM, unique_label: str) -> None:
    rsa_private = rsa.generate_private_key(65537, 2048)
    imported = nethsm_hsm.import_key(rsa_private, unique_label, usage={"sign", "decrypt"})
    ec_private = ec.generate_private_key(ec.SECP384R1())
    ec_imported = nethsm_hsm.import_key(ec_private, f"{unique_label} ec", key_id=uuid.uuid4().hex)
    try:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        assert imported.public_key_der() == rsa_private.public_key().public_bytes(der, spki)
        assert ec_imported.public_key_der() == ec_private.public_key().public_bytes(der, spki)
        signed = imported.sign(b"imported", Mechanism.RSA_PKCS1_SHA256)
        pkcs1_verify(rsa_private.public_key(), signed, b"imported")
        ciphertext = rsa_private.public_key().encrypt(b"secret", padding.PKCS1v15())
        assert imported.decrypt(ciphertext, "rsa-pkcs1", allow_pkcs1v15=True) == b"secret"
        signature = ec_imported.sign(b"imported ec", "ecdsa-sha384")
        ec_private.public_key().verify(signature, b"imported ec", ec.ECDSA(hashes.SHA384()))
        found = nethsm_hsm.get_key(f"{unique_label} ec")
        assert (found.id, found.spec) == (ec_imported.id, EC("P-384"))
        assert found.info.usage == frozenset({"sign"})
        with pytest.raises(KeyExists):
            nethsm_hsm.import_key(rsa_private, unique_label)
    finally:
        imported.delete()
        ec_imported.delete()


def test_keys_of_the_official_sdk_and_missing_mechanisms(
    nethsm_hsm: NetHSM, bridge: BridgeServer, unique_label: str
) -> None:
    admin = bridge.sdk("admin")
    operator = bridge.sdk("operator")
    key_id = admin.generate_key(
        nethsm.KeyType.RSA, [nethsm.KeyMechanism.RSA_SIGNATURE_PSS_SHA256], 2048,
        key_id=unique_label.replace("-", "x"), label=f"sdk {unique_label}",
    )  # fmt: skip
    try:
        key = nethsm_hsm.get_key(f"sdk {unique_label}")
        assert key.id == key_id and key.info.usage == {"sign"}
        signature = key.sign(b"pss", "rsa-pss-sha256")
        public = key.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        public.verify(signature, b"pss", pss, hashes.SHA256())
        with pytest.raises(MechanismNotSupported, match="rsa-pss-sha256") as info:
            key.sign(b"x", "rsa-pkcs1-sha256")  # the key allows PSS-SHA256 only
        assert "RSA_Signature_PKCS1" in info.value.message
        assert key.public_key_der() == key.public_key_der_from_data()
    finally:
        admin.delete_key(key_id)
    # and the other way round: the SDK signs with a key hsmbridge generated
    ours = nethsm_hsm.generate_key(RSA(2048), unique_label)
    try:
        prepared = signing_input(Mechanism.RSA_PKCS1_SHA256, b"sdk", prehashed=False)
        signed = operator.sign(ours.id, nethsm.Base64.encode(prepared), nethsm.SignMode.PKCS1)
        pkcs1_verify(ours.public_key(), signed.decode(), b"sdk")
    finally:
        ours.delete()
        admin.close()  # the SDK's keep-alive connections would hold up the server's shutdown
        operator.close()


def test_operator_handle_and_admin_handle(bridge: BridgeServer, unique_label: str) -> None:
    with open_nethsm(bridge, "operator") as operator:
        assert isinstance(operator, NetHSM)
        with pytest.raises(PermissionDenied, match="Administrator"):
            operator.import_key(ec.generate_private_key(ec.SECP256R1()), unique_label)
        assert operator.health() == "Operational"


def test_batch_threads_never_wait_for_or_discard_connections(
    bridge: BridgeServer, unique_label: str
) -> None:
    hsm = open_nethsm(bridge, max_connections=4)
    key = hsm.generate_key(RSA(2048), unique_label)
    try:
        messages = [b"pool %d" % i for i in range(40)]
        signatures = key.sign_batch(messages, "rsa-pkcs1-sha256", threads=16)
        assert key._default_threads() == 4  # never more threads than pooled connections
        signatures += key.sign_batch(messages, "rsa-pkcs1-sha256")
        for message, signature in zip(messages * 2, signatures, strict=True):
            pkcs1_verify(key.public_key(), signature, message)
        wires = hsm.client.instances[0].wires
        assert wires.maxsize == 4
        assert wires.opened <= 4  # one pooled keep-alive connection per thread
    finally:
        key.delete()
        hsm.close()
