"""NetHSM's vocabulary: key types, key mechanisms, modes, IDs, labels, public data.

Pure functions between hsmbridge's words (``RSA(2048)``, usage ``{"sign"}``,
``rsa-pss-sha256``) and NetHSM's (``RSA``, ``RSA_Signature_PSS_SHA256``,
``PSS_SHA256``). The NetHSM backend (a client of the API) and ``hsmbridge
serve`` (a server of it) both speak through this module, so each fact of the
API is written once. Errors are :class:`InvalidInput` (a client's bad value)
or :class:`HSMError` (an answer that breaks the API).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .. import curves
from ..api import EC, RSA, Ed25519, KeySpec, curve_spec
from ..errors import HSMError, InvalidInput
from ..export import int_to_bytes
from ..mechanisms import RAW_USAGE, Mechanism

#: NetHSM key IDs (``components/schemas/ID`` in the OpenAPI spec).
KEY_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
#: NetHSM 5.0 labels are UTF-8 strings of at most 32 bytes.
MAX_LABEL_BYTES = 32

#: every key type of the API (``KeyType``); hsmbridge makes RSA and the curves in
#: :mod:`hsmbridge.curves`
ALL_TYPES = frozenset(
    {"RSA", "Curve25519", "EC_P256K1", "BrainpoolP256", "BrainpoolP384", "BrainpoolP512", "Generic"}
    | {c.nethsm_type for c in curves.CURVES}
)

#: NetHSM's type for symmetric (AES) keys
GENERIC = "Generic"

#: every key mechanism of the API (``KeyMechanism``), by the key family that may carry it
KEY_MECHANISMS: dict[str, tuple[str, ...]] = {
    "rsa": (
        "RSA_Decryption_RAW",
        "RSA_Decryption_PKCS1",
        "RSA_Decryption_OAEP_MD5",
        "RSA_Decryption_OAEP_SHA1",
        "RSA_Decryption_OAEP_SHA224",
        "RSA_Decryption_OAEP_SHA256",
        "RSA_Decryption_OAEP_SHA384",
        "RSA_Decryption_OAEP_SHA512",
        "RSA_Signature_PKCS1",
        "RSA_Signature_PSS_MD5",
        "RSA_Signature_PSS_SHA1",
        "RSA_Signature_PSS_SHA224",
        "RSA_Signature_PSS_SHA256",
        "RSA_Signature_PSS_SHA384",
        "RSA_Signature_PSS_SHA512",
    ),
    "ec": ("ECDSA_Signature",),
    "ed25519": ("EdDSA_Signature",),
    "aes": ("AES_Encryption_CBC", "AES_Decryption_CBC"),
    "other": ("BIP340_Signature",),
}
ALL_MECHANISMS = frozenset(m for group in KEY_MECHANISMS.values() for m in group)

#: sign and decrypt ``mode`` -> the key mechanism a key needs for it
SIGN_MODES = {
    "PKCS1": "RSA_Signature_PKCS1",
    "PSS_MD5": "RSA_Signature_PSS_MD5",
    "PSS_SHA1": "RSA_Signature_PSS_SHA1",
    "PSS_SHA224": "RSA_Signature_PSS_SHA224",
    "PSS_SHA256": "RSA_Signature_PSS_SHA256",
    "PSS_SHA384": "RSA_Signature_PSS_SHA384",
    "PSS_SHA512": "RSA_Signature_PSS_SHA512",
    "EdDSA": "EdDSA_Signature",
    "ECDSA": "ECDSA_Signature",
    "BIP340": "BIP340_Signature",
}
DECRYPT_MODES = {
    "RAW": "RSA_Decryption_RAW",
    "PKCS1": "RSA_Decryption_PKCS1",
    "OAEP_MD5": "RSA_Decryption_OAEP_MD5",
    "OAEP_SHA1": "RSA_Decryption_OAEP_SHA1",
    "OAEP_SHA224": "RSA_Decryption_OAEP_SHA224",
    "OAEP_SHA256": "RSA_Decryption_OAEP_SHA256",
    "OAEP_SHA384": "RSA_Decryption_OAEP_SHA384",
    "OAEP_SHA512": "RSA_Decryption_OAEP_SHA512",
    "AES_CBC": "AES_Decryption_CBC",
}

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
    Mechanism.ED25519: ("EdDSA_Signature", "EdDSA"),
    Mechanism.RSA_OAEP_SHA1: ("RSA_Decryption_OAEP_SHA1", "OAEP_SHA1"),
    Mechanism.RSA_OAEP_SHA256: ("RSA_Decryption_OAEP_SHA256", "OAEP_SHA256"),
    Mechanism.RSA_OAEP_SHA384: ("RSA_Decryption_OAEP_SHA384", "OAEP_SHA384"),
    Mechanism.RSA_OAEP_SHA512: ("RSA_Decryption_OAEP_SHA512", "OAEP_SHA512"),
    Mechanism.RSA_PKCS1: ("RSA_Decryption_PKCS1", "PKCS1"),
    Mechanism.RSA_RAW: ("RSA_Decryption_RAW", "RAW"),
}


def is_key_id(text: str) -> bool:
    """Whether ``text`` can be a NetHSM key ID (and so double as the label)."""
    return isinstance(text, str) and KEY_ID_RE.fullmatch(text) is not None


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


def type_of(spec: KeySpec) -> str:
    """The NetHSM key type of a spec (``RSA``, ``EC_P256``, ``Curve25519``, ...)."""
    if isinstance(spec, RSA):
        return "RSA"
    if isinstance(spec, (EC, Ed25519)):
        return spec.curve_info.nethsm_type
    raise InvalidInput(f"spec must be RSA(bits), EC(curve) or Ed25519(), not {spec!r}")


def key_type_body(spec: KeySpec) -> dict[str, Any]:
    """The ``type``/``length`` members of a ``/keys/generate`` body."""
    if isinstance(spec, RSA):
        return {"type": "RSA", "length": spec.bits}
    return {"type": type_of(spec)}


def spec_for(key_type: str, length: object) -> KeySpec:
    """The hsmbridge key spec for a NetHSM type (and an RSA ``length``)."""
    if key_type == "RSA":
        if not isinstance(length, int) or isinstance(length, bool):
            raise InvalidInput("RSA keys need an integer 'length' (e.g. 2048)")
        return RSA(length)
    curve = curves.by_nethsm_type(key_type)
    if curve is None:
        made = ", ".join(["RSA", *(c.nethsm_type for c in curves.CURVES)])
        raise InvalidInput(f"key type {key_type} is not supported by hsmbridge; it makes {made}")
    return curve_spec(curve)


def _family(key_type: str) -> str:
    """The :data:`KEY_MECHANISMS` family of a NetHSM key type."""
    if key_type == "RSA":
        return "rsa"
    if key_type == GENERIC:
        return "aes"
    curve = curves.by_nethsm_type(key_type)
    return curve_spec(curve).key_type if curve is not None else "other"


def check_mechanisms(key_type: str, mechanisms: object) -> list[str]:
    """Validate a key's mechanism list against its type; return it sorted, deduplicated."""
    if not isinstance(mechanisms, list) or not all(isinstance(m, str) for m in mechanisms):
        raise InvalidInput("mechanisms must be a list of KeyMechanism strings")
    unknown = sorted(set(mechanisms) - ALL_MECHANISMS)
    if unknown:
        raise InvalidInput(f"unknown key mechanisms: {', '.join(unknown)}")
    allowed = KEY_MECHANISMS[_family(key_type)]
    wrong = sorted(set(mechanisms) - set(allowed))
    if wrong:
        raise InvalidInput(
            f"mechanisms {', '.join(wrong)} do not fit a {key_type} key; use: {', '.join(allowed)}"
        )
    if not mechanisms:
        raise InvalidInput(
            f"a key needs at least one mechanism; for {key_type}: {', '.join(allowed)}"
        )
    return sorted(set(mechanisms))


