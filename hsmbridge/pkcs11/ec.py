"""Curve keys on PKCS#11: ECDSA on Weierstrass curves and EdDSA on Ed25519.

Both are named-curve keys whose CKA_EC_PARAMS holds the curve's OID and whose
CKA_EC_POINT holds the public point; they differ in the key type, the
generation and signing mechanisms (:data:`_PKCS11`, by the curve's kind) and
the private value (a scalar, or the RFC 8032 seed). Ed25519 on SoftHSM2:
docs/design.md, fact 19.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pkcs11
from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import Mechanism as CKM
from pkcs11.util.ec import encode_named_curve_parameters

from .. import curves
from ..api import EC, Ed25519, curve_spec
from ..errors import InvalidInput
from ..export import int_to_bytes
from ..mechanisms import Mechanism
from .templates import Template

#: curve kind -> (PKCS#11 key type, key-pair generation mechanism, signing mechanism)
_PKCS11 = {
    "weierstrass": (KeyType.EC, CKM.EC_KEY_PAIR_GEN, CKM.ECDSA),
    "edwards": (KeyType.EC_EDWARDS, CKM.EC_EDWARDS_KEY_PAIR_GEN, CKM.EDDSA),
}
#: PKCS#11 key types of curve keys
KEY_TYPES = tuple(key_type for key_type, _, _ in _PKCS11.values())
#: CKA_EC_PARAMS as a PrintableString (PKCS#11 3.0 allows it for Edwards curves) -> curve
_PRINTABLE_NAMES = {"edwards25519": "Ed25519"}


def ec_params(curve: curves.Curve) -> bytes:
    """CKA_EC_PARAMS of a named curve: its OID, DER."""
    return encode_named_curve_parameters(curve.oid)


def generate(
    session: pkcs11.Session,
    spec: EC | Ed25519,
    public: dict[Attribute, Any],
    private: dict[Attribute, Any],
) -> tuple[Any, Any]:
    curve = spec.curve_info
    key_type, generation, _ = _PKCS11[curve.kind]
    return session.generate_keypair(
        key_type,
        store=True,
        mechanism=generation,
        public_template={**public, Attribute.EC_PARAMS: ec_params(curve)},
        private_template=private,
    )


def _curve_of_params(params: bytes) -> curves.Curve:
    """The curve CKA_EC_PARAMS names (an OID, or a PrintableString for Edwards curves)."""
    found = None
    with contextlib.suppress(ValueError, TypeError):
        if params[:1] == b"\x13":
            name = asn1_core.PrintableString.load(params).native
            found = curves.by_name(_PRINTABLE_NAMES.get(name, name))
        else:
            chosen = asn1_keys.ECDomainParameters.load(params)
            if chosen.name != "named":
                raise InvalidInput(
                    "EC key with explicit curve parameters; only named curves are supported"
                )
            found = curves.by_oid_name(str(chosen.chosen.native))
    if found is None:
        raise InvalidInput(
            f"curve key with CKA_EC_PARAMS {params.hex()} is not supported; "
            f"use {curves.NAMES} or Ed25519"
        )
    return found


def spec_of(obj: Any) -> EC | Ed25519:
    return curve_spec(_curve_of_params(obj[Attribute.EC_PARAMS]))


def spec_of_curve(oid_name: str) -> EC:
    """The spec of a named curve (``secp256r1``), or InvalidInput for curves hsmbridge lacks."""
    curve = curves.by_oid_name(oid_name)
    if curve is None or curve.kind != "weierstrass":
        raise InvalidInput(f"EC curve {oid_name} is not supported; use {curves.NAMES}")
    return EC(curve.name)


def public_key_der(obj: Any) -> bytes:
    """SPKI DER from a public key object's CKA_EC_PARAMS and CKA_EC_POINT."""
    params = obj[Attribute.EC_PARAMS]
    point = obj[Attribute.EC_POINT]
    # CKA_EC_POINT is a DER OCTET STRING per the spec; some modules store the raw point.
    with contextlib.suppress(ValueError):
        point = asn1_core.OctetString.load(point, strict=True).native
    curve = _curve_of_params(params)
    algorithm: dict[str, Any]
    if curve.kind == "edwards":  # RFC 8410: the OID names the curve, no parameters
        algorithm = {"algorithm": curve.oid_name}
    else:
        algorithm = {"algorithm": "ec", "parameters": asn1_keys.ECDomainParameters.load(params)}
    spki = asn1_keys.PublicKeyInfo({"algorithm": algorithm, "public_key": point})
    return bytes(spki.dump())


def mechanism(mech: Mechanism) -> tuple[CKM, None]:
    """(CKM, parameter) for python-pkcs11: ECDSA or EdDSA, neither with parameters."""
    return (CKM.EDDSA if mech.family == "eddsa" else CKM.ECDSA), None


def import_templates(key: Any, public: Template, private: Template) -> tuple[Template, Template]:
    """C_CreateObject templates for a ``cryptography`` EC or Ed25519 private key and its
    public half (an Ed25519 private key is its 32-byte RFC 8032 seed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    spec: EC | Ed25519
    if isinstance(key, ed25519.Ed25519PrivateKey):
        spec = Ed25519()
        raw = serialization.Encoding.Raw
        point = key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
        secret = key.private_bytes(
            raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    else:
        spec = spec_of_curve(key.curve.name)
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        secret = int_to_bytes(key.private_numbers().private_value, spec.field_bytes)
    curve = spec.curve_info
    shared = {Attribute.KEY_TYPE: _PKCS11[curve.kind][0], Attribute.EC_PARAMS: ec_params(curve)}
    return (
        {
            **public,
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            **shared,
            Attribute.EC_POINT: bytes(asn1_core.OctetString(point).dump()),
        },
        {**private, Attribute.CLASS: ObjectClass.PRIVATE_KEY, **shared, Attribute.VALUE: secret},
    )
