"""hsmbridge.aio under load: event-loop lag and throughput against the synchronous batch.

    .venv/bin/python benchmarks/bench_aio.py             # writes benchmarks/results/aio.json
    HSMBRIDGE_AIO_BENCH_COUNT=20000 .venv/bin/python benchmarks/bench_aio.py

For each key (ECDSA P-256 and RSA-2048 on a throwaway SoftHSM2 token), the
same ``COUNT`` messages are signed by each contender, alternating over
``ROUNDS`` rounds in one process (docs/design.md, "Performance method"):

- ``sync-batch``: one ``key.sign_batch(messages)`` (the baseline);
- ``aio-1000``: ``CONCURRENCY`` (1,000) tasks, each awaiting
  ``akey.sign(message)`` one message after another, while a probe task
  sleeps 1 ms in a loop and records how late it wakes (the loop lag);
- ``aio-1000-nice0``: the same with ``worker_nice=0`` (the pool threads at the
  event loop's CPU priority), the effect of the default ``worker_nice``;
- ``to-thread-1000``: the same tasks calling ``await asyncio.to_thread(key.sign, m)``,
  what one would write without hsmbridge.aio (its lag is recorded too).

Before each round the probe also runs on an idle loop (``idle-loop``: what
the machine alone adds), and it runs during ``sync-batch`` too (the batch in
a thread: the lag the same HSM work causes with no asyncio work at all).

Reported per contender: wall ops/s and process CPU time per operation
(every thread, ``time.process_time``), median of rounds; for the async
contenders the probe's overshoot p50/p99/max in ms over all rounds; and
aio/sync ratios of throughput (median of per-round ratios).
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import hsmbridge  # noqa: E402
import hsmbridge.aio  # noqa: E402

COUNT = int(os.environ.get("HSMBRIDGE_AIO_BENCH_COUNT", "10000"))
RSA_COUNT = int(os.environ.get("HSMBRIDGE_AIO_BENCH_RSA_COUNT", str(max(1000, COUNT // 10))))
ROUNDS = int(os.environ.get("HSMBRIDGE_AIO_BENCH_ROUNDS", "3"))
CONCURRENCY = int(os.environ.get("HSMBRIDGE_AIO_BENCH_CONCURRENCY", "1000"))
PROBE_SLEEP = 0.001


class Probe:
    """Sleeps PROBE_SLEEP in a loop; records how much later than asked it woke and how
    much CPU the loop thread used meanwhile (seconds): a late wake with the loop busy
    is the loop's own work, one with the loop idle is a wait for the GIL or a core."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (overshoot, loop-thread CPU)
        self._stop = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            start, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(PROBE_SLEEP)
            overshoot = loop.time() - start - PROBE_SLEEP
            self.samples.append((overshoot, time.thread_time() - cpu))

    def stop(self) -> None:
        self._stop = True


async def _concurrent(
    messages: list[bytes], sign: Callable[[bytes], Awaitable[bytes]], probe: Probe
) -> list[bytes]:
    """CONCURRENCY tasks, each signing its share of ``messages`` one after another."""
    out: list[bytes] = [b""] * len(messages)

    async def worker(start: int) -> None:
        for i in range(start, len(messages), CONCURRENCY):
            out[i] = await sign(messages[i])

    probe_task = asyncio.ensure_future(probe.run())
    await asyncio.sleep(0.01)  # the probe's first samples: the idle loop
    await asyncio.gather(*(worker(s) for s in range(min(CONCURRENCY, len(messages)))))
    probe.stop()
    await probe_task
    return out


def _idle_lag(seconds: float) -> list[tuple[float, float]]:
    """The probe on an idle loop: what the machine itself adds (fact 18)."""
    probe = Probe()

    async def main() -> None:
        task = asyncio.ensure_future(probe.run())
        await asyncio.sleep(seconds)
        probe.stop()
        await task

    asyncio.run(main())
    return probe.samples


