"""Timing one measurement: wall and CPU time, and per-operation latency.

Only the operations are timed: inputs are made, sessions bound and threads
started before the clock starts (a barrier releases every worker at once);
results are checked once per workload before any measurement
(:func:`.contenders.prepare`). CPU time is the whole process's
(``time.process_time``: every thread, user and system), so on a shared
machine it moves much less than wall time when other work steals the cores.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ..errors import HSMError

#: a worker's set-up (untimed) giving the operation it runs on item j (timed)
WorkerSetup = Callable[[int], AbstractContextManager[Callable[[int], object]]]


@dataclass(frozen=True)
class Sample:
    """One measurement: ``ops`` operations in ``seconds`` using ``cpu_seconds`` of CPU."""

    ops: int
    seconds: float
    cpu_seconds: float
    latencies: tuple[float, ...] = ()  # seconds per operation, where measured one by one


def timed(call: Callable[[], object], ops: int) -> Sample:
    """One call doing ``ops`` operations (a batch, the C ceiling)."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    call()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Sample(ops, seconds, cpu)


def parallel(threads: int, count: int, setup: WorkerSetup) -> Sample:
    """``count`` operations shared by ``threads`` threads, each timed one by one."""
    start = threading.Barrier(threads + 1)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        own = latencies[i]
        clock = time.perf_counter
        try:
            with setup(i) as op:
                start.wait()
                for j in range(i, count, threads):
                    t0 = clock()
                    op(j)
                    own.append(clock() - t0)
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: see below
        start.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.join()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if errors:
        first = errors[0]
        if isinstance(first, HSMError):
            raise first
        raise HSMError(f"a benchmark worker failed: {type(first).__name__}: {first}") from first
    flat = tuple(x for own in latencies for x in own)
    return Sample(len(flat), seconds, cpu, flat)


def each(op: Callable[[int], object]) -> WorkerSetup:
    """A worker set-up with nothing to set up: every thread runs ``op``."""
    return lambda _i: contextlib.nullcontext(op)
