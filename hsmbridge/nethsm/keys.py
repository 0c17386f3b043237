"""NetHSM key vocabulary: types, mechanisms, modes and public data.

Pure functions between hsmbridge's words (``RSA(2048)``, usage ``{"sign"}``,
``rsa-pss-sha256``) and NetHSM's (``RSA``, ``RSA_Signature_PSS_SHA256``,
``PSS_SHA256``), kept apart from the transport so they are easy to test.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..api import EC, RSA, KeySpec
from ..errors import HSMError, InvalidInput
from ..mechanisms import Mechanism

#: NetHSM key IDs (``components/schemas/ID`` in the OpenAPI spec).
KEY_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
#: NetHSM 5.0 labels are UTF-8 strings of at most 32 bytes.
MAX_LABEL_BYTES = 32

_EC_TYPES = {"P-256": "EC_P256", "P-384": "EC_P384", "P-521": "EC_P521"}
_EC_CURVES = {v: k for k, v in _EC_TYPES.items()}

_SIGN_MECHANISMS = {
    "rsa": (
        "RSA_Signature_PKCS1",
        "RSA_Signature_PSS_SHA256",
        "RSA_Signature_PSS_SHA384",
        "RSA_Signature_PSS_SHA512",
    ),
    "ec": ("ECDSA_Signature",),
}
_DECRYPT_MECHANISMS = (
    "RSA_Decryption_OAEP_SHA1",
    "RSA_Decryption_OAEP_SHA256",
    "RSA_Decryption_OAEP_SHA384",
    "RSA_Decryption_OAEP_SHA512",
    "RSA_Decryption_PKCS1",
)

#: hsmbridge mechanism -> (NetHSM key mechanism, NetHSM sign/decrypt mode).
_MODES: dict[Mechanism, tuple[str, str]] = {
    Mechanism.RSA_PKCS1_SHA256: ("RSA_Signature_PKCS1", "PKCS1"),
    Mechanism.RSA_PKCS1_SHA384: ("RSA_Signature_PKCS1", "PKCS1"),
    Mechanism.RSA_PKCS1_SHA512: ("RSA_Signature_PKCS1", "PKCS1"),
    Mechanism.RSA_PSS_SHA256: ("RSA_Signature_PSS_SHA256", "PSS_SHA256"),
    Mechanism.RSA_PSS_SHA384: ("RSA_Signature_PSS_SHA384", "PSS_SHA384"),
    Mechanism.RSA_PSS_SHA512: ("RSA_Signature_PSS_SHA512", "PSS_SHA512"),
    Mechanism.ECDSA_SHA256: ("ECDSA_Signature", "ECDSA"),
    Mechanism.ECDSA_SHA384: ("ECDSA_Signature", "ECDSA"),
    Mechanism.ECDSA_SHA512: ("ECDSA_Signature", "ECDSA"),
    Mechanism.RSA_OAEP_SHA1: ("RSA_Decryption_OAEP_SHA1", "OAEP_SHA1"),
    Mechanism.RSA_OAEP_SHA256: ("RSA_Decryption_OAEP_SHA256", "OAEP_SHA256"),
    Mechanism.RSA_OAEP_SHA384: ("RSA_Decryption_OAEP_SHA384", "OAEP_SHA384"),
    Mechanism.RSA_OAEP_SHA512: ("RSA_Decryption_OAEP_SHA512", "OAEP_SHA512"),
    Mechanism.RSA_PKCS1: ("RSA_Decryption_PKCS1", "PKCS1"),
}


def is_key_id(text: str) -> bool:
    """Whether ``text`` can be a NetHSM key ID (and so double as the label)."""
    return bool(KEY_ID_RE.match(text))


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not is_key_id(key_id):
        raise InvalidInput(
            f"{key_id!r} is not a valid NetHSM key ID: 1-128 characters of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit"
        )
    return key_id


def label_fits(label: str) -> bool:
    """Whether NetHSM 5.0 can store ``label`` as the key's label."""
    return len(label.encode("utf-8")) <= MAX_LABEL_BYTES


def key_type_body(spec: KeySpec) -> dict[str, Any]:
    """The ``type``/``length`` members of a ``/keys/generate`` body."""
    if isinstance(spec, RSA):
        return {"type": "RSA", "length": spec.bits}
    if isinstance(spec, EC):
        return {"type": _EC_TYPES[spec.curve]}
    raise InvalidInput(f"spec must be RSA(bits) or EC(curve), not {spec!r}")


