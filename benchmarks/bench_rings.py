"""Key-ring overhead: a ring of 50 versions in a token of many keys, against plain keys.

Side by side in each round, CPU time (``time.process_time``: this process and
the SoftHSM2 library inside it) per operation over batches of single calls:

- ``primary+sign``: ``ring.primary.sign(m)`` vs ``key.sign(m)`` on the same key;
- ``decrypt(kid)``: ``ring.decrypt(ct, kid=v1.kid)`` (the oldest version) vs
  ``key.decrypt(ct)`` on that version's key;
- ``jwks``: ``ring.jwks()`` (50 keys: every version is in grace) vs
  ``{"keys": [k.public_key_jwk() for k in keys]}`` over the same 50 keys.

The ring reads its records from the token at most once a second
(:data:`hsmbridge.rings.REFRESH`); those reads are in the ring's numbers.
Run::

    .venv/bin/python -m benchmarks.bench_rings [--keys 10000] [--batch 1000] [--rounds 3]

It makes its own SoftHSM2 token in a temporary directory, fills it with EC
P-256 keys by C_CreateObject (fast, and as much a key to the token's searches
as a generated one), and writes ``benchmarks/results/rings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
P256_OID_DER = bytes.fromhex("06082a8648ce3d030107")


def fill(hsm: Any, count: int) -> float:
    """Add ``count`` EC private+public key objects; returns the seconds it took."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11 import Attribute, KeyType, ObjectClass

    started = time.perf_counter()
    with hsm.pool.admin() as session:
        for i in range(count):
            private = ec.generate_private_key(ec.SECP256R1())
            scalar = private.private_numbers().private_value.to_bytes(32, "big")
            key_id = os.urandom(16)
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.KEY_TYPE: KeyType.EC,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.SIGN: True,
                    Attribute.EC_PARAMS: P256_OID_DER,
                    Attribute.VALUE: scalar,
                    Attribute.LABEL: f"filler-{i}",
                    Attribute.ID: key_id,
                }
            )
            if i and i % 1000 == 0:
                print(f"  {i} keys ({time.perf_counter() - started:.0f} s)", flush=True)
    return time.perf_counter() - started


def cpu_per_op(fn: Callable[[], object], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - started) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000, help="keys in the token")
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1000, help="operations per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    import hsmbridge
    from hsmbridge import RSA
    from hsmbridge.softhsm import make_tokens

    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-bench-rings-"))
    try:
        [token] = make_tokens(directory, ["bench-rings"])
        os.environ.update(token.env())
        hsm = hsmbridge.open(token.uri, pin=token.pin)
        print(f"filling the token with {args.keys} keys ...", flush=True)
        fill_seconds = fill(hsm, args.keys)
        print(f"making a ring of {args.versions} RSA-2048 versions ...", flush=True)
        ring = hsm.key_ring("bench")
        started = time.perf_counter()
        ring.rotate(RSA(2048), usage={"sign", "decrypt"})
        for _ in range(args.versions - 1):
            ring.rotate(grace=timedelta(hours=24))
        rotate_seconds = (time.perf_counter() - started) / args.versions
        versions = ring.versions()
        assert [v.state for v in versions].count("grace") == args.versions - 1
        plain = [hsm.get_key(key_id=v.key_id) for v in versions]  # plain Key objects
        newest, oldest = plain[-1], plain[0]
        public = oldest.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        ct = public.encrypt(
            b"bench", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        )
        kid = versions[0].kid

        cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "primary+sign": (
                lambda: ring.primary.sign(b"m", "rsa-pss-sha256"),
                lambda: newest.sign(b"m", "rsa-pss-sha256"),
            ),
            "decrypt(kid)": (
                lambda: ring.decrypt(ct, "rsa-oaep-sha1", kid=kid),
                lambda: oldest.decrypt(ct, "rsa-oaep-sha1"),
            ),
            "jwks": (
                ring.jwks,
                lambda: {"keys": [k.public_key_jwk() for k in reversed(plain)]},
            ),
        }
        for ring_op, plain_op in cases.values():  # warm both (sessions, copies, caches)
            ring_op(), plain_op()
        assert ring.jwks() == cases["jwks"][1]()
        ratios: dict[str, list[float]] = {name: [] for name in cases}
        per_op: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, (ring_op, plain_op) in cases.items():
                order = [("ring", ring_op), ("plain", plain_op)]
                if r % 2:
                    order.reverse()
                measured = {who: cpu_per_op(op, args.batch) for who, op in order}
                ratios[name].append(measured["ring"] / measured["plain"])
                per_op[name].append((measured["ring"], measured["plain"]))
                print(
                    f"round {r + 1} {name:13} ring {measured['ring'] * 1e6:9.1f} us  plain "
                    f"{measured['plain'] * 1e6:9.1f} us  ratio {ratios[name][-1]:.3f}",
                    flush=True,
                )
        summary = {
            "keys_in_token": args.keys + args.versions,  # list_keys is slow here (fact 11)
            "ring_versions": args.versions,
            "batch": args.batch,
            "rounds": args.rounds,
            "fill_seconds": round(fill_seconds, 1),
            "rotate_seconds_each": round(rotate_seconds, 3),
            "cpu_count": os.cpu_count(),
            "results": {
                name: {
                    "ring_us": round(statistics.median(r for r, _ in per_op[name]) * 1e6, 1),
                    "plain_us": round(statistics.median(p for _, p in per_op[name]) * 1e6, 1),
                    "ratio_median": round(statistics.median(ratios[name]), 4),
                    "overhead_percent": round((statistics.median(ratios[name]) - 1) * 100, 2),
                }
                for name in cases
            },
        }
        hsm.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rings.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
