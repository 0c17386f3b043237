"""Rounds, the thread sweep and the statistics of one benchmark run.

Per workload: prepare the key (untimed), warm every contender up at every
thread count (which also sizes each measurement to about ``seconds``), then
``rounds`` rounds; each round runs every contender at every thread count
once, the contenders' order rotating from round to round, so that whatever
else the machine does lands on all of them alike. Ratios are taken within a
round, then summarised over rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..api import HSM
from ..errors import HSMError
from ..progress import Progress
from .contenders import CONTENDERS, Contender, Target, common, prepare
from .timing import Sample
from .workloads import Workload

#: ratios reported for every round: (contender, over)
RATIOS = tuple(
    (c, base)
    for c in ("hsmbridge-batch", "hsmbridge-single", "hsmbridge-batch-python")
    for base in ("c-ceiling", "python-pkcs11", "nethsm-sdk", "openssl")
)
#: the latency distribution kept per contender: 0th, 5th, ..., 100th percentile
QUANTILES = tuple(range(0, 101, 5))


@dataclass(frozen=True)
class Settings:
    threads: tuple[int, ...]
    rounds: int
    seconds: float  # target length of one measurement


Extra = Callable[[Target], list[Contender]]


def run_workload(
    hsm: HSM, workload: Workload, settings: Settings, extra: Extra, progress: Progress
) -> dict[str, Any]:
    """Measure one workload; a workload the HSM cannot do comes back ``skipped``."""
    try:
        target = prepare(hsm, workload)
    except HSMError as exc:
        return entry(workload, skipped=f"{type(exc).__name__}: {exc}")
    try:
        found = {c.name: c for c in common(target) + extra(target)}
        contenders = [found[name] for name in CONTENDERS if name in found]
        progress.total += len(contenders) * len(settings.threads) * (settings.rounds + 1)
        counts = _warm_up(workload, contenders, settings, progress)
        samples: dict[tuple[str, int], list[Sample]] = {}
        for r in range(settings.rounds):
            turn = r % len(contenders)
            order = contenders[turn:] + contenders[:turn]
            for threads in settings.threads:
                for c in order:
                    progress.advance(0, f"{workload.name} {c.name} x{threads} round {r + 1}")
                    sample = c.run(threads, counts[c.name, threads])
                    samples.setdefault((c.name, threads), []).append(sample)
                    progress.advance(1)
    finally:
        if target.key is not None:
            target.key.delete()
    done = entry(workload)
    done["results"] = [
        _summary(name, threads, counts[name, threads], runs)
        for (name, threads), runs in samples.items()
    ]
    done["ratios"] = _ratios(samples, settings)
    return done


def entry(workload: Workload, skipped: str | None = None) -> dict[str, Any]:
    """A workload's entry in the JSON result, without results yet (or ``skipped``, and why)."""
    return {
        "name": workload.name,
        "kind": workload.kind,
        "key": workload.key,
        "mechanism": workload.mechanism.value if workload.mechanism else None,
        "skipped": skipped,
        "results": [],
        "ratios": [],
    }


def _warm_up(
    workload: Workload, contenders: Sequence[Contender], settings: Settings, progress: Progress
) -> dict[tuple[str, int], int]:
    """Run each contender once, small, at every thread count; size the measurements."""
    counts = {}
    for threads in settings.threads:
        for c in contenders:
            progress.advance(0, f"{workload.name} {c.name} x{threads} warm-up")
            first = max(threads, 2) if workload.kind == "keygen" else max(2 * threads, 8)
            sample = c.run(threads, first)
            rate = sample.ops / sample.seconds if sample.seconds > 0 else 1e6
            counts[c.name, threads] = max(threads, math.ceil(rate * settings.seconds))
            progress.advance(1)
    return counts


def _stats(values: Sequence[float]) -> dict[str, float]:
    median = statistics.median(values)
    low, high = min(values), max(values)
    spread = (high - low) / median if median else 0.0
    return {"median": median, "min": low, "max": high, "spread": spread}


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _summary(name: str, threads: int, count: int, runs: Sequence[Sample]) -> dict[str, Any]:
    rounds = [
        {
            "round": i,
            "ops": s.ops,
            "seconds": s.seconds,
            "cpu_seconds": s.cpu_seconds,
            "ops_per_s": s.ops / s.seconds if s.seconds > 0 else 0.0,
            "cpu_us_per_op": s.cpu_seconds / s.ops * 1e6,
        }
        for i, s in enumerate(runs)
    ]
    latencies = sorted(x for s in runs for x in s.latencies)
    latency = None
    if latencies:
        us = [x * 1e6 for x in latencies]
        latency = {
            "samples": len(us),
            "p50": _percentile(us, 50),
            "p95": _percentile(us, 95),
            "p99": _percentile(us, 99),
            "quantiles": [_percentile(us, q) for q in QUANTILES],
        }
    return {
        "contender": name,
        "threads": threads,
        "count": count,
        "rounds": rounds,
        "ops_per_s": _stats([r["ops_per_s"] for r in rounds]),
        "cpu_us_per_op": _stats([r["cpu_us_per_op"] for r in rounds]),
        "latency_us": latency,
    }


def _ratios(
    samples: dict[tuple[str, int], list[Sample]], settings: Settings
) -> list[dict[str, Any]]:
    out = []
    for threads in settings.threads:
        for name, base in RATIOS:
            a, b = samples.get((name, threads)), samples.get((base, threads))
            if not a or not b:
                continue
            per_round = [
                (x.ops / x.seconds) / (y.ops / y.seconds) for x, y in zip(a, b, strict=True)
            ]
            cpu = [
                (x.cpu_seconds / x.ops) / (y.cpu_seconds / y.ops)
                for x, y in zip(a, b, strict=True)
                if y.cpu_seconds > 0
            ]
            out.append(
                {
                    "contender": name,
                    "over": base,
                    "threads": threads,
                    "ops_per_s": _stats(per_round),
                    "cpu_per_op": _stats(cpu) if cpu else None,
                }
            )
    return out
