"""The two batch engines (native C and pure Python) on PKCS#11 give the same
results, keep the pool healthy, and stream in bounded memory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pkcs11.exceptions as p11x
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

import hsmbridge
from hsmbridge import EC, RSA
from hsmbridge.pkcs11 import Pkcs11HSM, Pkcs11Key
from hsmbridge.testing import SoftToken

OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)


@pytest.fixture(scope="module")
def engines(softhsm_token: SoftToken, pkcs11_hsm: hsmbridge.HSM) -> Iterator[dict[str, Pkcs11HSM]]:
    if not isinstance(pkcs11_hsm, Pkcs11HSM) or pkcs11_hsm.native is None:
        pytest.skip("the native engine hsmbridge._native is not built")
    python_hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, native=False)
    assert isinstance(python_hsm, Pkcs11HSM) and python_hsm.native is None
    yield {"native": pkcs11_hsm, "python": python_hsm}
    python_hsm.close()


@pytest.fixture(scope="module")
def rsa_keys(engines: dict[str, Pkcs11HSM]) -> Iterator[dict[str, Pkcs11Key]]:
    key = engines["native"].generate_key(RSA(2048), label="engines-rsa", usage={"sign", "decrypt"})
    yield {"native": key, "python": engines["python"].get_key(key_id=key.id)}
    key.delete()


def test_rsa_engines_agree(rsa_keys: dict[str, Pkcs11Key]) -> None:
    messages = [os.urandom(40) for _ in range(300)]
    pub = rsa_keys["native"].public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    for mech in ("rsa-pkcs1-sha256", "rsa-pkcs1-sha512"):
        native = rsa_keys["native"].sign_batch(messages, mech, threads=2)
        python = rsa_keys["python"].sign_batch(messages, mech, threads=2)
        assert native == python  # PKCS#1 v1.5 signatures are deterministic
    pss = rsa_keys["native"].sign_batch(messages, "rsa-pss-sha384", threads=2)
    for sig, msg in zip(pss, messages, strict=True):
        pub.verify(sig, msg, padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())
    plain = [os.urandom(i % 100) for i in range(300)]
    cts = [pub.encrypt(p, OAEP_SHA1) for p in plain]
    assert rsa_keys["native"].decrypt_batch(cts, "rsa-oaep-sha1") == plain
    assert rsa_keys["python"].decrypt_batch(cts, "rsa-oaep-sha1") == plain


@pytest.mark.parametrize("engine", ["native", "python"])
def test_corrupt_items_do_not_poison_sessions(rsa_keys: dict[str, Pkcs11Key], engine: str) -> None:
    key = rsa_keys[engine]
    pub = key.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    plain = [os.urandom(20) for _ in range(200)]
    cts = [pub.encrypt(p, OAEP_SHA1) for p in plain]
    bad = {7, 8, 100, 199}
    for i in bad:
        cts[i] = bytes(256) if i % 2 else os.urandom(256)
    out = key.decrypt_batch(cts, "rsa-oaep-sha1", threads=2, return_exceptions=True)
    for i, r in enumerate(out):
        if i in bad:
            assert isinstance(r, hsmbridge.DecryptionFailed), (i, r)
        else:
            assert r == plain[i]
    with pytest.raises(hsmbridge.BatchItemError) as info:
        key.decrypt_batch(cts, "rsa-oaep-sha1", threads=2)
    assert info.value.index in bad
    assert isinstance(info.value.cause, hsmbridge.DecryptionFailed)
    good = [c for i, c in enumerate(cts) if i not in bad]
    assert key.decrypt_batch(good, "rsa-oaep-sha1", threads=2) == [
        p for i, p in enumerate(plain) if i not in bad
    ]


def test_huge_ecdsa_batch_verified(engines: dict[str, Pkcs11HSM], unique_label: str) -> None:
    key = engines["native"].generate_key(EC("P-256"), label=unique_label)
    try:
        messages = [i.to_bytes(4, "big") for i in range(20000)]
        sigs = key.sign_batch(messages, "ecdsa-sha256", signature_format="raw")
        pub = key.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        for msg, sig in zip(messages, sigs, strict=True):
            assert len(sig) == 64
            der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
            pub.verify(der, msg, ec.ECDSA(hashes.SHA256()))
    finally:
        key.delete()


def test_consumer_exception_leaves_the_pool_healthy(
    engines: dict[str, Pkcs11HSM], rsa_keys: dict[str, Pkcs11Key]
) -> None:
    hsm = engines["native"]
    key = rsa_keys["native"]

    class Stop(Exception):
        pass

    for _ in range(3):
        with pytest.raises(Stop):
            for i, _sig in enumerate(
                key.sign_many((b"%d" % n for n in range(5000)), "rsa-pkcs1-sha256")
            ):
                if i == 300:
                    raise Stop
    stream = key.sign_many((b"x" for _ in range(10_000)), "rsa-pkcs1-sha256", window=64)
    next(stream)
    stream.close()  # abandon mid-stream
    assert len(hsm.pool._idle) == hsm.pool._open_count  # every session came back
    sigs = key.sign_batch([b"a", b"b"], "rsa-pkcs1-sha256")
    assert len(sigs) == 2


@pytest.mark.slow
def test_one_million_messages_stream_in_bounded_memory(softhsm_token: SoftToken) -> None:
    """1,000,000 messages through sign_many: peak RSS grows by less than 50 MB."""
    script = textwrap.dedent(
        f"""
        import resource, hsmbridge
        hsm = hsmbridge.open({softhsm_token.uri!r})
        key = hsm.generate_key(hsmbridge.EC("P-256"), label="stream-1m")
        try:
            msgs = lambda n: (i.to_bytes(8, "big") for i in range(n))
            for _ in key.sign_many(msgs(20000), "ecdsa-sha256"):
                pass
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            count = 0
            for sig in key.sign_many(msgs(1_000_000), "ecdsa-sha256"):
                count += 1
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(count, base, peak)
        finally:
            key.delete()
        """
    )
    env = {**os.environ, **softhsm_token.env(), "HSMBRIDGE_PIN": softhsm_token.pin}
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0, r.stderr
    count, base_kb, peak_kb = map(int, r.stdout.split())
    assert count == 1_000_000
    grown = (peak_kb - base_kb) / 1024
    print(f"peak RSS grew {grown:.1f} MB over 1,000,000 streamed signatures")
    assert grown < 50, f"peak RSS grew {grown:.1f} MB"


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_broken_session_is_replaced(
    engines: dict[str, Pkcs11HSM], rsa_keys: dict[str, Pkcs11Key], engine: str
) -> None:
    """Close pooled sessions behind the pool's back: the next operations still work."""
    hsm = engines[engine]
    key = rsa_keys[engine]
    pub = key.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    key.sign_batch([b"warm", b"up"], "rsa-pkcs1-sha256", threads=2)  # sessions now pooled
    idle = list(hsm.pool._idle)
    assert idle
    for pooled in idle:
        pooled.session.close()  # C_CloseSession: the pool still holds the dead handles
    sig = key.sign(b"after", "rsa-pkcs1-sha256")  # single path: replaced and retried
    pub.verify(sig, b"after", padding.PKCS1v15(), hashes.SHA256())
    key.sign_batch([b"warm", b"up"], "rsa-pkcs1-sha256", threads=2)
    for pooled in list(hsm.pool._idle):
        with contextlib.suppress(p11x.SessionHandleInvalid):  # some may be dead already
            pooled.session.close()
    # Items that ran on a dead session are repeated on fresh ones: the batch is whole.
    sigs = key.sign_batch([b"y%d" % i for i in range(50)], "rsa-pkcs1-sha256", threads=2)
    for i, sig in enumerate(sigs):
        pub.verify(sig, b"y%d" % i, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("curve", ["P-256", "P-384", "P-521"])
def test_native_der_encoding_of_ecdsa(
    engines: dict[str, Pkcs11HSM], unique_label: str, curve: str
) -> None:
    """The native engine's DER encoding matches the Python one and verifies."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from hsmbridge.mechanisms import ecdsa_raw_to_der

    key = engines["native"].generate_key(EC(curve), label=unique_label)
    try:
        pub = key.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        messages = [os.urandom(16) for _ in range(400)]  # ~1/256 with a short r or s
        mech = {"P-256": "ecdsa-sha256", "P-384": "ecdsa-sha384", "P-521": "ecdsa-sha512"}[curve]
        algo = {"P-256": hashes.SHA256(), "P-384": hashes.SHA384(), "P-521": hashes.SHA512()}
        for msg, der in zip(messages, key.sign_batch(messages, mech), strict=True):
            pub.verify(der, msg, ec.ECDSA(algo[curve]))
            r, s = decode_dss_signature(der)
            size = (pub.curve.key_size + 7) // 8
            assert ecdsa_raw_to_der(r.to_bytes(size, "big") + s.to_bytes(size, "big")) == der
    finally:
        key.delete()
