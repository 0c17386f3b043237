"""EC keys on PKCS#11: generation on named curves, public key, ECDSA."""

from __future__ import annotations

import contextlib
from typing import Any

import pkcs11
from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from pkcs11 import Attribute, KeyType
from pkcs11 import Mechanism as CKM
from pkcs11.util.ec import encode_named_curve_parameters

from ..api import EC
from ..errors import InvalidInput

_OID = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}
_BY_OID = {v: k for k, v in _OID.items()}


def generate(
    session: pkcs11.Session, spec: EC, public: dict[Attribute, Any], private: dict[Attribute, Any]
) -> tuple[Any, Any]:
    params = session.create_domain_parameters(
        KeyType.EC,
        {Attribute.EC_PARAMS: encode_named_curve_parameters(_OID[spec.curve])},
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
    name = _curve_name(obj[Attribute.EC_PARAMS])
    if name not in _BY_OID:
        raise InvalidInput(f"EC curve {name} is not supported; use P-256, P-384 or P-521")
    return EC(_BY_OID[name])


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


def output_length(spec: EC) -> int:
    return 2 * spec.field_bytes
