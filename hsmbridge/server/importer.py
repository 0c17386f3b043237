"""Private keys in NetHSM's import formats (KeyPrivateData JSON, PEM) for the bridge.

Parsing and checking happen here; storing goes through the backend's
:meth:`hsmbridge.HSM.import_key`, so the bridge imports into any backend.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .. import curves
from ..api import HSM, Key
from .errors import bad_request
from .keys import unb64
from .limits import DEFAULT, Limits

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _bounded(data: bytes, what: str, max_bits: int) -> int:
    """A big-endian number of at most ``max_bits`` bits; 400 before any arithmetic on it."""
    value = _int(data)  # linear in the (body-capped) input
    if value.bit_length() > max_bits:
        raise bad_request(f"{what} has {value.bit_length()} bits; at most {max_bits} are allowed")
    return value


def _rsa_from_primes(p: int, q: int, e: int, limits: Limits = DEFAULT) -> rsa.RSAPrivateKey:
    """An RSA key from its primes and public exponent, every number bounded first.

    Primality is tested here (Miller-Rabin, in Python) rather than by OpenSSL's
    key check, which holds the GIL — and so the server's event loop — for
    seconds on an 8192-bit key; a Python ``pow`` holds it for one modular
    exponentiation at a time.
    """
    low, high = limits.rsa_min_modulus_bits // 2, limits.rsa_max_prime_bits
    for name, value in (("primeP", p), ("primeQ", q)):
        if not low <= value.bit_length() <= high:
            raise bad_request(
                f"private.{name} has {value.bit_length()} bits; it must have {low}-{high}"
            )
    if e.bit_length() > limits.rsa_max_exponent_bits or e < 3 or e % 2 == 0:
        raise bad_request(
            "the public exponent must be odd, at least 3 and below "
            f"2**{limits.rsa_max_exponent_bits}"
        )
    bits = (p * q).bit_length()
    if not limits.rsa_min_modulus_bits <= bits <= limits.rsa_max_modulus_bits:
        raise bad_request(
            f"the RSA modulus has {bits} bits; it must have {limits.rsa_min_modulus_bits}-"
            f"{limits.rsa_max_modulus_bits}"
        )
    if p == q or not _probably_prime(p) or not _probably_prime(q):
        raise bad_request("primeP and primeQ must be two different primes")
    try:
        d = rsa.rsa_recover_private_exponent(e, p, q)
    except ValueError:  # e is not invertible modulo lcm(p-1, q-1)
        raise bad_request("the public exponent does not fit these primes") from None
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )  # fmt: skip
    try:
        return numbers.private_key(unsafe_skip_rsa_key_validation=True)  # validated above
    except ValueError as exc:
        raise bad_request(f"the RSA private key is invalid: {exc}") from None


_SMALL_PRIMES = [n for n in range(3, 2000, 2) if all(n % f for f in range(3, int(n**0.5) + 1, 2))]


def _probably_prime(n: int) -> bool:
    """Miller-Rabin with random bases; rounds for an error below 2**-100 on RSA-size
    random candidates (FIPS 186-5, appendix B.3)."""
    if n < 2 or n % 2 == 0:
        return n == 2
    for f in _SMALL_PRIMES:
        if n % f == 0:
            return n == f
    rounds = 5 if n.bit_length() < 1536 else 4
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def from_json(key_type: str, private: object, limits: Limits = DEFAULT) -> PrivateKey:
    """A private key from NetHSM's KeyPrivateData (RSA primes, an EC scalar or an Ed25519 seed)."""
    if not isinstance(private, dict):
        raise bad_request("'private' must be an object")
    unknown = set(private) - {"primeP", "primeQ", "publicExponent", "data"}
    if unknown:
        raise bad_request(f"unknown properties in 'private': {', '.join(sorted(unknown))}")
    try:
        if key_type == "RSA":
            max_prime = limits.rsa_max_prime_bits
            p = _bounded(unb64(private.get("primeP"), "private.primeP"), "primeP", max_prime)
            q = _bounded(unb64(private.get("primeQ"), "private.primeQ"), "primeQ", max_prime)
            e = _bounded(
                unb64(private.get("publicExponent"), "private.publicExponent"),
                "publicExponent",
                limits.rsa_max_exponent_bits,
            )
            return _rsa_from_primes(p, q, e, limits)
        curve = curves.by_nethsm_type(key_type)
        if curve is not None and curve.kind == "edwards":
            seed = unb64(private.get("data"), "private.data")
            return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        if curve is not None:
            data = unb64(private.get("data"), "private.data")
            scalar = _bounded(data, "private.data", curve.bits)
            return ec.derive_private_key(scalar, curve.crypto_curve())
    except (ValueError, ZeroDivisionError) as exc:
        raise bad_request(f"the {key_type} private key is invalid: {exc}") from None
    raise bad_request(f"importing {key_type} keys is not supported by hsmbridge serve")


def from_pem(pem: bytes, limits: Limits = DEFAULT) -> tuple[str, PrivateKey]:
    """(NetHSM type, key) from a PEM private key (PKCS#1, SEC1 or PKCS#8, unencrypted).

    RSA keys are loaded without OpenSSL's check, bounded, then rebuilt and
    tested from their primes like a JSON import (the PEM's other numbers are
    recomputed, not trusted).
    """
    try:
        key = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise bad_request(f"key_file is not an unencrypted PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        return "RSA", _rsa_from_primes(numbers.p, numbers.q, numbers.public_numbers.e, limits)
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
