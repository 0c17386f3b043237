"""The request threads: blocking work (HSM calls, argon2) handed over by the event loop.

``loop.run_in_executor`` wraps a ``concurrent.futures.Future`` in an asyncio
future for every call (two futures, a condition lock, chained callbacks that
copy the state across); a signature request makes one such call, and all of
that runs on the one event-loop thread that every request shares. Here a job
is a tuple on a ``SimpleQueue`` and its worker sets the asyncio future with
one ``call_soon_threadsafe``. Threads start as needed, up to ``max_threads``,
as ``ThreadPoolExecutor`` starts them: a new one only when none is idle, and,
as it does, they are told to end when the interpreter exits (a forced exit
skips the server's shutdown, and the threads are not daemons).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the awaiting request may have been cancelled meanwhile
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Workers:
    """Up to ``max_threads`` threads running blocking calls for coroutines on one loop."""

    def __init__(self, max_threads: int, name: str) -> None:
        self.max_threads = max_threads
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a worker each time it is idle
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        _LIVE.add(self)

    def run(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``func(*args)`` in a worker thread; await the returned future for its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, func, args))
        if not self._idle.acquire(blocking=False):
            self._start_thread()
        return future

    def _start_thread(self) -> None:
        with self._lock:
            if len(self._threads) >= self.max_threads:
                return
            thread = threading.Thread(
                target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=False
            )
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, func, args = job
            del job
            try:
                result = func(*args)
            except BaseException as exc:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_result, future, result)
            del loop, future, func, args
            self._idle.release()

    def shutdown(self) -> None:
        """Let every thread end after the jobs queued so far (does not wait for them)."""
        with self._lock:
            count = len(self._threads)
        for _ in range(count):
            self._jobs.put(None)


#: every Workers not yet collected; their threads are ended at interpreter exit
_LIVE: weakref.WeakSet[Workers] = weakref.WeakSet()


def _end_at_exit() -> None:
    for workers in list(_LIVE):
        workers.shutdown()


# Runs before the interpreter joins non-daemon threads, as ThreadPoolExecutor's hook does.
threading._register_atexit(_end_at_exit)  # type: ignore[attr-defined]
