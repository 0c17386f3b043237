"""Pure parts of the NetHSM backend: vocabulary, options, and the HTTP error mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import hsmbridge
from hsmbridge import (
    EC,
    RSA,
    AuthenticationError,
    ConfigurationError,
    DecryptionFailed,
    Ed25519,
    HSMError,
    HSMUnavailable,
    InvalidInput,
    KeyExists,
    KeyNotFound,
    Mechanism,
    MechanismNotSupported,
    PermissionDenied,
    RateLimited,
)
from hsmbridge.nethsm import NetHSM
from hsmbridge.nethsm import vocabulary as keys
from hsmbridge.nethsm.client import normalize_fingerprint
from hsmbridge.nethsm.errors import ADMINISTRATOR, OPERATOR, Answer, Call, from_response

SPEC_MECHANISMS = {  # the KeyMechanism enum of the NetHSM 5.0 OpenAPI spec
    "RSA_Decryption_RAW", "RSA_Decryption_PKCS1", "RSA_Decryption_OAEP_MD5",
    "RSA_Decryption_OAEP_SHA1", "RSA_Decryption_OAEP_SHA224", "RSA_Decryption_OAEP_SHA256",
    "RSA_Decryption_OAEP_SHA384", "RSA_Decryption_OAEP_SHA512", "RSA_Signature_PKCS1",
    "RSA_Signature_PSS_MD5", "RSA_Signature_PSS_SHA1", "RSA_Signature_PSS_SHA224",
    "RSA_Signature_PSS_SHA256", "RSA_Signature_PSS_SHA384", "RSA_Signature_PSS_SHA512",
    "EdDSA_Signature", "ECDSA_Signature", "BIP340_Signature", "AES_Encryption_CBC",
    "AES_Decryption_CBC",
}  # fmt: skip
SIGN_MODES = {"PKCS1", "PSS_MD5", "PSS_SHA1", "PSS_SHA224", "PSS_SHA256", "PSS_SHA384",
              "PSS_SHA512", "EdDSA", "ECDSA", "BIP340"}  # fmt: skip
DECRYPT_MODES = {"RAW", "PKCS1", "OAEP_MD5", "OAEP_SHA1", "OAEP_SHA224", "OAEP_SHA256",
                 "OAEP_SHA384", "OAEP_SHA512", "AES_CBC"}  # fmt: skip


def test_key_ids_follow_the_spec_pattern() -> None:
    for good in ("a", "Key-1.v2_x", "0" * 128):
        assert keys.is_key_id(good)
    for bad in ("", "-a", "_a", "a b", "a/b", "a" * 129, "ä"):
        assert not keys.is_key_id(bad)
        with pytest.raises(InvalidInput, match="not a valid NetHSM key ID"):
            keys.check_key_id(bad)


@pytest.mark.parametrize(
    ("spec", "usage", "expected"),
    [
        (RSA(2048), {"sign"}, ["RSA_Signature_PKCS1", "RSA_Signature_PSS_SHA256",
                               "RSA_Signature_PSS_SHA384", "RSA_Signature_PSS_SHA512"]),
        (RSA(2048), {"decrypt"}, ["RSA_Decryption_OAEP_SHA1", "RSA_Decryption_OAEP_SHA256",
                                  "RSA_Decryption_OAEP_SHA384", "RSA_Decryption_OAEP_SHA512",
                                  "RSA_Decryption_PKCS1"]),
        (EC("P-384"), {"sign"}, ["ECDSA_Signature"]),
    ],
)  # fmt: skip
def test_usage_to_mechanisms_and_back(spec: RSA | EC, usage: set[str], expected: list[str]) -> None:
    mechanisms = keys.mechanisms_for(spec, usage)
    assert mechanisms == expected
    assert set(mechanisms) <= SPEC_MECHANISMS
    assert keys.usage_of(mechanisms) == usage
    assert keys.usage_of(keys.mechanisms_for(RSA(2048), {"sign", "decrypt"})) == {"sign", "decrypt"}
    assert keys.usage_of(["AES_Decryption_CBC", "EdDSA_Signature"]) == {"sign"}


def test_every_mechanism_has_a_spec_mode_and_key_mechanism() -> None:
    for mech in Mechanism:
        needed, mode = keys.mode_for(mech)
        assert needed in SPEC_MECHANISMS
        assert mode in (SIGN_MODES if mech.is_sign else DECRYPT_MODES)
    assert keys.mode_for(Mechanism.RSA_PKCS1_SHA384) == ("RSA_Signature_PKCS1", "PKCS1")
    assert keys.mode_for(Mechanism.RSA_OAEP_SHA256) == ("RSA_Decryption_OAEP_SHA256", "OAEP_SHA256")
    offered = keys.offered_mechanisms(RSA(2048), ["RSA_Decryption_OAEP_SHA1"], sign=False)
    assert offered == ["rsa-oaep-sha1"]


def test_non_string_labels_and_ids_are_invalid_input() -> None:
    hsm = hsmbridge.open("nethsm://op@127.0.0.1:1", password="unused-password")
    assert isinstance(hsm, NetHSM)
    for bad in (5, b"label", ""):
        with pytest.raises(InvalidInput):
            hsm.get_key(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            hsm.get_key(key_id=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            hsm.generate_key(RSA(2048), bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not a valid NetHSM key ID"):
        hsm.generate_key(RSA(2048), "ok-label", key_id="not/valid")
    with pytest.raises(InvalidInput, match="32-byte"):
        hsm.generate_key(EC("P-256"), "a label with spaces that is far too long for NetHSM")
    assert hsm.stats["requests"] == 0  # all refused before anything was sent


def test_key_type_bodies() -> None:
    assert keys.key_type_body(RSA(3072)) == {"type": "RSA", "length": 3072}
    assert keys.key_type_body(EC("P-521")) == {"type": "EC_P521"}


def test_spec_and_public_key_from_key_data() -> None:
    rsa_key = rsa.generate_private_key(65537, 2048).public_key()
    n = rsa_key.public_numbers().n
    data: dict[str, Any] = {
        "type": "RSA",
        "mechanisms": ["RSA_Signature_PKCS1"],
        "public": {"modulus": keys.b64encode(n.to_bytes(256, "big")), "publicExponent": "AQAB"},
    }
    assert keys.spec_of(data) == RSA(2048)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert keys.public_key_der(RSA(2048), data["public"]) == rsa_key.public_bytes(
        serialization.Encoding.DER, spki
    )
    ec_key = ec.generate_private_key(ec.SECP384R1()).public_key()
    point = ec_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert keys.spec_of({"type": "EC_P384"}) == EC("P-384")
    assert keys.public_key_der(EC("P-384"), {"data": keys.b64encode(point)}) == ec_key.public_bytes(
        serialization.Encoding.DER, spki
    )
    assert keys.spec_of({"type": "Curve25519"}) == Ed25519()
    assert keys.spec_of({"type": "Generic"}) is None
    with pytest.raises(HSMError, match="malformed base64"):
        keys.b64decode("no*base64", "x")
    with pytest.raises(HSMError, match="unusable public key"):
        keys.public_key_der(EC("P-256"), {"data": keys.b64encode(b"\x04" + b"\x01" * 64)})


def test_ecdsa_input_is_truncated_to_the_group_size() -> None:
    assert keys.ecdsa_input(b"\x01" * 64, EC("P-256")) == b"\x01" * 32
    assert keys.ecdsa_input(b"\x02" * 48, EC("P-384")) == b"\x02" * 48
    assert keys.ecdsa_input(b"\x03" * 64, EC("P-521")) == b"\x03" * 64
    assert keys.ecdsa_input(b"\x04" * 32, RSA(2048)) == b"\x04" * 32


def test_fingerprint_forms() -> None:
    hexa = "ab" * 32
    colons = ":".join(["AB"] * 32)
    for form in (hexa, hexa.upper(), f"sha256:{hexa}", f"SHA256:{colons}", colons):
        assert normalize_fingerprint(form) == hexa
    for bad in ("ab" * 20, "sha1:" + hexa, "zz" * 32, ""):
        with pytest.raises(ConfigurationError):
            normalize_fingerprint(bad)


def response(status: int, body: object) -> Answer:
    """An HTTP answer as the transport hands it to the error mapping."""
    return Answer(status, body if isinstance(body, bytes) else json.dumps(body).encode())


SIGN = Call("signing (rsa-pss-sha256) with key 'k1'", OPERATOR, safe=True, key_id="k1", op="sign")
DECRYPT = Call(
    "decryption (rsa-oaep-sha256) with key 'k1'", OPERATOR, True, "k1", "decrypt",
    offers="rsa-oaep-sha1, rsa-pkcs1",
)  # fmt: skip
GENERATE = Call("generating a rsa:2048 key 'k1'", ADMINISTRATOR, safe=False, op="generate")


@pytest.mark.parametrize(
    ("status", "call", "cls", "words"),
    [
        (401, SIGN, AuthenticationError, ["'alice'", "password"]),
        (403, SIGN, PermissionDenied, ["signing", "needs the Operator role", "operator user"]),
        (403, GENERATE, PermissionDenied, ["Administrator role", "admin=(user, password)"]),
        (404, SIGN, KeyNotFound, ["'k1'"]),
        (409, GENERATE, KeyExists, ["already exists"]),
        (412, SIGN, HSMUnavailable, ["not Operational", "unlock"]),
        (429, SIGN, RateLimited, ["wait"]),
        (500, SIGN, HSMUnavailable, ["HTTP 500"]),
        (503, SIGN, HSMUnavailable, ["retry later"]),
        (418, SIGN, HSMError, ["HTTP 418"]),
    ],
)
def test_http_status_mapping(status: int, call: Call, cls: type, words: list[str]) -> None:
    exc = from_response(
        response(status, {"message": "the server's words"}),
        call,
        user="alice",
        where="NetHSM at h:1",
    )
    assert type(exc) is cls
    assert exc.status == status
    assert "the server's words" in exc.message
    for word in words:
        assert word in exc.message


def test_bad_request_mapping_reads_the_message() -> None:
    def mapped(call: Call, message: str) -> HSMError:
        return from_response(response(400, {"message": message}), call, user="u", where="h")

    unsupported = mapped(DECRYPT, "token 'x' does not support rsa-oaep-sha256; it offers: ...")
    assert isinstance(unsupported, MechanismNotSupported)
    assert "rsa-oaep-sha1, rsa-pkcs1" in unsupported.message  # names what works instead
    assert isinstance(mapped(SIGN, "key k1 does not allow mode PSS_SHA256: its mechanisms are"),
                      MechanismNotSupported)  # fmt: skip
    assert isinstance(mapped(DECRYPT, "Decryption failed"), DecryptionFailed)
    assert isinstance(mapped(DECRYPT, "the ciphertext is corrupt (EncryptedDataInvalid)"),
                      DecryptionFailed)  # fmt: skip
    assert type(mapped(SIGN, "PSS_SHA256 signs a 32-byte digest, got 5 bytes")) is InvalidInput
    assert type(mapped(GENERATE, "mechanisms are not supported")) is InvalidInput
    plain = from_response(response(400, b"not json"), SIGN, user="u", where="h")
    assert type(plain) is InvalidInput and "not json" in plain.message


def test_from_uri_options_and_password_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NETHSM_PASSWORD", raising=False)
    with pytest.raises(ConfigurationError, match="NETHSM_PASSWORD"):
        hsmbridge.open("nethsm://op@127.0.0.1:8443")
    with pytest.raises(ConfigurationError, match="password"):
        hsmbridge.open("nethsm://op:pw@127.0.0.1:8443")
    monkeypatch.setenv("NETHSM_PASSWORD", "from-the-env-123")
    hsm = hsmbridge.open(
        "nethsm://op@127.0.0.1:8443,127.0.0.2:9443?timeout=3,20&retries=2&max-connections=4",
        fingerprint="ab" * 32,
        admin=("boss", "admin-pass-123"),
    )
    assert isinstance(hsm, NetHSM)
    client = hsm.client
    assert client.timeout == (3.0, 20.0) and client.retries == 2 and client.max_connections == 4
    assert [i.base for i in client.instances] == [
        "https://127.0.0.1:8443/api/v1",
        "https://127.0.0.2:9443/api/v1",
    ]
    assert hsm._cred(OPERATOR).user == "op" and hsm._cred(ADMINISTRATOR).user == "boss"
    text = repr(hsm) + repr(hsm._cred(OPERATOR)) + repr(hsm._cred(ADMINISTRATOR))
    assert "from-the-env-123" not in text and "admin-pass-123" not in text
    # a handle made only of role credentials needs no primary password
    monkeypatch.delenv("NETHSM_PASSWORD")
    both = hsmbridge.open(
        "nethsm://boss@[::1]:8443", admin=("boss", "a-password-1"), operator=("op", "o-password-1")
    )
    assert isinstance(both, NetHSM) and both.client.instances[0].base == "https://[::1]:8443/api/v1"
    for bad_uri, match in [
        ("nethsm://op@h:1?colour=red", "unknown NetHSM URI parameter"),
        ("nethsm://op@h:1?retries=many", "retries must be an integer"),
        ("nethsm://op@h:1?timeout=-1", "timeout must be"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            hsmbridge.open(bad_uri, password="x")
    with pytest.raises(ConfigurationError, match="unknown NetHSM option"):
        hsmbridge.open("nethsm://op@h:1", password="x", pin="1234")
    with pytest.raises(ConfigurationError, match=r"operator= must be"):
        hsmbridge.open("nethsm://op@h:1", password="x", operator="op")


def test_narrowed_keeps_what_the_bridge_can_perform() -> None:
    """The client's second try after hsmbridge serve refused mechanisms its token lacks."""
    asked = ["RSA_Decryption_PKCS1", "RSA_Decryption_OAEP_SHA1", "RSA_Decryption_OAEP_SHA256"]
    works = ["RSA_Decryption_PKCS1", "RSA_Decryption_OAEP_SHA1", "RSA_Signature_PKCS1"]
    said = keys.unperformable_message("token 't'", "RSA", asked[2:], works)
    wrapped = f"NetHSM at h refused the input for generating (NetHSM said: {said})"
    assert keys.narrowed(asked, wrapped) == asked[:2]
    assert keys.narrowed(asked[2:], wrapped) is None  # no decryption would be left
    assert keys.narrowed(asked[:2], wrapped) is None  # nothing to drop: the refusal stands
    assert keys.narrowed(asked, "label is not supported") is None


def test_a_mechanism_refusal_is_not_taken_for_a_missing_label_field() -> None:
    """Only a NetHSM < 5.0's label refusal turns labels off; hsmbridge serve's refusal of
    mechanisms stays one, even from a token whose name holds "label"."""
    said = keys.unperformable_message(
        "token 'labels-prod'", "RSA", ["RSA_Decryption_OAEP_SHA256"], ["RSA_Signature_PKCS1"]
    )
    assert not keys.refuses_labels(f"NetHSM at h refused the input (NetHSM said: {said})")
    assert keys.refuses_labels("NetHSM at h refused the input (NetHSM said: unknown field label)")
