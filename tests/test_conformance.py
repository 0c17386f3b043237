"""The backend-neutral conformance suite: only the public key API, through ``hsm``.

Every backend must pass this file unchanged. Results are checked with
independent tools (``cryptography`` and the ``openssl`` command) on the
exported public key, never with hsmbridge's own helpers. Where a backend
lacks a mechanism (SoftHSM2 has no OAEP with SHA-2) it may answer
:class:`MechanismNotSupported` naming what it offers, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from oracles import OpenSSL, crypto_encrypt, crypto_verify, raw_to_der
from token_gaps import GAPS, TOKEN, Gaps

from hsmbridge import (
    EC,
    HSM,
    RSA,
    BatchItemError,
    ConfigurationError,
    DecryptionFailed,
    Ed25519,
    HSMError,
    InvalidInput,
    Key,
    KeyExists,
    KeyNotFound,
    Mechanism,
    MechanismNotSupported,
)
from hsmbridge.api import KeySpec
from hsmbridge.export import jwk_thumbprint
from hsmbridge.mechanisms import DECRYPT_MECHANISMS, SIGN_MECHANISMS

SPECS: dict[str, KeySpec] = {
    "rsa2048": RSA(2048),
    "rsa3072": RSA(3072),
    "rsa4096": RSA(4096),
    "p256": EC("P-256"),
    "p384": EC("P-384"),
    "p521": EC("P-521"),
    "ed25519": Ed25519(),
}
RSA_KEYS = [name for name, spec in SPECS.items() if isinstance(spec, RSA)]
EC_KEYS = [name for name, spec in SPECS.items() if isinstance(spec, EC)]
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def gaps_of(hsm: HSM) -> Gaps:
    """The measured gaps of the module behind ``hsm`` (tests/token_gaps.py)."""
    return GAPS["nethsm" if type(hsm).__name__ == "NetHSM" else TOKEN]


def small_spec(hsm: HSM) -> KeySpec:
    """A quick key for the lookup tests: EC P-256, or RSA-2048 where there is no EC."""
    return RSA(2048) if "p256" in gaps_of(hsm).specs else EC("P-256")


def corrupt_error(key: Key) -> type[HSMError]:
    """What a corrupt ciphertext raises: DecryptionFailed, or (a known gap) HSMError."""
    return HSMError if gaps_of(key_hsm(key)).corrupt_ciphertext else DecryptionFailed


def key_hsm(key: Key) -> HSM:
    return key.hsm  # type: ignore[attr-defined, no-any-return]


def small_mech(spec: KeySpec) -> Mechanism:
    return Mechanism.ECDSA_SHA256 if isinstance(spec, EC) else Mechanism.RSA_PKCS1_SHA256


def unsupported(hsm: HSM, mech: Mechanism, exc: MechanismNotSupported) -> None:
    """A refusal is a skip naming the module's gap, or a failure if none is known."""
    reason = gaps_of(hsm).mechanisms.get(mech)
    if reason is None:
        raise AssertionError(f"{mech.value} refused, and no gap is known: {exc.message}")
    pytest.skip(f"module gap: {reason}")


class Keyring:
    """One key per spec per backend, generated on first use (RSA-4096 takes seconds)."""

    def __init__(self, hsm: HSM) -> None:
        self.hsm = hsm
        self.keys: dict[str, Key] = {}

    def get(self, name: str) -> Key:
        gap = gaps_of(self.hsm).specs.get(name)
        if gap is not None:
            pytest.skip(f"module gap: {gap}")
        if name not in self.keys:
            spec = SPECS[name]
            usage = {"sign", "decrypt"} if isinstance(spec, RSA) else {"sign"}
            label = f"conf-{name}-{uuid.uuid4().hex[:8]}"
            self.keys[name] = self.hsm.generate_key(spec, label, usage=usage)
        return self.keys[name]


@pytest.fixture(scope="module")
def keyring(hsm: HSM) -> Iterator[Keyring]:
    ring = Keyring(hsm)
    yield ring
    gap = gaps_of(hsm).delete_after_failed_decrypt
    for key in ring.keys.values():
        try:
            key.delete()
        except HSMError:
            if gap is None:
                raise
            warnings.warn(f"module gap: {gap} (key {key.label!r} left)", stacklevel=1)


@pytest.fixture(scope="module")
def weak_key(hsm: HSM) -> Iterator[Key]:
    """An RSA-1024 sign-only key: for the upload refusal and usage checks."""
    key = hsm.generate_key(RSA(1024), f"conf-weak-{uuid.uuid4().hex[:8]}", usage="sign")
    yield key
    key.delete()


def pem_public(key: Key) -> PublicKeyTypes:
    """The public key as ``cryptography`` reads the exported PEM."""
    return serialization.load_pem_public_key(key.public_key_pem().encode("ascii"))


def message_for(*parts: object) -> bytes:
    return ("conformance " + " ".join(map(str, parts))).encode() + os.urandom(8)


