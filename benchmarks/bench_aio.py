"""hsmbridge.aio under load: event-loop lag and throughput against the synchronous batch.

    .venv/bin/python benchmarks/bench_aio.py             # writes benchmarks/results/aio.json
    HSMBRIDGE_AIO_BENCH_COUNT=20000 .venv/bin/python benchmarks/bench_aio.py

For each key (ECDSA P-256 and RSA-2048 on a throwaway SoftHSM2 token), the
same ``COUNT`` messages are signed by each contender, alternating over
``ROUNDS`` (9) rounds in one process (docs/design.md, "Performance method"):

- ``sync-batch``: one ``key.sign_batch(messages)`` in a thread (the baseline:
  the lag the same HSM work causes with no asyncio work at all);
- ``aio-1000``: ``CONCURRENCY`` (1,000) tasks, each awaiting
  ``akey.sign(message)`` one message after another;
- ``aio-1000-nice10`` and ``aio-1000-nice0``: the same with ``worker_nice=10``
  and ``worker_nice=0`` instead of the default ``"idle"`` (the native engine's
  threads at nice 10, or at the event loop's priority, instead of SCHED_IDLE);
- ``to-thread-1000``: the same tasks calling ``await asyncio.to_thread(key.sign, m)``,
  what one would write without hsmbridge.aio.

While each runs, two probes measure the loop (benchmarks/loopprobe.py): a
task sleeping 1 ms records how late it wakes (``loop_lag_ms``), and a task
awaiting a socket that a thread writes to every ~1 ms records how long after
the write it resumes (``socket_lag_ms``: what a request reaching a server
waits for the loop). Before each round both also run on an idle loop
(``idle-loop``: what the machine and the probes alone give; there the timer
probe shows its floor, since the socket probe wakes the loop, fact 22).

Reported per contender: wall ops/s and process CPU time per operation
(every thread, ``time.process_time``), median of rounds; both probes'
p50/p99/max in ms over all rounds; and aio/sync ratios of throughput and of
CPU per operation (medians of per-round ratios).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from loopprobe import Probes, summary, timer_summary  # noqa: E402

import hsmbridge  # noqa: E402
import hsmbridge.aio  # noqa: E402
import hsmbridge.batch  # noqa: E402

COUNT = int(os.environ.get("HSMBRIDGE_AIO_BENCH_COUNT", "10000"))
RSA_COUNT = int(os.environ.get("HSMBRIDGE_AIO_BENCH_RSA_COUNT", str(max(1000, COUNT // 10))))
ROUNDS = int(os.environ.get("HSMBRIDGE_AIO_BENCH_ROUNDS", "9"))
CONCURRENCY = int(os.environ.get("HSMBRIDGE_AIO_BENCH_CONCURRENCY", "1000"))

_R = TypeVar("_R")


async def _concurrent(
    messages: list[bytes], sign: Callable[[bytes], Awaitable[bytes]]
) -> list[bytes]:
    """CONCURRENCY tasks, each signing its share of ``messages`` one after another."""
    out: list[bytes] = [b""] * len(messages)

    async def worker(start: int) -> None:
        for i in range(start, len(messages), CONCURRENCY):
            out[i] = await sign(messages[i])

    await asyncio.gather(*(worker(s) for s in range(min(CONCURRENCY, len(messages)))))
    return out


class Lags:
    """Both probes' samples per contender, over all rounds."""

    def __init__(self) -> None:
        self.timer: dict[str, list[tuple[float, float]]] = {}
        self.socket: dict[str, list[float]] = {}

    def probed(self, name: str, work: Callable[[], Awaitable[_R]]) -> _R:
        """Run ``work()`` on a fresh loop with both probes running; keep their samples."""

        async def main() -> _R:
            async with Probes() as probes:
                await asyncio.sleep(0.01)  # the probes' first samples: the idle loop
                out = await work()
            self.timer.setdefault(name, []).extend(probes.timer.samples)
            self.socket.setdefault(name, []).extend(probes.socket.samples)
            return out

        return asyncio.run(main())


