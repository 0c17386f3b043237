"""Certificates stored with their keys, on every backend, and the CSR/self-signed shortcuts.

On PKCS#11 the certificate must be the object other tools look for (a public
``CKO_CERTIFICATE`` of type X.509 with the key's ``CKA_ID`` and label, and
subject, issuer, serial and value set): ``pkcs11-tool`` and ``p11tool`` read
it back. On NetHSM it lives at ``/keys/{id}/cert`` (here ``hsmbridge serve``).
"""

from __future__ import annotations

import contextlib
import datetime
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmbridge import EC, HSM, RSA, AmbiguousKey, InvalidInput, Key, KeyNotFound
from hsmbridge.testing import SoftToken

PEM = serialization.Encoding.PEM


@pytest.fixture
def key(hsm: HSM) -> Iterator[Key]:
    made = hsm.generate_key(EC("P-256"), f"cert-{uuid.uuid4().hex[:8]}")
    yield made
    made.delete()


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)


def test_csr_shortcut_verified_by_openssl(key: Key, tmp_path: Path) -> None:
    csr = key.csr("CN=api.example.com,O=Example,C=DE",
                  sans=["api.example.com", "DNS:www.example.com", "IP:127.0.0.1"])  # fmt: skip
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=api.example.com,O=Example,C=DE"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["api.example.com", "www.example.com", "127.0.0.1"]
    (tmp_path / "r.csr").write_bytes(csr.public_bytes(PEM))
    done = _openssl("req", "-in", str(tmp_path / "r.csr"), "-verify", "-noout")
    assert done.returncode == 0, done.stderr


def test_certificate_round_trip(key: Key, hsm: HSM, tmp_path: Path) -> None:
    assert key.certificate() is None
    assert key.delete_certificate() is False
    cert = key.self_signed(f"CN={key.label}", days=30, sans=["DNS:svc.example"])
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(PEM))
    done = _openssl("verify", "-CAfile", str(tmp_path / "c.pem"), str(tmp_path / "c.pem"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=30)

    key.set_certificate(cert.public_bytes(PEM))  # PEM in, object out
    assert key.certificate() == cert
    again = hsm.get_key(key.label)  # a fresh handle sees it
    assert again.certificate() == cert
    assert hsm.get_key_by_certificate(f"CN={key.label}").id == key.id

    renewed = key.self_signed(f"CN={key.label}", days=60)
    key.set_certificate(renewed)  # replaces, never two
    assert key.certificate() == renewed
    assert key.delete_certificate() is True
    assert key.certificate() is None
    with pytest.raises(KeyNotFound, match="set_certificate"):
        hsm.get_key_by_certificate(f"CN={key.label}")


def test_certificate_of_another_key_is_refused(key: Key) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    now = datetime.datetime.now(datetime.UTC)
    foreign = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(other.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(other, hashes.SHA256())
    )  # fmt: skip
    with pytest.raises(InvalidInput, match="another public key"):
        key.set_certificate(foreign)
    with pytest.raises(InvalidInput, match="PEM or DER"):
        key.set_certificate(b"not a certificate")
    assert key.certificate() is None


def test_lookup_by_subject_is_exact(hsm: HSM) -> None:
    subject = f"CN=shared-{uuid.uuid4().hex[:8]}"
    keys = [hsm.generate_key(EC("P-256"), f"dup-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    try:
        for k in keys:
            k.set_certificate(k.self_signed(subject, days=1))
        with pytest.raises(AmbiguousKey, match="2 keys"):
            hsm.get_key_by_certificate(subject)
        keys[1].delete_certificate()
        assert hsm.get_key_by_certificate(x509.Name.from_rfc4514_string(subject)).id == keys[0].id
    finally:
        for k in keys:
            k.delete()


@pytest.mark.parametrize(
    ("subject", "days", "says"),
    [
        ("", 1, "RFC 4514"),
        ("CN", 1, "RFC 4514"),
        ("FOO=bar", 1, "such as CN"),
        ("CN=x", 0, "days"),
        ("CN=x", 10**6, "days"),
    ],
)
def test_bad_subject_or_days(key: Key, subject: str, days: int, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        key.self_signed(subject, days=days)


def test_pkcs11_object_is_what_tools_read(
    pkcs11_hsm: HSM, softhsm_token: SoftToken, tmp_path: Path
) -> None:
    key = pkcs11_hsm.generate_key(RSA(2048), f"tls-{uuid.uuid4().hex[:8]}")
    try:
        cert = key.self_signed("CN=tools.example,O=hsmbridge", days=2)
        key.set_certificate(cert)
        env = {**softhsm_token.env(), "PATH": "/usr/bin:/bin"}
        listed = subprocess.run(
            ["pkcs11-tool", "--module", softhsm_token.module, "--token-label",
             softhsm_token.label, "--list-objects", "--type", "cert"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        block = listed.stdout.split(f"label:      {key.label}")[1].split("Certificate Object")[0]
        assert re.search(rf"ID:\s+{key.id}", block), listed.stdout
        assert "tools.example" in block and "hsmbridge" in block  # subject
        # read it back by id, no PIN: the public object pkcs11-provider would find
        der = tmp_path / "cert.der"
        got = subprocess.run(
            ["pkcs11-tool", "--module", softhsm_token.module, "--token-label",
             softhsm_token.label, "--read-object", "--type", "cert", "--id", key.id,
             "--output-file", str(der)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert x509.load_der_x509_certificate(der.read_bytes()) == cert
        if shutil.which("p11tool"):
            p11 = subprocess.run(
                ["p11tool", "--provider", softhsm_token.module, "--list-all-certs",
                 f"pkcs11:token={softhsm_token.label}"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            assert p11.returncode == 0, p11.stderr
            assert f"object={key.label}" in p11.stdout and "type=cert" in p11.stdout
        key.delete()  # deleting the key removes its certificate
        listed = subprocess.run(
            ["pkcs11-tool", "--module", softhsm_token.module, "--token-label",
             softhsm_token.label, "--list-objects", "--type", "cert"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert key.label not in listed.stdout
    finally:
        with contextlib.suppress(KeyNotFound):
            key.delete()
