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

Besides wall time, every contender's CPU per signature is measured: the
server process's (``/proc/PID/stat``) and this process's (``process_time``),
which is steadier than wall time on a shared machine. Contenders run in
alternating order (reversed every other round).

``test_batch_vs_sdk_loop_over_latency`` puts ``benchmarks/latency_proxy.py``
(its own process) between the clients and the server, adding 0.5 ms and 2 ms
each way per chunk, as a network to an appliance would, and compares the
batch with the SDK loop at each latency (and without the proxy) in one run.

Run::

    .venv/bin/python -m pytest benchmarks/bench_nethsm.py --benchmark-enable -s \
        --benchmark-json=benchmarks/results/nethsm.json

``HSMBRIDGE_NETHSM_BENCH_COUNT`` (default 400) and
``HSMBRIDGE_NETHSM_LATENCY_COUNT`` (default 200) messages per contender and
round, ``HSMBRIDGE_NETHSM_BENCH_ROUNDS`` (default 3) rounds. Ops/s and CPU are
medians over rounds; the ratios (median of
per-round ratios) go in extra_info.
"""

from __future__ import annotations

import contextlib
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
from hsmbridge.nethsm.backend import DEFAULT_THREADS
from hsmbridge.testing import SoftToken

from .latency_proxy import running as latency_proxy
from .serving import cpu_seconds, free_port, wait_ready

COUNT = int(os.environ.get("HSMBRIDGE_NETHSM_BENCH_COUNT", "400"))
LATENCY_COUNT = int(os.environ.get("HSMBRIDGE_NETHSM_LATENCY_COUNT", "200"))
#: milliseconds added each way by the proxy (0: no proxy)
LATENCIES = (0.0, 0.5, 2.0)
#: a second batch contender over the proxy, with this many requests in flight (default:
#: hsmbridge.nethsm.backend.DEFAULT_THREADS)
WIDE = 24
ROUNDS = int(os.environ.get("HSMBRIDGE_NETHSM_BENCH_ROUNDS", "3"))
MECH = Mechanism.RSA_PKCS1_SHA256
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


def _sdk_loop(
    hostport: str, cert: Path, key_id: str, messages: list[bytes]
) -> Callable[[], list[bytes]]:
    """The official SDK signing one message at a time (hashing and DigestInfo by the caller)."""
    import nethsm

    sdk = nethsm.NetHSM(
        hostport, nethsm.Authentication(*OPERATOR), verify_tls=True, ca_certs=str(cert)
    )

    def loop() -> list[bytes]:
        out = []
        for m in messages:
            data = nethsm.Base64.encode(signing_input(MECH, m, prehashed=False))
            out.append(sdk.sign(key_id, data, nethsm.SignMode.PKCS1).decode())
        return out

    return loop


def _runners(served: Served, messages: list[bytes]) -> dict[str, Callable[[], list[bytes]]]:
    direct = hsmbridge.open(served.token.uri, pin=served.token.pin)
    direct_key = direct.get_key(key_id=_backend_id(direct, served.key))
    key = served.key
    return {
        "nethsm-sdk-loop": _sdk_loop(served.hostport, served.cert, key.id, messages),
        "hsmbridge-loop": lambda: [key.sign(m, MECH) for m in messages],
        "hsmbridge-batch": lambda: key.sign_batch(messages, MECH),
        "pkcs11-direct": lambda: direct_key.sign_batch(messages, MECH),
    }


@dataclass
class Sample:
    """One contender in one round."""

    ops_per_s: float
    server_cpu_ms: float  # per operation
    client_cpu_ms: float


def _measure(
    served: Served,
    messages: list[bytes],
    runners: dict[str, Callable[[], list[bytes]]],
    benchmark: Any | None,
) -> dict[str, list[Sample]]:
    """ROUNDS rounds of every contender, alternating their order; signatures spot-checked."""
    samples: dict[str, list[Sample]] = {c: [] for c in runners}
    order = list(runners)

    def one_round() -> None:
        for contender in order:
            server0, client0 = cpu_seconds([served.process.pid]), time.process_time()
            start = time.perf_counter()
            signatures = runners[contender]()
            elapsed = time.perf_counter() - start
            server = cpu_seconds([served.process.pid]) - server0
            client = time.process_time() - client0
            _verify_sample(served, messages, signatures)
            n = len(messages)
            samples[contender].append(Sample(n / elapsed, 1000 * server / n, 1000 * client / n))
        order.reverse()

    if benchmark is None:
        for _ in range(ROUNDS):
            one_round()
    else:
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    return samples


def _medians(samples: dict[str, list[Sample]]) -> dict[str, dict[str, float]]:
    return {
        c: {
            "ops_per_s": round(statistics.median(s.ops_per_s for s in v), 1),
            "server_cpu_ms": round(statistics.median(s.server_cpu_ms for s in v), 3),
            "client_cpu_ms": round(statistics.median(s.client_cpu_ms for s in v), 3),
            "cpu_ms": round(statistics.median(s.server_cpu_ms + s.client_cpu_ms for s in v), 3),
        }
        for c, v in samples.items()
    }


def _ratio(samples: dict[str, list[Sample]], top: str, base: str) -> float:
    """Median over rounds of ``top``'s ops/s over ``base``'s in the same round."""
    pairs = zip(samples[top], samples[base], strict=True)
    return statistics.median(t.ops_per_s / b.ops_per_s for t, b in pairs)


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
    samples = _measure(served, messages, _runners(served, messages), benchmark)
    medians = _medians(samples)
    batch, direct = medians["hsmbridge-batch"], medians["pkcs11-direct"]
    ratios = {
        "batch_vs_sdk_loop": round(_ratio(samples, "hsmbridge-batch", "nethsm-sdk-loop"), 2),
        "batch_vs_hsmbridge_loop": round(_ratio(samples, "hsmbridge-batch", "hsmbridge-loop"), 2),
        "batch_vs_pkcs11_direct": round(_ratio(samples, "hsmbridge-batch", "pkcs11-direct"), 3),
        # CPU per signature of the direct path over that of client + server: the share of
        # the machine a signature through the bridge leaves to signing
        "cpu_pkcs11_direct_vs_batch": round(direct["cpu_ms"] / batch["cpu_ms"], 3),
    }
    benchmark.extra_info.update(
        {
            "workload": "rsa2048 rsa-pkcs1-sha256 sign",
            "count": COUNT,
            "rounds": ROUNDS,
            "threads": served.key._default_threads(),
            "ops_per_s": {c: m["ops_per_s"] for c, m in medians.items()},
            "cpu_ms_per_op": {
                c: {k: v for k, v in m.items() if k != "ops_per_s"} for c, m in medians.items()
            },
            "ratios": ratios,
            "machine": f"{os.cpu_count()} cores",
            "load_average": os.getloadavg()[0],
        }
    )
    print(f"\nNetHSM backend, {COUNT} RSA-2048 PKCS#1 v1.5 signatures x {ROUNDS} rounds (median):")
    _print(medians)
    for name, value in ratios.items():
        print(f"  {name:26s} {value:.3f}x")


def _print(medians: dict[str, dict[str, float]]) -> None:
    for contender, m in medians.items():
        print(
            f"  {contender:18s} {m['ops_per_s']:8.1f} ops/s  CPU/op: server "
            f"{m['server_cpu_ms']:.3f} ms, client {m['client_cpu_ms']:.3f} ms"
        )


def test_batch_vs_sdk_loop_over_latency(benchmark: Any, served: Served) -> None:
    """Batch vs SDK loop with 0 / 0.5 / 2 ms added each way by a proxy process, one run.

    One latency at a time (the server allows 64 connections per client address, and
    every connection here comes from 127.0.0.1), its contenders alternating round by round.
    """
    messages = [b"latency message %d " % i + os.urandom(8) for i in range(LATENCY_COUNT)]
    samples: dict[str, list[Sample]] = {}
    proxies: dict[float, dict[str, float | int]] = {}

    def at_latency(delay: float) -> None:
        with contextlib.ExitStack() as stack:
            hostport = served.hostport
            if delay:
                hostport, proxies[delay] = stack.enter_context(
                    latency_proxy(served.hostport, delay)
                )
            runners = {
                f"{delay:g}ms nethsm-sdk-loop": _sdk_loop(
                    hostport, served.cert, served.key.id, messages
                )
            }
            for name, threads in (("hsmbridge-batch", 0), (f"hsmbridge-batch-{WIDE}", WIDE)):
                hsm = hsmbridge.open(
                    f"nethsm://admin@{hostport}", password=ADMIN[1], operator=OPERATOR,
                    ca=str(served.cert), max_connections=max(threads, DEFAULT_THREADS),
                )  # fmt: skip
                stack.callback(hsm.close)
                key = hsm.get_key(served.key.id)

                def batch(key: hsmbridge.Key = key, n: int = threads) -> list[bytes]:
                    return key.sign_batch(messages, MECH, threads=n or None)

                batch()  # connect the pool before measuring
                runners[f"{delay:g}ms {name}"] = batch
            samples.update(_measure(served, messages, runners, None))

    def every_latency() -> None:
        for delay in LATENCIES:
            at_latency(delay)

    benchmark.pedantic(every_latency, rounds=1, iterations=1)
    medians = _medians(samples)
    results: dict[str, Any] = {}
    for delay in LATENCIES:
        at = f"{delay:g}ms"
        sdk = f"{at} nethsm-sdk-loop"
        results[at] = {
            "ops_per_s": {
                c.split()[1]: m["ops_per_s"] for c, m in medians.items() if c.startswith(at + " ")
            },
            "batch_vs_sdk_loop": round(_ratio(samples, f"{at} hsmbridge-batch", sdk), 2),
            f"batch_{WIDE}_vs_sdk_loop": round(
                _ratio(samples, f"{at} hsmbridge-batch-{WIDE}", sdk), 2
            ),
            "proxy_added_each_way": proxies.get(delay, {}),
        }
    benchmark.extra_info.update(
        {
            "workload": "rsa2048 rsa-pkcs1-sha256 sign",
            "count": LATENCY_COUNT,
            "rounds": ROUNDS,
            "threads": served.key._default_threads(),
            "latency": results,
            "load_average": os.getloadavg()[0],
        }
    )
    print(f"\nbatch vs SDK loop, {LATENCY_COUNT} signatures x {ROUNDS} rounds, per latency:")
    _print(medians)
    for at, result in results.items():
        added = result["proxy_added_each_way"] or "no proxy"
        print(
            f"  {at}: batch_vs_sdk_loop {result['batch_vs_sdk_loop']:.2f}x, with {WIDE} threads "
            f"{result[f'batch_{WIDE}_vs_sdk_loop']:.2f}x (added each way: {added})"
        )