def _timed(run: Callable[[], list[bytes]], count: int) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    results = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(results) == count and all(results)
    return {"ops_per_s": count / wall, "cpu_us_per_op": cpu / count * 1e6}


def bench(hsm: Any, key: Any, mechanism: str, count: int) -> dict[str, Any]:
    messages = [os.urandom(32) + i.to_bytes(4, "big") for i in range(count)]
    rows: dict[str, list[dict[str, float]]] = {}
    lags = Lags()

    async def sync_batch() -> list[bytes]:
        return await asyncio.to_thread(key.sign_batch, messages, mechanism)  # type: ignore[no-any-return]

    def aio(worker_nice: hsmbridge.batch.WorkerNice) -> Callable[[], Awaitable[list[bytes]]]:
        async def work() -> list[bytes]:
            view = hsmbridge.aio.AsyncHSM.wrap(hsm, worker_nice=worker_nice)
            async_key = await view.get_key(key_id=key.id)
            try:
                return await _concurrent(messages, lambda m: async_key.sign(m, mechanism))
            finally:
                await view.close()

        return work

    async def to_thread() -> list[bytes]:
        async def sign(m: bytes) -> bytes:
            return await asyncio.to_thread(key.sign, m, mechanism)  # type: ignore[no-any-return]

        return await _concurrent(messages, sign)

    async def idle() -> list[bytes]:
        await asyncio.sleep(0.3)
        return []

    contenders: dict[str, Callable[[], Awaitable[list[bytes]]]] = {
        "sync-batch": sync_batch,
        "aio-1000": aio(hsmbridge.aio.WORKER_NICE),
        "aio-1000-nice10": aio(10),
        "aio-1000-nice0": aio(0),
        "to-thread-1000": to_thread,
    }
    for _ in range(ROUNDS):
        lags.probed("idle-loop", idle)
        for name, work in contenders.items():
            rows.setdefault(name, []).append(
                _timed(lambda name=name, work=work: lags.probed(name, work), count)  # type: ignore[misc]
            )
    summary_: dict[str, Any] = {"mechanism": mechanism, "count": count, "rounds": ROUNDS}
    for name, rounds in rows.items():
        summary_[name] = {
            "ops_per_s_median": round(statistics.median(r["ops_per_s"] for r in rounds)),
            "cpu_us_per_op_median": round(statistics.median(r["cpu_us_per_op"] for r in rounds), 1),
        }
    for name, samples in lags.timer.items():
        summary_.setdefault(name, {})["loop_lag_ms"] = timer_summary(samples)
        summary_[name]["socket_lag_ms"] = summary(lags.socket[name])
    for name in ("aio-1000", "aio-1000-nice10", "aio-1000-nice0", "to-thread-1000"):
        pairs = list(zip(rows[name], rows["sync-batch"], strict=True))
        summary_[f"{name}_over_sync_batch"] = round(
            statistics.median(a["ops_per_s"] / s["ops_per_s"] for a, s in pairs), 3
        )
        summary_[f"{name}_cpu_over_sync_batch"] = round(
            statistics.median(a["cpu_us_per_op"] / s["cpu_us_per_op"] for a, s in pairs), 3
        )
    return summary_


def main() -> int:
    from hsmbridge.bench import machine
    from hsmbridge.softhsm import make_tokens

    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-aio-bench-"))
    try:
        token = make_tokens(directory, ["aio-bench"])[0]
        os.environ.update(token.env())
        hsm = hsmbridge.open(token.uri, pin=token.pin)
        results = {"machine": machine(), "concurrency": CONCURRENCY, "suites": []}
        for spec, mechanism, count in (
            (hsmbridge.EC("P-256"), "ecdsa-sha256", COUNT),
            (hsmbridge.RSA(2048), "rsa-pkcs1-sha256", RSA_COUNT),
        ):
            key = hsm.generate_key(spec, label=f"aio-{spec}")
            key.sign_batch([b"warm"] * 100, mechanism)
            suite = bench(hsm, key, mechanism, count)
            print(json.dumps(suite), flush=True)
            results["suites"].append(suite)  # type: ignore[attr-defined]
        hsm.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = HERE / "results" / "aio.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
