"""NetHSM key vocabulary on hsmbridge keys: types, mechanisms, sign and decrypt modes.

NetHSM's sign modes take prepared input (the DigestInfo-prefixed hash for
PKCS1, the digest for PSS and ECDSA), which is exactly what a backend's
prepared-input path signs (see :mod:`hsmbridge.mechanisms`), so signing goes
through :meth:`Key._run_prepared` with the mechanism whose token operation
matches the mode. Decryption modes map one to one onto hsmbridge mechanisms.
"""

from __future__ import annotations

import base64
from typing import Literal

from asn1crypto import keys as asn1_keys

from ..api import EC, RSA, Key, KeySpec
from ..errors import BatchItemError, HSMError
from ..mechanisms import _DIGEST_INFO_PREFIX, Mechanism, ecdsa_raw_to_der
from .errors import ApiError, bad_request, from_hsm_error

RSA_MECHANISMS = (
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
)
EC_MECHANISMS = ("ECDSA_Signature",)
OTHER_MECHANISMS = (
    "EdDSA_Signature",
    "BIP340_Signature",
    "AES_Encryption_CBC",
    "AES_Decryption_CBC",
)
ALL_MECHANISMS = frozenset(RSA_MECHANISMS + EC_MECHANISMS + OTHER_MECHANISMS)

EC_TYPES = {"EC_P256": "P-256", "EC_P384": "P-384", "EC_P521": "P-521"}
TYPE_OF_CURVE = {v: k for k, v in EC_TYPES.items()}
ALL_TYPES = frozenset(
    {"RSA", "Curve25519", "EC_P256K1", "BrainpoolP256", "BrainpoolP384", "BrainpoolP512", "Generic"}
    | set(EC_TYPES)
)

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
_PSS = {
    "PSS_SHA256": Mechanism.RSA_PSS_SHA256,
    "PSS_SHA384": Mechanism.RSA_PSS_SHA384,
    "PSS_SHA512": Mechanism.RSA_PSS_SHA512,
}
_DECRYPT = {
    "PKCS1": Mechanism.RSA_PKCS1,
    "OAEP_SHA1": Mechanism.RSA_OAEP_SHA1,
    "OAEP_SHA256": Mechanism.RSA_OAEP_SHA256,
    "OAEP_SHA384": Mechanism.RSA_OAEP_SHA384,
    "OAEP_SHA512": Mechanism.RSA_OAEP_SHA512,
}
_ECDSA_BY_LEN = {32: Mechanism.ECDSA_SHA256, 48: Mechanism.ECDSA_SHA384, 64: Mechanism.ECDSA_SHA512}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{what} must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise bad_request(f"{what} is not valid base64") from None


def spec_for(key_type: str, length: object) -> KeySpec:
    """The hsmbridge key spec for a NetHSM type (and RSA length)."""
    if key_type == "RSA":
        if not isinstance(length, int) or isinstance(length, bool):
            raise bad_request("RSA keys need an integer 'length' (e.g. 2048)")
        try:
            return RSA(length)
        except HSMError as exc:
            raise from_hsm_error(exc) from None
    if key_type in EC_TYPES:
        return EC(EC_TYPES[key_type])
    raise bad_request(
        f"key type {key_type} is not supported by this token; hsmbridge serve offers "
        "RSA, EC_P256, EC_P384 and EC_P521"
    )


def type_of(spec: KeySpec) -> str:
    return "RSA" if isinstance(spec, RSA) else TYPE_OF_CURVE[spec.curve]


def check_mechanisms(key_type: str, mechanisms: object) -> list[str]:
    """Validate a key's mechanism list against its type; return it deduplicated."""
    if not isinstance(mechanisms, list) or not all(isinstance(m, str) for m in mechanisms):
        raise bad_request("mechanisms must be a list of KeyMechanism strings")
    unknown = sorted(set(mechanisms) - ALL_MECHANISMS)
    if unknown:
        raise bad_request(f"unknown key mechanisms: {', '.join(unknown)}")
    allowed = RSA_MECHANISMS if key_type == "RSA" else EC_MECHANISMS
    wrong = sorted(set(mechanisms) - set(allowed))
    if wrong:
        raise bad_request(
            f"mechanisms {', '.join(wrong)} do not fit a {key_type} key; use: {', '.join(allowed)}"
        )
    if not mechanisms:
        raise bad_request(
            f"a key needs at least one mechanism; for {key_type}: {', '.join(allowed)}"
        )
    return sorted(set(mechanisms))


def usage_for(mechanisms: list[str]) -> set[str]:
    """hsmbridge usage flags (token attributes CKA_SIGN/CKA_DECRYPT) for mechanisms."""
    usage = set()
    if any("Signature" in m for m in mechanisms):
        usage.add("sign")
    if any("Decryption" in m for m in mechanisms):
        usage.add("decrypt")
    return usage


