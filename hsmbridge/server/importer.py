"""Private keys in NetHSM's import formats (KeyPrivateData JSON, PEM) for the bridge.

Parsing and checking happen here; storing goes through the backend's
:meth:`hsmbridge.HSM.import_key`, so the bridge imports into any backend.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import curves
from ..api import HSM, Key
from .errors import bad_request
from .keys import unb64

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def from_json(key_type: str, private: object) -> PrivateKey:
    """A private key from NetHSM's KeyPrivateData (RSA primes, an EC scalar or an Ed25519 seed)."""
    if not isinstance(private, dict):
        raise bad_request("'private' must be an object")
    unknown = set(private) - {"primeP", "primeQ", "publicExponent", "data"}
    if unknown:
        raise bad_request(f"unknown properties in 'private': {', '.join(sorted(unknown))}")
    try:
        if key_type == "RSA":
            p = _int(unb64(private.get("primeP"), "private.primeP"))
            q = _int(unb64(private.get("primeQ"), "private.primeQ"))
            e = _int(unb64(private.get("publicExponent"), "private.publicExponent"))
            d = rsa.rsa_recover_private_exponent(e, p, q)
            numbers = rsa.RSAPrivateNumbers(
                p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                rsa.RSAPublicNumbers(e, p * q),
            )  # fmt: skip
            return numbers.private_key()
        curve = curves.by_nethsm_type(key_type)
        if curve is not None and curve.kind == "edwards":
            seed = unb64(private.get("data"), "private.data")
            return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        if curve is not None:
            scalar = _int(unb64(private.get("data"), "private.data"))
            return ec.derive_private_key(scalar, curve.crypto_curve())
    except (ValueError, ZeroDivisionError) as exc:
        raise bad_request(f"the {key_type} private key is invalid: {exc}") from None
    raise bad_request(f"importing {key_type} keys is not supported by hsmbridge serve")


def from_pem(pem: bytes) -> tuple[str, PrivateKey]:
    """(NetHSM type, key) from a PEM private key (PKCS#1, SEC1 or PKCS#8, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"key_file is not an unencrypted PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA", key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = curves.by_oid_name(key.curve.name)
        if curve is not None:
            return curve.nethsm_type, key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return curves.get("Ed25519").nethsm_type, key
    raise bad_request(f"only RSA, EC ({curves.NAMES}) and Ed25519 private keys can be imported")


def import_key(
    hsm: HSM, key: PrivateKey, label: str, backend_id: str, usage: frozenset[str]
) -> Key:
    """Store ``key`` in the HSM under the backend id ``backend_id``."""
    return hsm.import_key(key, label, usage=usage, key_id=backend_id)
