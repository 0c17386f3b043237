"""X.509 certificates and CSRs for HSM keys, on ``cryptography``'s builders.

Everything here signs through ``key.private_key()`` (:mod:`hsmbridge.crypto_keys`),
so the CSR and certificate shortcuts of :class:`~hsmbridge.api.Key` are the
same code a user would write with ``cryptography``. Subjects are RFC 4514
strings (``"CN=api.example.com,O=Example"``) or ``x509.Name`` objects; SANs
are ``DNS:``, ``IP:``, ``email:`` or ``URI:`` strings (a bare name is DNS).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .errors import InvalidInput

if TYPE_CHECKING:
    from .api import Key

#: SAN prefix -> the GeneralName it makes from the rest of the string
_SAN_KINDS: dict[str, Any] = {
    "DNS": x509.DNSName,
    "IP": lambda v: x509.IPAddress(ipaddress.ip_address(v)),
    "EMAIL": x509.RFC822Name,
    "URI": x509.UniformResourceIdentifier,
}
#: hash name -> the cryptography hash class
_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
#: the longest validity a certificate made here may have (about 100 years)
MAX_DAYS = 36500


def parse_name(subject: str | x509.Name) -> x509.Name:
    """An RFC 4514 string (``CN=x,O=y``) or an ``x509.Name`` as an ``x509.Name``."""
    if isinstance(subject, x509.Name):
        return subject
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidInput(
            f"a subject is an RFC 4514 string such as 'CN=api.example.com,O=Example' "
            f"or an x509.Name, not {subject!r}"
        )
    try:
        name = x509.Name.from_rfc4514_string(subject.strip())
    except ValueError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise InvalidInput(
            f"cannot read the subject {subject!r}{detail}; write it as RFC 4514 with "
            "attributes such as CN, O, OU, L, ST, C, e.g. 'CN=api.example.com,O=Example,C=DE'"
        ) from None
    if not len(name):
        raise InvalidInput(f"the subject {subject!r} names nothing; give at least CN=...")
    return name


def parse_sans(sans: Iterable[str]) -> list[x509.GeneralName]:
    """``DNS:a.example``, ``IP:10.0.0.1``, ``email:a@b``, ``URI:https://...``; bare = DNS."""
    if isinstance(sans, str):
        sans = [sans]
    names: list[x509.GeneralName] = []
    for san in sans:
        kind, sep, value = str(san).partition(":")
        if not sep or kind.upper() not in _SAN_KINDS:
            kind, value = "DNS", str(san)
        try:
            names.append(_SAN_KINDS[kind.upper()](value))
        except ValueError as exc:
            raise InvalidInput(
                f"bad subjectAltName {san!r} ({exc}); use DNS:name, IP:address, "
                "email:address or URI:uri"
            ) from None
    return names


def load_certificate(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    """A certificate object from itself, PEM (bytes or str) or DER."""
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode() if isinstance(cert, str) else cert
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidInput(
            f"a certificate is an x509.Certificate, PEM or DER, not {type(cert).__name__}"
        )
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(bytes(data))
        return x509.load_der_x509_certificate(bytes(data))
    except ValueError as exc:
        raise InvalidInput(f"not an X.509 certificate in PEM or DER ({exc})") from None


def check_belongs(cert: x509.Certificate, key: Key) -> None:
    """Refuse a certificate whose public key is not ``key``'s."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if spki != key.public_key_der():
        raise InvalidInput(
            f"the certificate for {cert.subject.rfc4514_string()!r} certifies another public "
            f"key than key {key.label!r}'s; store it with the key it was issued for"
        )


def signing_hash(key: Key) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """The hash to sign certificates with: SHA-256 for RSA, the curve's own for EC,
    None for Ed25519 (EdDSA signs the message itself)."""
    from .api import EC, RSA

    if isinstance(key.spec, RSA):
        return hashes.SHA256()
    if isinstance(key.spec, EC):
        name = key.spec.curve_info.hash_name
        assert name is not None
        return _HASHES[name]()
    return None


def build_csr(
    key: Key, subject: str | x509.Name, sans: Iterable[str] = ()
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``key``, signed in the HSM."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(parse_name(subject))
    names = parse_sans(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key.private_key(), signing_hash(key))


def build_self_signed(
    key: Key,
    subject: str | x509.Name,
    *,
    days: int = 365,
    sans: Iterable[str] = (),
    ca: bool = False,
) -> x509.Certificate:
    """A self-signed certificate for ``key``, valid from now for ``days`` days."""
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_DAYS:
        raise InvalidInput(f"days must be a whole number from 1 to {MAX_DAYS}, got {days!r}")
    name = parse_name(subject)
    public = key.private_key().public_key()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    names = parse_sans(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key.private_key(), signing_hash(key))


def describe(cert: x509.Certificate) -> dict[str, Any]:
    """What a person checks in a certificate, as JSON-ready values."""
    try:
        sans = [str(n.value) for n in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value]  # fmt: skip
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        "sans": sans,
    }
