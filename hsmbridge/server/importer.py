"""Importing private key material into a PKCS#11 token (NetHSM key import).

The key is written with C_CreateObject as a token object that is private,
sensitive and never extractable (the same template as generated keys, from
:mod:`hsmbridge.pkcs11.templates`), with its public half beside it under the
same CKA_ID. Backends other than PKCS#11 cannot import through the hsmbridge
API, so the bridge answers 501 for them.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..api import HSM, Key
from ..errors import HSMError
from .errors import bad_request, from_hsm_error, not_implemented
from .keys import EC_TYPES, unb64

_CURVES: dict[str, ec.EllipticCurve] = {
    "EC_P256": ec.SECP256R1(),
    "EC_P384": ec.SECP384R1(),
    "EC_P521": ec.SECP521R1(),
}
_OIDS = {"EC_P256": "secp256r1", "EC_P384": "secp384r1", "EC_P521": "secp521r1"}
_TYPE_OF_CURVE = {"secp256r1": "EC_P256", "secp384r1": "EC_P384", "secp521r1": "EC_P521"}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def from_json(key_type: str, private: object) -> PrivateKey:
    """A private key from NetHSM's KeyPrivateData (RSA primes or an EC scalar)."""
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
        if key_type in EC_TYPES:
            scalar = _int(unb64(private.get("data"), "private.data"))
            return ec.derive_private_key(scalar, _CURVES[key_type])
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
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _TYPE_OF_CURVE:
        return _TYPE_OF_CURVE[key.curve.name], key
    raise bad_request("only RSA and EC P-256/P-384/P-521 private keys can be imported")


def import_key(
    hsm: HSM, key: PrivateKey, key_type: str, label: str, backend_id: str, usage: set[str]
) -> Key:
    """Write ``key`` into the token under CKA_ID ``backend_id``; return the hsmbridge key."""
    try:
        from ..pkcs11.backend import Pkcs11HSM
    except ImportError:  # pragma: no cover - python-pkcs11 is a dependency
        Pkcs11HSM = None  # type: ignore[assignment,misc]
    if Pkcs11HSM is None or not isinstance(hsm, Pkcs11HSM):
        raise not_implemented(f"importing private keys into {hsm.description}")
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    from ..pkcs11.templates import key_pair_templates

    raw_id = bytes.fromhex(backend_id)
    public_t, private_t = key_pair_templates(raw_id, label, frozenset(usage))
    public_t[Attribute.CLASS] = ObjectClass.PUBLIC_KEY
    private_t[Attribute.CLASS] = ObjectClass.PRIVATE_KEY
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        pub: dict[Any, Any] = {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: _bytes(n.public_numbers.n),
            Attribute.PUBLIC_EXPONENT: _bytes(n.public_numbers.e),
        }
        public_t.update(pub)
        private_t.update(pub)
        private_t.update(
            {
                Attribute.PRIVATE_EXPONENT: _bytes(n.d),
                Attribute.PRIME_1: _bytes(n.p),
                Attribute.PRIME_2: _bytes(n.q),
                Attribute.EXPONENT_1: _bytes(n.dmp1),
                Attribute.EXPONENT_2: _bytes(n.dmq1),
                Attribute.COEFFICIENT: _bytes(n.iqmp),
            }
        )
    else:
        params = encode_named_curve_parameters(_OIDS[key_type])
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        size = (key.curve.key_size + 7) // 8
        public_t.update(
            {
                Attribute.KEY_TYPE: KeyType.EC,
                Attribute.EC_PARAMS: params,
                Attribute.EC_POINT: _der_octet_string(point),
            }
        )
        private_t.update(
            {
                Attribute.KEY_TYPE: KeyType.EC,
                Attribute.EC_PARAMS: params,
                Attribute.VALUE: key.private_numbers().private_value.to_bytes(size, "big"),
            }
        )
    try:
        with hsm.pool.admin() as session:
            public_obj = session.create_object(public_t)
            try:
                session.create_object(private_t)
            except Exception:
                public_obj.destroy()
                raise
    except HSMError as exc:
        raise from_hsm_error(exc) from None
    except Exception as exc:
        from ..pkcs11.errormap import translate

        raise from_hsm_error(translate(exc, what="importing the key")) from None
    try:
        return hsm.get_key(key_id=backend_id)
    except HSMError as exc:
        raise from_hsm_error(exc) from None


def _bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _der_octet_string(data: bytes) -> bytes:
    from asn1crypto.core import OctetString

    return bytes(OctetString(data).dump())
