"""Sign and decrypt as the appliance does, on hsmbridge keys.

NetHSM's sign modes take prepared input (the DigestInfo-prefixed hash for
PKCS1, the digest for PSS and ECDSA), which is what :meth:`Key.sign_prepared`
signs, with the hsmbridge mechanism whose token operation matches the mode.
Decryption modes map one to one onto hsmbridge mechanisms. The words of the
API (types, mechanisms, modes) live in :mod:`hsmbridge.nethsm.vocabulary`.
"""

from __future__ import annotations

import base64

from ..api import Key
from ..mechanisms import DIGEST_INFO_PREFIX, Mechanism
from ..nethsm import vocabulary
from .errors import ApiError, bad_request


def b64(data: bytes) -> str:
    return vocabulary.b64encode(data)


def unb64(value: object, what: str) -> bytes:
    """A request's base64 member (400 if it is not)."""
    if not isinstance(value, str) or not value:
        raise bad_request(f"{what} must be a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise bad_request(f"{what} is not valid base64") from None


def _require(mechanisms: list[str], needed: str, mode: str, key_id: str) -> None:
    if needed not in mechanisms:
        raise bad_request(
            f"key {key_id} does not allow mode {mode}: its mechanisms are {', '.join(mechanisms)}"
        )


def _pick(mode: str, candidates: list[Mechanism], message: bytes) -> Mechanism:
    """The hsmbridge mechanism for a sign mode and its input (PKCS1: by DigestInfo)."""
    if mode == "PKCS1":  # CKM_RSA_PKCS signs the DigestInfo as given; the hash only names it
        for mech in candidates:
            assert mech.hash_name is not None
            if message.startswith(DIGEST_INFO_PREFIX[mech.hash_name]):
                return mech
        return candidates[0]
    if mode == "ECDSA":  # the digest length names the hash
        return next((m for m in candidates if m.digest_size == len(message)), candidates[0])
    return candidates[0]


def _candidates(op: str, mode: str, mechanisms: list[str], key_id: str) -> list[Mechanism]:
    """hsmbridge mechanisms for a sign/decrypt ``mode`` the key allows (else 400)."""
    modes = vocabulary.SIGN_MODES if op == "sign" else vocabulary.DECRYPT_MODES
    if mode not in modes:
        raise bad_request(f"unknown {op} mode {mode!r}; use one of: {', '.join(modes)}")
    _require(mechanisms, modes[mode], mode, key_id)
    candidates = vocabulary.mechanisms_of_mode(mode, sign=op == "sign")
    if not candidates:
        raise bad_request(f"{op} mode {mode} is not supported by this token (hsmbridge serve)")
    return candidates


def sign(key: Key, key_id: str, mechanisms: list[str], mode: str, message: bytes) -> bytes:
    """Sign as the appliance does: ``message`` is the prepared input of ``mode``."""
    mech = _pick(mode, _candidates("sign", mode, mechanisms, key_id), message)
    size = key.spec.size
    if mech.family == "pkcs1" and len(message) > size // 8 - 11:
        raise bad_request(
            f"PKCS1 input is {len(message)} bytes; an RSA-{size} key signs at most "
            f"{size // 8 - 11} (send the DigestInfo-prefixed hash)"
        )
    if mech.family == "pss" and len(message) != mech.digest_size:
        raise bad_request(
            f"{mode} signs a {mech.digest_size}-byte digest, got {len(message)} bytes"
        )
    if mech.family == "ecdsa" and len(message) > (size + 7) // 8:
        raise bad_request(f"ECDSA input is {len(message)} bytes, more than the group size")
    return key.sign_prepared(message, mech, signature_format="der")


def decrypt(key: Key, key_id: str, mechanisms: list[str], mode: str, data: bytes) -> bytes:
    if mode == "AES_CBC":
        raise bad_request(
            f"mode AES_CBC needs a Generic key; {key_id} is {vocabulary.type_of(key.spec)}"
        )
    [mech] = _candidates("decrypt", mode, mechanisms, key_id)
    if len(data) > key.spec.size // 8:
        raise bad_request(f"the ciphertext is longer than the RSA-{key.spec.size} modulus")
    # the key's mechanisms decide: RSA_Decryption_PKCS1 was allowed when the key was made
    return key.decrypt(data, mech, allow_pkcs1v15=True)


def check_encrypt(key: Key, mode: object) -> ApiError:
    """NetHSM encrypts only with Generic (AES) keys; RSA/EC keys answer 400."""
    return bad_request(
        f"encryption (mode {mode}) needs a Generic key with AES_Encryption_CBC; "
        f"this is an {vocabulary.type_of(key.spec)} key (encrypt with its public key instead)"
    )
