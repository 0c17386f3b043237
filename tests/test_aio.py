"""hsmbridge.aio: the same operations and errors as the sync API, awaitable; cancelled
waiters leak no PKCS#11 session. Timing is measured in benchmarks/bench_aio.py, not here."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

import hsmbridge
import hsmbridge.aio
from hsmbridge.pkcs11 import Pkcs11HSM
from hsmbridge.testing import SoftToken

T = TypeVar("T")
OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)


def run(make: Callable[[hsmbridge.aio.AsyncHSM], Awaitable[T]], hsm: hsmbridge.HSM) -> T:
    """Run ``make(view)`` on a fresh loop with an AsyncHSM view of the session's handle."""

    async def main() -> T:
        view = hsmbridge.aio.AsyncHSM.wrap(hsm)
        try:
            return await make(view)
        finally:
            await view.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def ec_label(pkcs11_hsm: hsmbridge.HSM) -> Iterator[str]:
    key = pkcs11_hsm.generate_key(hsmbridge.EC("P-256"), label="aio-ec")
    yield key.label
    key.delete()


@pytest.fixture(scope="module")
def rsa_label(pkcs11_hsm: hsmbridge.HSM) -> Iterator[str]:
    key = pkcs11_hsm.generate_key(hsmbridge.RSA(2048), "aio-rsa", usage={"sign", "decrypt"})
    yield key.label
    key.delete()


def test_open_as_context_manager_and_key_management(
    softhsm_token: SoftToken, unique_label: str
) -> None:
    async def main() -> tuple[list[str], str, bool]:
        async with hsmbridge.aio.open(softhsm_token.uri, pin=softhsm_token.pin) as hsm:
            made = await hsm.generate_key(hsmbridge.EC("P-256"), unique_label)
            found = await hsm.get_key(unique_label)
            labels = [info.label for info in await hsm.list_keys()]
            pem = found.public_key_pem()
            await found.delete()
            gone = unique_label not in [i.label for i in await hsm.list_keys()]
            assert made.id == found.id
            return labels, pem, gone

    labels, pem, gone = asyncio.run(main())
    assert unique_label in labels and pem.startswith("-----BEGIN PUBLIC KEY-----") and gone


def test_concurrent_signs_verify_and_match_the_inputs(
    pkcs11_hsm: hsmbridge.HSM, ec_label: str
) -> None:
    messages = [os.urandom(40) for _ in range(300)]

    async def main(hsm: hsmbridge.aio.AsyncHSM) -> tuple[list[bytes], Any]:
        key = await hsm.get_key(ec_label)
        sigs = await asyncio.gather(*(key.sign(m, "ecdsa-sha256") for m in messages))
        return list(sigs), key.public_key()

    sigs, public = run(main, pkcs11_hsm)
    for message, sig in zip(messages, sigs, strict=True):
        public.verify(sig, message, ec.ECDSA(hashes.SHA256()))


def test_prehashed_raw_and_large_messages(pkcs11_hsm: hsmbridge.HSM, ec_label: str) -> None:
    big = os.urandom(hsmbridge.aio.HASH_ON_LOOP + 1)  # hashed in the pool, not on the loop

    async def main(hsm: hsmbridge.aio.AsyncHSM) -> tuple[bytes, bytes, bytes, Any]:
        key = await hsm.get_key(ec_label)
        digest = hashlib.sha256(b"m").digest()
        pre = await key.sign(digest, "ecdsa-sha256", prehashed=True)
        raw = await key.sign(b"m", "ecdsa-sha256", signature_format="raw")
        large = await key.sign(big, "ecdsa-sha256")
        return pre, raw, large, key.public_key()

    pre, raw, large, public = run(main, pkcs11_hsm)
    public.verify(pre, b"m", ec.ECDSA(hashes.SHA256()))
    public.verify(large, big, ec.ECDSA(hashes.SHA256()))
    assert len(raw) == 64


