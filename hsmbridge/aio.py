"""asyncio front end: the same HSMs, keys and errors, awaitable.

    async with hsmbridge.aio.open(uri) as hsm:
        key = await hsm.get_key("payments-2026")
        signature = await key.sign(b"message", "ecdsa-sha256")

Built on the synchronous API only. Every blocking call runs in the handle's
own bounded thread pool, so the event loop never waits for the HSM. What keeps
the loop responsive under load:

- **Coalescing.** Concurrent :meth:`AsyncKey.sign` / :meth:`AsyncKey.decrypt`
  calls with the same mechanism are gathered into one ``sign_batch`` /
  ``decrypt_batch``: a thousand awaits cost a few engine batches (the native
  engine releases the GIL once per batch), not a thousand thread hand-offs.
  At most :data:`IN_FLIGHT` batches per key and mechanism run at once, the
  second only once :data:`MIN_BATCH` calls wait; what arrives meanwhile forms
  the next batch.
- **Little Python off the loop.** Messages are hashed on the loop (small ones;
  large ones in the pool), so the pool thread runs a ``prehashed`` batch and
  holds the GIL only briefly around the engine call.
- **The token's threads below the loop.** A software token computes on the
  host's cores in the native engine's threads; by default they run
  SCHED_IDLE (``worker_nice="idle"``), so a waking loop thread takes a core
  from them at once.
- **Completions in slices.** A finished batch wakes its waiters
  :data:`WAKE_SLICE` at a time, one loop iteration each, so a timer or a
  socket that became ready meanwhile is served between slices.

A handle and its keys belong to the event loop that first awaits them.

A waiting task that is cancelled gives up only its result: an item not yet
dispatched is dropped, and a dispatched batch runs to its end in the pool,
where the synchronous engine returns every session it took (sessions are
never held across an ``await``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import functools
import hashlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from . import batch
from .api import HSM, Key, KeyInfo, KeySpec, _window
from .errors import HSMError, InvalidInput
from .mechanisms import Mechanism

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

_T = TypeVar("_T")

#: engine batches one key and mechanism may have running at once
IN_FLIGHT = 2
#: most items one coalesced batch takes (bounds the GIL time of one hand-off)
MAX_BATCH = 512
#: while a batch of a lane runs, items waiting before a second one is sent: fewer,
#: larger batches mean fewer hand-offs between threads, each of which wakes the
#: loop and takes the GIL (docs/design.md, "asyncio and the event loop")
MIN_BATCH = 64
#: waiters woken per loop iteration when a batch completes (each resumes its task
#: in the next iteration: this bounds the loop's work between two I/O polls)
WAKE_SLICE = 8
#: messages up to this size are hashed on the event loop; larger ones in the pool
HASH_ON_LOOP = 16 * 1024
#: how the threads computing in a software token yield the CPU to the event loop:
#: SCHED_IDLE, or a nice value 0-19 below it (see hsmbridge.batch.worker_nice)
WORKER_NICE: batch.WorkerNice = batch.IDLE


def open(
    uri: str | None = None,
    *,
    workers: int = 4,
    worker_nice: batch.WorkerNice = WORKER_NICE,
    **options: Any,
) -> AsyncHSM:
    """An :class:`AsyncHSM` for ``uri``; use it as ``async with hsmbridge.aio.open(uri) as hsm``.

    Options are :func:`hsmbridge.open`'s. ``workers`` bounds the threads that
    run blocking calls (batches, key management) for this handle;
    ``worker_nice`` is how the native engine's threads yield the CPU to the
    event loop's (Linux): ``"idle"`` (SCHED_IDLE: they run only on a core no
    other thread wants), or a nice value 1-19 below it, or 0 (equal); see
    :data:`hsmbridge.batch.worker_nice` and docs/design.md for the trade-off.
    """
    return AsyncHSM(uri, workers=workers, worker_nice=worker_nice, **options)


class AsyncHSM:
    """An HSM handle whose calls are awaitable. Opens on ``async with`` (or :meth:`open`)."""

    def __init__(
        self,
        uri: str | None,
        *,
        workers: int = 4,
        worker_nice: batch.WorkerNice = WORKER_NICE,
        **options: Any,
    ) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise InvalidInput(f"workers must be a whole number, at least 1, got {workers!r}")
        if worker_nice != batch.IDLE and (
            type(worker_nice) is not int or not 0 <= worker_nice <= 19
        ):
            raise InvalidInput(
                f"worker_nice must be 'idle' or a whole number 0-19 (0: the event loop's "
                f"priority), got {worker_nice!r}"
            )
        self._uri = uri
        self._options = options
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="hsmbridge-aio",
        )
        self._worker_nice = worker_nice
        self._hsm: HSM | None = None
        self._owned = True

    @classmethod
    def wrap(
        cls, hsm: HSM, *, workers: int = 4, worker_nice: batch.WorkerNice = WORKER_NICE
    ) -> AsyncHSM:
        """An awaitable view of a handle that is already open; closing the view leaves
        ``hsm`` open (its owner closes it)."""
        handle = cls(None, workers=workers, worker_nice=worker_nice)
        handle._hsm = hsm
        handle._owned = False
        return handle

    async def open(self) -> AsyncHSM:
        """Load the module, log in or connect (in the pool). Idempotent."""
        if self._hsm is None:
            from . import open as open_sync

            self._hsm = await self._call(open_sync, self._uri, **self._options)
        return self

    @property
    def sync(self) -> HSM:
        """The synchronous handle underneath (for what has no awaitable form)."""
        if self._hsm is None:
            raise HSMError("this AsyncHSM is not open; use 'async with hsmbridge.aio.open(uri)'")
        return self._hsm

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking call in this handle's pool (the caller's context variables go along)."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        # A software token computes in the threads that call it and keeps every
        # core busy; the loop thread must not queue behind them for a core
        # (docs/design.md, "asyncio and the event loop").
        ctx.run(batch.worker_nice.set, self._worker_nice)
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    # -- key management -------------------------------------------------------------

    async def get_key(self, label: str | None = None, *, key_id: str | None = None) -> AsyncKey:
        """Exactly one key by label or id (see :meth:`hsmbridge.HSM.get_key`)."""
        return await self._call(self._with_public, self.sync.get_key, label, key_id=key_id)

    async def generate_key(
        self,
        spec: KeySpec,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> AsyncKey:
        """Generate a key pair in the HSM (see :meth:`hsmbridge.HSM.generate_key`)."""
        return await self._call(
            self._with_public, self.sync.generate_key, spec, label, usage=usage, key_id=key_id
        )

    async def import_key(
        self,
        private_key: PrivateKeyTypes,
        label: str,
        *,
        usage: Iterable[str] | str | None = None,
        key_id: str | None = None,
    ) -> AsyncKey:
        """Store a ``cryptography`` private key in the HSM (see ``HSM.import_key``)."""
        return await self._call(
            self._with_public, self.sync.import_key, private_key, label, usage=usage, key_id=key_id
        )

    async def list_keys(self) -> list[KeyInfo]:
        """Every key pair the HSM holds that hsmbridge can use."""
        return await self._call(self.sync.list_keys)

    def _with_public(self, find: Callable[..., Key], *args: Any, **kwargs: Any) -> AsyncKey:
        """Find or make a key and read its public half while still in the pool thread,
        so the exports of :class:`AsyncKey` never block the loop."""
        key = find(*args, **kwargs)
        key.public_key_der()
        return AsyncKey(key, self)

    # -- lifetime -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the handle after the work already running; idempotent."""
        hsm, self._hsm = self._hsm, None
        if hsm is not None and self._owned:
            await self._call(hsm.close)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncHSM:
        try:
            return await self.open()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        inner = repr(self._hsm) if self._hsm is not None else "not open"
        return f"<AsyncHSM {inner}>"


