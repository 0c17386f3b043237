"""``hsmbridge demo``: the main job, end to end, on any HSM.

Generates an RSA-2048 and an EC P-256 key inside the HSM, exports the public
halves (64-column PEM, upload JSON, JWK), then runs batch RSA signing, RSA
OAEP decryption and ECDSA signing, verifies every result with
``cryptography``, and prints the throughput next to a one-at-a-time loop.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .api import EC, HSM, RSA
from .errors import HSMError
from .progress import Progress


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>9,.0f} ops/s" if seconds > 0 else "      n/a"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_demo(hsm: HSM, *, count: int = 2000, keep: bool = False) -> None:
    suffix = uuid.uuid4().hex[:6]
    print(f"HSM: {hsm.description}\n")
    rsa_key = hsm.generate_key(RSA(2048), label=f"demo-rsa-{suffix}", usage={"sign", "decrypt"})
    ec_key = hsm.generate_key(EC("P-256"), label=f"demo-ec-{suffix}")
    try:
        print(f"generated {rsa_key!r}\ngenerated {ec_key!r}\n")
        print(rsa_key.public_key_pem())
        print("upload JSON:", rsa_key.upload_json(min_bits=2048)[:72] + "...")
        print("EC JWK kid (RFC 7638):", ec_key.public_key_jwk()["kid"], "\n")

        rsa_pub = rsa_key.public_key()
        ec_pub = ec_key.public_key()
        assert isinstance(rsa_pub, rsa.RSAPublicKey) and isinstance(
            ec_pub, ec.EllipticCurvePublicKey
        )
        messages = [os.urandom(32) for _ in range(count)]
        plaintexts = [os.urandom(24) for _ in range(count)]
        oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        ciphertexts = [rsa_pub.encrypt(p, oaep) for p in plaintexts]
        single = max(1, count // 10)

        print(f"{'operation':<34}{'one at a time':>16}{'batch':>16}   ({count} items, verified)")
        rows: list[tuple[str, Callable[[], list[bytes]], Callable[[int], bytes]]] = [
            (
                "RSA-2048 sign rsa-pkcs1-sha256",
                lambda: rsa_key.sign_batch(messages, "rsa-pkcs1-sha256"),
                lambda i: rsa_key.sign(messages[i], "rsa-pkcs1-sha256"),
            ),
            (
                "RSA-2048 decrypt rsa-oaep-sha1",
                lambda: rsa_key.decrypt_batch(ciphertexts, "rsa-oaep-sha1"),
                lambda i: rsa_key.decrypt(ciphertexts[i], "rsa-oaep-sha1"),
            ),
            (
                "EC P-256 sign ecdsa-sha256",
                lambda: ec_key.sign_batch(messages, "ecdsa-sha256"),
                lambda i: ec_key.sign(messages[i], "ecdsa-sha256"),
            ),
        ]
        for name, batch, one in rows:
            with Progress(3) as progress:
                progress.update(0, f"{name}: one at a time")
                _, t_single = _timed(lambda one=one: [one(i) for i in range(single)])  # type: ignore[misc]
                progress.update(1, f"{name}: batch")
                results, t_batch = _timed(batch)
                progress.update(2, f"{name}: verifying")
                _verify(name, results, messages, plaintexts, rsa_pub, ec_pub)
            print(f"{name:<34}{_rate(single, t_single):>16}{_rate(count, t_batch):>16}")
        print("\nevery signature verified with cryptography; every plaintext matched")
    finally:
        if not keep:
            for key in (rsa_key, ec_key):
                try:
                    key.delete()
                except HSMError as exc:
                    print(f"could not delete demo key {key.label!r}: {exc}")


def _verify(
    name: str,
    results: list[bytes],
    messages: list[bytes],
    plaintexts: list[bytes],
    rsa_pub: rsa.RSAPublicKey,
    ec_pub: ec.EllipticCurvePublicKey,
) -> None:
    for i, out in enumerate(results):
        if "decrypt" in name:
            if out != plaintexts[i]:
                raise HSMError(f"demo: plaintext {i} does not match")
        elif "ecdsa" in name:
            ec_pub.verify(out, messages[i], ec.ECDSA(hashes.SHA256()))
        else:
            rsa_pub.verify(out, messages[i], padding.PKCS1v15(), hashes.SHA256())
