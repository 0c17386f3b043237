"""A key's X.509 certificate as a PKCS#11 ``CKO_CERTIFICATE`` object.

The certificate is a public token object of type ``CKC_X_509`` with the
key's ``CKA_ID`` and ``CKA_LABEL`` — the pairing pkcs11-tool, p11tool,
OpenSSL's pkcs11-provider and browsers use to find a key's certificate — and
``CKA_SUBJECT``, ``CKA_ISSUER``, ``CKA_SERIAL_NUMBER`` (the DER INTEGER) and
``CKA_VALUE`` (the DER certificate) filled in, as PKCS#11 3.0 section 4.6.3
asks. Public (``CKA_PRIVATE`` false), so those tools list it without a login.
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11x
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, CertificateType, ObjectClass

from .templates import Template


def template(cert: x509.Certificate, key_id: bytes, label: str) -> Template:
    """The C_CreateObject template of ``cert`` stored with the key ``key_id``/``label``."""
    return {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.SUBJECT: cert.subject.public_bytes(),
        Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: core.Integer(cert.serial_number).dump(),
        Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
    }


def of_key(session: Any, key_id: bytes) -> list[Any]:
    """The X.509 certificate objects stored with the key ``key_id``."""
    return list(
        session.get_objects(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.ID: key_id,
            }
        )
    )


def key_ids_with_subject(session: Any, name: x509.Name) -> list[bytes]:
    """CKA_IDs of the X.509 certificates whose subject is ``name``.

    Compared as names, not as DER: a CA may encode the same name with other
    string types than ``x509.Name.from_rfc4514_string`` does.
    """
    found = []
    template = {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
    }
    for obj in session.get_objects(template):
        try:
            cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
            key_id = bytes(obj[Attribute.ID])
        except (ValueError, p11x.AttributeTypeInvalid):
            continue  # not a certificate hsmbridge can read, or not linked to a key
        if key_id and cert.subject == name:
            found.append(key_id)
    return found