class _Item(NamedTuple):
    """One call waiting for (or in) a batch."""

    data: bytes
    future: asyncio.Future[bytes]


@dataclass
class _Lane:
    """Waiting items of one (operation, mechanism, options) and the batches running for them."""

    run: Callable[[list[bytes]], list[Any]]
    waiting: list[_Item] = field(default_factory=list)
    running: int = 0


#: where a call goes: its lane, and the hash to apply on the loop first (or None)
_Route = tuple[_Lane, Callable[[bytes], Any] | None]


def _bytes(value: object, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidInput(f"{what} must be bytes, not {type(value).__name__}")


class AsyncKey:
    """A key inside the HSM with awaitable operations. Private material never leaves it."""

    def __init__(self, key: Key, hsm: AsyncHSM) -> None:
        self.sync = key
        self._hsm = hsm
        self._lanes: dict[tuple[Any, ...], _Lane] = {}
        #: a call's (op, mechanism, prehashed, format) as given -> its lane and hash
        self._routes: dict[tuple[Any, ...], _Route] = {}

    # -- identity and exports (no HSM call: the public key was read on creation) ----

    @property
    def info(self) -> KeyInfo:
        return self.sync.info

    @property
    def label(self) -> str:
        return self.sync.label

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def key_type(self) -> str:
        return self.sync.key_type

    @property
    def spec(self) -> KeySpec:
        return self.sync.spec

    def public_key_der(self) -> bytes:
        return self.sync.public_key_der()

    def public_key_pem(self) -> str:
        return self.sync.public_key_pem()

    def public_key_jwk(self) -> dict[str, str]:
        return self.sync.public_key_jwk()

    def jwk_thumbprint(self) -> str:
        return self.sync.jwk_thumbprint()

    def public_key(self) -> PublicKeyTypes:
        return self.sync.public_key()

    def __repr__(self) -> str:
        return f"<AsyncKey {self.sync!r}>"

    # -- single operations, coalesced ---------------------------------------------------

    async def sign(
        self,
        data: bytes,
        mechanism: str | Mechanism,
        *,
        prehashed: bool = False,
        signature_format: str = "der",
    ) -> bytes:
        """Sign ``data`` (see :meth:`hsmbridge.Key.sign`); concurrent calls share engine batches."""
        options = ("sign", mechanism, prehashed, signature_format)
        lane, digest = self._lookup(options)
        if digest is not None:  # hashed here, so the pool thread runs a prehashed batch
            if type(data) is not bytes:
                data = _bytes(data, "data to sign")
            data = (
                digest(data).digest()
                if len(data) <= HASH_ON_LOOP
                else await self._hash(digest, data)
            )
        return await self._submit(lane, data)

    async def decrypt(
        self, ciphertext: bytes, mechanism: str | Mechanism, *, allow_pkcs1v15: bool = False
    ) -> bytes:
        """Decrypt one ciphertext (see :meth:`hsmbridge.Key.decrypt`); calls share batches."""
        options = ("decrypt", mechanism, allow_pkcs1v15, "der")
        lane, _ = self._lookup(options)
        return await self._submit(lane, ciphertext)

    def _check_sign(self, mechanism: str | Mechanism, prehashed: bool, fmt: str) -> Mechanism:
        """The sync API's own checks of these options (an empty batch: nothing is signed)."""
        self.sync.sign_batch([], mechanism, prehashed=prehashed, signature_format=fmt)
        return Mechanism(mechanism)

    def _check_decrypt(self, mechanism: str | Mechanism, allow_pkcs1v15: bool) -> Mechanism:
        """The sync API's own checks of these options (an empty batch: nothing is decrypted)."""
        self.sync.decrypt_batch([], mechanism, allow_pkcs1v15=allow_pkcs1v15)
        return Mechanism(mechanism)

    def _lookup(self, options: tuple[Any, ...]) -> _Route:
        try:
            return self._routes[options]
        except (KeyError, TypeError):  # new options, or unhashable ones that _route refuses
            return self._route(options)

    def _route(self, options: tuple[Any, ...]) -> _Route:
        """Check a call's options once; later calls with the same options skip the checks."""
        op, mechanism, flag, signature_format = options
        if not isinstance(flag, bool):
            name = "prehashed" if op == "sign" else "allow_pkcs1v15"
            raise InvalidInput(f"{name} must be True or False, not {flag!r}")
        digest = None
        if op == "sign":
            mech = self._check_sign(mechanism, flag, signature_format)
            if mech.hash_name is not None and not flag:
                digest, flag = getattr(hashlib, mech.hash_name), True
            run = functools.partial(
                self.sync.sign_batch,
                mechanism=mech,
                prehashed=flag,
                signature_format=signature_format,
                return_exceptions=True,
            )
        else:
            mech = self._check_decrypt(mechanism, flag)
            run = functools.partial(
                self.sync.decrypt_batch,
                mechanism=mech,
                allow_pkcs1v15=flag,
                return_exceptions=True,
            )
        key = (op, mech, flag, signature_format)
        lane = self._lanes.get(key) or self._lanes.setdefault(key, _Lane(run))
        route = self._routes[options] = (lane, digest)
        return route

    async def _hash(self, digest: Callable[[bytes], Any], data: bytes) -> bytes:
        """Hash a large message in the pool (hashlib releases the GIL), not on the loop."""
        return await self._hsm._call(lambda: bytes(digest(data).digest()))

    def _submit(self, lane: _Lane, data: bytes) -> asyncio.Future[bytes]:
        """Queue one call; the future its caller awaits (no coroutine frame of its own:
        this runs once per call on the loop)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        lane.waiting.append(_Item(data, future))
        # A first batch goes at once; a second one only when MIN_BATCH items wait
        # (otherwise what arrives waits for the running batch's end, see _finish).
        if lane.running == 0 or (lane.running < IN_FLIGHT and len(lane.waiting) == MIN_BATCH):
            lane.running += 1
            loop.call_soon(self._dispatch, lane)
        return future

    def _dispatch(self, lane: _Lane) -> None:
        """Send what is waiting (callers of this loop iteration included) as one batch."""
        items = [item for item in lane.waiting[:MAX_BATCH] if not item.future.done()]
        del lane.waiting[:MAX_BATCH]
        if not items:
            lane.running -= 1
            if lane.waiting:  # only cancelled items were in that slice
                lane.running += 1
                asyncio.get_running_loop().call_soon(self._dispatch, lane)
            return
        task = asyncio.ensure_future(self._hsm._call(lane.run, [i.data for i in items]))
        task.add_done_callback(functools.partial(self._finish, lane, items))

    def _finish(self, lane: _Lane, items: list[_Item], task: asyncio.Future[list[Any]]) -> None:
        """Start the next batch, then wake this batch's waiters a slice per loop iteration."""
        if lane.waiting:
            self._dispatch(lane)
        else:
            lane.running -= 1
        if task.cancelled():  # the loop is shutting down
            for item in items:
                item.future.cancel()
            return
        failure = task.exception()  # the whole batch failed (usage, no session)?
        results = task.result() if failure is None else [copy.copy(failure) for _ in items]
        _wake(asyncio.get_running_loop(), items, results, 0)

    # -- batches and streams ---------------------------------------------------------------

    async def sign_batch(
        self,
        messages: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        prehashed: bool = False,
        signature_format: str = "der",
        threads: int | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """:meth:`hsmbridge.Key.sign_batch` in the pool: same results and errors."""
        return await self._hsm._call(
            self.sync.sign_batch,
            list(messages),
            mechanism,
            prehashed=prehashed,
            signature_format=signature_format,
            threads=threads,
            return_exceptions=return_exceptions,
        )

    async def decrypt_batch(
        self,
        ciphertexts: Iterable[bytes],
        mechanism: str | Mechanism,
        *,
        threads: int | None = None,
        return_exceptions: bool = False,
        allow_pkcs1v15: bool = False,
    ) -> list[Any]:
        """:meth:`hsmbridge.Key.decrypt_batch` in the pool: same results and errors."""
        return await self._hsm._call(
            self.sync.decrypt_batch,
            list(ciphertexts),
            mechanism,
            threads=threads,
            return_exceptions=return_exceptions,
            allow_pkcs1v15=allow_pkcs1v15,
        )

    def sign_many(
        self,
        messages: Iterable[bytes] | AsyncIterable[bytes],
        mechanism: str | Mechanism,
        *,
        prehashed: bool = False,
        signature_format: str = "der",
        threads: int | None = None,
        window: int | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        """Stream signatures in order, ``window`` items per batch, the next batch
        running while the current one is consumed (see :meth:`hsmbridge.Key.sign_many`).

        Close it early with ``contextlib.aclosing`` so the batch ahead stops at once.
        """
        self._check_sign(mechanism, prehashed, signature_format)
        run = functools.partial(
            self.sign_batch,
            mechanism=mechanism,
            prehashed=prehashed,
            signature_format=signature_format,
            threads=threads,
            return_exceptions=return_exceptions,
        )
        return _stream(messages, run, _window(window, threads))

    def decrypt_many(
        self,
        ciphertexts: Iterable[bytes] | AsyncIterable[bytes],
        mechanism: str | Mechanism,
        *,
        threads: int | None = None,
        window: int | None = None,
        return_exceptions: bool = False,
        allow_pkcs1v15: bool = False,
    ) -> AsyncIterator[Any]:
        """Stream plaintexts in order (see :meth:`sign_many`)."""
        self._check_decrypt(mechanism, allow_pkcs1v15)
        run = functools.partial(
            self.decrypt_batch,
            mechanism=mechanism,
            threads=threads,
            return_exceptions=return_exceptions,
            allow_pkcs1v15=allow_pkcs1v15,
        )
        return _stream(ciphertexts, run, _window(window, threads))

    async def delete(self) -> None:
        """Destroy the key in the HSM. It cannot be recovered."""
        await self._hsm._call(self.sync.delete)


def _wake(
    loop: asyncio.AbstractEventLoop, items: list[_Item], results: list[Any], start: int
) -> None:
    """Resolve ``items[start:start + WAKE_SLICE]``; schedule the rest for the next iteration."""
    end = min(start + WAKE_SLICE, len(items))
    for item, result in zip(items[start:end], results[start:end], strict=True):
        if item.future.done():  # its task was cancelled
            continue
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)
    if end < len(items):
        loop.call_soon(_wake, loop, items, results, end)


async def _stream(
    items: Iterable[bytes] | AsyncIterable[bytes],
    run: Callable[[list[bytes]], Any],
    window: int,
) -> AsyncIterator[Any]:
    """Batches of ``window`` through ``run``, one ahead, results in order.

    Closing the iterator early cancels the batch ahead (its pool thread still
    finishes, returning its sessions); nothing else is left running.
    """
    from .errors import BatchItemError

    chunks = _chunks(items, window)
    offset = 0
    ahead: asyncio.Task[list[Any]] | None = None
    try:
        chunk = await anext(chunks, None)
        if chunk is None:
            return
        ahead = asyncio.ensure_future(run(chunk))
        while ahead is not None:
            current = ahead
            chunk = await anext(chunks, None)
            ahead = asyncio.ensure_future(run(chunk)) if chunk is not None else None
            try:
                results = await current
            except BatchItemError as exc:
                raise BatchItemError(offset + exc.index, exc.cause) from None
            for result in results:
                yield result
            offset += len(results)
    finally:
        if ahead is not None:
            ahead.cancel()
        await chunks.aclose()


async def _chunks(
    items: Iterable[bytes] | AsyncIterable[bytes], size: int
) -> AsyncGenerator[list[bytes], None]:
    chunk: list[bytes] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    else:
        for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


__all__ = ["AsyncHSM", "AsyncKey", "open"]
