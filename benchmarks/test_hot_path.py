"""The hot path side by side: C ceiling, python-pkcs11, hsmbridge, OpenSSL.

Run (10,000 messages, threads = cores, 3 rounds):

    .venv/bin/python -m pytest benchmarks/test_hot_path.py --benchmark-enable \
        --benchmark-json=benchmarks/results/hot_path.json

The summary (ops/s and the ratios batch/C-ceiling and batch/python-pkcs11 with
min/median/max over rounds) is printed and saved to
benchmarks/results/hot_path_summary.json.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hsmbridge.api import EC
from hsmbridge.bench import CONTENDERS, WORKLOADS, Prepared, Workload, measure, prepare
from hsmbridge.pkcs11 import Pkcs11HSM

from .conftest import COUNT, ROUNDS, THREADS

ALL_CONTENDERS = CONTENDERS


@pytest.fixture(scope="module", params=WORKLOADS, ids=[w.name for w in WORKLOADS])
def prepared(
    request: pytest.FixtureRequest, handles: tuple[Pkcs11HSM, Pkcs11HSM, str]
) -> Iterator[Prepared]:
    workload: Workload = request.param
    hsm, python_hsm, _ = handles
    count = COUNT * (3 if isinstance(workload.spec, EC) else 1)
    prep = prepare(hsm, python_hsm, workload, count, f"bench-{uuid.uuid4().hex[:8]}")
    yield prep
    prep.key.delete()


@pytest.mark.parametrize("contender", ALL_CONTENDERS)
def test_hot_path(
    benchmark: Any,
    prepared: Prepared,
    contender: str,
    handles: tuple[Pkcs11HSM, Pkcs11HSM, str],
    collect: Any,
) -> None:
    hsm, _, pin = handles
    rounds = itertools.count()

    def one_round() -> None:
        m = measure(prepared, contender, THREADS, hsm, pin)
        collect(next(rounds), m)
        benchmark.extra_info.setdefault("ops_per_s", []).append(round(m.ops_per_s, 1))

    benchmark.extra_info.update(
        workload=prepared.workload.name, contender=contender, ops=len(prepared.inputs)
    )
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
