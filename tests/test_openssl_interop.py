"""OpenSSL and hsmbridge share keys by RFC 7512 URI (libp11's pkcs11 engine).

OpenSSL signs and makes a CSR with keys hsmbridge generated, naming them by
URI; hsmbridge signs with a key OpenSSL generated (written into the token by
OpenSC's pkcs11-tool). Debian 12 has no pkcs11-provider, so the engine it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from hsmbridge import EC, HSM, RSA
from hsmbridge.pkcs11.module import _p11_kit_module_dir
from hsmbridge.testing import SoftToken

ENGINE = os.path.join(os.path.dirname(_p11_kit_module_dir()), "engines-3", "pkcs11.so")

OPENSSL_CNF = """\
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = {engine}
MODULE_PATH = {module}
init = 0
[req]
distinguished_name = dn
[dn]
"""


class OpenSSL:
    """The openssl command with libp11's engine on the test token; the PIN in a file."""

    def __init__(self, token: SoftToken, directory: Path) -> None:
        if not os.path.exists(ENGINE) or shutil.which("openssl") is None:
            pytest.skip(f"{ENGINE} is not installed (apt-get install libengine-pkcs11-openssl)")
        self.dir = directory
        self.token = token
        conf = directory / "openssl.cnf"
        conf.write_text(OPENSSL_CNF.format(engine=ENGINE, module=token.module))
        self.pin_file = directory / "pin"
        self.pin_file.write_text(token.pin)
        self.pin_file.chmod(0o600)
        self.env = {**os.environ, **token.env(), "OPENSSL_CONF": str(conf)}

    def uri(self, label: str) -> str:
        return (
            f"pkcs11:token={self.token.label};object={label};type=private"
            f"?pin-source=file:{self.pin_file}"
        )

    def run(self, *args: str) -> None:
        done = subprocess.run(
            ["openssl", *args], env=self.env, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.fixture
def openssl(softhsm_token: SoftToken, tmp_path: Path) -> OpenSSL:
    return OpenSSL(softhsm_token, tmp_path)


@pytest.fixture
def keys(pkcs11_hsm: HSM) -> Iterator[dict[str, object]]:
    tag = uuid.uuid4().hex[:8]
    made = {
        "rsa": pkcs11_hsm.generate_key(RSA(2048), f"ossl-rsa-{tag}", usage="sign"),
        "ec": pkcs11_hsm.generate_key(EC("P-256"), f"ossl-ec-{tag}", usage="sign"),
    }
    yield made
    for key in made.values():
        key.delete()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_signs_with_a_key_hsmbridge_generated(
    openssl: OpenSSL, keys: dict[str, object], kind: str, tmp_path: Path
) -> None:
    key = keys[kind]
    message = tmp_path / "message"
    message.write_bytes(b"signed by OpenSSL with an hsmbridge key " + os.urandom(8))
    signature = tmp_path / "signature"
    openssl.run(
        "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine",
        "-sign", openssl.uri(key.label), "-out", str(signature), str(message),  # type: ignore[attr-defined]
    )  # fmt: skip
    public = key.public_key()  # type: ignore[attr-defined]
    data, sig = message.read_bytes(), signature.read_bytes()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(sig, data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_openssl_makes_a_csr_with_a_key_hsmbridge_generated(
    openssl: OpenSSL, keys: dict[str, object], kind: str, tmp_path: Path
) -> None:
    key = keys[kind]
    csr_file = tmp_path / "request.pem"
    openssl.run(
        "req", "-new", "-engine", "pkcs11", "-keyform", "engine",
        "-key", openssl.uri(key.label),  # type: ignore[attr-defined]
        "-subj", "/CN=hsmbridge interop", "-sha256", "-out", str(csr_file),
    )  # fmt: skip
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    assert csr.is_signature_valid
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        key.public_key_der()  # type: ignore[attr-defined]
    )


def test_hsmbridge_signs_with_a_key_openssl_generated(
    openssl: OpenSSL, pkcs11_hsm: HSM, softhsm_token: SoftToken, tmp_path: Path
) -> None:
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool is not installed (apt-get install opensc)")
    label, key_id = f"from-openssl-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:16]
    pem = tmp_path / "key.pem"
    openssl.run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", str(pem))  # fmt: skip
    der = tmp_path / "key.der"
    openssl.run("pkey", "-in", str(pem), "-outform", "DER", "-out", str(der))
    pub_der, pub_pem = tmp_path / "pub.der", tmp_path / "pub.pem"
    openssl.run("pkey", "-in", str(pem), "-pubout", "-outform", "DER", "-out", str(pub_der))
    openssl.run("pkey", "-in", str(pem), "-pubout", "-out", str(pub_pem))
    for kind, path in (("privkey", der), ("pubkey", pub_der)):
        subprocess.run(
            ["pkcs11-tool", "--module", softhsm_token.module, "--token-label",
             softhsm_token.label, "--login", "--pin", softhsm_token.pin, "--write-object",
             str(path), "--type", kind, "--label", label, "--id", key_id],
            env=openssl.env, check=True, capture_output=True,
        )  # fmt: skip
    key = pkcs11_hsm.get_key(uri=f"pkcs11:object={label};id=%{'%'.join(_pairs(key_id))}")
    try:
        message = b"signed by hsmbridge with an OpenSSL key"
        signature = key.sign(message, "ecdsa-sha256")
        (tmp_path / "message").write_bytes(message)
        (tmp_path / "signature").write_bytes(signature)
        openssl.run(
            "dgst", "-sha256", "-verify", str(pub_pem), "-signature", str(tmp_path / "signature"),
            str(tmp_path / "message"),
        )  # fmt: skip
    finally:
        key.delete()


def _pairs(hex_id: str) -> list[str]:
    return [hex_id[i : i + 2] for i in range(0, len(hex_id), 2)]