def mechanisms_for(spec: KeySpec, usage: Iterable[str]) -> list[str]:
    """NetHSM key mechanisms that let a key do every hsmbridge mechanism of ``usage``."""
    uses = set(usage)
    needed = (
        key_mechanism
        for mech, (key_mechanism, _) in _MODES.items()
        if mech.key_type == spec.key_type and mech.usage in uses
    )
    return list(dict.fromkeys(needed))


def usage_of(mechanisms: Iterable[str]) -> frozenset[str]:
    """hsmbridge usage of a key from its NetHSM mechanisms (``RSA_Decryption_RAW``: the
    usage of raw decryption)."""
    uses = set()
    for m in mechanisms:
        if "_Signature" in m:
            uses.add("sign")
        elif m == _MODES[Mechanism.RSA_RAW][0]:
            uses.add(RAW_USAGE)
        elif m.startswith("RSA_Decryption_"):
            uses.add("decrypt")
    return frozenset(uses)


def performable(key_type: str, offered: Iterable[Mechanism]) -> list[str]:
    """The NetHSM key mechanisms of ``key_type`` that some ``offered`` hsmbridge mechanism
    performs (the PSS/OAEP hashes hsmbridge lacks: none does)."""
    offered = set(offered)
    can = {key_mechanism for m, (key_mechanism, _) in _MODES.items() if m in offered}
    return [m for m in KEY_MECHANISMS[_family(key_type)] if m in can]


#: how ``hsmbridge serve`` lists, in a refusal, the key mechanisms its token performs
_PERFORMABLE = "mechanisms that work for {} keys here: "
_PERFORMABLE_RE = re.compile(_PERFORMABLE.format(r"\S+") + r"([A-Za-z0-9_]+(?:, [A-Za-z0-9_]+)*)")


def unperformable_message(where: str, key_type: str, missing: list[str], works: list[str]) -> str:
    """``hsmbridge serve``'s refusal of key mechanisms its token cannot perform."""
    return (
        f"{where} cannot perform {', '.join(missing)}; "
        + _PERFORMABLE.format(key_type)
        + (", ".join(works) or "none")
    )


