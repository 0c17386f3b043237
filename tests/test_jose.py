"""JOSE with HSM keys, checked against an independent JOSE library (jwcrypto).

jwcrypto encrypts JWEs to the key's exported JWK and verifies the JWS/JWT
hsmbridge signs; hsmbridge's own code is never its own oracle. Runs on every
backend (PKCS#11 and NetHSM through ``hsmbridge serve``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws
from jwcrypto import jwt as jw_jwt

from hsmbridge import (
    EC,
    HSM,
    RSA,
    DecryptionFailed,
    Ed25519,
    InvalidInput,
    Key,
    MechanismNotSupported,
    jose,
)

PLAINTEXT = b'{"cardNumber":"4111111111111111","securityCode":"123"}'


@pytest.fixture(scope="module")
def rsa_key(hsm: HSM) -> Iterator[Key]:
    key = hsm.generate_key(RSA(2048), f"jose-{uuid.uuid4().hex[:8]}", usage={"decrypt", "sign"})
    yield key
    key.delete()


@pytest.fixture(scope="module")
def other_key(hsm: HSM) -> Iterator[Key]:
    key = hsm.generate_key(RSA(2048), f"jose-other-{uuid.uuid4().hex[:8]}", usage={"decrypt"})
    yield key
    key.delete()


def public_jwk(key: Key) -> jw_jwk.JWK:
    return jw_jwk.JWK(**key.public_key_jwk())


def encrypt(key: Key, alg: str, enc: str, plaintext: bytes = PLAINTEXT, **extra: object) -> str:
    """A compact JWE made by jwcrypto, as a browser-side library would."""
    header = {"alg": alg, "enc": enc, "kid": key.jwk_thumbprint(), **extra}
    token = jw_jwe.JWE(plaintext, protected=json.dumps(header))
    token.add_recipient(public_jwk(key))
    return str(token.serialize(compact=True))


def supports(key: Key, alg: str) -> bool:
    """Whether the HSM unwraps with this alg's OAEP hash (SoftHSM2: SHA-1 only)."""
    try:
        jose.decrypt_jwe(key, encrypt(key, alg, "A256GCM"))
    except MechanismNotSupported:
        return False
    return True


@pytest.mark.parametrize("enc", list(jose.JWE_ENCS))
@pytest.mark.parametrize("alg", ["RSA-OAEP", "RSA-OAEP-256"])  # what jwcrypto can encrypt
def test_decrypts_what_jwcrypto_encrypts(rsa_key: Key, alg: str, enc: str) -> None:
    token = encrypt(rsa_key, alg, enc)
    if not supports(rsa_key, alg):
        with pytest.raises(MechanismNotSupported, match=jose.JWE_ALGS[alg]):
            jose.decrypt_jwe(rsa_key, token)
        pytest.skip(f"the HSM has no {jose.JWE_ALGS[alg]} (SoftHSM2 2.6: OAEP with SHA-1 only)")
    assert jose.decrypt_jwe(rsa_key, token) == PLAINTEXT


def test_batch_matches_single_and_keeps_failures_in_place(rsa_key: Key, other_key: Key) -> None:
    tokens: list[str | bytes] = [
        encrypt(rsa_key, "RSA-OAEP", "A256GCM", f"card {i}".encode()) for i in range(12)
    ]
    tokens[3] = encrypt(other_key, "RSA-OAEP", "A256GCM", b"for someone else")
    tokens[7] = "not.a.jwe"
    out = jose.decrypt_jwe_batch(rsa_key, tokens, return_exceptions=True)
    assert isinstance(out[3], DecryptionFailed) and isinstance(out[7], InvalidInput)
    for i in set(range(12)) - {3, 7}:
        assert out[i] == f"card {i}".encode()
    with pytest.raises(DecryptionFailed):
        jose.decrypt_jwe_batch(rsa_key, tokens[:5])


def _tamper(token: str, part: int, change: bytes | None = None) -> str:
    parts = token.split(".")
    raw = jose._unb64url(parts[part], "part")
    parts[part] = jose.b64url(change if change is not None else raw[:-1] + bytes([raw[-1] ^ 1]))
    return ".".join(parts)