def digest(mech: Mechanism, data: bytes) -> bytes:
    assert mech.hash_name is not None
    return hashlib.new(mech.hash_name, data).digest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def named_mechanisms(message: str, among: tuple[Mechanism, ...]) -> list[Mechanism]:
    return [m for m in among if re.search(rf"(?<![\w-]){re.escape(m.value)}(?![\w-])", message)]


def assert_offers_working_alternative(
    key: Key, exc: MechanismNotSupported, mech: Mechanism
) -> None:
    """An unsupported mechanism must be refused naming one that does work."""
    offered = [m for m in named_mechanisms(exc.message, DECRYPT_MECHANISMS) if m is not mech]
    assert offered, f"message names no alternative: {exc.message!r}"
    public = pem_public(key)
    working = []
    for alt in offered:
        plaintext = b"alternative " + alt.value.encode()
        try:
            ciphertext = crypto_encrypt(public, plaintext, alt)
            if key.decrypt(ciphertext, alt.value, allow_pkcs1v15=True) == plaintext:
                working.append(alt)
        except MechanismNotSupported:
            pass
    assert working, f"none of the offered mechanisms works: {exc.message!r}"


# -- signatures ------------------------------------------------------------------------

SIGN_CASES = [
    pytest.param(name, mech, id=f"{name}-{mech.value}")
    for name, spec in SPECS.items()
    for mech in SIGN_MECHANISMS
    if mech.key_type == spec.key_type
]


@pytest.mark.parametrize("prehashed", [False, True], ids=["message", "prehashed"])
@pytest.mark.parametrize(("name", "mech"), SIGN_CASES)
def test_signature_verifies_with_cryptography_and_openssl(
    keyring: Keyring, name: str, mech: Mechanism, prehashed: bool, tmp_path: Path
) -> None:
    key = keyring.get(name)
    message = message_for(name, mech)
    if prehashed and mech.family == "eddsa":  # pure EdDSA signs the message, never a digest
        with pytest.raises(InvalidInput, match="no digest"):
            key.sign(hashlib.sha512(message).digest(), mech.value, prehashed=True)
        return
    data = digest(mech, message) if prehashed else message
    try:
        signature = key.sign(data, mech.value, prehashed=prehashed)
    except MechanismNotSupported as exc:
        unsupported(keyring.hsm, mech, exc)
    public = pem_public(key)
    if isinstance(public, rsa.RSAPublicKey):
        assert len(signature) == public.key_size // 8
    assert crypto_verify(public, signature, data, mech, prehashed=prehashed)
    assert OpenSSL(key.public_key_pem(), tmp_path).verify(
        signature, data, mech, prehashed=prehashed
    )
    # the same signature does not cover other data: the checks above can fail
    other = digest(mech, message + b"!") if prehashed else message + b"!"
    assert not crypto_verify(public, signature, other, mech, prehashed=prehashed)


@pytest.mark.parametrize("mech", [m for m in SIGN_MECHANISMS if m.family == "ecdsa"])
@pytest.mark.parametrize("name", EC_KEYS)
def test_ecdsa_raw_signature_is_r_s(
    keyring: Keyring, name: str, mech: Mechanism, tmp_path: Path
) -> None:
    key = keyring.get(name)
    spec = SPECS[name]
    assert isinstance(spec, EC)
    message = message_for(name, mech, "raw")
    raw = key.sign(message, mech, signature_format="raw")
    assert len(raw) == 2 * spec.field_bytes
    assert crypto_verify(pem_public(key), raw, message, mech, raw=True)
    assert OpenSSL(key.public_key_pem(), tmp_path).verify(raw_to_der(raw), message, mech)
    prehashed_raw = key.sign(digest(mech, message), mech, prehashed=True, signature_format="raw")
    assert crypto_verify(pem_public(key), prehashed_raw, message, mech, raw=True)


def test_openssl_oracle_rejects_a_bad_signature(keyring: Keyring, tmp_path: Path) -> None:
    """The openssl check can fail: a flipped bit is refused."""
    key = keyring.get("rsa2048")
    mech = Mechanism.RSA_PSS_SHA256
    signature = bytearray(key.sign(b"payload", mech))
    signature[10] ^= 1
    tool = OpenSSL(key.public_key_pem(), tmp_path)
    assert not tool.verify(bytes(signature), b"payload", mech)
    assert not tool.verify(bytes(signature), digest(mech, b"payload"), mech, prehashed=True)


