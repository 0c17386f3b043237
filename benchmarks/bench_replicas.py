"""Replicas: throughput of 1, 2 and 3 behind HAProxy, CPU per request, failover time,
and PostgreSQL vs SQLite per request on one replica. Not part of CI.

Everything runs side by side in one run, rounds interleaved, on one SoftHSM2
token: a durable PostgreSQL (fsync on), three ``hsmbridge serve`` replicas on
it, three HAProxy front ends (over the first 1, 2 and 3 replicas) and one
replica on SQLite. Workloads, from ``CLIENTS`` keep-alive client threads in
this process:

- ``sign``: ECDSA P-256 signatures (the hot path: cached records, no write);
- ``tag``: add then remove a key tag (a write transaction per request).

CPU per request is the CPU time (user + system, from /proc) of the serving
processes — the replicas, HAProxy, PostgreSQL and its backends — divided by
the requests served; the shared 2-core machine makes wall-clock numbers noisy,
CPU per request much less so. Failover: ``CLIENTS`` threads sign through
HAProxy over 2 replicas with hsmbridge's NetHSM client (which retries); one
replica is SIGKILLed; the longest gap between two completed signatures and the
slowest single call are the failover time a client sees.

Run::

    python -m benchmarks.bench_replicas  # writes benchmarks/results/replicas.json
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

import hsmbridge
from hsmbridge.server import tls
from hsmbridge.server.testing import Credentials, provision
from hsmbridge.softhsm import make_tokens

from .cluster import HAProxy, Postgres, Replica, _Direct, start_cluster
from .serving import cpu_seconds, run_clients

REQUESTS = int(os.environ.get("HSMBRIDGE_REPLICA_BENCH_REQUESTS", "1500"))
ROUNDS = int(os.environ.get("HSMBRIDGE_REPLICA_BENCH_ROUNDS", "3"))
CLIENTS = int(os.environ.get("HSMBRIDGE_REPLICA_BENCH_CLIENTS", "12"))
RESULTS = Path(__file__).parent / "results" / "replicas.json"


def children(parent: int) -> list[int]:
    """``parent`` and its direct children (PostgreSQL's backends)."""
    found = [parent]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def drive(url: str, ca: str, who: Credentials, make: Callable[[int], tuple[str, str, Any]]) -> int:
    """``REQUESTS`` requests from ``CLIENTS`` keep-alive sessions; ``make(i)``: the i-th."""
    errors: list[str] = []

    def client(start: int) -> None:
        with requests.Session() as s:
            s.trust_env, s.verify, s.auth = False, ca, who.auth
            for i in range(start, REQUESTS, CLIENTS):
                method, path, body = make(i)
                r = s.request(method, f"{url}{path}", json=body, timeout=60)
                if r.status_code >= 400:  # 304: a tag the last round left in place
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return

    run_clients(client, CLIENTS)
    assert not errors, errors[:3]
    return REQUESTS


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="hsmbridge-bench-replicas-"))
    token = make_tokens(root / "token", ["bench-replicas"])[0]
    os.environ.update(token.env())
    postgres = Postgres(durable=True)
    cluster = start_cluster(token, root / "cluster", 3, postgres)
    fronts: list[HAProxy] = []
    sqlite: Replica | None = None
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, shared", "clients": CLIENTS}
    try:
        fronts = [
            HAProxy(root / f"lb{n}", [r.hostport for r in cluster.replicas[:n]], cluster.cert)
            for n in (1, 2, 3)
        ]
        sqlite = Replica(token, root / "sqlite", cluster.cert, cluster.key, None, {})
        sqlite.wait_ready()
        provision(_Direct(cluster, sqlite))
        time.sleep(1.5)  # HAProxy health checks see every replica ready
        key_id = _make_key(cluster.url, cluster)
        pg_pids = lambda: children(postgres.process.pid)  # noqa: E731
        replica_pids = [r.process.pid for r in cluster.replicas]
        contenders: dict[str, tuple[str, Callable[[], list[int]]]] = {
            f"pg-{n}-replicas-haproxy": (
                f"https://{fronts[n - 1].hostport}/api/v1",
                lambda n=n: [*replica_pids[:n], fronts[n - 1].process.pid, *pg_pids()],
            )
            for n in (1, 2, 3)
        }
        contenders["pg-1-replica-direct"] = (
            cluster.replicas[0].url,
            lambda: [replica_pids[0], *pg_pids()],
        )
        contenders["sqlite-1-replica-direct"] = (sqlite.url, lambda: [sqlite.process.pid])
        sqlite_key = _make_key(sqlite.url, cluster)
        digest = base64.b64encode(hashlib.sha256(b"bench").digest()).decode()
        # the tag workload: each client thread alternates add/remove on a key of its own
        # (tag changes to one key are read-modify-write: concurrent ones would race)
        tag_keys = {
            "pg": [_make_key(cluster.url, cluster) for _ in range(CLIENTS)],
            "sqlite": [_make_key(sqlite.url, cluster) for _ in range(CLIENTS)],
        }

        def sign(engine: str) -> Callable[[int], tuple[str, str, Any]]:
            k = sqlite_key if engine == "sqlite" else key_id
            return lambda i: ("POST", f"/keys/{k}/sign", {"mode": "ECDSA", "message": digest})

        def tag(engine: str) -> Callable[[int], tuple[str, str, Any]]:
            def make(i: int) -> tuple[str, str, Any]:
                k = tag_keys[engine][i % CLIENTS]
                return (
                    "PUT" if (i // CLIENTS) % 2 == 0 else "DELETE",
                    f"/keys/{k}/restrictions/tags/t",
                    None,
                )

            return make

        workloads = {"sign": sign, "tag": tag}
        raw: dict[str, dict[str, dict[str, list[float]]]] = {
            w: {c: {"ops": [], "cpu_ms": [], "client_cpu_ms": []} for c in contenders}
            for w in workloads
        }
        for _ in range(ROUNDS):
            for workload, make in workloads.items():
                for name, (url, pids) in contenders.items():
                    engine = "sqlite" if name.startswith("sqlite") else "pg"
                    cpu0, client0, t0 = (
                        cpu_seconds(pids()),
                        time.process_time(),
                        time.perf_counter(),
                    )
                    n = drive(url, cluster.ca_file, cluster.operator if workload == "sign"
                              else cluster.admin, make(engine))  # fmt: skip
                    elapsed = time.perf_counter() - t0
                    cpu = cpu_seconds(pids()) - cpu0
                    raw[workload][name]["ops"].append(n / elapsed)
                    raw[workload][name]["cpu_ms"].append(1000 * cpu / n)
                    raw[workload][name]["client_cpu_ms"].append(
                        1000 * (time.process_time() - client0) / n
                    )
        summary: dict[str, Any] = {}
        for workload, per in raw.items():
            summary[workload] = {
                name: {k: round(statistics.median(v), 3) for k, v in m.items()}
                for name, m in per.items()
            }
            base = summary[workload]["pg-1-replicas-haproxy"]
            for name in per:
                s = summary[workload][name]
                s["throughput_vs_1_replica"] = round(s["ops"] / base["ops"], 3)
            sq = summary[workload]["sqlite-1-replica-direct"]
            pg = summary[workload]["pg-1-replica-direct"]
            summary[workload]["pg_vs_sqlite_cpu_per_request"] = round(
                pg["cpu_ms"] / sq["cpu_ms"], 3
            )
            summary[workload]["pg_minus_sqlite_cpu_ms_per_request"] = round(
                pg["cpu_ms"] - sq["cpu_ms"], 3
            )
        results["workloads"] = summary
        results["failover"] = _failover(cluster, fronts[1], key_id)
    finally:
        for front in fronts:
            front.stop()
        if sqlite is not None:
            sqlite.stop()
        cluster.stop()
        postgres.stop()
        shutil.rmtree(root, ignore_errors=True)
    results["requests_per_round"], results["rounds"] = REQUESTS, ROUNDS
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _make_key(url: str, cluster: Any) -> str:
    with cluster.session(cluster.admin) as s:
        body = {"type": "EC_P256", "mechanisms": ["ECDSA_Signature"]}
        r = s.post(f"{url}/keys/generate", json=body, timeout=60)
        r.raise_for_status()
        key_id = str(r.json()["id"])
    with cluster.session(cluster.operator) as s:  # first login pays argon2: not in rounds
        s.get(f"{url}/keys/{key_id}", timeout=60).raise_for_status()
    return key_id


def _failover(cluster: Any, front: HAProxy, key_id: str) -> dict[str, Any]:
    """Sign continuously through HAProxy over two replicas; SIGKILL one; the longest gap."""
    hsm = hsmbridge.open(
        f"nethsm://operator@{front.hostport}",
        password=cluster.operator.passphrase,
        fingerprint=tls.fingerprint(cluster.cert),
    )
    key = hsm.get_key(key_id=key_id)
    done: list[float] = []
    failed: list[str] = []
    slowest = [0.0]
    stop = threading.Event()

    def signer() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                key.sign(b"failover", "ecdsa-sha256")
            except hsmbridge.HSMError as exc:
                failed.append(exc.message)
                continue
            now = time.perf_counter()
            slowest[0] = max(slowest[0], now - t)
            done.append(now)

    threads = [threading.Thread(target=signer) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.perf_counter()
    cluster.replicas[1].kill()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    after = sorted(t for t in done if t >= killed_at - 1)
    gaps = [b - a for a, b in itertools.pairwise(after)]
    stats = dict(hsm.stats)
    hsm.close()
    cluster.replicas[1].start()
    cluster.replicas[1].wait_ready()
    return {
        "longest_gap_between_signatures_s": round(max(gaps), 3),
        "slowest_single_sign_s": round(slowest[0], 3),
        "signatures": len(done),
        "client_retries": stats["retries"],
        "failed_calls": len(failed),
        "failures": sorted(set(failed))[:3],
    }


if __name__ == "__main__":
    main()
