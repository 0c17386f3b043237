"""The pure-Python batch engine: N worker threads over an index counter.

Each thread enters one *worker* (a context manager from the backend that
binds, say, a PKCS#11 session) for its whole run and pulls item indexes from a
shared counter, so there is no per-item queueing or session checkout. Backends
release the GIL inside each HSM call, so threads run the HSM in parallel.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from .errors import BatchItemError, HSMError

Operation = Callable[[bytes], bytes]
BatchWorker = AbstractContextManager[Operation]
T = TypeVar("T")


def run_batch(
    make_worker: Callable[[], BatchWorker],
    items: Sequence[bytes],
    threads: int,
    return_exceptions: bool,
) -> list[bytes | HSMError]:
    """Apply the worker's operation to every item; results in input order.

    Without ``return_exceptions`` the first failure stops the remaining work
    and raises :class:`BatchItemError` with the item's index.
    """
    n = len(items)
    if n == 0:
        return []
    if n == 1:  # the single-operation path: no threads, events or locks
        with make_worker() as operate:
            try:
                return [operate(items[0])]
            except HSMError as exc:
                if return_exceptions:
                    return [exc]
                raise BatchItemError(0, exc) from None
    results: list[Any] = [None] * n
    counter = itertools.count()
    stop = threading.Event()
    first_error: list[BatchItemError] = []
    lock = threading.Lock()

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
                        if return_exceptions:
                            results[i] = exc
                            continue
                        with lock:
                            first_error.append(BatchItemError(i, exc))
                        stop.set()
        except HSMError as exc:  # the worker itself could not start
            with lock:
                first_error.append(BatchItemError(min(next(counter), n - 1), exc))
            stop.set()

    threads = max(1, min(threads, n))
    if threads == 1:
        work()
    else:
        pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if first_error:
        raise min(first_error, key=lambda e: e.index)
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