def test_signature_format_and_mechanism_checks(keyring: Keyring) -> None:
    rsa_key, ec_key = keyring.get("rsa2048"), keyring.get("p256")
    with pytest.raises(InvalidInput, match="signature_format"):
        ec_key.sign(b"x", "ecdsa-sha256", signature_format="jws")
    with pytest.raises(InvalidInput, match="ecdsa-sha256"):
        rsa_key.sign(b"x", "ecdsa-sha256")
    with pytest.raises(InvalidInput, match="rsa-pss-sha256"):
        ec_key.sign(b"x", "rsa-pss-sha256")
    with pytest.raises(InvalidInput):
        ec_key.decrypt(b"x" * 32, "rsa-oaep-sha1")
    with pytest.raises(MechanismNotSupported, match="rsa-pkcs1-sha256"):
        rsa_key.sign(b"x", "rsa-pkcs1-sha1")
    with pytest.raises(MechanismNotSupported):
        rsa_key.sign(b"x", "rsa-oaep-sha1")  # a decrypt mechanism
    with pytest.raises(MechanismNotSupported):
        rsa_key.decrypt(b"x" * 256, "rsa-pss-sha256")  # a sign mechanism
    with pytest.raises(InvalidInput, match="32-byte"):
        rsa_key.sign(b"\x00" * 48, "rsa-pkcs1-sha256", prehashed=True)


# -- decryption --------------------------------------------------------------------------

DECRYPT_CASES = [
    pytest.param(name, mech, id=f"{name}-{mech.value}")
    for name in RSA_KEYS
    for mech in DECRYPT_MECHANISMS
    if mech.usage == "decrypt"  # rsa-raw needs a key of its own: test_raw_decryption
]


@pytest.mark.parametrize("tool", ["openssl", "cryptography"])
@pytest.mark.parametrize(("name", "mech"), DECRYPT_CASES)
def test_decrypts_ciphertext_made_by_independent_tool(
    keyring: Keyring, name: str, mech: Mechanism, tool: str, tmp_path: Path
) -> None:
    key = keyring.get(name)
    plaintext = message_for("secret", name, mech)
    if tool == "openssl":
        ciphertext = OpenSSL(key.public_key_pem(), tmp_path).encrypt(plaintext, mech)
    else:
        ciphertext = crypto_encrypt(pem_public(key), plaintext, mech)
    try:
        result = key.decrypt(ciphertext, mech.value, allow_pkcs1v15=True)
    except MechanismNotSupported as exc:
        assert_offers_working_alternative(key, exc, mech)
        unsupported(keyring.hsm, mech, exc)
    assert mech not in gaps_of(keyring.hsm).mechanisms, "the gap table says it cannot"
    assert result == plaintext


def test_pkcs1v15_decryption_is_opt_in(keyring: Keyring) -> None:
    """PKCS#1 v1.5 decryption is a padding oracle: refused unless the call opts in."""
    key = keyring.get("rsa2048")
    ciphertext = crypto_encrypt(pem_public(key), b"legacy", Mechanism.RSA_PKCS1)
    for attempt in (
        lambda: key.decrypt(ciphertext, "rsa-pkcs1"),
        lambda: key.decrypt_batch([ciphertext], "rsa-pkcs1"),
        lambda: key.decrypt_many([ciphertext], "rsa-pkcs1"),
        lambda: key.decrypt(ciphertext, "rsa-pkcs1", allow_pkcs1v15=1),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput, match=r"padding oracle.*rsa-oaep.*allow_pkcs1v15=True"):
            attempt()
    assert key.decrypt(ciphertext, "rsa-pkcs1", allow_pkcs1v15=True) == b"legacy"
    assert list(key.decrypt_many([ciphertext], "rsa-pkcs1", allow_pkcs1v15=True)) == [b"legacy"]


def test_raw_decryption(hsm: HSM, keyring: Keyring, unique_label: str) -> None:
    """rsa-raw gives RSADP's modulus-length block, only on a key made for it alone."""
    try:
        key = hsm.generate_key(RSA(2048), unique_label, usage="decrypt-raw")
    except MechanismNotSupported as exc:
        unsupported(hsm, Mechanism.RSA_RAW, exc)
    try:
        assert Mechanism.RSA_RAW not in gaps_of(hsm).mechanisms, "the gap table says it cannot"
        assert key.info.usage == hsm.get_key(unique_label).info.usage == {"decrypt-raw"}
        public = pem_public(key)
        assert isinstance(public, rsa.RSAPublicKey)
        n, e = public.public_numbers().n, public.public_numbers().e
        blocks = [os.urandom(256), os.urandom(100)]  # the second: a block of leading zeros
        blocks[0] = (int.from_bytes(blocks[0], "big") % n).to_bytes(256, "big")
        cts = [pow(int.from_bytes(m, "big"), e, n).to_bytes(256, "big") for m in blocks]
        assert key.decrypt(cts[1], "rsa-raw") == blocks[1].rjust(256, b"\0")
        stripped = cts[0].lstrip(b"\0")[1:]  # a shorter integer is padded to the modulus
        out = key.decrypt_batch([cts[0], stripped], Mechanism.RSA_RAW)
        assert out[0] == blocks[0] and len(out[1]) == 256
        assert pow(int.from_bytes(out[1], "big"), e, n) == int.from_bytes(stripped, "big")
        with pytest.raises(InvalidInput, match="not below"):
            key.decrypt(n.to_bytes(256, "big"), "rsa-raw")
        with pytest.raises(InvalidInput, match="not made for decrypt"):
            key.decrypt(crypto_encrypt(public, b"x", OAEP), OAEP)
        with pytest.raises(InvalidInput, match="not made for sign"):
            key.sign(b"x", Mechanism.RSA_PKCS1_SHA256)
    finally:
        key.delete()
    with pytest.raises(InvalidInput, match="not made for raw decryption"):
        keyring.get("rsa2048").decrypt(cts[0], "rsa-raw")
    for usage in ({"decrypt-raw", "decrypt"}, {"decrypt-raw", "sign"}):
        with pytest.raises(InvalidInput, match="stands alone"):
            hsm.generate_key(RSA(2048), unique_label + "-x", usage=usage)
    with pytest.raises(InvalidInput, match="cannot decrypt"):
        hsm.generate_key(EC("P-256"), unique_label + "-ec", usage="decrypt-raw")


