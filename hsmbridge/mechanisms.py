"""Mechanism names and the client-side work every backend shares.

Every backend receives the same prepared input: the message hashed on the
client (or taken as a digest when ``prehashed``), with the PKCS#1 v1.5
DigestInfo prefix for ``rsa-pkcs1-*``; for ``ed25519`` (pure EdDSA, which
hashes inside the signature) the message itself. That is exactly what NetHSM's sign
modes take, and what PKCS#11's raw ``CKM_RSA_PKCS``/``CKM_RSA_PKCS_PSS``/
``CKM_ECDSA`` take, so hashing lives in one place.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from asn1crypto.algos import DSASignature

from .errors import InvalidInput, MechanismNotSupported

#: DER DigestInfo prefixes (RFC 8017, section 9.2, note 1).
DIGEST_INFO_PREFIX = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


class Mechanism(enum.StrEnum):
    """Every operation hsmbridge offers, by its stable string name."""

    RSA_PKCS1_SHA256 = "rsa-pkcs1-sha256"
    RSA_PKCS1_SHA384 = "rsa-pkcs1-sha384"
    RSA_PKCS1_SHA512 = "rsa-pkcs1-sha512"
    RSA_PSS_SHA256 = "rsa-pss-sha256"
    RSA_PSS_SHA384 = "rsa-pss-sha384"
    RSA_PSS_SHA512 = "rsa-pss-sha512"
    ECDSA_SHA256 = "ecdsa-sha256"
    ECDSA_SHA384 = "ecdsa-sha384"
    ECDSA_SHA512 = "ecdsa-sha512"
    ED25519 = "ed25519"
    RSA_OAEP_SHA1 = "rsa-oaep-sha1"
    RSA_OAEP_SHA256 = "rsa-oaep-sha256"
    RSA_OAEP_SHA384 = "rsa-oaep-sha384"
    RSA_OAEP_SHA512 = "rsa-oaep-sha512"
    RSA_PKCS1 = "rsa-pkcs1"
    RSA_RAW = "rsa-raw"

    def __str__(self) -> str:
        return self.value

    # Cached: signing requests read these several times each (members are singletons).
    @functools.cached_property
    def family(self) -> str:
        """``pkcs1``, ``pss``, ``ecdsa``, ``eddsa``, ``oaep``, ``pkcs1-decrypt`` or ``raw``."""
        if self is Mechanism.RSA_PKCS1:
            return "pkcs1-decrypt"
        if self is Mechanism.RSA_RAW:
            return "raw"
        if self is Mechanism.ED25519:
            return "eddsa"
        return self.value.split("-")[1] if self.value.startswith("rsa-") else "ecdsa"

    @functools.cached_property
    def hash_name(self) -> str | None:
        """hashlib name of the hash the client applies; None for decryption without a
        hash (PKCS#1 v1.5, raw) and for EdDSA (whose input is the message itself)."""
        if self in (Mechanism.RSA_PKCS1, Mechanism.RSA_RAW, Mechanism.ED25519):
            return None
        return self.value.rsplit("-", 1)[1]

    @functools.cached_property
    def digest_size(self) -> int:
        assert self.hash_name is not None
        return hashlib.new(self.hash_name).digest_size

    @functools.cached_property
    def is_sign(self) -> bool:
        return self.family in ("pkcs1", "pss", "ecdsa", "eddsa")

    @functools.cached_property
    def usage(self) -> str:
        """The key usage this mechanism needs: ``sign``, ``decrypt``, or ``decrypt-raw``
        for raw RSA decryption, which only a key made for it alone does (see
        :func:`hsmbridge.api.normalize_usage`)."""
        if self is Mechanism.RSA_RAW:
            return RAW_USAGE
        return "sign" if self.is_sign else "decrypt"

    @functools.cached_property
    def key_type(self) -> str:
        """``rsa``, ``ec`` or ``ed25519``: the key type this mechanism needs."""
        return _KEY_TYPES.get(self.family, "rsa")


#: the usage of a key made for raw RSA decryption (and nothing else)
RAW_USAGE = "decrypt-raw"

#: mechanism family -> key type, for the families that are not RSA's
_KEY_TYPES = {"ecdsa": "ec", "eddsa": "ed25519"}


SIGN_MECHANISMS = tuple(m for m in Mechanism if m.is_sign)
DECRYPT_MECHANISMS = tuple(m for m in Mechanism if not m.is_sign)


def parse_mechanism(name: str | Mechanism, *, sign: bool) -> Mechanism:
    """Turn a name into a :class:`Mechanism`, checking it is a sign or decrypt one."""
    try:
        mech = Mechanism(name)
    except ValueError:
        raise MechanismNotSupported(
            f"unknown mechanism {name!r}; known mechanisms are: "
            + ", ".join(m.value for m in Mechanism)
        ) from None
    if mech.is_sign != sign:
        wanted = SIGN_MECHANISMS if sign else DECRYPT_MECHANISMS
        verb = "sign" if sign else "decrypt"
        raise MechanismNotSupported(
            f"{mech.value} is not a {verb} mechanism; use one of: "
            + ", ".join(m.value for m in wanted)
        )
    return mech


def check_key_type(mech: Mechanism, key_type: str, key_name: str) -> None:
    """Refuse e.g. an ECDSA mechanism on an RSA key, naming what would work."""
    if mech.key_type != key_type:
        fitting = [
            m.value for m in Mechanism if m.key_type == key_type and m.is_sign == mech.is_sign
        ]
        raise InvalidInput(
            f"key {key_name!r} is an {key_type.upper()} key and cannot do {mech.value}; "
            + (f"use one of: {', '.join(fitting)}" if fitting else "use another key")
        )


def signing_preparer(mech: Mechanism, *, prehashed: bool) -> Callable[[bytes], bytes]:
    """A function turning a message (or digest) into what the HSM signs.

    Everything that depends only on the mechanism is decided once here, not
    per message: batches call the returned function for every item.
    """
    if mech.family == "eddsa":
        return _eddsa_preparer(mech, prehashed=prehashed)
    hash_name = mech.hash_name
    assert hash_name is not None
    size = mech.digest_size
    prefix = DIGEST_INFO_PREFIX[hash_name] if mech.family == "pkcs1" else b""
    hasher = getattr(hashlib, hash_name)

    def check(data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"data to sign must be bytes, not {type(data).__name__}")

    if prehashed:

        def prepare_digest(data: bytes) -> bytes:
            check(data)
            if len(data) != size:
                raise InvalidInput(
                    f"{mech.value} with prehashed=True needs a {size}-byte "
                    f"{hash_name.upper()} digest, got {len(data)} bytes"
                )
            return prefix + bytes(data)

        return prepare_digest

    def prepare_message(data: bytes) -> bytes:
        if type(data) is not bytes:
            check(data)
            data = bytes(data)  # hashlib refuses non-contiguous buffers
        return prefix + hasher(data).digest()  # type: ignore[no-any-return]

    return prepare_message


def _eddsa_preparer(mech: Mechanism, *, prehashed: bool) -> Callable[[bytes], bytes]:
    """Pure EdDSA signs the message itself: there is no digest to give."""
    if prehashed:
        raise InvalidInput(
            f"{mech.value} is pure EdDSA (RFC 8032): it signs the message itself and takes "
            "no digest; pass the message with prehashed=False"
        )

    def prepare_message(data: bytes) -> bytes:
        if type(data) is bytes:
            return data
        if not isinstance(data, (bytearray, memoryview)):
            raise InvalidInput(f"data to sign must be bytes, not {type(data).__name__}")
        return bytes(data)

    return prepare_message


def signing_input(mech: Mechanism, data: bytes, *, prehashed: bool) -> bytes:
    """What the HSM signs: the digest, DigestInfo-prefixed for PKCS#1 v1.5."""
    return signing_preparer(mech, prehashed=prehashed)(data)


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """r‖s (PKCS#11, JWS) to the DER SEQUENCE X.509 and OpenSSL expect.

    Encoded by hand in one function: it runs once per signature on the hot
    path, where a general ASN.1 library costs more than the HSM call.
    """
    half = len(raw) // 2
    r = raw[:half].lstrip(b"\x00")
    s = raw[half:].lstrip(b"\x00")
    if not r or r[0] & 0x80:
        r = b"\x00" + r
    if not s or s[0] & 0x80:
        s = b"\x00" + s
    body = b"\x02" + bytes((len(r),)) + r + b"\x02" + bytes((len(s),)) + s
    n = len(body)  # < 256 even for P-521
    return (b"\x30" + bytes((n,)) if n < 0x80 else b"\x30\x81" + bytes((n,))) + body


def ecdsa_der_to_raw(der: bytes, field_bytes: int) -> bytes:
    """DER (NetHSM, X.509) to fixed-width r‖s of ``field_bytes`` each."""
    try:
        parsed = DSASignature.load(der)
        r: int = parsed["r"].native
        s: int = parsed["s"].native
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"not a DER ECDSA signature: {exc}") from None
    return r.to_bytes(field_bytes, "big") + s.to_bytes(field_bytes, "big")


@dataclass(frozen=True)
class SignatureFormat:
    """ECDSA output encodings: DER (default) or raw r‖s (JWS)."""

    DER = "der"
    RAW = "raw"


def check_signature_format(fmt: str) -> str:
    if fmt not in (SignatureFormat.DER, SignatureFormat.RAW):
        raise InvalidInput(f"signature_format must be 'der' or 'raw', not {fmt!r}")
    return fmt
