"""JWE decryption against the bare RSA step it is built on, side by side in one run.

    .venv/bin/python -m benchmarks.bench_jose [--count 1000] [--rounds 3]

A compact JWE (RSA-OAEP + A256GCM, made by jwcrypto as a browser library
would) costs one RSA-OAEP unwrap in the HSM plus AES-GCM and parsing on the
host. The claim is that the host part is small: ``decrypt_jwe`` against
``key.decrypt`` of the same wrapped CEKs (one at a time), and
``decrypt_jwe_batch`` against ``key.decrypt_batch`` (one HSM batch), as ratios
of CPU time per operation (steadier than wall time on a shared machine; the
token's work is in-process with SoftHSM2, so it is counted too). Rounds
alternate the contenders. Results: benchmarks/results/jose.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk

import hsmbridge
from hsmbridge import RSA, jose
from hsmbridge.testing import make_tokens

RESULTS = Path(__file__).parent / "results" / "jose.json"


def cpu_per_op(fn: Callable[[], object], n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    [token] = make_tokens(Path(tempfile.mkdtemp(prefix="hsmbridge-jose-")), ["jose"])
    os.environ.update(token.env())
    hsm = hsmbridge.open(token.uri, pin=token.pin)
    key = hsm.generate_key(RSA(2048), "jose-bench", usage={"decrypt"})
    public = jw_jwk.JWK(**key.public_key_jwk())
    tokens = []
    for i in range(args.count):
        jwe = jw_jwe.JWE(f"card {i}".encode(), protected='{"alg":"RSA-OAEP","enc":"A256GCM"}')
        jwe.add_recipient(public)
        tokens.append(str(jwe.serialize(compact=True)))
    wrapped = [jose._unb64url(t.split(".")[1], "key") for t in tokens]
    n = args.count
    contenders: dict[str, Callable[[], object]] = {
        "jwe-single": lambda: [jose.decrypt_jwe(key, t) for t in tokens],
        "rsa-single": lambda: [key.decrypt(w, "rsa-oaep-sha1") for w in wrapped],
        "jwe-batch": lambda: jose.decrypt_jwe_batch(key, tokens),
        "rsa-batch": lambda: key.decrypt_batch(wrapped, "rsa-oaep-sha1"),
    }
    assert jose.decrypt_jwe_batch(key, tokens[:3]) == [b"card 0", b"card 1", b"card 2"]
    per: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            per[name].append(cpu_per_op(fn, n))
    key.delete()
    hsm.close()
    median = {name: statistics.median(v) for name, v in per.items()}
    summary = {
        "count": n,
        "rounds": args.rounds,
        "cpu_us_per_op": per,
        "median_cpu_us_per_op": median,
        # throughput ratios (higher is better): RSA-only CPU per op / JWE CPU per op
        "single_jwe_over_rsa": round(median["rsa-single"] / median["jwe-single"], 3),
        "batch_jwe_over_rsa": round(median["rsa-batch"] / median["jwe-batch"], 3),
    }
    print(json.dumps(summary, indent=1))
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