def test_usage_is_enforced(hsm: HSM, weak_key: Key, unique_label: str) -> None:
    ciphertext = crypto_encrypt(pem_public(weak_key), b"p", Mechanism.RSA_PKCS1)
    with pytest.raises(InvalidInput, match="decrypt"):
        weak_key.decrypt(ciphertext, "rsa-pkcs1", allow_pkcs1v15=True)
    decrypt_only = hsm.generate_key(RSA(1024), unique_label, usage={"decrypt"})
    try:
        assert decrypt_only.info.usage == {"decrypt"}
        with pytest.raises(InvalidInput, match="sign"):
            decrypt_only.sign(b"x", "rsa-pkcs1-sha256")
        plaintext = b"decrypt-only works"
        ct = crypto_encrypt(pem_public(decrypt_only), plaintext, Mechanism.RSA_PKCS1)
        assert decrypt_only.decrypt(ct, "rsa-pkcs1", allow_pkcs1v15=True) == plaintext
    finally:
        decrypt_only.delete()
    if "p256" not in gaps_of(hsm).specs:
        with pytest.raises(InvalidInput, match="decrypt"):
            hsm.generate_key(EC("P-256"), unique_label + "-ec", usage={"sign", "decrypt"})


# -- finding, listing, deleting -------------------------------------------------------------


def test_get_key_by_label_and_by_id(hsm: HSM, unique_label: str) -> None:
    key_id = uuid.uuid4().hex
    spec = small_spec(hsm)
    made = hsm.generate_key(spec, unique_label, key_id=key_id)
    try:
        assert (made.label, made.id) == (unique_label, key_id)
        found = [
            hsm.get_key(unique_label),
            hsm.get_key(key_id=key_id),
            hsm.get_key(unique_label, key_id=key_id),
        ]
        for key in found:
            assert (key.label, key.id, key.spec) == (unique_label, key_id, spec)
            assert key.public_key_der() == made.public_key_der()
            signature = key.sign(b"found", small_mech(spec))
            assert crypto_verify(pem_public(made), signature, b"found", small_mech(spec))
        with pytest.raises(KeyNotFound):
            hsm.get_key(unique_label, key_id=uuid.uuid4().hex)
    finally:
        made.delete()


def test_generated_key_gets_an_id_it_can_be_found_by(hsm: HSM, unique_label: str) -> None:
    made = hsm.generate_key(small_spec(hsm), unique_label)
    try:
        assert made.id
        assert hsm.get_key(key_id=made.id).label == unique_label
    finally:
        made.delete()


def test_list_keys_reports_label_id_type_size_usage(
    hsm: HSM, keyring: Keyring, weak_key: Key
) -> None:
    expected = {
        keyring.get("rsa2048").label: ("rsa", 2048, None, ["decrypt", "sign"]),
        weak_key.label: ("rsa", 1024, None, ["sign"]),
    }
    for name, curve in (("p384", "P-384"), ("p521", "P-521")):
        if name not in gaps_of(hsm).specs:  # (the no-EC modules' gap is skipped elsewhere)
            expected[keyring.get(name).label] = ("ec", int(curve[2:]), curve, ["sign"])
    ids = {k.label: k.id for k in [*keyring.keys.values(), weak_key]}
    listed = {info.label: info for info in hsm.list_keys() if info.label in expected}
    assert set(listed) == set(expected)
    extra_usages = gaps_of(hsm).extra_usages
    for label, (kind, size, curve, usage) in expected.items():
        info = listed[label]
        if extra_usages and set(usage) < info.usage:
            usage = sorted(info.usage)  # the module's own defaults: see the skip below
        assert (info.key_type, info.size, info.curve, sorted(info.usage)) == (
            kind,
            size,
            curve,
            usage,
        )
        assert info.id == ids[label]
        assert info.to_dict() == {
            "label": label,
            "id": ids[label],
            "type": kind,
            "size": size,
            "curve": curve,
            "usage": usage,
        }
    if extra_usages:
        pytest.skip(f"module gap (the rest was checked): {extra_usages}")