def test_rsa_sign_decrypt_batches_and_streams(pkcs11_hsm: hsmbridge.HSM, rsa_label: str) -> None:
    plaintexts = [os.urandom(16) for _ in range(40)]

    async def source() -> AsyncIterator[bytes]:
        for p in plaintexts:
            yield p

    async def main(hsm: hsmbridge.aio.AsyncHSM) -> dict[str, Any]:
        key = await hsm.get_key(rsa_label)
        public = key.public_key()
        cts = [public.encrypt(p, OAEP_SHA1) for p in plaintexts]  # type: ignore[union-attr]
        single = await asyncio.gather(*(key.decrypt(c, "rsa-oaep-sha1") for c in cts))
        batch = await key.decrypt_batch(cts, "rsa-oaep-sha1")
        streamed = [p async for p in key.decrypt_many(cts, "rsa-oaep-sha1", window=7)]
        pkcs1 = [public.encrypt(p, padding.PKCS1v15()) for p in plaintexts[:5]]  # type: ignore[union-attr]
        with pytest.raises(hsmbridge.InvalidInput, match="allow_pkcs1v15"):
            await key.decrypt(pkcs1[0], "rsa-pkcs1")
        opted_in = await asyncio.gather(
            *(key.decrypt(c, "rsa-pkcs1", allow_pkcs1v15=True) for c in pkcs1)
        )
        assert list(opted_in) == plaintexts[:5]
        sigs = await key.sign_batch(plaintexts, "rsa-pss-sha256")
        async_src = [s async for s in key.sign_many(source(), "rsa-pkcs1-sha256", window=9)]
        return {"single": single, "batch": batch, "streamed": streamed, "sigs": sigs,
                "async_src": async_src, "public": public}  # fmt: skip

    out = run(main, pkcs11_hsm)
    assert out["single"] == out["batch"] == out["streamed"] == plaintexts
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    for p, sig in zip(plaintexts, out["sigs"], strict=True):
        out["public"].verify(sig, p, pss, hashes.SHA256())
    for p, sig in zip(plaintexts, out["async_src"], strict=True):
        out["public"].verify(sig, p, padding.PKCS1v15(), hashes.SHA256())


def test_same_errors_as_the_sync_api(pkcs11_hsm: hsmbridge.HSM, ec_label: str) -> None:
    async def main(hsm: hsmbridge.aio.AsyncHSM) -> list[BaseException]:
        errors: list[BaseException] = []
        key = await hsm.get_key(ec_label)
        attempts: list[Callable[[], Awaitable[Any]]] = [
            lambda: hsm.get_key("no-such-key-anywhere"),
            lambda: key.sign(b"m", "rsa-pss-sha256"),  # wrong family for an EC key
            lambda: key.sign(b"m", "no-such-mechanism"),
            lambda: key.sign(b"short", "ecdsa-sha256", prehashed=True),  # not a digest
            lambda: key.sign("text", "ecdsa-sha256"),  # type: ignore[arg-type]
            lambda: key.decrypt(b"x", "rsa-oaep-sha1"),  # EC key: no decryption
            lambda: key.sign_batch([b"a", b"b" * 31], "ecdsa-sha256", prehashed=True),
        ]
        for attempt in attempts:
            try:
                await attempt()
            except BaseException as exc:
                errors.append(exc)
        return errors

    errors = run(main, pkcs11_hsm)
    kinds = [type(e) for e in errors]
    assert kinds == [
        hsmbridge.KeyNotFound,
        hsmbridge.InvalidInput,
        hsmbridge.MechanismNotSupported,
        hsmbridge.InvalidInput,
        hsmbridge.InvalidInput,
        hsmbridge.InvalidInput,
        hsmbridge.BatchItemError,
    ]
    assert "32-byte" in str(errors[3]) and errors[6].index == 0  # type: ignore[attr-defined]
    # the sync API raises the very same classes
    key = pkcs11_hsm.get_key(ec_label)
    with pytest.raises(hsmbridge.InvalidInput, match="32-byte"):
        key.sign(b"short", "ecdsa-sha256", prehashed=True)


def test_an_item_error_fails_only_its_waiter(pkcs11_hsm: hsmbridge.HSM, ec_label: str) -> None:
    """Coalesced into one batch, a bad digest fails its own call; the others succeed."""

    async def main(hsm: hsmbridge.aio.AsyncHSM) -> list[Any]:
        key = await hsm.get_key(ec_label)
        digests = [os.urandom(32) for _ in range(20)]
        digests[7] = b"not a digest"
        calls = [key.sign(d, "ecdsa-sha256", prehashed=True) for d in digests]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    results = run(main, pkcs11_hsm)
    assert isinstance(results[7], hsmbridge.InvalidInput)
    assert all(isinstance(r, bytes) for i, r in enumerate(results) if i != 7)


