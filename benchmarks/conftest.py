"""Shared set-up for the benchmark suites: open handles on the session's
SoftHSM2 token and collect measurements for the side-by-side summary."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hsmbridge
from hsmbridge.bench import Measurement, machine
from hsmbridge.pkcs11 import Pkcs11HSM
from hsmbridge.testing import SoftToken

RESULTS = Path(__file__).parent / "results"
COUNT = int(os.environ.get("HSMBRIDGE_BENCH_COUNT", "10000"))
ROUNDS = int(os.environ.get("HSMBRIDGE_BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("HSMBRIDGE_BENCH_THREADS", str(os.cpu_count() or 1)))

_collected: list[tuple[int, Measurement]] = []


@pytest.fixture(scope="session")
def handles(softhsm_token: SoftToken) -> Iterator[tuple[Pkcs11HSM, Pkcs11HSM, str]]:
    """(native-engine handle, Python-engine handle, PIN) on the benchmark token."""
    hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    python_hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin, native=False)
    assert isinstance(hsm, Pkcs11HSM) and isinstance(python_hsm, Pkcs11HSM)
    yield hsm, python_hsm, softhsm_token.pin
    python_hsm.close()
    hsm.close()


@pytest.fixture(scope="session")
def collect() -> Any:
    """Record one round's measurement for the summary (round index, measurement)."""

    def _add(round_index: int, m: Measurement) -> None:
        _collected.append((round_index, m))

    return _add


def _summary() -> dict[str, Any]:
    per: dict[tuple[str, str], list[float]] = {}
    rounds: dict[tuple[str, int], dict[str, float]] = {}
    for i, m in _collected:
        per.setdefault((m.workload, m.contender), []).append(m.ops_per_s)
        rounds.setdefault((m.workload, i), {})[m.contender] = m.ops_per_s
    ratio_runs: dict[tuple[str, str], list[float]] = {}
    for (workload, _), by in rounds.items():
        batch = by.get("hsmbridge-batch")
        for base in ("c-ceiling", "python-pkcs11"):
            if batch and by.get(base):
                ratio_runs.setdefault((workload, base), []).append(batch / by[base])
    return {
        "machine": machine(),
        "count": COUNT,
        "threads": THREADS,
        "ops_per_s": [
            {"workload": w, "contender": c, "median": statistics.median(v), "runs": v}
            for (w, c), v in sorted(per.items())
        ],
        "ratios": [
            {
                "workload": w,
                "batch_over": base,
                "min": min(v),
                "median": statistics.median(v),
                "max": max(v),
            }
            for (w, base), v in sorted(ratio_runs.items())
        ],
    }


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _collected:
        return
    summary = _summary()
    tr = terminalreporter
    tr.section("hsmbridge hot path (ops/s, median of rounds)")
    for row in summary["ops_per_s"]:
        tr.write_line(f"{row['workload']:<28}{row['contender']:<26}{row['median']:>12,.0f}")
    tr.section("hsmbridge-batch ratios (min / median / max over rounds)")
    for r in summary["ratios"]:
        tr.write_line(
            f"{r['workload']:<28} / {r['batch_over']:<24}"
            f"{r['min']:.2f}  {r['median']:.2f}  {r['max']:.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hot_path_summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    tr.write_line(f"summary written to {out}")