def test_unknown_keys_are_not_found(hsm: HSM, unique_label: str) -> None:
    with pytest.raises(KeyNotFound, match=unique_label):
        hsm.get_key(unique_label)
    with pytest.raises(KeyNotFound):
        hsm.get_key(key_id=uuid.uuid4().hex)


def test_duplicate_label_or_id_is_refused(hsm: HSM, unique_label: str) -> None:
    key_id = uuid.uuid4().hex
    spec = small_spec(hsm)
    first = hsm.generate_key(spec, unique_label, key_id=key_id)
    try:
        with pytest.raises(KeyExists, match=unique_label):
            hsm.generate_key(spec, unique_label)
        with pytest.raises(KeyExists):
            hsm.generate_key(spec, unique_label + "-other", key_id=key_id)
        assert [i.id for i in hsm.list_keys() if i.label == unique_label] == [key_id]
        assert not [i for i in hsm.list_keys() if i.label == unique_label + "-other"]
        assert hsm.get_key(key_id=key_id).spec == spec
    finally:
        first.delete()


def test_deleted_key_is_gone(hsm: HSM, unique_label: str) -> None:
    spec = small_spec(hsm)
    key = hsm.generate_key(spec, unique_label)
    key.sign(b"before", small_mech(spec))
    key.delete()
    with pytest.raises(KeyNotFound):
        hsm.get_key(unique_label)
    with pytest.raises(KeyNotFound):
        hsm.get_key(key_id=key.id)
    assert unique_label not in {info.label for info in hsm.list_keys()}
    with pytest.raises(KeyNotFound):
        key.sign(b"after", small_mech(spec))
    with pytest.raises(KeyNotFound):
        key.delete()


# -- exports ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_pem_is_64_columns_and_parses(keyring: Keyring, name: str, tmp_path: Path) -> None:
    key = keyring.get(name)
    pem = key.public_key_pem()
    assert "\r" not in pem and pem.endswith("\n")
    lines = pem.split("\n")
    assert lines[0] == "-----BEGIN PUBLIC KEY-----"
    assert lines[-2:] == ["-----END PUBLIC KEY-----", ""]
    body = lines[1:-2]
    assert body and all(len(line) == 64 for line in body[:-1])
    assert 0 < len(body[-1]) <= 64
    assert all(re.fullmatch(r"[A-Za-z0-9+/]+=*", line) for line in body)
    der = base64.b64decode("".join(body), validate=True)
    assert der == key.public_key_der()
    assert OpenSSL(pem, tmp_path).parses()
    public = pem_public(key)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert public.public_bytes(serialization.Encoding.DER, spki) == key.public_key_der()
    spec = SPECS[name]
    if isinstance(spec, RSA):
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == spec.bits
    elif isinstance(spec, Ed25519):
        assert isinstance(public, ed25519.Ed25519PublicKey)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, _CURVES[spec.curve])