def test_usage_error_reaches_every_coalesced_waiter(
    pkcs11_hsm: hsmbridge.HSM, ec_label: str
) -> None:
    async def main(hsm: hsmbridge.aio.AsyncHSM) -> list[Any]:
        key = await hsm.get_key(ec_label)
        key.sync.info = hsmbridge.KeyInfo(key.label, key.id, key.spec, frozenset({"decrypt"}))
        return list(
            await asyncio.gather(
                *(key.sign(b"m", "ecdsa-sha256") for _ in range(5)), return_exceptions=True
            )
        )

    results = run(main, pkcs11_hsm)
    assert all(isinstance(r, hsmbridge.InvalidInput) and "usage" in str(r) for r in results)


def test_calls_during_a_running_batch_wait_to_form_the_next(
    pkcs11_hsm: hsmbridge.HSM, rsa_label: str
) -> None:
    """Fewer than MIN_BATCH calls arriving one per loop iteration while a batch runs
    become one batch when it ends (not one small batch each); MIN_BATCH of them start
    a second batch at once. Every signature is checked."""
    late = hsmbridge.aio.MIN_BATCH // 4

    async def main(hsm: hsmbridge.aio.AsyncHSM) -> tuple[list[int], list[bytes], Any]:
        key = await hsm.get_key(rsa_label)
        sizes: list[int] = []
        real = key.sync.sign_batch

        def counted(messages: list[bytes], *args: Any, **kwargs: Any) -> list[Any]:
            if messages:
                sizes.append(len(messages))
            return real(messages, *args, **kwargs)

        key.sync.sign_batch = counted  # type: ignore[method-assign]
        # a first batch of 30 RSA signatures: tens of milliseconds in the token
        tasks = [asyncio.ensure_future(key.sign(b"first-%d" % i, "rsa-pss-sha256"))
                 for i in range(30)]  # fmt: skip
        await asyncio.sleep(0)
        for i in range(late):  # one call per iteration while the first batch runs
            tasks.append(asyncio.ensure_future(key.sign(b"late-%d" % i, "rsa-pss-sha256")))
            await asyncio.sleep(0)
        sigs = list(await asyncio.gather(*tasks))
        wave = [asyncio.ensure_future(key.sign(b"wave-%d" % i, "rsa-pss-sha256"))
                for i in range(hsmbridge.aio.MIN_BATCH + 8)]  # fmt: skip
        await asyncio.sleep(0)
        more = [asyncio.ensure_future(key.sign(b"more-%d" % i, "rsa-pss-sha256"))
                for i in range(hsmbridge.aio.MIN_BATCH)]  # fmt: skip
        await asyncio.gather(*wave, *more)
        return sizes, sigs, key.public_key()

    sizes, sigs, public = run(main, pkcs11_hsm)
    assert sizes[:2] == [30, late]
    # the wave: one batch at once; the next MIN_BATCH arrivals start a second while it runs
    assert sizes[2] == hsmbridge.aio.MIN_BATCH + 8 and sum(sizes[3:]) == hsmbridge.aio.MIN_BATCH
    messages = [b"first-%d" % i for i in range(30)] + [b"late-%d" % i for i in range(late)]
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    for message, sig in zip(messages, sigs, strict=True):
        public.verify(sig, message, pss, hashes.SHA256())


def _pool_intact(hsm: Pkcs11HSM) -> None:
    """Every worker session can be taken at once (none leaked), then all go back."""
    pool = hsm.pool
    taken = [pool.acquire(timeout=5.0) for _ in range(pool.max_workers)]
    for pooled in taken:
        pool.release(pooled)