def _timed(run: Callable[[], list[bytes]], count: int) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    results = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(results) == count and all(results)
    return {"ops_per_s": count / wall, "cpu_us_per_op": cpu / count * 1e6}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench(hsm: Any, key: Any, mechanism: str, count: int) -> dict[str, Any]:
    messages = [os.urandom(32) + i.to_bytes(4, "big") for i in range(count)]
    rows: dict[str, list[dict[str, float]]] = {}
    lags: dict[str, list[tuple[float, float]]] = {
        "idle-loop": [],
        "sync-batch": [],
        "aio-1000": [],
        "aio-1000-nice0": [],
        "to-thread-1000": [],
    }

    def sync_batch() -> list[bytes]:
        """The baseline; run in a thread while the loop is probed, which costs it nothing
        (the probe wakes 1,000 times a second) and shows the lag the HSM work alone causes."""
        probe = Probe()

        async def main() -> list[bytes]:
            probe_task = asyncio.ensure_future(probe.run())
            out = await asyncio.to_thread(key.sign_batch, messages, mechanism)
            probe.stop()
            await probe_task
            return out  # type: ignore[no-any-return]

        out = asyncio.run(main())
        lags["sync-batch"] += probe.samples
        return out

    def aio(name: str, worker_nice: int) -> Callable[[], list[bytes]]:
        def run() -> list[bytes]:
            probe = Probe()
            out = asyncio.run(_aio_round(hsm, key, messages, mechanism, probe, worker_nice))
            lags[name] += probe.samples
            return out

        return run

    def to_thread() -> list[bytes]:
        probe = Probe()

        async def sign(m: bytes) -> bytes:
            return await asyncio.to_thread(key.sign, m, mechanism)  # type: ignore[no-any-return]

        out = asyncio.run(_concurrent(messages, sign, probe))
        lags["to-thread-1000"] += probe.samples
        return out

    contenders = {
        "sync-batch": sync_batch,
        "aio-1000": aio("aio-1000", hsmbridge.aio.WORKER_NICE),
        "aio-1000-nice0": aio("aio-1000-nice0", 0),
        "to-thread-1000": to_thread,
    }
    for _ in range(ROUNDS):
        lags["idle-loop"] += _idle_lag(0.3)
        for name, run in contenders.items():
            rows.setdefault(name, []).append(_timed(run, count))
    summary: dict[str, Any] = {"mechanism": mechanism, "count": count, "rounds": ROUNDS}
    for name, rounds in rows.items():
        summary[name] = {
            "ops_per_s_median": round(statistics.median(r["ops_per_s"] for r in rounds)),
            "cpu_us_per_op_median": round(statistics.median(r["cpu_us_per_op"] for r in rounds), 1),
        }
    for name, samples in lags.items():
        ms = [v * 1000 for v, _ in samples]
        late = [(v * 1000, busy * 1000) for v, busy in samples if v > 0.001]
        summary.setdefault(name, {})["loop_lag_ms"] = {
            "samples": len(ms),
            "p50": round(_pct(ms, 0.50), 3),
            "p99": round(_pct(ms, 0.99), 3),
            "max": round(max(ms), 3),
            # wakes over 1 ms late: how late on average, and how much of the
            # interval (PROBE_SLEEP + lag) the loop thread spent on the CPU
            "late_wakes": len(late),
            "late_mean": round(statistics.mean(v for v, _ in late), 3) if late else None,
            "late_loop_cpu_mean": round(statistics.mean(b for _, b in late), 3) if late else None,
        }
    for name in ("aio-1000", "aio-1000-nice0", "to-thread-1000"):
        pairs = zip(rows[name], rows["sync-batch"], strict=True)
        summary[f"{name}_over_sync_batch"] = round(
            statistics.median(a["ops_per_s"] / s["ops_per_s"] for a, s in pairs), 3
        )
    return summary


async def _aio_round(
    hsm: Any, key: Any, messages: list[bytes], mechanism: str, probe: Probe, worker_nice: int
) -> list[bytes]:
    """One aio round on this round's loop, over the same open handle and key."""
    view = hsmbridge.aio.AsyncHSM.wrap(hsm, worker_nice=worker_nice)
    async_key = await view.get_key(key_id=key.id)
    try:
        return await _concurrent(messages, lambda m: async_key.sign(m, mechanism), probe)
    finally:
        await view.close()


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
