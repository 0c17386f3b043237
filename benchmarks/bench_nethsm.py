"""NetHSM backend throughput: batch signing against the official SDK and direct PKCS#11.

Workload: RSA-2048 ``rsa-pkcs1-sha256`` signatures of distinct messages, one
key, on ``hsmbridge serve`` running as its own process over a SoftHSM2 token
(so the server does not share the client's GIL, as an appliance would not).
Contenders, measured side by side in every round:

- ``hsmbridge-batch``: ``NetHSMKey.sign_batch`` (concurrent keep-alive requests);
- ``hsmbridge-loop``: ``NetHSMKey.sign`` one message at a time;
- ``nethsm-sdk-loop``: the official ``nethsm`` SDK's ``sign`` in a plain loop
  (hashing and the DigestInfo prefix done by the caller, as its users must);
- ``pkcs11-direct``: ``sign_batch`` straight on the same token over PKCS#11.

Run::

    .venv/bin/python -m pytest benchmarks/bench_nethsm.py --benchmark-enable -s \
        --benchmark-json=benchmarks/results/nethsm.json

``HSMBRIDGE_NETHSM_BENCH_COUNT`` (default 400) messages per contender and
round, ``HSMBRIDGE_NETHSM_BENCH_ROUNDS`` (default 3) rounds. Ops/s are the
median over rounds; the ratios (median of per-round ratios) go in extra_info.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import hsmbridge
from hsmbridge import RSA
from hsmbridge.mechanisms import Mechanism, signing_input
from hsmbridge.nethsm import NetHSM, NetHSMKey
from hsmbridge.testing import SoftToken

from .serving import free_port, wait_ready

COUNT = int(os.environ.get("HSMBRIDGE_NETHSM_BENCH_COUNT", "400"))
ROUNDS = int(os.environ.get("HSMBRIDGE_NETHSM_BENCH_ROUNDS", "3"))
MECH = Mechanism.RSA_PKCS1_SHA256
CONTENDERS = ("nethsm-sdk-loop", "hsmbridge-loop", "hsmbridge-batch", "pkcs11-direct")
ADMIN = ("admin", "bench-admin-passphrase")
OPERATOR = ("operator", "bench-operator-passphrase")


@dataclass
class Served:
    """A ``hsmbridge serve`` process, provisioned, with one RSA-2048 signing key."""

    process: subprocess.Popen[bytes]
    hostport: str
    cert: Path
    hsm: NetHSM
    key: NetHSMKey
    log: Path
    token: SoftToken = field(repr=False)


@pytest.fixture(scope="module")
def served(softhsm_token: SoftToken, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("nethsm-bench")
    port = free_port()
    log = state / "serve.log"
    env = {**os.environ, **softhsm_token.env(), "HSMBRIDGE_PIN": softhsm_token.pin}
    cmd = [sys.executable, "-m", "hsmbridge.cli", "--hsm", softhsm_token.uri, "serve",
           "--listen", f"127.0.0.1:{port}", "--state-dir", str(state / "state")]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}/api/v1"
    cert = state / "state" / "tls-cert.pem"
    try:
        wait_ready(url, cert, process, log)
        with requests.Session() as s:
            s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
            s.verify = str(cert)
            body = {"unlockPassphrase": "bench-unlock-passphrase", "adminPassphrase": ADMIN[1],
                    "systemTime": "2026-01-01T00:00:00Z"}  # fmt: skip
            s.post(f"{url}/provision", json=body, timeout=30).raise_for_status()
            user = {"realName": "bench", "role": "Operator", "passphrase": OPERATOR[1]}
            s.put(f"{url}/users/operator", json=user, auth=ADMIN, timeout=30).raise_for_status()
        hsm = hsmbridge.open(
            f"nethsm://admin@127.0.0.1:{port}", password=ADMIN[1], operator=OPERATOR, ca=str(cert)
        )
        assert isinstance(hsm, NetHSM)
        key = hsm.generate_key(RSA(2048), f"bench-{uuid.uuid4().hex[:8]}")
        yield Served(process, f"127.0.0.1:{port}", cert, hsm, key, log, softhsm_token)
        key.delete()
        hsm.close()
    finally:
        process.terminate()
        process.wait(30)


def _runners(served: Served, messages: list[bytes]) -> dict[str, Callable[[], list[bytes]]]:
    import nethsm

    sdk = nethsm.NetHSM(
        served.hostport,
        nethsm.Authentication(*OPERATOR),
        verify_tls=True,
        ca_certs=str(served.cert),
    )
    direct = hsmbridge.open(served.token.uri, pin=served.token.pin)
    direct_key = direct.get_key(key_id=_backend_id(direct, served.key))
    key = served.key

    def sdk_loop() -> list[bytes]:
        out = []
        for m in messages:
            data = nethsm.Base64.encode(signing_input(MECH, m, prehashed=False))
            out.append(sdk.sign(key.id, data, nethsm.SignMode.PKCS1).decode())
        return out

    return {
        "nethsm-sdk-loop": sdk_loop,
        "hsmbridge-loop": lambda: [key.sign(m, MECH) for m in messages],
        "hsmbridge-batch": lambda: key.sign_batch(messages, MECH),
        "pkcs11-direct": lambda: direct_key.sign_batch(messages, MECH),
    }


def _backend_id(direct: hsmbridge.HSM, key: NetHSMKey) -> str:
    """The token key behind a bridge key: the bridge labels it with the NetHSM key ID."""
    return direct.get_key(key.id).id


def _verify_sample(served: Served, messages: list[bytes], signatures: list[bytes]) -> None:
    public = served.key.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    for i in (0, len(messages) // 2, len(messages) - 1):
        public.verify(signatures[i], messages[i], padding.PKCS1v15(), hashes.SHA256())


def test_batch_sign_throughput(benchmark: Any, served: Served) -> None:
    messages = [b"bench message %d " % i + os.urandom(8) for i in range(COUNT)]
    runners = _runners(served, messages)
    ops: dict[str, list[float]] = {c: [] for c in CONTENDERS}

    def one_round() -> None:
        for contender in CONTENDERS:
            start = time.perf_counter()
            signatures = runners[contender]()
            elapsed = time.perf_counter() - start
            _verify_sample(served, messages, signatures)
            ops[contender].append(len(messages) / elapsed)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    rounds = len(ops["hsmbridge-batch"])

    def ratio(base: str) -> float:
        return statistics.median(ops["hsmbridge-batch"][i] / ops[base][i] for i in range(rounds))

    medians = {c: round(statistics.median(v), 1) for c, v in ops.items()}
    ratios = {
        "batch_vs_sdk_loop": round(ratio("nethsm-sdk-loop"), 2),
        "batch_vs_hsmbridge_loop": round(ratio("hsmbridge-loop"), 2),
        "batch_vs_pkcs11_direct": round(ratio("pkcs11-direct"), 3),
    }
    benchmark.extra_info.update(
        {
            "workload": "rsa2048 rsa-pkcs1-sha256 sign",
            "count": COUNT,
            "rounds": rounds,
            "threads": served.key._default_threads(),
            "ops_per_s": medians,
            "ratios": ratios,
            "machine": f"{os.cpu_count()} cores",
        }
    )
    print(f"\nNetHSM backend, {COUNT} RSA-2048 PKCS#1 v1.5 signatures x {rounds} rounds (median):")
    for contender, value in medians.items():
        print(f"  {contender:18s} {value:9.1f} ops/s")
    for name, value in ratios.items():
        print(f"  {name:26s} {value:.2f}x")
