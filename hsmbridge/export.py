"""Public key encodings: SPKI DER/PEM, JWK with RFC 7638 thumbprint, upload JSON.

All of them start from SubjectPublicKeyInfo DER, which every backend can give,
so exports are identical whichever HSM holds the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import textwrap

from asn1crypto import keys as asn1_keys

from . import curves
from .errors import InvalidInput


def der_to_pem(der: bytes, label: str = "PUBLIC KEY") -> str:
    """PEM with base64 lines of exactly 64 characters and ``\\n`` line endings."""
    body = base64.b64encode(der).decode("ascii")
    lines = textwrap.wrap(body, 64)
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def int_to_bytes(value: int, length: int | None = None) -> bytes:
    """Big-endian unsigned bytes: ``length`` of them, or as few as hold ``value`` (at least 1)."""
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def _load_spki(der: bytes) -> asn1_keys.PublicKeyInfo:
    try:
        info = asn1_keys.PublicKeyInfo.load(der)
        _ = info.native  # force a full parse so corrupt DER fails here
    except ValueError as exc:
        raise InvalidInput(f"not a DER SubjectPublicKeyInfo: {exc}") from None
    return info


def jwk(der: bytes) -> dict[str, str]:
    """JWK for an RSA, EC or Ed25519 (RFC 8037 ``OKP``) SPKI, ``kid`` = RFC 7638 thumbprint."""
    info = _load_spki(der)
    algo = info.algorithm
    if algo == "rsa":
        pub = info["public_key"].parsed
        members = {
            "kty": "RSA",
            "n": _b64url(int_to_bytes(pub["modulus"].native)),
            "e": _b64url(int_to_bytes(pub["public_exponent"].native)),
        }
    elif algo == "ec":
        curve = curves.by_oid_name(info.curve[1])
        if curve is None:
            raise InvalidInput(f"curve {info.curve[1]} has no JWK name; use {curves.NAMES}")
        x, y = info["public_key"].to_coords()
        members = {
            "kty": curve.jwk_kty,
            "crv": curve.name,
            "x": _b64url(int_to_bytes(x, curve.field_bytes)),
            "y": _b64url(int_to_bytes(y, curve.field_bytes)),
        }
    elif (curve := curves.by_oid_name(algo)) is not None:  # RFC 8037: the key is the point
        members = {
            "kty": curve.jwk_kty,
            "crv": curve.name,
            "x": _b64url(bytes(info["public_key"])),
        }
    else:
        raise InvalidInput(
            f"{algo} keys have no JWK form here; only RSA, EC and Ed25519 are supported"
        )
    members["kid"] = jwk_thumbprint(members)
    return members


#: the members an RFC 7638 thumbprint covers, by ``kty`` (RFC 7638 section 3.2; RFC 8037 A.3)
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


def jwk_thumbprint(members: dict[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    required = _THUMBPRINT_MEMBERS[members["kty"]]
    canonical = json.dumps({k: members[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


#: key type a provider may ask for -> how to make one (for messages)
_MAKE_KEY = {"rsa": "RSA(2048), or --type rsa:2048", "ec": 'EC("P-256"), or --type ec:p256'}


def upload_json(der: bytes, *, min_bits: int = 2048, key_type: str | None = None) -> str:
    """``{"public_key": PEM}`` as payment providers ask for it; refuses weak keys.

    ``key_type`` (``"rsa"``, ``"ec"``) is the algorithm the provider wants:
    a key of another algorithm is refused, naming both.
    """
    if not isinstance(min_bits, int) or isinstance(min_bits, bool) or min_bits < 0:
        raise InvalidInput(f"min_bits must be a whole number of bits, not {min_bits!r}")
    info = _load_spki(der)
    if key_type is not None:
        wanted = str(key_type).lower()
        if wanted not in _MAKE_KEY:
            raise InvalidInput(f"key_type must be one of {sorted(_MAKE_KEY)}, not {key_type!r}")
        if info.algorithm != wanted:
            raise InvalidInput(
                f"the provider wants an {wanted.upper()} key but this is an {_describe(info)} "
                f"key; upload an {wanted.upper()} key instead ({_MAKE_KEY[wanted]})"
            )
    if info.algorithm == "rsa" and info.bit_size < min_bits:
        raise InvalidInput(
            f"the key is {_describe(info)}, below the required minimum of {min_bits} bits; "
            f"generate an RSA({max(min_bits, 2048)}) key for upload"
        )
    return json.dumps({"public_key": der_to_pem(der).rstrip("\n")})


def _describe(info: asn1_keys.PublicKeyInfo) -> str:
    """``RSA-2048`` or ``EC P-256``, for messages."""
    if info.algorithm == "rsa":
        return f"RSA-{info.bit_size}"
    if info.algorithm == "ec":
        curve = curves.by_oid_name(info.curve[1])
        return f"EC {curve.name if curve else info.curve[1]}"
    return str(info.algorithm).upper()