def independent_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 section 3, written out by hand: required members, lexicographic order."""
    if jwk["kty"] == "RSA":
        text = f'{{"e":"{jwk["e"]}","kty":"RSA","n":"{jwk["n"]}"}}'
    elif jwk["kty"] == "OKP":  # RFC 8037 appendix A.3
        text = f'{{"crv":"{jwk["crv"]}","kty":"OKP","x":"{jwk["x"]}"}}'
    else:
        text = f'{{"crv":"{jwk["crv"]}","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'
    return b64url(hashlib.sha256(text.encode("ascii")).digest())


def test_rfc7638_example_thumbprint() -> None:
    """The worked example of RFC 7638 section 3.1."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_"
        "BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
        "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTW"
        "hAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert independent_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rfc8037_example_thumbprint() -> None:
    """The Ed25519 JWK thumbprint of RFC 8037 appendix A.3."""
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert independent_thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize("name", ["rsa2048", "rsa4096", "p256", "p521", "ed25519"])
def test_jwk_members_and_kid(keyring: Keyring, name: str) -> None:
    key = keyring.get(name)
    jwk = key.public_key_jwk()
    public = pem_public(key)
    if isinstance(public, ed25519.Ed25519PublicKey):  # RFC 8037: OKP, x is the key itself
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert jwk == {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": jwk["kid"]}
    elif isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        assert set(jwk) == {"kty", "n", "e", "kid"}
        assert jwk["kty"] == "RSA"
        assert jwk["n"] == b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
        assert jwk["e"] == "AQAB" == b64url(numbers.e.to_bytes(3, "big"))
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        spec = SPECS[name]
        assert isinstance(spec, EC)
        point = public.public_numbers()
        size = spec.field_bytes
        assert set(jwk) == {"kty", "crv", "x", "y", "kid"}
        assert (jwk["kty"], jwk["crv"]) == ("EC", spec.curve)
        assert jwk["x"] == b64url(point.x.to_bytes(size, "big"))
        assert jwk["y"] == b64url(point.y.to_bytes(size, "big"))
    assert jwk["kid"] == independent_thumbprint(jwk) == key.jwk_thumbprint()
    assert "=" not in "".join(jwk.values())


def test_upload_json_exact_format(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    pem = key.public_key_pem()
    body = key.upload_json()
    assert body == '{"public_key": "' + pem.rstrip("\n").replace("\n", "\\n") + '"}'
    assert "\n" not in body
    assert json.loads(body) == {"public_key": pem.rstrip("\n")}
    assert key.upload_json(min_bits=2048) == body


def test_upload_json_refuses_weak_rsa(keyring: Keyring, weak_key: Key) -> None:
    with pytest.raises(InvalidInput) as info:
        weak_key.upload_json(min_bits=2048)
    assert "1024" in info.value.message and "2048" in info.value.message
    with pytest.raises(InvalidInput) as info:
        keyring.get("rsa2048").upload_json(min_bits=3072)
    assert "2048" in info.value.message and "3072" in info.value.message
    assert json.loads(weak_key.upload_json(min_bits=1024))["public_key"].startswith("-----BEGIN")


def test_upload_json_refuses_another_algorithm(keyring: Keyring) -> None:
    rsa_key, ec_key = keyring.get("rsa2048"), keyring.get("p256")
    with pytest.raises(InvalidInput) as info:
        ec_key.upload_json(key_type="rsa")
    assert "wants an RSA key" in info.value.message and "EC P-256" in info.value.message
    with pytest.raises(InvalidInput) as info:
        rsa_key.upload_json(key_type="ec")
    assert "wants an EC key" in info.value.message and "RSA-2048" in info.value.message
    assert rsa_key.upload_json(key_type="rsa") == rsa_key.upload_json()
    assert ec_key.upload_json(key_type="EC") == ec_key.upload_json()
    with pytest.raises(InvalidInput, match="key_type must be one of"):
        rsa_key.upload_json(key_type="dsa")


# -- batches ------------------------------------------------------------------------------

OAEP = Mechanism.RSA_OAEP_SHA1  # the OAEP every backend has (SoftHSM2: SHA-1 only)


def encrypt_many(key: Key, plaintexts: list[bytes]) -> list[bytes]:
    public = pem_public(key)
    return [crypto_encrypt(public, p, OAEP) for p in plaintexts]


def corrupt(ciphertext: bytes) -> bytes:
    flipped = bytearray(ciphertext)
    flipped[len(flipped) // 2] ^= 0x5A
    return bytes(flipped)


@pytest.mark.parametrize("threads", [None, 1, 3])
@pytest.mark.parametrize(
    ("name", "mech"), [("rsa2048", Mechanism.RSA_PKCS1_SHA256), ("p256", Mechanism.ECDSA_SHA256)]
)
def test_sign_batch_in_order_and_verified(
    keyring: Keyring, name: str, mech: Mechanism, threads: int | None
) -> None:
    key = keyring.get(name)
    messages = [message_for("batch", i) for i in range(24)]
    signatures = key.sign_batch(messages, mech.value, threads=threads)
    assert len(signatures) == len(messages)
    public = pem_public(key)
    for message, signature in zip(messages, signatures, strict=True):
        assert crypto_verify(public, signature, message, mech)


def test_sign_batch_prehashed_raw(keyring: Keyring) -> None:
    key = keyring.get("p384")
    mech = Mechanism.ECDSA_SHA384
    messages = [message_for("raw", i) for i in range(10)]
    signatures = key.sign_batch(
        [digest(mech, m) for m in messages], mech, prehashed=True, signature_format="raw"
    )
    for message, signature in zip(messages, signatures, strict=True):
        assert len(signature) == 96
        assert crypto_verify(pem_public(key), signature, message, mech, raw=True)


def test_decrypt_batch_in_order(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    plaintexts = [message_for("pt", i) for i in range(24)]
    assert key.decrypt_batch(encrypt_many(key, plaintexts), OAEP) == plaintexts
    assert key.decrypt_batch(encrypt_many(key, plaintexts), OAEP, threads=4) == plaintexts


def test_empty_and_single_item_batches(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    assert key.sign_batch([], "rsa-pss-sha256") == []
    assert key.decrypt_batch([], OAEP) == []
    assert list(key.sign_many([], "rsa-pss-sha256")) == []
    assert list(key.decrypt_many(iter([]), OAEP)) == []
    [signature] = key.sign_batch([b"one"], "rsa-pss-sha256")
    assert crypto_verify(pem_public(key), signature, b"one", Mechanism.RSA_PSS_SHA256)
    assert key.decrypt_batch(encrypt_many(key, [b"one"]), OAEP) == [b"one"]
    # batches always say which item failed; decrypt() raises the item's own error
    with pytest.raises(BatchItemError) as info:
        key.decrypt_batch([corrupt(encrypt_many(key, [b"one"])[0])], OAEP)
    assert info.value.index == 0 and isinstance(info.value.cause, corrupt_error(key))
    with pytest.raises(corrupt_error(key)):
        key.decrypt(corrupt(encrypt_many(key, [b"one"])[0]), OAEP)


def test_decrypt_batch_with_corrupt_item(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    plaintexts = [message_for("mixed", i) for i in range(11)]
    ciphertexts = encrypt_many(key, plaintexts)
    ciphertexts[5] = corrupt(ciphertexts[5])
    with pytest.raises(BatchItemError) as info:
        key.decrypt_batch(ciphertexts, OAEP, threads=3)
    assert info.value.index == 5
    assert isinstance(info.value.cause, corrupt_error(key))
    results = key.decrypt_batch(ciphertexts, OAEP, threads=3, return_exceptions=True)
    assert isinstance(results[5], corrupt_error(key))
    assert results[:5] + results[6:] == plaintexts[:5] + plaintexts[6:]
    # the key and its sessions are fine afterwards
    assert key.decrypt_batch(encrypt_many(key, plaintexts), OAEP, threads=3) == plaintexts


def test_batches_keep_input_errors_in_place(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    plaintexts = [message_for("inp", i) for i in range(8)]
    items: list[object] = list(encrypt_many(key, plaintexts))
    items[2] = "not bytes"
    items[6] = corrupt(items[6])  # type: ignore[arg-type]
    with pytest.raises(BatchItemError) as info:
        key.decrypt_batch(items, OAEP)  # type: ignore[arg-type]
    assert info.value.index == 2 and isinstance(info.value.cause, InvalidInput)
    results = key.decrypt_batch(items, OAEP, return_exceptions=True)  # type: ignore[arg-type]
    assert isinstance(results[2], InvalidInput) and isinstance(results[6], corrupt_error(key))
    assert [r for i, r in enumerate(results) if i not in (2, 6)] == [
        p for i, p in enumerate(plaintexts) if i not in (2, 6)
    ]

    mech = Mechanism.RSA_PSS_SHA256
    digests: list[object] = [digest(mech, p) for p in plaintexts]
    digests[3] = b"short"
    with pytest.raises(BatchItemError) as info:
        key.sign_batch(digests, mech, prehashed=True)  # type: ignore[arg-type]
    assert info.value.index == 3 and isinstance(info.value.cause, InvalidInput)
    signed = key.sign_batch(digests, mech, prehashed=True, return_exceptions=True)  # type: ignore[arg-type]
    assert isinstance(signed[3], InvalidInput)
    public = pem_public(key)
    for i, (d, s) in enumerate(zip(digests, signed, strict=True)):
        if i != 3:
            assert crypto_verify(public, s, d, mech, prehashed=True)  # type: ignore[arg-type]


# -- streaming ------------------------------------------------------------------------------


class Counting:
    """An input iterator that records how far it has been consumed."""

    def __init__(self, items: list[bytes]) -> None:
        self.items = items
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        for item in self.items:
            self.pulled += 1
            yield item


def test_sign_many_streams_in_order(keyring: Keyring) -> None:
    key = keyring.get("p256")
    mech = Mechanism.ECDSA_SHA256
    messages = [message_for("stream", i) for i in range(40)]
    source = Counting(messages)
    stream = key.sign_many(source, mech, threads=2, window=8)
    first = next(stream)
    assert source.pulled <= 8  # lazily consumed, one window at a time
    signatures = [first, *stream]
    assert source.pulled == 40
    public = pem_public(key)
    for message, signature in zip(messages, signatures, strict=True):
        assert crypto_verify(public, signature, message, mech)


def test_decrypt_many_streams_in_order_with_errors(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    plaintexts = [message_for("dm", i) for i in range(17)]
    ciphertexts = encrypt_many(key, plaintexts)
    ciphertexts[13] = corrupt(ciphertexts[13])
    results = list(key.decrypt_many(ciphertexts, OAEP, window=5, return_exceptions=True))
    assert isinstance(results[13], corrupt_error(key))
    assert results[:13] + results[14:] == plaintexts[:13] + plaintexts[14:]
    received = []
    with pytest.raises(BatchItemError) as info:
        for plaintext in key.decrypt_many(ciphertexts, OAEP, window=5, threads=2):
            received.append(plaintext)
    assert info.value.index == 13  # an index into the whole stream, not the window
    assert received == plaintexts[:10]


def test_stream_mechanism_is_checked_before_iteration(keyring: Keyring) -> None:
    with pytest.raises(MechanismNotSupported):
        keyring.get("rsa2048").sign_many([b"x"], "no-such-mechanism")
    with pytest.raises(InvalidInput):
        keyring.get("p256").decrypt_many([b"x"], OAEP)


def test_stream_window_and_threads_arguments(keyring: Keyring) -> None:
    key = keyring.get("p256")
    with pytest.raises(InvalidInput, match="window"):
        list(key.sign_many([b"x"], Mechanism.ECDSA_SHA256, window=-1))
    with pytest.raises(InvalidInput, match="window"):
        list(keyring.get("rsa2048").decrypt_many([b"x"], OAEP, window=-5))
    # threads below 1 mean one thread, as in sign_batch
    messages = [message_for("t", i) for i in range(3)]
    for signed in (
        key.sign_batch(messages, Mechanism.ECDSA_SHA256, threads=-2),
        list(key.sign_many(messages, Mechanism.ECDSA_SHA256, threads=-2)),
    ):
        for message, signature in zip(messages, signed, strict=True):
            assert crypto_verify(pem_public(key), signature, message, Mechanism.ECDSA_SHA256)


def test_stream_cancellation_leaves_key_usable(keyring: Keyring) -> None:
    key = keyring.get("rsa2048")
    mech = Mechanism.RSA_PKCS1_SHA256
    threads_before = threading.active_count()
    source = Counting([message_for("cancel", i) for i in range(200)])
    for count, _ in enumerate(key.sign_many(source, mech, threads=2, window=10), 1):
        if count == 3:
            break
    assert source.pulled <= 10
    assert threading.active_count() <= threads_before

    plaintexts = [message_for("boom", i) for i in range(30)]
    stream = key.decrypt_many(encrypt_many(key, plaintexts), OAEP, threads=2, window=4)
    with pytest.raises(RuntimeError, match="consumer failed"):
        for i, plaintext in enumerate(stream):
            assert plaintext == plaintexts[i]
            if i == 6:
                raise RuntimeError("consumer failed")
    assert threading.active_count() <= threads_before

    signature = key.sign(b"still works", mech)
    assert crypto_verify(pem_public(key), signature, b"still works", mech)
    assert list(key.decrypt_many(encrypt_many(key, plaintexts), OAEP, threads=2)) == plaintexts


# -- one-time keys (hsmbridge.onetime) -----------------------------------------------------

JWE_ENCS = ["A128GCM", "A192GCM", "A256GCM", "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512"]


def test_one_time_keys_with_an_independent_jose_library(keyring: Keyring, hsm: HSM) -> None:
    """jwcrypto verifies each key's context with the signer's JWK and encrypts a JWE to
    the key's JWK, for every JWE alg the HSM can decrypt and every enc; the service
    decrypts each once. An alg the module lacks is refused up front, never run with
    another hash (RSA-OAEP-256 end to end on opencryptoki; refused on SoftHSM2)."""
    from jwcrypto import jwe, jwk, jwt

    from hsmbridge import KeyExpired
    from hsmbridge.onetime import ALGS

    gaps = gaps_of(hsm)
    if gaps.one_time_keys is not None:
        if "ConfigurationError" in gaps.one_time_keys:
            with pytest.raises(ConfigurationError, match="several sessions used at once"):
                hsm.one_time_keys(RSA(2048), alg="RSA-OAEP")
        pytest.skip(f"module gap: {gaps.one_time_keys}")
    signer = keyring.get("rsa2048")
    verifier = jwk.JWKSet.from_json(json.dumps({"keys": [signer.public_key_jwk()]}))
    if Mechanism.RSA_OAEP_SHA256 not in gaps.mechanisms:  # the default where the HSM has it
        with hsm.one_time_keys(RSA(2048), pool=1, name=f"d{uuid.uuid4().hex[:10]}") as otk:
            assert otk.alg == "RSA-OAEP-256"
    elif type(hsm).__name__ != "NetHSM":
        with pytest.raises(MechanismNotSupported, match="pass alg='RSA-OAEP'"):
            hsm.one_time_keys(RSA(2048))
    ran = []
    for alg, mech in ALGS.items():
        if mech in gaps.mechanisms:
            if type(hsm).__name__ != "NetHSM":  # a NetHSM lists no mechanisms to check
                with pytest.raises(MechanismNotSupported, match=f"cannot decrypt {alg}"):
                    hsm.one_time_keys(RSA(2048), alg=alg)
            continue
        name = f"c{uuid.uuid4().hex[:10]}"
        with hsm.one_time_keys(
            RSA(2048), pool=len(JWE_ENCS), alg=alg, signer=signer, name=name
        ) as otk:
            for enc in JWE_ENCS:
                k = otk.issue()
                context = jwt.JWT(jwt=k.context, key=verifier)  # signature, exp and iat
                public = json.loads(context.claims)["jwk"]
                assert public == k.jwk and public["alg"] == alg and public["use"] == "enc"
                card = f"4111111111111111 {alg} {enc}".encode()
                if alg not in ("RSA-OAEP", "RSA-OAEP-256"):
                    # jwcrypto has no RSA-OAEP-384/512: the raw OAEP step, by cryptography
                    ciphertext = crypto_encrypt(jwk.JWK(**public).get_op_key("encrypt"), card, mech)
                    assert otk.decrypt(k.kid, ciphertext, mech) == card
                    continue
                token = jwe.JWE(card, protected={"alg": alg, "enc": enc, "kid": k.kid})
                token.add_recipient(jwk.JWK(**public))
                compact = token.serialize(compact=True)
                assert otk.decrypt_jwe(compact) == card
                with pytest.raises(KeyExpired, match="already used"):
                    otk.decrypt_jwe(compact)
        ran.append(alg)
    assert "RSA-OAEP" in ran
