"""Soak: many threads and forked workers on one SoftHSM2 token, every result verified.

    .venv/bin/python -m benchmarks.soak [--minutes 10] [--threads 64] [--workers 4]

The parent opens the HSM, then forks ``--workers`` children (as gunicorn
``--preload`` does); the parent and every child run ``--threads`` threads of
mixed sign, decrypt, batch, generate, list and delete for ``--minutes``. Each
signature is verified and each plaintext compared with ``cryptography``.
Every 5 s each process samples its RSS and its PKCS#11 worker sessions
(``Pkcs11HSM.stats``: open and idle). The report (JSON on stdout,
also written to ``benchmarks/results/soak.json`` with ``--save``) gives the
failures, the operation counts, and the RSS and session samples, first and
last; "memory flat" means the last RSS sample is within 10% of the one
taken after the first minute. Not a CI test: it is long by design.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

import hsmbridge
from hsmbridge import EC, RSA
from hsmbridge.testing import make_tokens

OAEP = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
RESULTS = Path(__file__).parent / "results" / "soak.json"


def rss_mb() -> float:
    """Current resident set size of this process (not the peak)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_process(
    hsm: hsmbridge.HSM, seconds: float, n_threads: int, role: str, churn: bool = True
) -> dict[str, Any]:
    tag = f"{role}-{uuid.uuid4().hex[:6]}"
    rsa_key = hsm.generate_key(RSA(2048), f"soak-rsa-{tag}", usage={"sign", "decrypt"})
    ec_key = hsm.generate_key(EC("P-256"), f"soak-ec-{tag}")
    rsa_pub, ec_pub = rsa_key.public_key(), ec_key.public_key()
    counts: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def count(name: str) -> None:
        with lock:
            counts[name] = counts.get(name, 0) + 1

    def one(rng: random.Random) -> None:
        pick = rng.random()
        message = os.urandom(24)
        if pick < 0.35:
            sig = ec_key.sign(message, "ecdsa-sha256")
            ec_pub.verify(sig, message, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]
            count("sign_ec")
        elif pick < 0.55:
            sig = rsa_key.sign(message, "rsa-pss-sha256")
            rsa_pub.verify(  # type: ignore[union-attr,call-arg]
                sig, message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()
            )
            count("sign_rsa")
        elif pick < 0.75:
            ct = rsa_pub.encrypt(message, OAEP)  # type: ignore[union-attr]
            assert rsa_key.decrypt(ct, "rsa-oaep-sha1") == message
            count("decrypt")
        elif pick < 0.93:
            msgs = [os.urandom(16) for _ in range(32)]
            for m, s in zip(msgs, ec_key.sign_batch(msgs, "ecdsa-sha256", threads=2), strict=True):
                ec_pub.verify(s, m, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr,call-arg]
            count("batch32")
        elif pick < 0.97 or not churn:
            hsm.list_keys()
            count("list")
        else:
            key = hsm.generate_key(EC("P-256"), f"soak-tmp-{tag}-{uuid.uuid4().hex[:8]}")
            key.sign(b"x", "ecdsa-sha256")
            key.delete()
            count("generate_delete")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                one(rng)
            except Exception as exc:  # every failure is the soak's finding
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}"[:300])

    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(5.0):
            stats = getattr(hsm, "stats", {})
            samples.append(
                {
                    "t": round(time.monotonic() - start, 1),
                    "rss_mb": round(rss_mb(), 1),
                    "sessions_open": stats.get("sessions_open", -1),
                }
            )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    rsa_key.delete()
    ec_key.delete()
    return {
        "role": role,
        "pid": os.getpid(),
        "counts": counts,
        "failures": len(failures),
        "first_failures": failures[:5],
        "samples": samples,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--save", action="store_true", help=f"write {RESULTS}")
    ap.add_argument(
        "--no-churn", action="store_true", help="no generate/delete (to tell token growth apart)"
    )
    args = ap.parse_args()
    [token] = make_tokens(Path(tempfile.mkdtemp(prefix="hsmbridge-soak-")), ["soak"])
    os.environ.update(token.env())
    hsm = hsmbridge.open(token.uri, pin=token.pin, max_sessions=args.threads)
    seconds = args.minutes * 60
    pipes = []
    for i in range(args.workers):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # a preloaded worker: the parent's handle, re-initialised after fork
            os.close(read_fd)
            report = run_process(hsm, seconds, args.threads, f"worker{i}", not args.no_churn)
            os.write(write_fd, json.dumps(report).encode())
            os._exit(0)
        os.close(write_fd)
        pipes.append((pid, read_fd))
    reports = [run_process(hsm, seconds, args.threads, "parent", not args.no_churn)]
    for pid, read_fd in pipes:
        with os.fdopen(read_fd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        reports.append(json.loads(data) if data else {"role": f"pid {pid}", "exit": status})
    hsm.close()
    summary = {
        "minutes": args.minutes,
        "threads_per_process": args.threads,
        "processes": 1 + args.workers,
        "operations": sum(sum(r.get("counts", {}).values()) for r in reports),
        "failures": sum(r.get("failures", 1) for r in reports),
        "processes_report": reports,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.save:
        RESULTS.write_text(text + "\n")
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
