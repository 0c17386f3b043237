"""Independent checks of what hsmbridge produces: ``cryptography`` and the OpenSSL CLI.

The tests never trust hsmbridge to check itself: signatures are verified and
ciphertexts made by these tools, from the exported public key only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from hsmbridge import Mechanism

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def hash_of(mech: Mechanism) -> hashes.HashAlgorithm:
    assert mech.hash_name is not None
    return _HASHES[mech.hash_name]()


def raw_to_der(raw: bytes) -> bytes:
    """r‖s to DER with cryptography's encoder (not hsmbridge's)."""
    half = len(raw) // 2
    return utils.encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


def crypto_verify(
    public: PublicKeyTypes,
    signature: bytes,
    data: bytes,
    mech: Mechanism,
    *,
    prehashed: bool = False,
    raw: bool = False,
) -> bool:
    """True if ``cryptography`` accepts the signature."""
    if mech.family == "eddsa":  # pure EdDSA: the message itself, no hash to choose
        assert isinstance(public, ed25519.Ed25519PublicKey) and not prehashed
        try:
            public.verify(signature, data)
        except InvalidSignature:
            return False
        return True
    algo = hash_of(mech)
    chosen: hashes.HashAlgorithm | utils.Prehashed = utils.Prehashed(algo) if prehashed else algo
    try:
        if mech.family == "ecdsa":
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(raw_to_der(signature) if raw else signature, data, ec.ECDSA(chosen))
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if mech.family == "pkcs1"
                else padding.PSS(padding.MGF1(hash_of(mech)), padding.PSS.DIGEST_LENGTH)
            )
            public.verify(signature, data, pad, chosen)
    except InvalidSignature:
        return False
    return True


def crypto_encrypt(public: PublicKeyTypes, plaintext: bytes, mech: Mechanism) -> bytes:
    assert isinstance(public, rsa.RSAPublicKey)
    if mech is Mechanism.RSA_PKCS1:
        return public.encrypt(plaintext, padding.PKCS1v15())
    algo = hash_of(mech)
    return public.encrypt(plaintext, padding.OAEP(padding.MGF1(algo), algo, None))


def _run(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=60, check=False)


class OpenSSL:
    """The ``openssl`` command working on files in a scratch directory."""

    def __init__(self, pem: str, directory: Path) -> None:
        self.dir = directory
        self.pem = self._write("pub.pem", pem.encode("ascii"))

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def parses(self) -> bool:
        """``openssl pkey -pubin`` accepts the PEM."""
        return _run(["openssl", "pkey", "-pubin", "-in", self.pem, "-noout"]).returncode == 0

    def verify(
        self, signature: bytes, data: bytes, mech: Mechanism, *, prehashed: bool = False
    ) -> bool:
        """``openssl dgst -verify`` (message), ``pkeyutl -verify`` (digest), or
        ``pkeyutl -verify -rawin`` (EdDSA: the message itself)."""
        sig = self._write("sig.bin", signature)
        inp = self._write("data.bin", data)
        pss = mech.family == "pss"
        if mech.family == "eddsa":
            args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", self.pem, "-rawin"]
            args += ["-in", inp, "-sigfile", sig]
            prehashed = True  # pkeyutl's answer
        elif prehashed:
            opts = ["-pkeyopt", f"digest:{mech.hash_name}"]
            if pss:
                opts += ["-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:digest"]
            args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", self.pem]
            args += ["-in", inp, "-sigfile", sig, *opts]
        else:
            opts = []
            if pss:
                opts = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
            assert mech.hash_name is not None
            args = ["openssl", "dgst", f"-{mech.hash_name}", "-verify", self.pem]
            args += [*opts, "-signature", sig, inp]
        done = _run(args)
        success = b"Signature Verified Successfully" if prehashed else b"Verified OK"
        ok = done.returncode == 0 and success in done.stdout
        # a refusal must be a verification failure, not a usage error of ours
        assert ok or b"Verif" in done.stdout + done.stderr, done.stderr.decode()
        return ok

    def encrypt(self, plaintext: bytes, mech: Mechanism) -> bytes:
        """``openssl pkeyutl -encrypt`` with OAEP (hash = MGF1 hash) or PKCS#1 v1.5."""
        inp = self._write("pt.bin", plaintext)
        out = str(self.dir / "ct.bin")
        if mech is Mechanism.RSA_PKCS1:
            opts = ["-pkeyopt", "rsa_padding_mode:pkcs1"]
        else:
            md = mech.hash_name
            opts = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", f"rsa_oaep_md:{md}"]
            opts += ["-pkeyopt", f"rsa_mgf1_md:{md}"]
        done = _run(
            ["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", self.pem, "-in", inp,
             "-out", out, *opts]
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        return Path(out).read_bytes()


def ed25519_verifies(
    public: PublicKeyTypes, signature: bytes, message: bytes, directory: Path
) -> bool:
    """``cryptography`` and ``openssl pkeyutl -verify -rawin`` both accept an Ed25519 signature."""
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return crypto_verify(public, signature, message, Mechanism.ED25519) and OpenSSL(
        pem, directory
    ).verify(signature, message, Mechanism.ED25519)
