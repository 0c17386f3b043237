"""RSA keys on PKCS#11: generation, public key, mechanism parameters."""

from __future__ import annotations

from typing import Any

import pkcs11
from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from pkcs11 import MGF, Attribute, KeyType, ObjectClass
from pkcs11 import Mechanism as CKM

from ..api import RSA
from ..export import int_to_bytes
from ..mechanisms import Mechanism
from .templates import Template

_HASH = {
    "sha1": (CKM.SHA_1, MGF.SHA1),
    "sha256": (CKM.SHA256, MGF.SHA256),
    "sha384": (CKM.SHA384, MGF.SHA384),
    "sha512": (CKM.SHA512, MGF.SHA512),
}


def generate(
    session: pkcs11.Session, spec: RSA, public: dict[Attribute, Any], private: dict[Attribute, Any]
) -> tuple[Any, Any]:
    public = {**public, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"}
    return session.generate_keypair(
        KeyType.RSA,
        spec.bits,
        store=True,
        mechanism=CKM.RSA_PKCS_KEY_PAIR_GEN,
        public_template=public,
        private_template=private,
    )


def public_key_der(obj: Any) -> bytes:
    """SPKI DER from a public (or private) key object's modulus and exponent."""
    modulus = int.from_bytes(obj[Attribute.MODULUS], "big")
    exponent = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
    pub = asn1_keys.RSAPublicKey({"modulus": modulus, "public_exponent": exponent})
    spki = asn1_keys.PublicKeyInfo(
        {"algorithm": {"algorithm": "rsa", "parameters": asn1_core.Null()}, "public_key": pub}
    )
    return bytes(spki.dump())


def spec_of(obj: Any) -> RSA:
    return RSA(len(obj[Attribute.MODULUS]) * 8)


def mechanism(mech: Mechanism) -> tuple[CKM, Any]:
    """(CKM, parameter) for python-pkcs11, on prepared input (see mechanisms.py)."""
    family = mech.family
    if family == "pkcs1" or family == "pkcs1-decrypt":
        return CKM.RSA_PKCS, None
    if family == "raw":  # RSADP alone: the modulus-length block, no parameters
        return CKM.RSA_X_509, None
    assert mech.hash_name is not None
    hash_mech, mgf = _HASH[mech.hash_name]
    if family == "pss":
        return CKM.RSA_PKCS_PSS, (hash_mech, mgf, mech.digest_size)
    return CKM.RSA_PKCS_OAEP, (hash_mech, mgf, None)


def native_param(mech: Mechanism) -> tuple[Any, ...] | None:
    """The same parameters in the form hsmbridge._native takes."""
    ckm, param = mechanism(mech)
    if param is None:
        return None
    if ckm == CKM.RSA_PKCS_PSS:
        return ("pss", int(param[0]), int(param[1]), int(param[2]))
    return ("oaep", int(param[0]), int(param[1]))


def import_templates(key: Any, public: Template, private: Template) -> tuple[Template, Template]:
    """C_CreateObject templates for a ``cryptography`` RSA private key and its public half."""
    n = key.private_numbers()
    shared = {
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.MODULUS: int_to_bytes(n.public_numbers.n),
        Attribute.PUBLIC_EXPONENT: int_to_bytes(n.public_numbers.e),
    }
    secret = {
        Attribute.PRIVATE_EXPONENT: int_to_bytes(n.d),
        Attribute.PRIME_1: int_to_bytes(n.p),
        Attribute.PRIME_2: int_to_bytes(n.q),
        Attribute.EXPONENT_1: int_to_bytes(n.dmp1),
        Attribute.EXPONENT_2: int_to_bytes(n.dmq1),
        Attribute.COEFFICIENT: int_to_bytes(n.iqmp),
    }
    return (
        {**public, Attribute.CLASS: ObjectClass.PUBLIC_KEY, **shared},
        {**private, Attribute.CLASS: ObjectClass.PRIVATE_KEY, **shared, **secret},
    )
