"""JOSE with HSM keys: compact JWS/JWT signed in the HSM, compact JWE decrypted with it.

The private key never leaves the HSM: a JWS signature is one ``key.sign``
(ECDSA as raw r‖s, as RFC 7518 wants), and a JWE's content encryption key
(CEK) is unwrapped by one ``key.decrypt`` with RSA-OAEP; only the content is
decrypted on the host, with the CEK, by ``cryptography``'s AES.

Decryption gives one error for every way a token can be wrong after its
header has been read — a CEK that does not unwrap, a wrong length, a failed
tag — so the answer is no padding oracle (RFC 7516, section 11.5: on an
unwrap failure a random CEK is used and decryption goes on, to fail at the
tag as any other bad token does). A mechanism the HSM lacks (RSA-OAEP-256 on
SoftHSM2) is not a bad token: it raises :class:`MechanismNotSupported` at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DecryptionFailed, HSMError, InvalidInput

if TYPE_CHECKING:
    from .api import Key

__all__ = [
    "JWE_ALGS",
    "JWE_ENCS",
    "JWS_ALGS",
    "decrypt_jwe",
    "decrypt_jwe_batch",
    "jwe_header",
    "jws_alg_for",
    "sign_jws",
    "sign_jwt",
]  # fmt: skip

#: JWS ``alg`` -> hsmbridge mechanism (RFC 7518, section 3.1)
JWS_ALGS: dict[str, str] = {
    "RS256": "rsa-pkcs1-sha256",
    "RS384": "rsa-pkcs1-sha384",
    "RS512": "rsa-pkcs1-sha512",
    "PS256": "rsa-pss-sha256",
    "PS384": "rsa-pss-sha384",
    "PS512": "rsa-pss-sha512",
    "ES256": "ecdsa-sha256",
    "ES384": "ecdsa-sha384",
    "ES512": "ecdsa-sha512",
    "EdDSA": "ed25519",  # RFC 8037, section 3.1: an Ed25519 key signs the input itself
}
#: ES* algorithms name their curve (RFC 7518, section 3.4)
_ES_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

#: JWE ``alg`` -> hsmbridge mechanism that unwraps the CEK (RFC 7518, section 4.3)
JWE_ALGS: dict[str, str] = {
    "RSA-OAEP": "rsa-oaep-sha1",
    "RSA-OAEP-256": "rsa-oaep-sha256",
    "RSA-OAEP-384": "rsa-oaep-sha384",
    "RSA-OAEP-512": "rsa-oaep-sha512",
}


@dataclass(frozen=True)
class _Enc:
    """A JWE content encryption: CEK length and how the content is decrypted."""

    cek_bytes: int
    gcm: bool  # else AES-CBC with HMAC-SHA-2 (RFC 7518, section 5.2)
    hash_name: str = ""


#: JWE ``enc`` (RFC 7518, section 5.1)
JWE_ENCS: dict[str, _Enc] = {
    "A128GCM": _Enc(16, gcm=True),
    "A192GCM": _Enc(24, gcm=True),
    "A256GCM": _Enc(32, gcm=True),
    "A128CBC-HS256": _Enc(32, gcm=False, hash_name="sha256"),
    "A192CBC-HS384": _Enc(48, gcm=False, hash_name="sha384"),
    "A256CBC-HS512": _Enc(64, gcm=False, hash_name="sha512"),
}

#: the largest compact JWE or JWS accepted (bytes): card data and tokens are small
MAX_TOKEN_BYTES = 256 * 1024
#: the largest protected header accepted (bytes, base64url-decoded)
MAX_HEADER_BYTES = 4096
#: header parameters understood here; anything in ``crit`` must be among them
_KNOWN_HEADER = frozenset({"alg", "enc", "kid", "typ", "cty", "jku", "jwk", "x5u", "x5c", "x5t",
                           "x5t#S256", "epk", "apu", "apv"})  # fmt: skip

_BAD_TOKEN = "the JWE could not be decrypted: wrong key, or the token was altered or damaged"


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515, section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(part: str, what: str) -> bytes:
    if any(c in part for c in "=+/ \n"):
        raise InvalidInput(f"the {what} is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"the {what} is not base64url") from None


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidInput(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"the {what} is not a JSON object")
    return value


# -- signing ---------------------------------------------------------------------------------


def sign_jws(
    key: Key, payload: bytes, alg: str, *, headers: Mapping[str, Any] | None = None
) -> str:
    """A compact JWS of ``payload`` signed in the HSM; ``kid`` is the key's RFC 7638 thumbprint.

    ``key`` is a :class:`hsmbridge.Key`, or a key ring (its primary signs).
    """
    signer = _signer(key)
    mechanism = _jws_mechanism(signer, alg)
    if not isinstance(payload, (bytes, bytearray)):
        raise InvalidInput(f"a JWS payload is bytes, not {type(payload).__name__}")
    header: dict[str, Any] = {"alg": alg, "kid": signer.jwk_thumbprint(), **(headers or {})}
    if header.get("alg") != alg:
        raise InvalidInput("headers= may not change 'alg'")
    signing_input = f"{b64url(_compact_json(header))}.{b64url(bytes(payload))}".encode("ascii")
    signature = signer.sign(signing_input, mechanism, signature_format="raw")
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def sign_jwt(
    key: Key, claims: Mapping[str, Any], alg: str, *, headers: Mapping[str, Any] | None = None
) -> str:
    """A JWT (RFC 7519) with ``claims``, signed in the HSM (``typ`` JWT, ``kid`` thumbprint)."""
    if not isinstance(claims, Mapping):
        raise InvalidInput(f"JWT claims are a mapping, not {type(claims).__name__}")
    try:
        payload = _compact_json(dict(claims))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"the JWT claims are not JSON-serialisable: {exc}") from None
    return sign_jws(key, payload, alg, headers={"typ": "JWT", **(headers or {})})


def jws_alg_for(key: Key) -> str:
    """The JWS ``alg`` a key (or a ring's primary) signs with by default: RS256 for RSA
    (what payment providers' JWTs use), the ES* of an EC key's curve, EdDSA for Ed25519."""
    spec = _signer(key).spec
    if spec.key_type == "rsa":
        return "RS256"
    if spec.key_type == "ed25519":
        return "EdDSA"
    for alg, curve in _ES_CURVE.items():
        if getattr(spec, "curve", None) == curve:
            return alg
    raise InvalidInput(
        f"no JWS algorithm signs with a {spec} key; use RSA, P-256/384/521 or Ed25519"
    )


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _signer(key: Any) -> Key:
    """The key that signs: the key itself, or a key ring's primary version."""
    primary = getattr(key, "primary", None)
    return primary if primary is not None and hasattr(primary, "sign") else key  # type: ignore[no-any-return]


def _jws_mechanism(key: Key, alg: str) -> str:
    mechanism = JWS_ALGS.get(alg)
    if mechanism is None:
        raise InvalidInput(
            f"JWS alg {alg!r} is not supported; use one of: {', '.join(JWS_ALGS)}"
            + (" ('none' is never allowed)" if str(alg).lower() == "none" else "")
        )
    curve = _ES_CURVE.get(alg)
    if curve is not None and getattr(key.spec, "curve", None) != curve:
        raise InvalidInput(f"{alg} needs an EC {curve} key; key {key.label!r} is {key.spec}")
    return mechanism


# -- decryption ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    protected: str  # the first part as sent: the AAD
    header: dict[str, Any]
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes


def _parse_jwe(token: object) -> _Parsed:
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidInput("a compact JWE is ASCII text") from None
    if not isinstance(token, str):
        raise InvalidInput(f"a compact JWE is a str, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidInput(f"the JWE is {len(token)} bytes; at most {MAX_TOKEN_BYTES} are accepted")
    parts = token.strip().split(".")
    if len(parts) != 5:
        raise InvalidInput(
            f"a compact JWE has 5 parts separated by '.', this has {len(parts)} "
            "(a JWS has 3; JSON serialization is not supported)"
        )
    protected = parts[0]
    raw_header = _unb64url(protected, "JWE protected header")
    if len(raw_header) > MAX_HEADER_BYTES:
        raise InvalidInput(f"the JWE header is over {MAX_HEADER_BYTES} bytes")
    header = _json(raw_header, "JWE protected header")
    return _Parsed(
        protected,
        header,
        _unb64url(parts[1], "JWE encrypted key"),
        _unb64url(parts[2], "JWE initialization vector"),
        _unb64url(parts[3], "JWE ciphertext"),
        _unb64url(parts[4], "JWE authentication tag"),
    )


def _check_header(header: Mapping[str, Any]) -> tuple[str, _Enc]:
    """(unwrap mechanism, content encryption) from a JWE header, or InvalidInput."""
    alg, enc = header.get("alg"), header.get("enc")
    if alg not in JWE_ALGS:
        raise InvalidInput(
            f"JWE alg {alg!r} is not supported; use one of: {', '.join(JWE_ALGS)} "
            "('dir', 'none' and key agreement are never accepted: the key is in the HSM)"
        )
    if enc not in JWE_ENCS:
        raise InvalidInput(f"JWE enc {enc!r} is not supported; use one of: {', '.join(JWE_ENCS)}")
    if "zip" in header:
        raise InvalidInput("compressed JWEs ('zip') are refused (compression leaks plaintext)")
    crit = header.get("crit")
    if crit is not None:
        if not isinstance(crit, list) or not crit or not all(isinstance(c, str) for c in crit):
            raise InvalidInput("the JWE 'crit' header must be a non-empty list of names")
        unknown = sorted(set(crit) - _KNOWN_HEADER)
        if unknown:
            raise InvalidInput(f"the JWE marks unknown parameters critical: {', '.join(unknown)}")
    return JWE_ALGS[str(alg)], JWE_ENCS[str(enc)]


def jwe_header(token: str | bytes) -> dict[str, Any]:
    """The protected header of a compact JWE, checked as :func:`decrypt_jwe` checks it
    (``alg``, ``enc``, no ``zip``, ``crit``): read before choosing the key by ``kid``."""
    header = _parse_jwe(token).header
    _check_header(header)
    return header


def decrypt_jwe(key: Key, token: str | bytes) -> bytes:
    """The plaintext of a compact JWE encrypted to ``key`` (RSA-OAEP CEK, AES content).

    Raises :class:`InvalidInput` for a malformed token or an algorithm not
    accepted, :class:`MechanismNotSupported` when the HSM lacks the OAEP
    hash, and one :class:`DecryptionFailed` for every other failure.
    """
    item = _parse_jwe(token)
    mechanism, enc = _check_header(item.header)
    try:
        cek: bytes | None = key.decrypt(item.encrypted_key, mechanism)
    except (DecryptionFailed, InvalidInput):
        cek = None  # no oracle: fail at the tag like any other bad token
    return _decrypt_content(item, enc, cek)


def decrypt_jwe_batch(
    key: Key,
    tokens: Iterable[str | bytes],
    *,
    threads: int | None = None,
    return_exceptions: bool = False,
) -> list[Any]:
    """Decrypt many compact JWEs: one HSM batch unwraps all CEKs, AES runs on the host.

    Results in input order; with ``return_exceptions=True`` a failed token
    holds its :class:`HSMError` in place, else the first failure is raised
    (its own error, not wrapped, since tokens are independent).
    """
    parsed: list[_Parsed | HSMError] = []
    encs: list[_Enc | None] = []
    by_mechanism: dict[str, list[int]] = {}  # tokens grouped by how their CEK unwraps
    for i, token in enumerate(tokens):
        try:
            item = _parse_jwe(token)
            mechanism, enc = _check_header(item.header)
            by_mechanism.setdefault(mechanism, []).append(i)
            parsed.append(item)
            encs.append(enc)
        except HSMError as exc:
            if not return_exceptions:
                raise
            parsed.append(exc)
            encs.append(None)
    results: list[Any] = list(parsed)
    for mechanism, indexes in by_mechanism.items():
        group = [p for p in (parsed[i] for i in indexes) if isinstance(p, _Parsed)]
        ceks = _unwrap(key, [p.encrypted_key for p in group], mechanism, threads)
        for i, one, cek in zip(indexes, group, ceks, strict=True):
            content = encs[i]
            assert content is not None
            try:
                results[i] = _decrypt_content(one, content, cek)
            except HSMError as exc:
                if not return_exceptions:
                    raise
                results[i] = exc
    return results


def _unwrap(
    key: Key, wrapped: Sequence[bytes], mechanism: str, threads: int | None
) -> list[bytes | None]:
    """CEKs unwrapped in the HSM; None where the unwrap failed (no oracle: see module doc)."""
    out = key.decrypt_batch(wrapped, mechanism, threads=threads, return_exceptions=True)
    ceks: list[bytes | None] = []
    for result in out:
        if isinstance(result, HSMError) and not isinstance(
            result, (DecryptionFailed, InvalidInput)
        ):
            raise result  # e.g. MechanismNotSupported: the HSM could not try; not the token's fault
        ceks.append(result if isinstance(result, bytes) else None)
    return ceks


def _decrypt_content(item: _Parsed, enc: _Enc, cek: bytes | None) -> bytes:
    if cek is None or len(cek) != enc.cek_bytes:
        cek = os.urandom(enc.cek_bytes)  # go on and fail at the tag, like any bad token
    aad = item.protected.encode("ascii")
    if enc.gcm:
        if len(item.iv) != 12 or len(item.tag) != 16:
            raise DecryptionFailed(_BAD_TOKEN)
        try:
            return AESGCM(cek).decrypt(item.iv, item.ciphertext + item.tag, aad)
        except InvalidTag:
            raise DecryptionFailed(_BAD_TOKEN) from None
    half = enc.cek_bytes // 2
    mac_key, enc_key = cek[:half], cek[half:]
    al = (len(aad) * 8).to_bytes(8, "big")
    expected = hmac.new(
        mac_key, aad + item.iv + item.ciphertext + al, getattr(hashlib, enc.hash_name)
    ).digest()[:half]
    if len(item.iv) != 16 or not hmac.compare_digest(expected, item.tag):
        raise DecryptionFailed(_BAD_TOKEN)
    if not item.ciphertext or len(item.ciphertext) % 16:
        raise DecryptionFailed(_BAD_TOKEN)
    decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(item.iv)).decryptor()
    padded = decryptor.update(item.ciphertext) + decryptor.finalize()
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise DecryptionFailed(_BAD_TOKEN)  # unreachable after a good MAC, kept as a guard
    return padded[:-pad]
