"""The contenders: every way of doing a workload's operation that a run compares.

A contender is a name and a runner ``(threads, count) -> Sample``. This module
prepares a workload's key and inputs (:func:`prepare`) and makes the
contenders every backend has (hsmbridge one at a time, hsmbridge batches,
OpenSSL); :mod:`.pkcs11` and :mod:`.nethsm` add the backend's own baselines.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..api import EC, HSM, RSA, Key, KeySpec
from ..errors import HSMError
from ..mechanisms import Mechanism
from .timing import Sample, each, parallel, timed
from .workloads import Workload

#: every contender, in the order a round runs them, with what it is
CONTENDERS: dict[str, str] = {
    "c-ceiling": "the token's ceiling: a C loop over C_xxxInit + C_Sign/C_Decrypt on N sessions "
    "in N threads, no Python per operation (hsmbridge._native.ceiling)",
    "python-pkcs11": "a plain python-pkcs11 loop in each of N threads, one session each",
    "nethsm-sdk": "the official nethsm SDK's sign/decrypt in a loop in each of N threads",
    "hsmbridge-single": "hsmbridge one operation per call (sign, decrypt, generate_key) "
    "in a loop in each of N threads",
    "hsmbridge-batch": "hsmbridge sign_batch/decrypt_batch with threads=N "
    "(the native engine on PKCS#11)",
    "hsmbridge-batch-python": "the same batches on hsmbridge's pure-Python engine",
    "openssl": "OpenSSL through cryptography with an in-memory key in N threads: "
    "the physical reference",
}

Runner = Callable[[int, int], Sample]

#: distinct inputs per workload; measurements cycle through them
MESSAGES = 64
CIPHERTEXTS = 16


@dataclass(frozen=True)
class Contender:
    name: str
    run: Runner


@dataclass
class Target:
    """A workload made concrete: the HSM key, a same-type in-memory key, inputs for both."""

    workload: Workload
    hsm: HSM
    key: Key | None  # None for keygen
    soft_key: Any
    inputs: list[bytes] = field(default_factory=list)
    soft_inputs: list[bytes] = field(default_factory=list)

    @property
    def mechanism(self) -> Mechanism:
        assert self.workload.mechanism is not None
        return self.workload.mechanism

    @property
    def call(self) -> Callable[[bytes], bytes]:
        """One operation through hsmbridge's key API."""
        key, mech = self.key, self.mechanism
        assert key is not None
        if self.workload.kind == "sign":
            return lambda m: key.sign(m, mech)
        pkcs1 = mech is Mechanism.RSA_PKCS1  # opt-in: measuring it is knowing what it is
        return lambda c: key.decrypt(c, mech, allow_pkcs1v15=pkcs1)

    def batch(self, key: Key, items: list[bytes], threads: int) -> list[bytes]:
        """A whole batch through ``key`` (this workload's key, or another handle on it)."""
        mech = self.mechanism
        if self.workload.kind == "sign":
            return key.sign_batch(items, mech, threads=threads)
        pkcs1 = mech is Mechanism.RSA_PKCS1
        return key.decrypt_batch(items, mech, threads=threads, allow_pkcs1v15=pkcs1)

    def items(self, count: int, soft: bool = False) -> list[bytes]:
        pool = self.soft_inputs if soft else self.inputs
        return [pool[j % len(pool)] for j in range(count)]


def soft_key(spec: KeySpec) -> Any:
    """An in-memory private key of the same type (the OpenSSL reference)."""
    if isinstance(spec, RSA):
        return rsa.generate_private_key(65537, spec.bits)
    if isinstance(spec, EC):
        return ec.generate_private_key(spec.curve_info.crypto_curve())
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate()


def _hash(mech: Mechanism) -> hashes.HashAlgorithm:
    name = mech.hash_name
    assert name is not None
    algorithm: hashes.HashAlgorithm = getattr(hashes, name.upper())()
    return algorithm


def _decryption_padding(mech: Mechanism) -> padding.AsymmetricPadding:
    if mech.family == "oaep":
        return padding.OAEP(padding.MGF1(_hash(mech)), _hash(mech), None)
    return padding.PKCS1v15()


