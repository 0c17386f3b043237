"""The server's TLS identity: a self-signed certificate made once and kept.

Clients pin it by SHA-256 fingerprint or use the PEM file as their CA bundle
(it is its own CA, with SANs for localhost, 127.0.0.1, ::1 and the host name).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from ..errors import ConfigurationError
from .statedir import write_private

CERT_NAME = "tls-cert.pem"
KEY_NAME = "tls-key.pem"


TlsPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def ensure_self_signed(state_dir: Path, extra_names: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(cert, key) paths in ``state_dir``, created on first use and reused after."""
    cert_path, key_path = state_dir / CERT_NAME, state_dir / KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    install(state_dir, self_signed(key, extra_names), key)
    return cert_path, key_path


def self_signed(key: TlsPrivateKey, extra_names: tuple[str, ...] = ()) -> bytes:
    """A PEM self-signed CA certificate for ``key`` naming this host (ten years)."""
    hostname = socket.gethostname()
    dns = sorted({"localhost", hostname, *(n for n in extra_names if not _is_ip(n))})
    ips = sorted({"127.0.0.1", "::1", *(n for n in extra_names if _is_ip(n))})
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hsmbridge {hostname}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns]
                + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def install(state_dir: Path, cert_pem: bytes, key: TlsPrivateKey) -> tuple[Path, Path]:
    """Write the key and its certificate into ``state_dir`` (mode 0600), each atomically."""
    cert_path, key_path = state_dir / CERT_NAME, state_dir / KEY_NAME
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem)
    _write(cert_path, cert_pem)
    return cert_path, key_path


def _write(path: Path, data: bytes) -> None:
    """Mode 0600 and atomic: a restart never reads half a key or certificate."""
    tmp = path.with_name(path.name + ".new")
    write_private(tmp, data)
    os.replace(tmp, path)


def load_key(key_path: Path) -> TlsPrivateKey:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{key_path} holds neither an RSA nor an EC key")
    return key


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def fingerprint(cert_path: Path) -> str:
    """``sha256:AB:CD:...`` of the certificate's DER, as clients pin it."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def public_key_pem(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return (
        cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def certifies(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    """Whether ``cert`` is for ``key`` (the same public key)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def check_pem_pair(cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    """(cert, key) if they are a readable PEM certificate and its unencrypted PEM key."""
    texts = []
    for option, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        try:
            texts.append(path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read {option} {str(path)!r}: {exc.strerror}"
            ) from None
    try:
        cert = x509.load_pem_x509_certificate(texts[0])
    except ValueError:
        raise ConfigurationError(
            f"--tls-cert {str(cert_path)!r} is not a PEM certificate "
            "(-----BEGIN CERTIFICATE-----); convert it with 'openssl x509 -outform PEM'"
        ) from None
    try:
        key = serialization.load_pem_private_key(texts[1], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(
            f"--tls-key {str(key_path)!r} is not an unencrypted PEM private key; "
            "convert it with 'openssl pkey -out key.pem'"
        ) from None
    if not certifies(cert, key):
        raise ConfigurationError(
            f"--tls-key {str(key_path)!r} is not the key of --tls-cert {str(cert_path)!r}"
        )
    return cert_path, key_path
