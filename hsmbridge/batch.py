"""The pure-Python batch engine: N worker threads over an index counter.

Each thread enters one *worker* (a context manager from the backend that
binds, say, a PKCS#11 session) for its whole run and pulls item indexes from a
shared counter, so there is no per-item queueing or session checkout. Backends
release the GIL inside each HSM call, so threads run the HSM in parallel.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, TypeVar

from .errors import BatchItemError, HSMError

#: The value of :data:`worker_nice` that puts the threads on SCHED_IDLE (Linux).
IDLE: Literal["idle"] = "idle"
#: What :data:`worker_nice` holds: a nice value 0-19, or :data:`IDLE`.
WorkerNice = int | Literal["idle"]

#: How the threads that run a batch in the HSM yield the CPU to their caller's:
#: 0 not at all, 1-19 by that much lower Linux nice, :data:`IDLE` by running
#: SCHED_IDLE (only on a core no other thread wants; preempted as soon as one
#: wakes). Set by hsmbridge.aio for the calls it makes, so a software token's
#: cryptography yields the CPU to the event loop thread (docs/design.md,
#: "asyncio and the event loop"); the native engine honours it, the pure-Python
#: engine's threads (which hold the GIL between HSM calls) do not.
worker_nice: contextvars.ContextVar[WorkerNice] = contextvars.ContextVar("worker_nice", default=0)


def native_priority(value: WorkerNice) -> tuple[int, bool]:
    """(nice, idle) for the native engine's run_batch: SCHED_IDLE threads also take
    the lowest nice, which is what they get where SCHED_IDLE is refused."""
    return (19, True) if value == IDLE else (int(value), False)


Operation = Callable[[bytes], bytes]
BatchWorker = AbstractContextManager[Operation]
T = TypeVar("T")


def run_batch(
    make_worker: Callable[[], BatchWorker],
    items: Sequence[bytes],
    threads: int,
    stop_on_error: bool,
) -> list[bytes | HSMError | None]:
    """Apply the worker's operation to every item; one result per item, in order.

    An item's :class:`HSMError` is its result. With ``stop_on_error`` the
    first failure stops the remaining work: items never attempted are None.
    A worker that cannot start (no session) fails the whole call.
    """
    n = len(items)
    results: list[bytes | HSMError | None] = [None] * n
    if n == 0:
        return results
    counter = itertools.count()
    stop = threading.Event()
    start_errors: list[HSMError] = []

    def work() -> None:
        try:
            with make_worker() as operate:
                while not stop.is_set():
                    i = next(counter)
                    if i >= n:
                        return
                    try:
                        results[i] = operate(items[i])
                    except HSMError as exc:
                        results[i] = exc
                        if stop_on_error:
                            stop.set()
        except HSMError as exc:  # the worker itself could not start
            start_errors.append(exc)
            stop.set()

    threads = max(1, min(threads, n))
    if threads == 1:  # the single-operation path: no threads
        work()
    else:
        pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if start_errors:
        raise start_errors[0]
    return results


def stream_batches(
    items: Iterable[T],
    run: Callable[[list[T]], list[Any]],
    window: int,
) -> Iterator[Any]:
    """Feed ``items`` through ``run`` ``window`` at a time, yielding results in order.

    Only one window of inputs and outputs is alive at once, so memory stays
    bounded however long the input is. Stopping the iteration early (or an
    exception in the consumer) leaves nothing running: each window has been
    fully joined before its results are yielded.
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    iterator = iter(items)
    offset = 0
    while True:
        chunk = list(itertools.islice(iterator, window))
        if not chunk:
            return
        try:
            results = run(chunk)
        except BatchItemError as exc:
            raise BatchItemError(offset + exc.index, exc.cause) from None
        del chunk
        yield from results
        offset += len(results)
