"""Bridge server throughput: NetHSM REST API over SoftHSM2 vs the same token directly.

Workloads, one RSA-2048 key made through the server:

- ``sign``: NetHSM mode ``PKCS1`` (the client sends the DigestInfo-prefixed
  SHA-256 hash, as NetHSM clients do);
- ``decrypt``: NetHSM mode ``OAEP_SHA1`` (the OAEP hash SoftHSM2 supports).

Contenders, measured side by side in every round:

- ``server-clients``: ``CLIENTS`` threads, each with its own keep-alive
  ``requests.Session``, posting to ``hsmbridge serve`` running as its own
  process (so it does not share the clients' GIL, as an appliance would not);
- ``server-nethsm-batch``: ``sign_batch`` / ``decrypt_batch`` of hsmbridge's
  NetHSM backend on the same server (12 keep-alive connections, its own
  HTTP/1.1 client: a fraction of ``requests``' CPU per request, which on a
  2-core machine is CPU the server and the token do not get);
- ``pkcs11-direct``: ``sign_batch`` / ``decrypt_batch`` on the same token key
  through hsmbridge's PKCS#11 backend in this process.

The contenders run in alternating order (reversed every other round).

Run::

    python -m pytest benchmarks/bench_server.py --benchmark-enable -s \\
        --benchmark-json=benchmarks/results/server.json

``HSMBRIDGE_SERVER_BENCH_COUNT`` (default 600) operations per contender and
round, ``HSMBRIDGE_SERVER_BENCH_ROUNDS`` (default 3), and
``HSMBRIDGE_SERVER_BENCH_CLIENTS`` (default 16). Ops/s are medians over rounds;
the server/direct ratios (median of per-round ratios) are printed and stored in
``extra_info``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

import hsmbridge
from hsmbridge.mechanisms import DIGEST_INFO_PREFIX
from hsmbridge.testing import SoftToken

from .serving import free_port, run_clients, wait_ready

COUNT = int(os.environ.get("HSMBRIDGE_SERVER_BENCH_COUNT", "600"))
ROUNDS = int(os.environ.get("HSMBRIDGE_SERVER_BENCH_ROUNDS", "3"))
CLIENTS = int(os.environ.get("HSMBRIDGE_SERVER_BENCH_CLIENTS", "16"))
ADMIN = ("admin", "bench-admin-passphrase")
OPERATOR = ("operator", "bench-operator-passphrase")
OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
SERVE = (
    "import sys; from hsmbridge.server.run import serve; "
    "serve(sys.argv[1], sys.argv[2], sys.argv[3])"
)


@dataclass
class Served:
    """A ``hsmbridge serve`` process, provisioned, with one RSA-2048 key."""

    url: str
    cert: Path
    key_id: str
    public: rsa.RSAPublicKey
    direct: hsmbridge.Key
    over_nethsm: hsmbridge.Key  # the same key through hsmbridge's NetHSM backend
    pid: int  # of the server process


def _session(cert: Path, auth: tuple[str, str]) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
    s.verify = str(cert)
    s.auth = auth
    return s


@pytest.fixture(scope="module")
def served(softhsm_token: SoftToken, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("server-bench")
    port = free_port()
    log = state / "serve.log"
    env = {**os.environ, **softhsm_token.env(), "HSMBRIDGE_PIN": softhsm_token.pin}
    cmd = [sys.executable, "-c", SERVE, softhsm_token.uri, f"127.0.0.1:{port}", str(state / "s")]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url, cert = f"https://127.0.0.1:{port}/api/v1", state / "s" / "tls-cert.pem"
    direct_hsm = hsmbridge.open(softhsm_token.uri, pin=softhsm_token.pin)
    stack = contextlib.ExitStack()
    try:
        wait_ready(url, cert, process, log)
        with _session(cert, ADMIN) as s:
            body = {"unlockPassphrase": "bench-unlock-passphrase", "adminPassphrase": ADMIN[1],
                    "systemTime": "2026-01-01T00:00:00Z"}  # fmt: skip
            s.post(f"{url}/provision", json=body, timeout=30).raise_for_status()
            user = {"realName": "bench", "role": "Operator", "passphrase": OPERATOR[1]}
            s.put(f"{url}/users/operator", json=user, timeout=30).raise_for_status()
            gen: dict[str, Any] = {"type": "RSA", "length": 2048,
                   "mechanisms": ["RSA_Signature_PKCS1", "RSA_Decryption_OAEP_SHA1"]}  # fmt: skip
            r = s.post(f"{url}/keys/generate", json=gen, timeout=120)
            r.raise_for_status()
            key_id = r.json()["id"]
            pem = s.get(f"{url}/keys/{key_id}/public.pem", timeout=30).content
        with _session(cert, OPERATOR) as s:  # first login pays argon2; keep it out of rounds
            s.get(f"{url}/keys/{key_id}", timeout=30).raise_for_status()
        public = serialization.load_pem_public_key(pem)
        assert isinstance(public, rsa.RSAPublicKey)
        direct = direct_hsm.get_key(key_id)  # the bridge labels the token key with its id
        assert direct.public_key_der() == public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        over_nethsm = stack.enter_context(
            hsmbridge.open(f"nethsm://operator@127.0.0.1:{port}", password=OPERATOR[1],
                           ca=str(cert))
        ).get_key(key_id)  # fmt: skip
        yield Served(url, cert, key_id, public, direct, over_nethsm, process.pid)
        with _session(cert, ADMIN) as s:
            s.delete(f"{url}/keys/{key_id}", timeout=30)
    finally:
        stack.close()
        direct_hsm.close()
        process.terminate()  # SIGTERM: uvicorn shuts down gracefully
        process.wait(30)


def _over_server(
    served: Served, path: str, bodies: list[dict[str, str]], field: str
) -> list[bytes]:
    """Post every body with CLIENTS keep-alive sessions in parallel; results in order."""
    out: list[bytes] = [b""] * len(bodies)
    errors: list[str] = []

    def client(start: int) -> None:
        with _session(served.cert, OPERATOR) as s:
            for i in range(start, len(bodies), CLIENTS):
                r = s.post(f"{served.url}/keys/{served.key_id}/{path}", json=bodies[i], timeout=60)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                out[i] = base64.b64decode(r.json()[field])

    run_clients(client, CLIENTS)
    assert not errors, errors[:3]
    return out


def _measure(
    benchmark: Any, workload: str, runners: dict[str, Callable[[], list[bytes]]],
    check: Callable[[list[bytes]], None],
) -> None:  # fmt: skip
    ops: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)

    def one_round() -> None:
        for name in order:
            start = time.perf_counter()
            results = runners[name]()
            elapsed = time.perf_counter() - start
            check(results)
            ops[name].append(len(results) / elapsed)
        order.reverse()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    n = len(ops["server-clients"])

    def over_direct(name: str) -> float:
        return statistics.median(ops[name][i] / ops["pkcs11-direct"][i] for i in range(n))

    ratio = over_direct("server-clients")
    batch_ratio = over_direct("server-nethsm-batch")
    medians = {name: round(statistics.median(v), 1) for name, v in ops.items()}
    benchmark.extra_info.update(
        {
            "workload": workload,
            "count": COUNT,
            "rounds": n,
            "clients": CLIENTS,
            "ops_per_s": medians,
            "ratio_server_vs_direct": round(ratio, 3),
            "ratio_nethsm_batch_vs_direct": round(batch_ratio, 3),
            "machine": f"{os.cpu_count()} cores",
        }
    )
    print(
        f"\n{workload}: server {medians['server-clients']} ops/s with {CLIENTS} clients, "
        f"{medians['server-nethsm-batch']} ops/s with hsmbridge's NetHSM batch, "
        f"direct PKCS#11 {medians['pkcs11-direct']} ops/s; ratios {ratio:.3f}, {batch_ratio:.3f}"
    )


def test_rsa2048_pkcs1_sign_throughput(benchmark: Any, served: Served) -> None:
    messages = [b"bench message %d " % i + os.urandom(8) for i in range(COUNT)]
    digests = [hashlib.sha256(m).digest() for m in messages]
    prefix = DIGEST_INFO_PREFIX["sha256"]
    bodies = [{"mode": "PKCS1", "message": base64.b64encode(prefix + d).decode()} for d in digests]

    def check(signatures: list[bytes]) -> None:
        for i in (0, len(messages) // 2, len(messages) - 1):
            served.public.verify(signatures[i], messages[i], padding.PKCS1v15(), hashes.SHA256())

    _measure(
        benchmark,
        "rsa2048 PKCS1 (sha256) sign",
        {
            "server-clients": lambda: _over_server(served, "sign", bodies, "signature"),
            "server-nethsm-batch": lambda: served.over_nethsm.sign_batch(
                messages, "rsa-pkcs1-sha256"
            ),
            "pkcs11-direct": lambda: served.direct.sign_batch(messages, "rsa-pkcs1-sha256"),
        },
        check,
    )


def test_rsa2048_oaep_sha1_decrypt_throughput(benchmark: Any, served: Served) -> None:
    plaintexts = [os.urandom(32) for _ in range(COUNT)]
    cts = [served.public.encrypt(p, OAEP_SHA1) for p in plaintexts]
    bodies = [{"mode": "OAEP_SHA1", "encrypted": base64.b64encode(c).decode()} for c in cts]

    def check(results: list[bytes]) -> None:
        assert results == plaintexts

    _measure(
        benchmark,
        "rsa2048 OAEP_SHA1 decrypt",
        {
            "server-clients": lambda: _over_server(served, "decrypt", bodies, "decrypted"),
            "server-nethsm-batch": lambda: served.over_nethsm.decrypt_batch(cts, "rsa-oaep-sha1"),
            "pkcs11-direct": lambda: served.direct.decrypt_batch(cts, "rsa-oaep-sha1"),
        },
        check,
    )