def refuses_labels(message: str) -> bool:
    """Whether a 400 is a NetHSM before 5.0 refusing the ``label`` field (and not, say,
    ``hsmbridge serve`` refusing mechanisms of a token whose name holds "label")."""
    return "label" in message.lower() and _PERFORMABLE_RE.search(message) is None


def narrowed(requested: list[str], message: str) -> list[str] | None:
    """The requested mechanisms a refusal (:func:`unperformable_message`) says work, if
    they still cover every use the request had; else None (the refusal stands)."""
    found = _PERFORMABLE_RE.search(message)
    if found is None:
        return None
    works = set(found.group(1).split(", "))
    kept = [m for m in requested if m in works]
    if len(kept) == len(requested) or not usage_of(requested) <= usage_of(kept):
        return None
    return kept


def mode_for(mech: Mechanism) -> tuple[str, str]:
    """(NetHSM key mechanism the key needs, request ``mode``) for an hsmbridge mechanism."""
    return _MODES[mech]


#: (mode, is a sign mode) -> hsmbridge mechanisms, in _MODES order (one lookup per request)
_MECHANISMS_OF_MODE: dict[tuple[str, bool], tuple[Mechanism, ...]] = {}
for _mech, (_, _mode) in _MODES.items():
    _key = (_mode, _mech.is_sign)
    _MECHANISMS_OF_MODE[_key] = (*_MECHANISMS_OF_MODE.get(_key, ()), _mech)


def mechanisms_of_mode(mode: str, *, sign: bool) -> list[Mechanism]:
    """The hsmbridge mechanisms whose token operation is NetHSM's ``mode`` (may be empty)."""
    return list(_MECHANISMS_OF_MODE.get((mode, sign), ()))


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
    curve = curves.by_nethsm_type(str(kind))
    return curve_spec(curve) if curve else None


def public_key_der(spec: KeySpec, public: Mapping[str, Any]) -> bytes:
    """SubjectPublicKeyInfo DER from the ``public`` member of a key's data."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    try:
        if isinstance(spec, RSA):
            n = int.from_bytes(b64decode(public["modulus"], "the RSA modulus"), "big")
            e = int.from_bytes(b64decode(public["publicExponent"], "the RSA exponent"), "big")
            key = rsa.RSAPublicNumbers(e, n).public_key()
        elif isinstance(spec, Ed25519):
            raw = b64decode(public["data"], "the Ed25519 public key")
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
        else:
            point = b64decode(public["data"], "the EC point")
            key = ec.EllipticCurvePublicKey.from_encoded_point(
                spec.curve_info.crypto_curve(), point
            )
    except (KeyError, ValueError, TypeError) as exc:
        raise HSMError(f"the NetHSM answered unusable public key data: {exc}") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_data(private_key: Any) -> tuple[KeySpec, dict[str, str]]:
    """(spec, NetHSM ``KeyPrivateData``) of a ``cryptography`` RSA, EC or Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        numbers = private_key.private_numbers()
        spec: KeySpec = RSA(private_key.key_size)
        values = {
            "primeP": numbers.p,
            "primeQ": numbers.q,
            "publicExponent": numbers.public_numbers.e,
        }
        return spec, {k: b64encode(int_to_bytes(v)) for k, v in values.items()}
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        curve = curves.by_oid_name(private_key.curve.name)
        if curve is not None:
            scalar = private_key.private_numbers().private_value
            return EC(curve.name), {"data": b64encode(int_to_bytes(scalar, curve.field_bytes))}
    if isinstance(private_key, ed25519.Ed25519PrivateKey):  # the RFC 8032 seed
        seed = private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return Ed25519(), {"data": b64encode(seed)}
    raise InvalidInput(
        f"cannot import {type(private_key).__name__}; give a cryptography RSA private key, "
        f"an EC one on {curves.NAMES}, or an Ed25519 one"
    )


def public_data(spki_der: bytes) -> dict[str, str]:
    """NetHSM's ``public`` of a key: modulus/publicExponent for RSA, the EC point or the
    Ed25519 public key as ``data``."""
    from asn1crypto import keys as asn1_keys

    info = asn1_keys.PublicKeyInfo.load(spki_der)
    if info.algorithm == "rsa":
        pub = info["public_key"].parsed
        return {
            "modulus": b64encode(int_to_bytes(pub["modulus"].native)),
            "publicExponent": b64encode(int_to_bytes(pub["public_exponent"].native)),
        }
    return {"data": b64encode(bytes(info["public_key"]))}


def ecdsa_input(digest: bytes, spec: KeySpec) -> bytes:
    """Truncate a digest longer than the curve's order, as ECDSA does (FIPS 186-5 6.4.1).

    PKCS#11 ``CKM_ECDSA`` truncates inside the token; NetHSM refuses digests
    longer than the group instead, so the client does it for the same result.
    """
    if isinstance(spec, EC) and len(digest) > spec.field_bytes and spec.size % 8 == 0:
        return digest[: spec.field_bytes]
    return digest
