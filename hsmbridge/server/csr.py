"""PKCS#10 certificate signing requests signed inside the HSM.

The request is assembled with asn1crypto's structures and its
CertificationRequestInfo signed by the key itself (``key.sign``), so the
private key never leaves the token. Subject and SAN rules follow NetHSM's
DistinguishedName: SANs default to the common name, an empty list means no
SAN extension, and ``IP:`` marks an IP address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import pem, x509

from ..api import EC, Ed25519, Key
from .errors import bad_request
from .limits import DEFAULT, Limits

#: DistinguishedName property -> asn1crypto name attribute.
DN_FIELDS = {
    "countryName": "country_name",
    "stateOrProvinceName": "state_or_province_name",
    "localityName": "locality_name",
    "organizationName": "organization_name",
    "organizationalUnitName": "organizational_unit_name",
    "commonName": "common_name",
    "emailAddress": "email_address",
}


#: C0 and C1 controls and DEL: never part of a name (NUL would truncate it in C parsers)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_text(what: str, value: str, limits: Limits) -> None:
    if len(value) > limits.max_name_chars:
        raise bad_request(f"{what} is longer than {limits.max_name_chars} characters")
    if _CONTROL.search(value):
        raise bad_request(f"{what} contains a control character")


def check_subject(dn: dict[str, Any], limits: Limits = DEFAULT) -> None:
    """Bound a DistinguishedName before any encoding: field lengths, controls, SAN count."""
    for name, value in dn.items():
        if name in DN_FIELDS and isinstance(value, str):
            _check_text(name, value, limits)
    sans = dn.get("subjectAltNames", [])
    if isinstance(sans, list):
        if len(sans) > limits.max_subject_alt_names:
            raise bad_request(f"at most {limits.max_subject_alt_names} subjectAltNames are allowed")
        for san in sans:
            if isinstance(san, str):
                _check_text("a subjectAltName", san, limits)
                if not san.strip() or " " in san:
                    raise bad_request(f"subjectAltName {san[:64]!r} is empty or has spaces")


def _general_names(sans: list[str]) -> list[x509.GeneralName]:
    names = []
    for san in sans:
        if san.startswith("IP:"):
            try:
                ip = str(ipaddress.ip_address(san[3:]))
            except ValueError:
                raise bad_request(f"subjectAltName {san!r} is not an IP address") from None
            names.append(x509.GeneralName(name="ip_address", value=ip))
        else:
            names.append(x509.GeneralName(name="dns_name", value=san))
    return names


def check_dn(body: dict[str, Any]) -> dict[str, Any]:
    """A DistinguishedName request body with every member of the right type (else 400)."""
    for name, value in body.items():
        if name == "subjectAltNames":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise bad_request("subjectAltNames must be a list of strings")
        elif not isinstance(value, str):
            raise bad_request(f"{name} must be a string")
    return body


def build_csr(key: Key, dn: dict[str, Any]) -> str:
    """A PEM CSR for ``key`` with the subject ``dn`` (NetHSM DistinguishedName)."""
    if isinstance(key.spec, EC):
        hash_name = key.spec.curve_info.hash_name
        algorithm, mech = f"{hash_name}_ecdsa", f"ecdsa-{hash_name}"
    elif isinstance(key.spec, Ed25519):  # RFC 8410: pure EdDSA over the request info
        algorithm = mech = "ed25519"
    else:
        algorithm, mech = "sha256_rsa", "rsa-pkcs1-sha256"
    return signed_csr(key.public_key_der(), dn, algorithm, lambda tbs: key.sign(tbs, mech))


def signed_csr(
    public_key_der: bytes, dn: dict[str, Any], algorithm: str, sign: Callable[[bytes], bytes]
) -> str:
    """A PEM CSR for a public key, its request info signed by ``sign`` with ``algorithm``."""
    check_subject(dn)
    subject = {DN_FIELDS[k]: v for k, v in dn.items() if k in DN_FIELDS and v != ""}
    if "common_name" not in subject:
        raise bad_request("commonName must be a non-empty string")
    if "country_name" in subject and len(subject["country_name"]) != 2:
        raise bad_request("countryName must be a two-letter country code")
    sans = dn.get("subjectAltNames", [dn["commonName"]])
    try:
        name = x509.Name.build(subject)
        attributes = []
        if sans:
            ext = x509.Extension(
                {"extn_id": "subject_alt_name", "extn_value": _general_names(sans)}
            )
            attributes.append({"type": "extension_request", "values": [[ext]]})
        info = asn1_csr.CertificationRequestInfo(
            {
                "version": "v1",
                "subject": name,
                "subject_pk_info": asn1_keys.PublicKeyInfo.load(public_key_der),
                "attributes": attributes,
            }
        )
        tbs = info.dump()
    except (ValueError, TypeError) as exc:
        raise bad_request(f"cannot encode the distinguished name: {exc}") from None
    request = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": sign(tbs),
        }
    )
    return bytes(pem.armor("CERTIFICATE REQUEST", request.dump())).decode("ascii")
