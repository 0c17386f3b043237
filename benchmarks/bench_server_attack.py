"""Legitimate clients keep being served while the server is attacked (not run in CI).

``hsmbridge serve`` runs as its own process with its default limits. Operator
clients sign (RSA-2048 PKCS1, every signature verified) over keep-alive
connections from 127.0.0.10, first alone (baseline), then while a separate
attacker process runs, at the same time:

- idle connections: as many TLS connections as it gets from 127.0.0.66-.69
  (handshake done, nothing sent), reopened as the server closes them, plus raw
  TCP connections that never start TLS;
- unauthenticated big bodies: ``POST /keys`` multipart with Content-Length
  1 GiB from 127.0.0.77, sent in 256 KiB chunks until the server closes;
- an argon2 flood: 8 addresses (127.0.0.88-.95) logging in as new unknown users;
- wrong logins from the legitimate clients' own address (127.0.0.10) for the
  operator's user name.

``HSMBRIDGE_ATTACKS`` picks a subset (``idle,no-tls,big-body,argon2,wrong-logins``).
Everything is bounded in time (``HSMBRIDGE_ATTACK_SECONDS`` per phase, default
20) and stays on loopback. It reports the legitimate clients' latency (p50,
p99, max), failures (must be 0), what the attacks got, and the server's peak
RSS; results go to benchmarks/results/server_attack.json::

    python -m pytest benchmarks/bench_server_attack.py -s
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import multiprocessing
import os
import socket
import ssl
import statistics
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from hsmbridge.mechanisms import DIGEST_INFO_PREFIX

from .bench_server import OPERATOR, Served, served  # noqa: F401  (the fixture)

SECONDS = float(os.environ.get("HSMBRIDGE_ATTACK_SECONDS", "20"))
CLIENTS = int(os.environ.get("HSMBRIDGE_ATTACK_CLIENTS", "8"))
#: which attacks run (comma-separated; default all)
ATTACKS = os.environ.get("HSMBRIDGE_ATTACKS", "idle,no-tls,big-body,argon2,wrong-logins")
LEGIT = "127.0.0.10"
RESULTS = Path(__file__).parent / "results" / "server_attack.json"


def _basic(user: str, passphrase: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{passphrase}".encode()).decode()


def _context(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


def _connection(host: str, port: int, cert: str, source: str) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        host, port, context=_context(cert), timeout=30, source_address=(source, 0)
    )


# -- legitimate clients ------------------------------------------------------------------


def _legit(served: Served, seconds: float) -> dict[str, Any]:  # noqa: F811
    """CLIENTS operator threads signing for ``seconds``: latencies and failures."""
    parts = urlsplit(served.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    prefix = DIGEST_INFO_PREFIX["sha256"]
    auth = _basic(*OPERATOR)

    def client(n: int) -> None:
        conn = _connection(host, port, str(served.cert), LEGIT)
        i = 0
        while time.monotonic() < deadline and i < 100_000:
            i += 1
            message = f"legit {n} {i}".encode()
            body = json.dumps(
                {
                    "mode": "PKCS1",
                    "message": base64.b64encode(prefix + hashlib.sha256(message).digest()).decode(),
                }
            )
            start = time.perf_counter()
            try:
                conn.request(
                    "POST",
                    f"{parts.path}/keys/{served.key_id}/sign",
                    body=body,
                    headers={"Authorization": auth, "Content-Type": "application/json"},
                )
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                failures[type(exc).__name__] += 1
                conn.close()
                conn = _connection(host, port, str(served.cert), LEGIT)
                continue
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                failures[f"HTTP {response.status}"] += 1
                continue
            signature = base64.b64decode(json.loads(data)["signature"])
            served.public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)

    return {
        "requests": len(latencies),
        "failures": dict(failures),
        "ops_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(1000 * ordered[-1], 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
    }


# -- the attacker (its own process, so its threads do not slow the clients' GIL) ---------


def _attack(url: str, cert: str, seconds: float, report: Any) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    deadline = time.monotonic() + seconds
    stats: Counter[str] = Counter()
    lock = threading.Lock()
    context = _context(cert)

    def count(key: str, n: int = 1) -> None:
        with lock:
            stats[key] += n

    def idle(source: str) -> None:
        held: list[socket.socket] = []
        while time.monotonic() < deadline:
            try:
                raw = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
                held.append(context.wrap_socket(raw, server_hostname=host))
                count("idle TLS connections opened")
            except OSError:
                count("idle TLS connections refused")
                time.sleep(0.05)  # at the per-client cap: try again shortly
        for s in held:
            s.close()

    def no_tls(source: str) -> None:
        held: list[socket.socket] = []
        while time.monotonic() < deadline and len(held) < 2000:
            try:
                held.append(socket.create_connection((host, port), 5, (source, 0)))
                count("raw TCP connections opened")
            except OSError:
                count("raw TCP connections refused")
            time.sleep(0.01)
        for s in held:
            s.close()

    def big_body() -> None:
        chunk = b"x" * 256 * 1024
        while time.monotonic() < deadline:
            try:
                raw = socket.create_connection((host, port), 5, ("127.0.0.77", 0))
                s = context.wrap_socket(raw, server_hostname=host)
                s.sendall(
                    f"POST {parts.path}/keys HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 30}\r\n"
                    "Content-Type: multipart/form-data; boundary=B\r\n\r\n".encode()
                )
                sent = 0
                try:
                    while sent < 1 << 30 and time.monotonic() < deadline:
                        s.sendall(chunk)
                        sent += len(chunk)
                except OSError:
                    count("big-body uploads cut off by the server")
                count("big-body bytes sent before the cut", sent)
                s.close()
            except OSError:
                count("big-body connections refused")

    def argon2_flood(source: str) -> None:
        while time.monotonic() < deadline:
            try:
                conn = _connection(host, port, cert, source)
                user = uuid.uuid4().hex[:12]
                conn.request(
                    "GET", f"{parts.path}/keys", headers={"Authorization": _basic(user, user)}
                )
                count(f"argon2 flood: HTTP {conn.getresponse().status}")
                conn.close()
            except (OSError, http.client.HTTPException):
                count("argon2 flood: connection error")

    def wrong_logins() -> None:
        conn = _connection(host, port, cert, LEGIT)
        while time.monotonic() < deadline:
            try:
                auth = _basic(OPERATOR[0], "not-the-operator-passphrase")
                conn.request("GET", f"{parts.path}/keys", headers={"Authorization": auth})
                response = conn.getresponse()
                response.read()
                count(f"wrong logins from the clients' address: HTTP {response.status}")
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = _connection(host, port, cert, LEGIT)

    jobs: list[threading.Thread] = []
    if "idle" in ATTACKS:
        jobs += [threading.Thread(target=idle, args=(f"127.0.0.{66 + i}",)) for i in range(4)]
    if "no-tls" in ATTACKS:
        jobs.append(threading.Thread(target=no_tls, args=("127.0.0.70",)))
    if "big-body" in ATTACKS:
        jobs.append(threading.Thread(target=big_body))
    if "argon2" in ATTACKS:
        jobs += [
            threading.Thread(target=argon2_flood, args=(f"127.0.0.{88 + i}",)) for i in range(8)
        ]
    if "wrong-logins" in ATTACKS:
        jobs.append(threading.Thread(target=wrong_logins))
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(seconds + 60)
    report.put(dict(stats))


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def test_legitimate_clients_are_served_under_attack(served: Served) -> None:  # noqa: F811
    warm = _legit(served, 2)  # connections, cached login, token sessions
    assert not warm["failures"], warm
    rss_before = _peak_rss_mib(served.pid)
    baseline = _legit(served, SECONDS)
    report: Any = multiprocessing.get_context("fork").Queue()
    attacker = multiprocessing.get_context("fork").Process(
        target=_attack, args=(served.url, str(served.cert), SECONDS, report)
    )
    attacker.start()
    time.sleep(1)  # let the attacks build up first
    under_attack = _legit(served, SECONDS - 1)
    attacks = report.get(timeout=SECONDS + 120)
    attacker.join(60)
    result = {
        "seconds_per_phase": SECONDS,
        "clients": CLIENTS,
        "baseline": baseline,
        "under_attack": under_attack,
        "attacks": {"running": ATTACKS, **attacks},
        "server_peak_rss_mib": {"before": rss_before, "after": _peak_rss_mib(served.pid)},
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + json.dumps(result, indent=2))
    assert not baseline["failures"] and not under_attack["failures"], result
