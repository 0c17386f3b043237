"""``hsmbridge demo``: the main job, end to end, on any HSM.

Generates an RSA-2048 and an EC P-256 key inside the HSM, exports the public
halves (64-column PEM, upload JSON, JWK), then runs batch RSA signing, RSA
OAEP decryption and ECDSA signing, verifies every result with
``cryptography``, and prints the throughput next to a one-at-a-time loop.
Then the card-tokenisation flow with one-time keys, with timings: a pool
filled in the HSM, a key issued with its signed context, a "browser"
encrypting a JWE to it, the service decrypting it once.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .api import EC, HSM, RSA, Key
from .errors import HSMError, KeyExpired
from .jose import b64url
from .mechanisms import Mechanism
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
        _one_time_keys(hsm, rsa_key, suffix)
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


def _one_time_keys(hsm: HSM, signer: Key, suffix: str) -> None:
    """The tokenisation flow: issue, the browser encrypts, decrypt once (timed)."""
    offered = hsm.supported_mechanisms()  # None: learned on use (a NetHSM has every hash)
    alg = (
        "RSA-OAEP"
        if offered is not None and Mechanism.RSA_OAEP_SHA256 not in offered
        else "RSA-OAEP-256"
    )
    print(f"\none-time keys (alg {alg}{'' if alg.endswith('256') else ': no OAEP-SHA256 here'})")
    with hsm.one_time_keys(RSA(2048), pool=4, signer=signer, alg=alg, name=f"demo{suffix}") as otk:
        _, t_fill = _timed(otk.fill)
        k, t_issue = _timed(otk.issue)
        header, claims, signature = k.context.split(".") if k.context else ("", "", "")
        public = signer.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(
            _unb64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        jwk = json.loads(_unb64(claims))["jwk"]
        token = _browser_encrypts(jwk, b'{"number":"4111111111111111"}')
        card, t_decrypt = _timed(lambda: otk.decrypt_jwe(token))
        assert card == b'{"number":"4111111111111111"}'
        try:
            otk.decrypt_jwe(token)
            raise HSMError("demo: a one-time key decrypted twice")
        except KeyExpired as exc:
            refused = str(exc)[:60]
        print(f"  pool of 4 RSA-2048 keys generated in the HSM {t_fill * 1e3:>9.0f} ms")
        print(f"  issue() from the warm pool (context signed) {t_issue * 1e3:>9.1f} ms")
        print(f"  decrypt_jwe (claim, unwrap in HSM, destroy) {t_decrypt * 1e3:>9.1f} ms")
        print(f"  kid {k.kid}, expires {k.expires_at:%H:%M:%S} UTC")
        print(f"  second decrypt refused: {refused}...")
        print(f"  {otk.stats()}")


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _browser_encrypts(jwk: dict[str, str], plaintext: bytes) -> str:
    """What the browser does: a compact JWE (the JWK's alg, A256GCM) to the one-time key."""
    n, e = (int.from_bytes(_unb64(jwk[m]), "big") for m in ("n", "e"))
    hash_ = hashes.SHA256() if jwk["alg"] == "RSA-OAEP-256" else hashes.SHA1()
    cek, iv = AESGCM.generate_key(256), os.urandom(12)
    wrapped = (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .encrypt(cek, padding.OAEP(padding.MGF1(hash_), hash_, None))
    )
    header = b64url(json.dumps({"alg": jwk["alg"], "enc": "A256GCM", "kid": jwk["kid"]}).encode())
    sealed = AESGCM(cek).encrypt(iv, plaintext, header.encode())
    parts = (wrapped, iv, sealed[:-16], sealed[-16:])  # key, IV, ciphertext, tag
    return ".".join([header, *(b64url(p) for p in parts)])