def openssl_op(key: Any, mech: Mechanism) -> Callable[[bytes], object]:
    """The same operation as ``mech`` on an in-memory ``cryptography`` key."""
    family = mech.family
    if family == "pkcs1":
        pkcs1, h = padding.PKCS1v15(), _hash(mech)
        return lambda m: key.sign(m, pkcs1, h)
    if family == "pss":
        h = _hash(mech)
        pss = padding.PSS(padding.MGF1(h), h.digest_size)
        return lambda m: key.sign(m, pss, h)
    if family == "ecdsa":
        sig = ec.ECDSA(_hash(mech))
        return lambda m: key.sign(m, sig)
    if mech.is_sign:  # EdDSA: no parameters
        return lambda m: key.sign(m)
    pad = _decryption_padding(mech)
    return lambda c: key.decrypt(c, pad)


def prepare(hsm: HSM, workload: Workload) -> Target:
    """Generate the key and inputs, and check one operation against its public key.

    Raises MechanismNotSupported (or another HSMError) when this HSM cannot
    do the workload; the caller reports it as skipped.
    """
    soft = soft_key(workload.spec)
    if workload.kind == "keygen":
        return Target(workload, hsm, None, soft)
    usage = {workload.kind}
    label = f"bench-{workload.name}-{uuid.uuid4().hex[:8]}"
    key = hsm.generate_key(workload.spec, label=label, usage=usage)
    target = Target(workload, hsm, key, soft)
    try:
        mech = target.mechanism
        if workload.kind == "sign":
            target.inputs = [os.urandom(32) for _ in range(MESSAGES)]
            target.soft_inputs = target.inputs
            signature = target.call(target.inputs[0])
            _verify(key.public_key(), mech, signature, target.inputs[0])
        else:
            pad = _decryption_padding(mech)
            plain = [os.urandom(32) for _ in range(CIPHERTEXTS)]
            public = key.public_key()
            assert isinstance(public, rsa.RSAPublicKey)
            target.inputs = [public.encrypt(p, pad) for p in plain]
            target.soft_inputs = [soft.public_key().encrypt(p, pad) for p in plain]
            if target.call(target.inputs[0]) != plain[0]:
                raise HSMError(f"{workload.name}: the HSM decrypted to something else")
    except BaseException:
        key.delete()
        raise
    return target


def _verify(public: Any, mech: Mechanism, signature: bytes, message: bytes) -> None:
    from cryptography.exceptions import InvalidSignature

    family = mech.family
    try:
        if family == "pkcs1":
            public.verify(signature, message, padding.PKCS1v15(), _hash(mech))
        elif family == "pss":
            h = _hash(mech)
            public.verify(signature, message, padding.PSS(padding.MGF1(h), h.digest_size), h)
        elif family == "ecdsa":
            public.verify(signature, message, ec.ECDSA(_hash(mech)))
        else:
            public.verify(signature, message)
    except InvalidSignature:
        raise HSMError(f"the HSM's {mech.value} signature does not verify") from None


def common(target: Target) -> list[Contender]:
    """hsmbridge one at a time, hsmbridge batches and OpenSSL: every backend has these."""
    if target.workload.kind == "keygen":
        return [
            Contender("hsmbridge-single", lambda t, n: _keygen(target, t, n)),
            Contender("openssl", lambda t, n: parallel(t, n, each(_soft_keygen(target)))),
        ]
    key, mech = target.key, target.mechanism
    assert key is not None

    def single(threads: int, count: int) -> Sample:
        items, call = target.items(count), target.call
        return parallel(threads, count, each(lambda j: call(items[j])))

    def soft(threads: int, count: int) -> Sample:
        items, op = target.items(count, soft=True), openssl_op(target.soft_key, mech)
        return parallel(threads, count, each(lambda j: op(items[j])))

    return [
        Contender("hsmbridge-single", single),
        Contender("hsmbridge-batch", lambda t, n: batch(key, target, t, n)),
        Contender("openssl", soft),
    ]


def batch(key: Key, target: Target, threads: int, count: int) -> Sample:
    """One ``sign_batch``/``decrypt_batch`` of ``count`` items on ``key``."""
    items = target.items(count)
    return timed(lambda: target.batch(key, items, threads), count)


def _keygen(target: Target, threads: int, count: int) -> Sample:
    made: list[Key] = []
    spec, tag = target.workload.spec, uuid.uuid4().hex[:8]

    def generate(j: int) -> None:
        made.append(target.hsm.generate_key(spec, label=f"bench-keygen-{tag}-{j}"))

    try:
        return parallel(threads, count, each(generate))
    finally:
        for key in made:
            key.delete()


def _soft_keygen(target: Target) -> Callable[[int], object]:
    spec = target.workload.spec
    return lambda _j: soft_key(spec)
