"""The bridge server driven by the official NetHSM SDK (PyPI ``nethsm`` 3.0.0).

Every signature and plaintext is checked with ``cryptography`` against the
public key the server hands out, so the bridge is tested as a real client sees
it. RSA key generation is slow on SoftHSM2, so the RSA keys are made once per
module.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nethsm
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.x509.oid import NameOID
from oracles import ed25519_verifies

from hsmbridge.mechanisms import DIGEST_INFO_PREFIX, Mechanism
from hsmbridge.server.testing import TIMEOUT, BridgeServer

pytest_plugins = ["server_fixtures"]

M = nethsm.KeyMechanism
#: every RSA mechanism SoftHSM2 2.6 can perform (its OAEP has SHA-1 only)
RSA_ALL = [
    M.RSA_SIGNATURE_PKCS1,
    M.RSA_SIGNATURE_PSS_SHA256,
    M.RSA_SIGNATURE_PSS_SHA384,
    M.RSA_SIGNATURE_PSS_SHA512,
    M.RSA_DECRYPTION_PKCS1,
    M.RSA_DECRYPTION_OAEP_SHA1,
]
HASHES = {"SHA256": hashes.SHA256(), "SHA384": hashes.SHA384(), "SHA512": hashes.SHA512()}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def b64(data: bytes) -> Any:
    return nethsm.Base64.encode(data)


@pytest.fixture(scope="module")
def admin(bridge_server: BridgeServer) -> Iterator[Any]:
    client = bridge_server.sdk("admin")
    yield client
    client.close()


@pytest.fixture(scope="module")
def operator(bridge_server: BridgeServer) -> Iterator[Any]:
    client = bridge_server.sdk("operator")
    yield client
    client.close()


@pytest.fixture(scope="module")
def rsa2048(admin: Any) -> str:
    return str(admin.generate_key(nethsm.KeyType.RSA, RSA_ALL, 2048, uid("rsa2048")))


def public_key(client: Any, key_id: str) -> Any:
    return serialization.load_pem_public_key(client.get_key_public_key(key_id).encode())


def test_state_info_and_random(admin: Any, operator: Any) -> None:
    assert admin.get_state() == nethsm.State.OPERATIONAL
    assert admin.get_info().product == "NetHSM"
    a, b = operator.get_random_data(32).decode(), operator.get_random_data(32).decode()
    assert len(a) == len(b) == 32 and a != b


def test_generated_rsa_key_metadata_and_public_key(admin: Any, operator: Any, rsa2048: str) -> None:
    key = operator.get_key(rsa2048)
    assert key.type == nethsm.KeyType.RSA
    assert set(key.mechanisms) == set(RSA_ALL)
    assert key.tags == [] and key.label == ""
    pub = public_key(admin, rsa2048)
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    numbers = pub.public_numbers()
    assert int.from_bytes(key.public_key.modulus.decode(), "big") == numbers.n
    assert int.from_bytes(key.public_key.public_exponent.decode(), "big") == numbers.e
    pem = admin.get_key_public_key(rsa2048)
    body = pem.strip().splitlines()[1:-1]
    assert all(len(line) == 64 for line in body[:-1])
    assert rsa2048 in admin.list_keys()


def test_rsa_sign_every_mode(operator: Any, rsa2048: str) -> None:
    pub = public_key(operator, rsa2048)
    message = os.urandom(100)
    for name, algo in HASHES.items():
        digest = hashlib.new(name.lower(), message).digest()
        # PKCS1: the client prepends the DigestInfo (NetHSM semantics).
        sig = operator.sign(
            rsa2048, b64(DIGEST_INFO_PREFIX[name.lower()] + digest), nethsm.SignMode.PKCS1
        ).decode()
        pub.verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(algo))
        sig = operator.sign(rsa2048, b64(digest), nethsm.SignMode[f"PSS_{name}"]).decode()
        pss = padding.PSS(mgf=padding.MGF1(algo), salt_length=padding.PSS.DIGEST_LENGTH)
        pub.verify(sig, digest, pss, utils.Prehashed(algo))
    before = operator.get_key(rsa2048).operations
    operator.sign(rsa2048, b64(hashlib.sha256(b"x").digest()), nethsm.SignMode.PSS_SHA256)
    assert operator.get_key(rsa2048).operations == before + 1


def test_generate_refuses_what_the_token_cannot_perform(
    bridge_server: BridgeServer, admin: Any
) -> None:
    """Refused when the key is made (400 naming what works), not at every later use."""
    offered = bridge_server.hsm.supported_mechanisms()
    assert offered is not None
    cannot = [M.RSA_SIGNATURE_PSS_SHA1, M.RSA_DECRYPTION_OAEP_SHA224]
    if Mechanism.RSA_OAEP_SHA256 not in offered:  # SoftHSM2 2.6
        cannot.append(M.RSA_DECRYPTION_OAEP_SHA256)
    for mech in cannot:
        with pytest.raises(nethsm.NetHSMError, match="Bad request") as info:
            admin.generate_key(nethsm.KeyType.RSA, [M.RSA_SIGNATURE_PKCS1, mech], 1024)
        message = str(info.value)
        assert f"cannot perform {mech.value};" in message, message
        works = message.split("work for RSA keys here: ")[1].strip().split(", ")
        assert set(works) >= {m.value for m in [*RSA_ALL, M.RSA_DECRYPTION_RAW]}, message
        assert not set(works) & {m.value for m in cannot}, message
    pem = (
        rsa.generate_private_key(65537, 1024)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with pytest.raises(nethsm.NetHSMError, match="cannot perform RSA_Decryption_OAEP_SHA224"):
        admin.add_key_pem(None, [M.RSA_DECRYPTION_OAEP_SHA224], pem)
    assert len(admin.list_keys()) == len(set(admin.list_keys()))


def test_rsa_sign_refusals(admin: Any, operator: Any, rsa2048: str) -> None:
    digest = hashlib.sha256(b"m").digest()
    # not in the key's mechanisms
    with pytest.raises(nethsm.NetHSMError, match="does not allow mode PSS_SHA224"):
        operator.sign(rsa2048, b64(digest[:28]), nethsm.SignMode.PSS_SHA224)
    with pytest.raises(nethsm.NetHSMError, match="32-byte digest"):
        operator.sign(rsa2048, b64(digest[:20]), nethsm.SignMode.PSS_SHA256)
    with pytest.raises(nethsm.NetHSMError, match="does not allow mode ECDSA"):
        operator.sign(rsa2048, b64(digest), nethsm.SignMode.ECDSA)
    # signing needs the Operator role
    with pytest.raises(nethsm.NetHSMError, match="role Operator"):
        admin.sign(rsa2048, b64(digest), nethsm.SignMode.PSS_SHA256)


def test_rsa_decrypt_every_mode(operator: Any, rsa2048: str) -> None:
    pub = public_key(operator, rsa2048)
    secret = os.urandom(24)
    ct = pub.encrypt(secret, padding.PKCS1v15())
    assert operator.decrypt(rsa2048, b64(ct), nethsm.DecryptMode.PKCS1).decode() == secret
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    ct = pub.encrypt(secret, oaep)
    assert operator.decrypt(rsa2048, b64(ct), nethsm.DecryptMode.OAEP_SHA1).decode() == secret
    for mode in ("RAW", "OAEP_MD5", "OAEP_SHA256"):
        with pytest.raises(nethsm.NetHSMError, match=f"does not allow mode {mode}"):
            operator.decrypt(rsa2048, b64(ct), nethsm.DecryptMode[mode])
    wrong = pub.encrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    with pytest.raises(nethsm.NetHSMError, match="Bad request"):
        operator.decrypt(rsa2048, b64(wrong), nethsm.DecryptMode.PKCS1)


def test_raw_decryption(admin: Any, operator: Any) -> None:
    """RSA_Decryption_RAW keys (generated and imported) decrypt in mode RAW: RSADP's
    modulus-length block; such a key does raw decryption alone."""
    private = rsa.generate_private_key(65537, 2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    imported = admin.add_key_pem(None, [M.RSA_DECRYPTION_RAW], pem)
    generated = admin.generate_key(nethsm.KeyType.RSA, [M.RSA_DECRYPTION_RAW], 2048)
    try:
        numbers = private.private_numbers()
        d, n = numbers.d, numbers.public_numbers.n
        ct = os.urandom(256)
        ct = (int.from_bytes(ct, "big") % n).to_bytes(256, "big")
        out = operator.decrypt(imported, b64(ct), nethsm.DecryptMode.RAW).decode()
        assert out == pow(int.from_bytes(ct, "big"), d, n).to_bytes(256, "big")
        pub = public_key(operator, generated)
        secret = b"\x00\x02" + os.urandom(200)  # a block the client pads itself
        ct = pow(int.from_bytes(secret, "big"), 65537, pub.public_numbers().n).to_bytes(256, "big")
        out = operator.decrypt(generated, b64(ct), nethsm.DecryptMode.RAW).decode()
        assert out == secret.rjust(256, b"\x00")
        assert operator.get_key(generated).mechanisms == [M.RSA_DECRYPTION_RAW]
        with pytest.raises(nethsm.NetHSMError, match="does not allow mode OAEP_SHA1"):
            operator.decrypt(generated, b64(ct), nethsm.DecryptMode.OAEP_SHA1)
        with pytest.raises(nethsm.NetHSMError, match="not below"):
            operator.decrypt(generated, b64(b"\xff" * 256), nethsm.DecryptMode.RAW)
    finally:
        admin.delete_key(imported)
        admin.delete_key(generated)
    before = set(admin.list_keys())
    for other in (M.RSA_DECRYPTION_OAEP_SHA1, M.RSA_SIGNATURE_PKCS1):
        with pytest.raises(nethsm.NetHSMError, match="stands alone"):
            admin.generate_key(nethsm.KeyType.RSA, [M.RSA_DECRYPTION_RAW, other], 2048)
    assert set(admin.list_keys()) == before


def test_encrypt_is_for_generic_keys_only(operator: Any, rsa2048: str) -> None:
    with pytest.raises(nethsm.NetHSMError, match="Generic key"):
        operator.encrypt(rsa2048, b64(b"0" * 16), nethsm.EncryptMode.AES_CBC, b64(b"1" * 16))


def test_rsa3072_sign(admin: Any, operator: Any) -> None:
    key_id = admin.generate_key(nethsm.KeyType.RSA, [M.RSA_SIGNATURE_PKCS1], 3072)
    try:
        pub = public_key(operator, key_id)
        assert pub.key_size == 3072
        digest = hashlib.sha512(b"rsa3072").digest()
        sig = operator.sign(
            key_id, b64(DIGEST_INFO_PREFIX["sha512"] + digest), nethsm.SignMode.PKCS1
        )
        pub.verify(sig.decode(), digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA512()))
        with pytest.raises(nethsm.NetHSMError, match="does not allow mode PKCS1"):
            operator.decrypt(key_id, b64(b"x" * 384), nethsm.DecryptMode.PKCS1)
    finally:
        admin.delete_key(key_id)


@pytest.mark.parametrize(
    ("key_type", "curve", "algo"),
    [
        (nethsm.KeyType.EC_P256, ec.SECP256R1, hashes.SHA256()),
        (nethsm.KeyType.EC_P384, ec.SECP384R1, hashes.SHA384()),
        (nethsm.KeyType.EC_P521, ec.SECP521R1, hashes.SHA512()),
    ],
)
def test_ec_keys_sign_and_csr(
    admin: Any, operator: Any, key_type: Any, curve: Any, algo: Any
) -> None:
    key_id = admin.generate_key(key_type, [M.ECDSA_SIGNATURE], 256, uid("ec"), label="ec key")
    try:
        key = operator.get_key(key_id)
        assert key.type == key_type and key.label == "ec key"
        pub = public_key(operator, key_id)
        assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, curve)
        point = pub.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        assert key.public_key.data.decode() == point
        digest = hashlib.new(algo.name, b"ec message").digest()
        der = operator.sign(key_id, b64(digest), nethsm.SignMode.ECDSA).decode()
        pub.verify(der, digest, ec.ECDSA(utils.Prehashed(algo)))  # DER, as NetHSM returns
        with pytest.raises(nethsm.NetHSMError, match="does not allow mode PKCS1"):
            operator.sign(key_id, b64(digest), nethsm.SignMode.PKCS1)
        with pytest.raises(nethsm.NetHSMError, match="do not fit a Curve25519 key"):
            admin.generate_key(nethsm.KeyType.CURVE25519, [M.ECDSA_SIGNATURE], 256)
        pem = operator.key_csr(
            key_id,
            common_name="bridge.example",
            organization="hsmbridge",
            country="DE",
            email_address="ops@example.org",
            subject_alt_names=["bridge.example", "IP:127.0.0.1"],
        )
        csr = x509.load_pem_x509_csr(pem.encode())
        assert csr.is_signature_valid
        assert csr.public_key() == pub
        assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bridge.example"
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["bridge.example"]
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    finally:
        admin.delete_key(key_id)
    with pytest.raises(nethsm.NetHSMError, match="not found"):
        operator.get_key(key_id)


def test_rsa_csr_defaults_san_to_common_name(operator: Any, rsa2048: str) -> None:
    csr = x509.load_pem_x509_csr(operator.key_csr(rsa2048, common_name="cn.example").encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cn.example"]


def _self_signed(key: Any, cn: str) -> bytes:
    import datetime

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_import_json_and_pem_keys_then_certificate(admin: Any, operator: Any) -> None:
    local = rsa.generate_private_key(65537, 2048)
    numbers = local.private_numbers()
    key_id = admin.add_key(
        uid("imp"),
        nethsm.KeyType.RSA,
        [M.RSA_SIGNATURE_PSS_SHA256, M.RSA_DECRYPTION_OAEP_SHA1],
        nethsm.RsaPrivateKey(
            prime_p=b64(numbers.p.to_bytes(128, "big")),
            prime_q=b64(numbers.q.to_bytes(128, "big")),
            public_exponent=b64(b"\x01\x00\x01"),
        ),
        tags=[],
    )
    ec_local = ec.generate_private_key(ec.SECP384R1())
    ec_pem = ec_local.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    ec_id = admin.add_key_pem(None, [M.ECDSA_SIGNATURE], ec_pem, label="from pem")
    try:
        assert public_key(admin, key_id) == local.public_key()
        digest = hashlib.sha256(b"imported").digest()
        sig = operator.sign(key_id, b64(digest), nethsm.SignMode.PSS_SHA256).decode()
        local.public_key().verify(
            sig,
            digest,
            padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
            utils.Prehashed(hashes.SHA256()),
        )
        ct = local.public_key().encrypt(
            b"secret", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        )
        assert operator.decrypt(key_id, b64(ct), nethsm.DecryptMode.OAEP_SHA1).decode() == b"secret"

        assert admin.get_key(ec_id).label == "from pem"
        digest = hashlib.sha384(b"pem").digest()
        der = operator.sign(ec_id, b64(digest), nethsm.SignMode.ECDSA).decode()
        ec_local.public_key().verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA384())))

        with pytest.raises(nethsm.NetHSMError, match="already exists"):
            admin.add_key_pem(key_id, [M.ECDSA_SIGNATURE], ec_pem)

        cert = _self_signed(local, "imported")
        admin.set_key_certificate(key_id, cert)
        assert operator.get_key_certificate(key_id) == cert
        with pytest.raises(nethsm.NetHSMError, match="already has a certificate"):
            admin.set_key_certificate(key_id, cert)
        with pytest.raises(nethsm.NetHSMError, match=r"not an X\.509 certificate"):
            admin.set_key_certificate(ec_id, b"not a certificate")
        admin.delete_key_certificate(key_id)
        with pytest.raises(nethsm.NetHSMError, match="not found"):
            operator.get_key_certificate(key_id)
    finally:
        admin.delete_key(key_id)
        admin.delete_key(ec_id)


def test_tags_restrict_operators(bridge_server: BridgeServer, admin: Any) -> None:
    key_id = admin.generate_key(nethsm.KeyType.EC_P256, [M.ECDSA_SIGNATURE], 256, uid("tagged"))
    user_id, passphrase = uid("op"), "tagged-operator-pass"
    admin.add_user("Tagged Operator", nethsm.Role.OPERATOR, passphrase, user_id)
    op = nethsm.NetHSM(
        bridge_server.hostport,
        nethsm.Authentication(user_id, passphrase),
        ca_certs=bridge_server.ca_file,
    )
    digest = hashlib.sha256(b"tags").digest()
    try:
        admin.add_key_tag(key_id, "berlin")
        assert admin.get_key(key_id).tags == ["berlin"]
        with pytest.raises(nethsm.NetHSMError, match="Access denied"):
            op.sign(key_id, b64(digest), nethsm.SignMode.ECDSA)
        with bridge_server.session() as raw:  # the SDK drops 403 bodies; read it directly
            r = raw.post(
                f"{bridge_server.url}/keys/{key_id}/sign",
                json={"mode": "ECDSA", "message": b64(digest).data},
                auth=(user_id, passphrase),
                timeout=TIMEOUT,
            )
            assert r.status_code == 403
            assert "restricted to tags berlin" in r.json()["message"]
        assert key_id not in op.list_keys(filter="x")
        assert key_id in op.list_keys()
        admin.add_operator_tag(user_id, "berlin")
        assert admin.list_operator_tags(user_id) == ["berlin"]
        assert op.sign(key_id, b64(digest), nethsm.SignMode.ECDSA).decode()
        assert key_id in op.list_keys(filter="x")
        with pytest.raises(nethsm.NetHSMError, match="only be given to Operator"):
            admin.add_operator_tag("admin", "berlin")
        admin.delete_operator_tag(user_id, "berlin")
        with pytest.raises(nethsm.NetHSMError, match="Access denied"):
            op.sign(key_id, b64(digest), nethsm.SignMode.ECDSA)
        admin.delete_key_tag(key_id, "berlin")
        assert op.sign(key_id, b64(digest), nethsm.SignMode.ECDSA).decode()
    finally:
        op.close()
        admin.delete_user(user_id)
        admin.delete_key(key_id)


def test_label_move_prefix_and_delete(admin: Any, operator: Any) -> None:
    base = uid("mv")
    key_id = admin.generate_key(nethsm.KeyType.EC_P256, [M.ECDSA_SIGNATURE], 256, f"{base}-a")
    admin.set_key_label(key_id, "first")
    assert operator.list_keys(label="first") == [key_id]
    admin.set_key_label(key_id, None)
    assert admin.get_key(key_id).label == ""
    digest = hashlib.sha256(b"before move").digest()
    operator.sign(key_id, b64(digest), nethsm.SignMode.ECDSA)
    pem_before = admin.get_key_public_key(key_id)
    admin.move_key(key_id, f"{base}-b")
    with pytest.raises(nethsm.NetHSMError, match="not found"):
        admin.get_key(key_id)
    moved = admin.get_key(f"{base}-b")
    assert moved.operations == 1
    assert admin.get_key_public_key(f"{base}-b") == pem_before
    assert operator.list_keys(prefix=base) == [f"{base}-b"]
    other = admin.generate_key(nethsm.KeyType.EC_P256, [M.ECDSA_SIGNATURE], 256, f"{base}-c")
    with pytest.raises(nethsm.NetHSMError, match="already exists"):
        admin.move_key(f"{base}-b", other)
    # the old id is free again: a new key may take it (its token label is taken)
    again = admin.generate_key(nethsm.KeyType.EC_P256, [M.ECDSA_SIGNATURE], 256, key_id)
    assert sorted(operator.list_keys(prefix=base)) == sorted([key_id, f"{base}-b", other])
    for k in (f"{base}-b", other, again):
        admin.delete_key(k)
    assert operator.list_keys(prefix=base) == []


def test_users(bridge_server: BridgeServer, admin: Any) -> None:
    user_id = admin.add_user("Generated Id", nethsm.Role.METRICS, "metrics-pass-123")
    try:
        assert user_id in admin.list_users()
        user = admin.get_user(user_id)
        assert user.role == nethsm.Role.METRICS and user.real_name == "Generated Id"
        admin.set_passphrase(user_id, "metrics-pass-456")
        metrics = nethsm.NetHSM(
            bridge_server.hostport,
            nethsm.Authentication(user_id, "metrics-pass-456"),
            ca_certs=bridge_server.ca_file,
        )
        assert "keyOperations" in metrics.get_metrics()
        metrics.close()
        with pytest.raises(nethsm.NetHSMError, match="already exists"):
            admin.add_user("Dup", nethsm.Role.OPERATOR, "long-enough-pass", user_id)
        # a root administrator gives a namespace that does not exist yet its users
        assert (
            admin.add_user("Ns", nethsm.Role.OPERATOR, "long-enough-pass", "u1", namespace="ns1")
            == "ns1~u1"
        )
        admin.delete_user("ns1~u1")
    finally:
        admin.delete_user(user_id)
    with pytest.raises(nethsm.NetHSMError, match="not found"):
        admin.get_user(user_id)


RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def test_ed25519_keys_sign_and_csr(admin: Any, operator: Any, tmp_path: Path) -> None:
    M = nethsm.KeyMechanism
    key_id = admin.generate_key(nethsm.KeyType.CURVE25519, [M.EDDSA_SIGNATURE], 256, "ed-bridge")
    try:
        key = operator.get_key(key_id)
        assert key.type == nethsm.KeyType.CURVE25519
        public = serialization.load_pem_public_key(operator.get_key_public_key(key_id).encode())
        assert isinstance(public, ed25519.Ed25519PublicKey)
        assert key.public_key.data.decode() == public.public_bytes(*RAW)
        message = b"EdDSA mode signs the message itself"
        signature = operator.sign(key_id, nethsm.Base64.encode(message), nethsm.SignMode.EDDSA)
        assert ed25519_verifies(public, signature.decode(), message, tmp_path)
        with pytest.raises(nethsm.NetHSMError, match="does not allow mode ECDSA"):
            operator.sign(key_id, nethsm.Base64.encode(message), nethsm.SignMode.ECDSA)
        pem = operator.key_csr(key_id, common_name="ed.example")
        csr = x509.load_pem_x509_csr(pem.encode())
        assert csr.is_signature_valid and csr.public_key() == public
        assert csr.signature_algorithm_oid.dotted_string == "1.3.101.112"
        assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ed.example"
        csr_file = tmp_path / "req.pem"
        csr_file.write_text(pem)
        done = subprocess.run(
            ["openssl", "req", "-verify", "-noout", "-in", str(csr_file)],
            capture_output=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    finally:
        admin.delete_key(key_id)


def test_ed25519_import(admin: Any, operator: Any) -> None:
    original = ed25519.Ed25519PrivateKey.generate()
    seed = original.private_bytes(RAW[0], serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())  # fmt: skip
    M = nethsm.KeyMechanism
    key_id = "ed-import-" + uuid.uuid4().hex[:8]
    admin.add_key(
        key_id=key_id,
        type=nethsm.KeyType.CURVE25519,
        mechanisms=[M.EDDSA_SIGNATURE],
        private_key=nethsm.GenericPrivateKey(data=nethsm.Base64.encode(seed)),
    )
    try:
        message = b"imported through the bridge"
        signature = operator.sign(key_id, nethsm.Base64.encode(message), nethsm.SignMode.EDDSA)
        assert signature.decode() == original.sign(message)
    finally:
        admin.delete_key(key_id)