def test_cancelled_waiters_leak_no_session(pkcs11_hsm: hsmbridge.HSM, rsa_label: str) -> None:
    assert isinstance(pkcs11_hsm, Pkcs11HSM)
    workers = pkcs11_hsm.pool.max_workers

    async def main(hsm: hsmbridge.aio.AsyncHSM) -> tuple[int, int]:
        key = await hsm.get_key(rsa_label)
        cancelled = 0
        for _ in range(5):  # RSA is slow: batches are mid-flight when the cancel lands
            tasks = [asyncio.ensure_future(key.sign(os.urandom(8), "rsa-pss-sha256"))
                     for _ in range(200)]  # fmt: skip
            batch = asyncio.ensure_future(key.sign_batch([b"x"] * 50, "rsa-pss-sha256"))
            stream = key.sign_many([b"y"] * 100, "rsa-pss-sha256", window=10)
            async with aclosing(stream):  # type: ignore[type-var]
                await anext(stream)
            await asyncio.sleep(0.005)
            for t in [*tasks, batch]:
                cancelled += t.cancel()
            await asyncio.gather(*tasks, batch, return_exceptions=True)
        # every session the cancelled work took is back: a batch on all of them runs
        sigs = await key.sign_batch([b"after"] * (4 * workers), "rsa-pss-sha256", threads=workers)
        return cancelled, len(sigs)

    cancelled, signed = run(main, pkcs11_hsm)
    assert cancelled > 0 and signed == 4 * workers
    # the pool thread of a cancelled batch may still be finishing: wait for it, then count
    _pool_intact_eventually(pkcs11_hsm)


def _pool_intact_eventually(hsm: Pkcs11HSM) -> None:
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            _pool_intact(hsm)
            return
        except hsmbridge.HSMUnavailable:
            if time.monotonic() > deadline:
                raise


def test_errors_for_bad_options() -> None:
    with pytest.raises(hsmbridge.InvalidInput, match="workers"):
        hsmbridge.aio.open("pkcs11:token=x", workers=0)
    for nice in (-1, 20, True, 1.5, "IDLE", "10"):
        with pytest.raises(hsmbridge.InvalidInput, match="worker_nice must be 'idle' or a whole"):
            hsmbridge.aio.open("pkcs11:token=x", worker_nice=nice)  # type: ignore[arg-type]

    async def closed() -> None:
        view = hsmbridge.aio.AsyncHSM(None)
        await view.get_key("x")

    with pytest.raises(hsmbridge.HSMError, match="not open"):
        asyncio.run(closed())


def _thread_priorities() -> dict[int, tuple[int, int]]:
    """Every thread of this process: (nice, scheduling policy) (/proc stat fields 19, 41)."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{task}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            found[int(task)] = (int(fields[16]), int(fields[38]))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
@pytest.mark.parametrize("worker_nice", [0, 10, "idle"])
def test_native_workers_run_below_the_loop_priority(
    pkcs11_hsm: hsmbridge.HSM, ec_label: str, worker_nice: int | str
) -> None:
    """The threads computing in the token yield the CPU to the event loop thread
    (SCHED_IDLE by default, or a higher nice value); the loop thread and the pool
    threads (which run Python) keep their priority."""
    if not isinstance(pkcs11_hsm, Pkcs11HSM) or pkcs11_hsm.native is None:
        pytest.skip("the native engine is not built")
    loop_tid = threading.get_native_id()
    base = os.getpriority(os.PRIO_PROCESS, loop_tid)
    assert hsmbridge.aio.WORKER_NICE == "idle"

    async def main() -> set[tuple[int, int]]:
        view = hsmbridge.aio.AsyncHSM.wrap(pkcs11_hsm, worker_nice=worker_nice)  # type: ignore[arg-type]
        before = set(_thread_priorities())  # (earlier tests' batches may still be finishing)
        seen: set[tuple[int, int]] = set()
        try:
            key = await view.get_key(ec_label)
            work = asyncio.ensure_future(key.sign_batch([b"m"] * 3000, "ecdsa-sha256"))
            while not work.done():
                seen |= {p for tid, p in _thread_priorities().items() if tid not in before}
                await asyncio.sleep(0.001)
            await work
            pool = [t for t in threading.enumerate() if t.name.startswith("hsmbridge-aio")]
            for t in pool:
                assert os.getpriority(os.PRIO_PROCESS, t.native_id or 0) == base
                assert os.sched_getscheduler(t.native_id or 0) == os.SCHED_OTHER
            return seen
        finally:
            await view.close()

    seen = asyncio.run(main())
    assert os.getpriority(os.PRIO_PROCESS, loop_tid) == base
    assert os.sched_getscheduler(loop_tid) == os.SCHED_OTHER
    if worker_nice == "idle":
        assert (min(base + 19, 19), os.SCHED_IDLE) in seen
    elif worker_nice:
        assert (base + 10, os.SCHED_OTHER) in seen
    else:
        assert seen == {(base, os.SCHED_OTHER)}
