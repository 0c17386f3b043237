"""EC keys on PKCS#11: generation on named curves, public key, ECDSA."""

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
from ..api import EC
from ..errors import InvalidInput
from ..export import int_to_bytes
from .templates import Template


def generate(
    session: pkcs11.Session, spec: EC, public: dict[Attribute, Any], private: dict[Attribute, Any]
) -> tuple[Any, Any]:
    params = session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve_info.oid_name)},
        local=True,
    )
    return params.generate_keypair(
        store=True,
        mechanism=CKM.EC_KEY_PAIR_GEN,
        public_template=public,
        private_template=private,
    )


def _curve_name(ec_params: bytes) -> str:
    params = asn1_keys.ECDomainParameters.load(ec_params)
    if params.name != "named":
        raise InvalidInput("EC key with explicit curve parameters; only named curves are supported")
    return str(params.chosen.native)


def spec_of(obj: Any) -> EC:
    return spec_of_curve(_curve_name(obj[Attribute.EC_PARAMS]))


def spec_of_curve(oid_name: str) -> EC:
    """The spec of a named curve (``secp256r1``), or InvalidInput for curves hsmbridge lacks."""
    curve = curves.by_oid_name(oid_name)
    if curve is None:
        raise InvalidInput(f"EC curve {oid_name} is not supported; use {curves.NAMES}")
    return EC(curve.name)


def public_key_der(obj: Any) -> bytes:
    """SPKI DER from a public key object's CKA_EC_PARAMS and CKA_EC_POINT."""
    point = obj[Attribute.EC_POINT]
    # CKA_EC_POINT is a DER OCTET STRING per the spec; some modules store the raw point.
    with contextlib.suppress(ValueError):
        point = asn1_core.OctetString.load(point, strict=True).native
    spki = asn1_keys.PublicKeyInfo(
        {
            "algorithm": {
                "algorithm": "ec",
                "parameters": asn1_keys.ECDomainParameters.load(obj[Attribute.EC_PARAMS]),
            },
            "public_key": point,
        }
    )
    return bytes(spki.dump())


def mechanism() -> tuple[CKM, None]:
    return CKM.ECDSA, None


def import_templates(key: Any, public: Template, private: Template) -> tuple[Template, Template]:
    """C_CreateObject templates for a ``cryptography`` EC private key and its public half."""
    from cryptography.hazmat.primitives import serialization

    spec = spec_of_curve(key.curve.name)
    params = encode_named_curve_parameters(spec.curve_info.oid_name)
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    scalar = int_to_bytes(key.private_numbers().private_value, spec.field_bytes)
    shared = {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params}
    return (
        {
            **public,
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            **shared,
            Attribute.EC_POINT: bytes(asn1_core.OctetString(point).dump()),
        },
        {**private, Attribute.CLASS: ObjectClass.PRIVATE_KEY, **shared, Attribute.VALUE: scalar},
    )