def public_data(spki_der: bytes) -> dict[str, str]:
    """NetHSM's ``public``: modulus/publicExponent for RSA, the EC point as ``data``."""
    info = asn1_keys.PublicKeyInfo.load(spki_der)
    if info.algorithm == "rsa":
        pub = info["public_key"].parsed
        n, e = pub["modulus"].native, pub["public_exponent"].native
        return {
            "modulus": b64(n.to_bytes((n.bit_length() + 7) // 8, "big")),
            "publicExponent": b64(e.to_bytes((e.bit_length() + 7) // 8, "big")),
        }
    return {"data": b64(bytes(info["public_key"]))}


def _require(mechanisms: list[str], needed: str, mode: str, key_id: str) -> None:
    if needed not in mechanisms:
        raise bad_request(
            f"key {key_id} does not allow mode {mode}: its mechanisms are {', '.join(mechanisms)}"
        )


def _run_one(key: Key, op: Literal["sign", "decrypt"], mech: Mechanism, data: bytes) -> bytes:
    try:
        out = key._run_prepared(op, mech, [data], 1, False)[0]
    except HSMError as exc:
        raise from_hsm_error(exc) from None
    if isinstance(out, HSMError):  # pragma: no cover - only with return_exceptions
        raise from_hsm_error(out)
    return out


def sign(key: Key, key_id: str, mechanisms: list[str], mode: str, message: bytes) -> bytes:
    """Sign as the appliance does: ``message`` is the prepared input of ``mode``."""
    if mode not in SIGN_MODES:
        raise bad_request(f"unknown sign mode {mode!r}; use one of: {', '.join(SIGN_MODES)}")
    _require(mechanisms, SIGN_MODES[mode], mode, key_id)
    spec = key.spec
    if mode == "PKCS1":
        if len(message) > spec.size // 8 - 11:
            raise bad_request(
                f"PKCS1 input is {len(message)} bytes; an RSA-{spec.size} key signs at most "
                f"{spec.size // 8 - 11} (send the DigestInfo-prefixed hash)"
            )
        # CKM_RSA_PKCS signs the DigestInfo as given; the hash only names the mechanism.
        mech = next(
            (
                Mechanism(f"rsa-pkcs1-{name}")
                for name, prefix in _DIGEST_INFO_PREFIX.items()
                if name != "sha1" and message.startswith(prefix)
            ),
            Mechanism.RSA_PKCS1_SHA256,
        )
        return _run_one(key, "sign", mech, message)
    if mode in _PSS:
        mech = _PSS[mode]
        if len(message) != mech.digest_size:
            raise bad_request(
                f"{mode} signs a {mech.digest_size}-byte digest, got {len(message)} bytes"
            )
        return _run_one(key, "sign", mech, message)
    if mode == "ECDSA":
        assert isinstance(spec, EC)
        if len(message) > spec.field_bytes:
            raise bad_request(
                f"ECDSA input is {len(message)} bytes, more than the {spec.curve} group size"
            )
        mech = _ECDSA_BY_LEN.get(len(message), Mechanism.ECDSA_SHA256)
        return ecdsa_raw_to_der(_run_one(key, "sign", mech, message))
    raise bad_request(f"sign mode {mode} is not supported by this token (hsmbridge serve)")


def decrypt(key: Key, key_id: str, mechanisms: list[str], mode: str, data: bytes) -> bytes:
    if mode not in DECRYPT_MODES:
        raise bad_request(f"unknown decrypt mode {mode!r}; use one of: {', '.join(DECRYPT_MODES)}")
    if mode == "AES_CBC":
        raise bad_request(f"mode AES_CBC needs a Generic key; {key_id} is {type_of(key.spec)}")
    _require(mechanisms, DECRYPT_MODES[mode], mode, key_id)
    mech = _DECRYPT.get(mode)
    if mech is None:
        raise bad_request(f"decrypt mode {mode} is not supported by this token (hsmbridge serve)")
    if len(data) > key.spec.size // 8:
        raise bad_request(f"the ciphertext is longer than the RSA-{key.spec.size} modulus")
    try:
        return key.decrypt(data, mech)
    except BatchItemError as exc:  # pragma: no cover - single items raise their cause
        raise from_hsm_error(exc.cause) from None
    except HSMError as exc:
        raise from_hsm_error(exc) from None


def check_encrypt(key: Key, mode: object) -> ApiError:
    """NetHSM encrypts only with Generic (AES) keys; RSA/EC keys answer 400."""
    return bad_request(
        f"encryption (mode {mode}) needs a Generic key with AES_Encryption_CBC; "
        f"this is an {type_of(key.spec)} key (encrypt with its public key instead)"
    )