def mechanisms_for(spec: KeySpec, usage: Iterable[str]) -> list[str]:
    """NetHSM key mechanisms that let a key do every hsmbridge mechanism of ``usage``."""
    uses = set(usage)
    out: list[str] = []
    if "sign" in uses:
        out.extend(_SIGN_MECHANISMS[spec.key_type])
    if "decrypt" in uses:
        out.extend(_DECRYPT_MECHANISMS)
    return out


def usage_of(mechanisms: Iterable[str]) -> frozenset[str]:
    """hsmbridge usage of a key from its NetHSM mechanisms."""
    uses = set()
    for m in mechanisms:
        if "_Signature" in m:
            uses.add("sign")
        elif m.startswith("RSA_Decryption_"):
            uses.add("decrypt")
    return frozenset(uses)


def mode_for(mech: Mechanism) -> tuple[str, str]:
    """(NetHSM key mechanism the key needs, request ``mode``) for an hsmbridge mechanism."""
    return _MODES[mech]


def offered_mechanisms(spec: KeySpec, key_mechanisms: Iterable[str], *, sign: bool) -> list[str]:
    """hsmbridge mechanisms a key with these NetHSM mechanisms can do."""
    have = set(key_mechanisms)
    return [
        m.value
        for m, (needed, _) in _MODES.items()
        if m.is_sign == sign and m.key_type == spec.key_type and needed in have
    ]


def b64decode(text: Any, what: str) -> bytes:
    """Strict base64 decoding of a server answer, as an hsmbridge error if malformed."""
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise HSMError(f"the NetHSM answered malformed base64 in {what}") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def spec_of(data: Mapping[str, Any]) -> KeySpec | None:
    """The key spec of a ``GET /keys/{id}`` answer, or None for key types hsmbridge skips."""
    kind = data.get("type")
    if kind == "RSA":
        public = data.get("public") or {}
        modulus = int.from_bytes(b64decode(public.get("modulus", ""), "the RSA modulus"), "big")
        bits = modulus.bit_length()
        try:
            return RSA(bits)
        except InvalidInput:
            return None
    curve = _EC_CURVES.get(str(kind))
    return EC(curve) if curve else None


def public_key_der(spec: KeySpec, public: Mapping[str, Any]) -> bytes:
    """SubjectPublicKeyInfo DER from the ``public`` member of a key's data."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    try:
        if isinstance(spec, RSA):
            n = int.from_bytes(b64decode(public["modulus"], "the RSA modulus"), "big")
            e = int.from_bytes(b64decode(public["publicExponent"], "the RSA exponent"), "big")
            key = rsa.RSAPublicNumbers(e, n).public_key()
        else:
            curves: dict[str, ec.EllipticCurve] = {
                "P-256": ec.SECP256R1(),
                "P-384": ec.SECP384R1(),
                "P-521": ec.SECP521R1(),
            }
            point = b64decode(public["data"], "the EC point")
            key = ec.EllipticCurvePublicKey.from_encoded_point(curves[spec.curve], point)
    except (KeyError, ValueError, TypeError) as exc:
        raise HSMError(f"the NetHSM answered unusable public key data: {exc}") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_data(private_key: Any) -> tuple[KeySpec, dict[str, str]]:
    """(spec, NetHSM ``KeyPrivateData``) of a ``cryptography`` RSA or EC private key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        numbers = private_key.private_numbers()
        spec: KeySpec = RSA(private_key.key_size)
        values = {
            "primeP": numbers.p,
            "primeQ": numbers.q,
            "publicExponent": numbers.public_numbers.e,
        }
        return spec, {k: b64encode(_unsigned(v)) for k, v in values.items()}
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
            private_key.curve.name
        )
        if curve is not None:
            ec_spec = EC(curve)
            scalar = private_key.private_numbers().private_value
            return ec_spec, {"data": b64encode(scalar.to_bytes(ec_spec.field_bytes, "big"))}
    raise InvalidInput(
        f"cannot import {type(private_key).__name__}; give a cryptography RSA private key or "
        "an EC one on P-256, P-384 or P-521"
    )


def _unsigned(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def ecdsa_input(digest: bytes, spec: KeySpec) -> bytes:
    """Truncate a digest longer than the curve's order, as ECDSA does (FIPS 186-5 6.4.1).

    PKCS#11 ``CKM_ECDSA`` truncates inside the token; NetHSM refuses digests
    longer than the group instead, so the client does it for the same result.
    """
    if isinstance(spec, EC) and len(digest) > spec.field_bytes and spec.size % 8 == 0:
        return digest[: spec.field_bytes]
    return digest
