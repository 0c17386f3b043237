"""``key.private_key()`` in the libraries that take a ``cryptography`` private key.

The X.509 CSR, certificate and CRL builders, the PKCS#7 signature builder and
PyJWT run unchanged on HSM keys, on every backend; what they make is checked
by the ``openssl`` command and by ``cryptography``/PyJWT from the public key.
"""

from __future__ import annotations

import datetime
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import NameOID

from hsmbridge import (
    EC,
    HSM,
    RSA,
    Ed25519,
    InvalidInput,
    Key,
    KeyNotExtractable,
    MechanismNotSupported,
)

PEM = serialization.Encoding.PEM
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def keys(hsm: HSM) -> Iterator[dict[str, Key]]:
    tag = uuid.uuid4().hex[:8]
    made = {
        "rsa": hsm.generate_key(RSA(2048), f"ck-rsa-{tag}", usage={"sign", "decrypt"}),
        "ec": hsm.generate_key(EC("P-256"), f"ck-ec-{tag}"),
        "ed": hsm.generate_key(Ed25519(), f"ck-ed-{tag}"),
    }
    yield made
    for key in made.values():
        key.delete()


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(key: Key) -> x509.Certificate:
    """A self-signed CA made by CertificateBuilder with the HSM key."""
    private = key.private_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("hsmbridge test CA"))
        .issuer_name(_name("hsmbridge test CA"))
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(private, hashes.SHA256())
    )


def _leaf(ca_key: Key, ca: x509.Certificate, leaf_key: Key) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name("leaf.example"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key.private_key(), hashes.SHA256())
    )


def test_is_a_cryptography_private_key(keys: dict[str, Key]) -> None:
    rsa_key, ec_key = keys["rsa"].private_key(), keys["ec"].private_key()
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert rsa_key.key_size == 2048
    assert ec_key.key_size == 256 and isinstance(ec_key.curve, ec.SECP256R1)
    for key, private in ((keys["rsa"], rsa_key), (keys["ec"], ec_key)):
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert spki == key.public_key_der()


@pytest.mark.parametrize(
    "pad",
    [
        padding.PKCS1v15(),
        padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
        padding.PSS(padding.MGF1(hashes.SHA256()), 32),
    ],
    ids=["pkcs1", "pss-digest-length", "pss-32"],
)
@pytest.mark.parametrize("prehashed", [False, True])
def test_rsa_sign_maps_padding_and_hash(
    keys: dict[str, Key], pad: padding.AsymmetricPadding, prehashed: bool
) -> None:
    private = keys["rsa"].private_key()
    data = b"signed through cryptography's interface"
    if prehashed:
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        sig = private.sign(digest.finalize(), pad, utils.Prehashed(hashes.SHA256()))
    else:
        sig = private.sign(data, pad, hashes.SHA256())
    verify_pad = (
        padding.PSS(padding.MGF1(hashes.SHA256()), 32) if isinstance(pad, padding.PSS) else pad
    )
    private.public_key().verify(sig, data, verify_pad, hashes.SHA256())


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])
def test_ecdsa_sign_maps_hash(keys: dict[str, Key], algorithm: hashes.HashAlgorithm) -> None:
    private = keys["ec"].private_key()
    sig = private.sign(b"ecdsa", ec.ECDSA(algorithm))
    private.public_key().verify(sig, b"ecdsa", ec.ECDSA(algorithm))


def test_rsa_decrypt_maps_padding(keys: dict[str, Key]) -> None:
    private = keys["rsa"].private_key()
    public = private.public_key()
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    assert private.decrypt(public.encrypt(b"secret", oaep), oaep) == b"secret"
    v15 = public.encrypt(b"v15", padding.PKCS1v15())
    with pytest.raises(InvalidInput, match=r"private_key\(allow_pkcs1v15=True\)"):
        private.decrypt(v15, padding.PKCS1v15())  # a padding oracle: opt-in only
    opted_in = keys["rsa"].private_key(allow_pkcs1v15=True)
    assert opted_in.decrypt(v15, padding.PKCS1v15()) == b"v15"


@pytest.mark.parametrize(
    ("pad", "algorithm", "says"),
    [
        (padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256(),
         "PSS.MAX_LENGTH (222 bytes"),
        (padding.PSS(padding.MGF1(hashes.SHA256()), 20), hashes.SHA256(), "not 20 bytes"),
        (padding.PSS(padding.MGF1(hashes.SHA1()), 32), hashes.SHA256(), "MGF1"),
        (padding.PKCS1v15(), hashes.SHA1(), "SHA256, SHA384, SHA512"),
        (padding.PKCS1v15(), hashes.SHA3_256(), "SHA3-256"),
    ],
    ids=["pss-max-length", "pss-salt-20", "mgf-mismatch", "sha1", "sha3"],
)  # fmt: skip
def test_rsa_sign_refuses_what_has_no_mechanism(
    keys: dict[str, Key], pad: padding.AsymmetricPadding, algorithm: hashes.HashAlgorithm,
    says: str,
) -> None:  # fmt: skip
    with pytest.raises(MechanismNotSupported, match=None) as caught:
        keys["rsa"].private_key().sign(b"x", pad, algorithm)
    assert says in caught.value.message