def test_every_damage_after_the_header_is_one_error(rsa_key: Key, other_key: Key) -> None:
    """A failed unwrap and a failed tag must look the same: no padding oracle."""
    good = encrypt(rsa_key, "RSA-OAEP", "A256GCM")
    cbc = encrypt(rsa_key, "RSA-OAEP", "A128CBC-HS256")
    damaged = [
        _tamper(good, 1),  # the wrapped CEK: the RSA unwrap fails
        _tamper(good, 4),  # the GCM tag
        _tamper(good, 3),  # the ciphertext
        _tamper(good, 2),  # the IV
        _tamper(cbc, 4),  # the CBC-HMAC tag
        _tamper(cbc, 3),
        encrypt(other_key, "RSA-OAEP", "A256GCM"),  # the wrong key
        _tamper(good, 1, b"\x00" * 16),  # a wrapped key of the wrong size
    ]
    messages = set()
    for token in damaged:
        with pytest.raises(DecryptionFailed) as info:
            jose.decrypt_jwe(rsa_key, token)
        messages.add(info.value.message)
        assert "4111" not in info.value.message
    assert len(messages) == 1


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"alg": "dir", "enc": "A256GCM"}, "dir"),
        ({"alg": "none", "enc": "A256GCM"}, "none"),
        ({"alg": "RSA1_5", "enc": "A256GCM"}, "RSA1_5"),
        ({"alg": "RSA-OAEP", "enc": "A999GCM"}, "A999GCM"),
        ({"alg": "RSA-OAEP", "enc": "A256GCM", "zip": "DEF"}, "zip"),
        ({"alg": "RSA-OAEP", "enc": "A256GCM", "crit": ["exp"], "exp": 1}, "exp"),
        ({"alg": "RSA-OAEP", "enc": "A256GCM", "crit": "exp"}, "crit"),
    ],
)
def test_headers_that_are_refused(rsa_key: Key, header: dict[str, object], match: str) -> None:
    good = encrypt(rsa_key, "RSA-OAEP", "A256GCM").split(".")
    token = ".".join([jose.b64url(json.dumps(header).encode()), *good[1:]])
    with pytest.raises(InvalidInput, match=match):
        jose.decrypt_jwe(rsa_key, token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b.c",
        "a.b.c.d.e.f",
        "!!!.a.b.c.d",
        jose.b64url(b"[1]") + ".a.b.c.d",
        jose.b64url(b"\xff\xfe") + ".a.b.c.d",
        jose.b64url(b"[" * 100_000) + ".a.b.c.d",
        "x" * (jose.MAX_TOKEN_BYTES + 1),
        b"\xff.a.b.c.d",
        12345,
    ],
)
def test_malformed_tokens(rsa_key: Key, token: object) -> None:
    with pytest.raises(InvalidInput):
        jose.decrypt_jwe(rsa_key, token)  # type: ignore[arg-type]


# -- signing -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ec_keys(hsm: HSM) -> Iterator[dict[str, Key]]:
    keys = {
        alg: hsm.generate_key(EC(curve), f"jose-{alg}-{uuid.uuid4().hex[:8]}")
        for alg, curve in jose._ES_CURVE.items()
    }
    yield keys
    for key in keys.values():
        key.delete()


@pytest.fixture(scope="module")
def ed_key(hsm: HSM) -> Iterator[Key]:
    key = hsm.generate_key(Ed25519(), f"jose-ed-{uuid.uuid4().hex[:8]}")
    yield key
    key.delete()


@pytest.mark.parametrize("alg", list(jose.JWS_ALGS))
def test_jwcrypto_verifies_jws_and_jwt(
    rsa_key: Key, ec_keys: dict[str, Key], ed_key: Key, alg: str
) -> None:
    key = ed_key if alg == "EdDSA" else ec_keys.get(alg, rsa_key)
    token = jose.sign_jws(key, b"payload \x00\xff", alg)
    verified = jw_jws.JWS()
    verified.deserialize(token)
    verified.verify(public_jwk(key), alg=alg)
    assert verified.payload == b"payload \x00\xff"
    assert verified.jose_header["kid"] == key.jwk_thumbprint()

    claims = {"sub": "checkout-42", "exp": 4102444800}
    jwt = jose.sign_jwt(key, claims, alg)
    checked = jw_jwt.JWT(jwt=jwt, key=public_jwk(key), algs=[alg])
    assert json.loads(checked.claims) == claims
    assert json.loads(jose._unb64url(jwt.split(".")[0], "header")) == {
        "alg": alg,
        "kid": key.jwk_thumbprint(),
        "typ": "JWT",
    }


def test_signing_refusals(rsa_key: Key, ec_keys: dict[str, Key]) -> None:
    with pytest.raises(InvalidInput, match="none"):
        jose.sign_jws(rsa_key, b"x", "none")
    with pytest.raises(InvalidInput, match="P-384"):
        jose.sign_jws(ec_keys["ES256"], b"x", "ES384")
    with pytest.raises(InvalidInput, match="EC key"):
        jose.sign_jws(ec_keys["ES256"], b"x", "RS256")
    with pytest.raises(InvalidInput, match="alg"):
        jose.sign_jws(rsa_key, b"x", "RS256", headers={"alg": "HS256"})
    with pytest.raises(InvalidInput, match="JSON"):
        jose.sign_jwt(rsa_key, {"when": object()}, "RS256")