def test_refusals_name_what_works(keys: dict[str, Key]) -> None:
    private = keys["rsa"].private_key()
    labelled = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), b"label")
    with pytest.raises(MechanismNotSupported, match="label=None"):
        private.decrypt(b"\0" * 256, labelled)
    with pytest.raises(MechanismNotSupported, match="DIGEST_LENGTH"):
        private.sign(b"x", padding.PSS(padding.MGF1(hashes.SHA256()), 20), hashes.SHA256())
    if hasattr(utils, "NoDigestInfo"):
        with pytest.raises(MechanismNotSupported, match=r"hashes\.SHA256"):
            private.sign(b"x", padding.PKCS1v15(), utils.NoDigestInfo())
    try:
        deterministic = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    except Exception:  # an OpenSSL without RFC 6979
        return
    with pytest.raises(MechanismNotSupported, match="deterministic"):
        keys["ec"].private_key().sign(b"x", deterministic)


def test_private_material_cannot_leave(keys: dict[str, Key]) -> None:
    rsa_key, ec_key = keys["rsa"].private_key(), keys["ec"].private_key()
    for private in (rsa_key, ec_key):
        with pytest.raises(KeyNotExtractable, match="cannot leave the HSM"):
            private.private_numbers()
        with pytest.raises(KeyNotExtractable, match="cannot leave the HSM"):
            private.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())  # fmt: skip
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(KeyNotExtractable, match="cannot leave the HSM"):
        ec_key.exchange(ec.ECDH(), peer)
    # what the README lists as unusable: libraries that serialise or read the private key
    cert = keys["ec"].self_signed("CN=p12", days=1)
    with pytest.raises(KeyNotExtractable):
        pkcs12.serialize_key_and_certificates(
            b"n", ec_key, cert, None, serialization.NoEncryption()
        )
    with pytest.raises(KeyNotExtractable):
        jwt.algorithms.ECAlgorithm.to_jwk(ec_key)


def test_csr_builder_and_openssl(keys: dict[str, Key], tmp_path: Path) -> None:
    for kind, key in keys.items():
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_name(f"{kind}.example"))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(f"{kind}.example")]), critical=False
            )
            .sign(key.private_key(), None if kind == "ed" else hashes.SHA256())
        )
        assert csr.is_signature_valid
        path = tmp_path / f"{kind}.csr"
        path.write_bytes(csr.public_bytes(PEM))
        done = _openssl("req", "-in", str(path), "-verify", "-noout")
        assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr, done.stderr


def test_ca_leaf_crl_and_pkcs7_verified_by_openssl(keys: dict[str, Key], tmp_path: Path) -> None:
    ca_key, leaf_key = keys["rsa"], keys["ec"]
    ca = _ca(ca_key)
    leaf = _leaf(ca_key, ca, leaf_key)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    done = _openssl("verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem"))
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr

    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(leaf.serial_number)
            .revocation_date(NOW)
            .build()
        )
        .sign(ca_key.private_key(), hashes.SHA256())
    )
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(PEM))
    done = _openssl("crl", "-in", str(tmp_path / "crl.pem"), "-CAfile",
                    str(tmp_path / "ca.pem"), "-noout")  # fmt: skip
    assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr, done.stderr

    data = b"a message signed in the HSM\n"
    signed = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(data)
        .add_signer(leaf, leaf_key.private_key(), hashes.SHA256())
        .sign(PEM, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
    )
    (tmp_path / "sig.p7").write_bytes(signed)
    (tmp_path / "data.txt").write_bytes(data)
    done = _openssl("cms", "-verify", "-inform", "PEM", "-in", str(tmp_path / "sig.p7"),
                    "-content", str(tmp_path / "data.txt"), "-binary",
                    "-CAfile", str(tmp_path / "ca.pem"), "-out", "/dev/null")  # fmt: skip
    assert done.returncode == 0 and "Verification successful" in done.stderr, done.stderr
    # a changed message must fail the same check
    (tmp_path / "data.txt").write_bytes(data + b"!")
    done = _openssl("cms", "-verify", "-inform", "PEM", "-in", str(tmp_path / "sig.p7"),
                    "-content", str(tmp_path / "data.txt"), "-binary",
                    "-CAfile", str(tmp_path / "ca.pem"), "-out", "/dev/null")  # fmt: skip
    assert done.returncode != 0


def test_ed25519_key(keys: dict[str, Key], tmp_path: Path) -> None:
    private = keys["ed"].private_key()
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    private.public_key().verify(private.sign(b"pure EdDSA"), b"pure EdDSA")
    with pytest.raises(KeyNotExtractable, match="cannot leave the HSM"):
        private.private_bytes_raw()
    cert = keys["ed"].self_signed("CN=ed25519.example", days=1)
    (tmp_path / "ed.pem").write_bytes(cert.public_bytes(PEM))
    done = _openssl("verify", "-CAfile", str(tmp_path / "ed.pem"), str(tmp_path / "ed.pem"))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256", "EdDSA"])
def test_pyjwt(keys: dict[str, Key], algorithm: str) -> None:
    kinds = {"RS": "rsa", "PS": "rsa", "ES": "ec", "Ed": "ed"}
    key = keys[kinds[algorithm[:2]]]
    token = jwt.encode({"sub": "hsm"}, key.private_key(), algorithm=algorithm,
                       headers={"kid": key.jwk_thumbprint()})  # fmt: skip
    assert jwt.get_unverified_header(token)["kid"] == key.jwk_thumbprint()
    claims = jwt.decode(token, key.public_key(), algorithms=[algorithm])  # type: ignore[arg-type]
    assert claims == {"sub": "hsm"}
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, key.public_key(), algorithms=[algorithm])  # type: ignore[arg-type]
