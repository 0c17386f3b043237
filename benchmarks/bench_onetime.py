"""One-time keys: issue() latency, the pool's refill rate, and a token full of live keys.

    .venv/bin/python -m benchmarks.bench_onetime [--keys 40] [--rounds 3] [--live 1000]

On a fresh SoftHSM2 token, side by side in one run:

- *refill*: the refiller's key generation (``generate_dated(fresh=True)``:
  no label/id searches, no twin recheck) against plain ``generate_key`` of
  the same RSA-2048 decrypt key, alternating rounds of ``--keys`` each; CPU
  and wall time per key. Also ``generate_key`` without its twin recheck's
  20 ms pause (the difference is the recheck);
- *issue*: ``issue()`` from a warm pool (``fill()`` first), with an RS256
  signer: p50/p99 wall time over every issue of every round, with the
  refiller running (as in service) and held back (issue() alone), and the
  parts: one C_CreateObject (issue() makes one: the ticket is written with
  the pool key) and one RS256 signature;
- *live*: with ``--live`` issued, undecrypted one-time keys in the token
  (imported copies of one RSA key plus their records: what a token full of
  live keys holds, made quickly), ``issue()`` and ``decrypt_jwe`` (in the
  issuing process, and in another handle that must look the key up) against
  the same on the nearly empty token. ``--live 10000`` is the long run (about
  an hour here; not in CI: nothing in tests runs it).

Results: benchmarks/results/onetime.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwe, jwk

import hsmbridge
from hsmbridge import RSA
from hsmbridge.mechanisms import Mechanism
from hsmbridge.onetime import OneTimeKeys
from hsmbridge.pkcs11 import otkstore
from hsmbridge.pkcs11.ringstore import write_data
from hsmbridge.testing import make_tokens

RESULTS = Path(__file__).parent / "results" / "onetime.json"
SPEC = RSA(2048)
MECHANISM = Mechanism("rsa-oaep-sha1")  # what ALG unwraps with
ALG = "RSA-OAEP"  # SoftHSM2 has OAEP with SHA-1 only (docs/design.md, fact 6)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per operation of ``fn`` doing ``n`` operations."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - cpu) / n * 1e3, (time.perf_counter() - wall) / n * 1e3


def encrypt(public_jwk: dict[str, Any]) -> str:
    token = jwe.JWE(
        b"4111111111111111",
        protected={"alg": public_jwk["alg"], "enc": "A256GCM", "kid": public_jwk["kid"]},
    )
    token.add_recipient(jwk.JWK(**public_jwk))
    return str(token.serialize(compact=True))


def refill(hsm: Any, n: int, rounds: int) -> dict[str, Any]:
    from hsmbridge.pkcs11 import backend

    store = hsm.one_time_store()
    made: list[Any] = []

    def plain() -> None:
        made.extend(
            hsm.generate_key(SPEC, f"plain-{uuid.uuid4().hex}", usage="decrypt") for _ in range(n)
        )

    def no_pause() -> None:
        saved, backend.TWIN_RECHECK_SECONDS = backend.TWIN_RECHECK_SECONDS, 0.0
        try:
            plain()
        finally:
            backend.TWIN_RECHECK_SECONDS = saved

    def pool() -> None:
        now = int(time.time())
        made.extend(
            store.generate("bench", uuid.uuid4().hex, SPEC, now, MECHANISM) for _ in range(n)
        )

    contenders = {"generate_key": plain, "generate_key_no_recheck_pause": no_pause, "refill": pool}
    per: dict[str, dict[str, list[float]]] = {k: {"cpu_ms": [], "wall_ms": []} for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            cpu, wall = timed(fn, n)
            per[name]["cpu_ms"].append(cpu)
            per[name]["wall_ms"].append(wall)
            for key in made:
                store.discard(key)  # a pool key's ticket too, so the token stays small
            made.clear()
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in per.items()}
    return {
        "keys_per_round": n,
        "per_key": per,
        "median_per_key": med,
        # rates (higher is better): refill keys/s over generate_key keys/s
        "refill_over_generate_key_wall": round(
            med["generate_key"]["wall_ms"] / med["refill"]["wall_ms"], 3
        ),
        "refill_over_generate_key_cpu": round(
            med["generate_key"]["cpu_ms"] / med["refill"]["cpu_ms"], 3
        ),
        "twin_recheck_ms_per_key": round(
            med["generate_key"]["wall_ms"] - med["generate_key_no_recheck_pause"]["wall_ms"], 2
        ),
    }


def issue_latency(hsm: Any, signer: Any, n: int, rounds: int, *, idle: bool) -> dict[str, Any]:
    """issue() from a full pool; ``idle``: the refiller is held back meanwhile (what
    issue() itself costs, without a key generation competing for the CPU)."""
    times: list[float] = []
    for _ in range(rounds):
        with hsm.one_time_keys(SPEC, pool=n, signer=signer, alg=ALG, name="bench") as otk:
            otk.fill()
            if idle:
                otk._target = 0  # the refillers wait while the pool holds >= 0 keys
            kids = []
            for _ in range(n):
                start = time.perf_counter()
                kids.append(otk.issue().kid)
                times.append((time.perf_counter() - start) * 1e3)
            for kid in kids:  # gone now, not at expiry: the later "nearly empty" token stays so
                otk._store.forget(otk.name, kid)
    return {
        "issues": len(times),
        "p50_ms": round(percentile(times, 50), 3),
        "p99_ms": round(percentile(times, 99), 3),
        "max_ms": round(max(times), 3),
    }


def write_latency(hsm: Any, n: int) -> dict[str, float]:
    """One C_CreateObject of a small data object (issue() makes one) and one RS256
    context signature: the parts of issue()'s time."""
    from hsmbridge import jose

    create, sign = [], []
    key = hsm.key_ring("context").primary
    for i in range(n):
        with hsm.pool.admin() as session:
            start = time.perf_counter()
            obj = write_data(session, f"bench-write-{i}", b"\x01", {})
            create.append((time.perf_counter() - start) * 1e3)
            obj.destroy()
        start = time.perf_counter()
        jose.sign_jwt(key, {"jwk": {}}, alg="RS256")
        sign.append((time.perf_counter() - start) * 1e3)
    return {
        "create_object_p50_ms": round(percentile(create, 50), 3),
        "create_object_p99_ms": round(percentile(create, 99), 3),
        "rs256_context_p50_ms": round(percentile(sign, 50), 3),
    }


def fill_token(hsm: Any, live: int) -> None:
    """``live`` issued, unused one-time keys: imported copies of one RSA key, each with
    the ticket written when it was pooled and the issued record ``issue()`` writes
    (generating them would take hours)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    expires = int(time.time()) + 7 * 24 * 3600
    for i in range(live):
        kid = uuid.uuid4().hex
        hsm.import_key(
            private, otkstore.key_label("filler", kid, int(time.time())), usage="decrypt",
            key_id=kid,
        )  # fmt: skip
        with hsm.pool.admin() as session:
            write_data(
                session, otkstore.TICKET_PREFIX + kid, bytes.fromhex(kid), {"name": "filler"}
            )
            write_data(
                session,
                otkstore.ISSUED_PREFIX + kid,
                bytes.fromhex(kid),
                {"name": "filler", "expires_at": expires},
            )
        if i and i % 500 == 0:
            print(f"  {i} live keys", flush=True)


def token_objects(hsm: Any) -> int:
    """How many objects the token holds (all of them: a SoftHSM2 search scans each)."""
    with hsm.pool.admin() as session:
        return sum(1 for _ in session.get_objects({}))


def use_latency(hsm: Any, other: Any, n: int) -> dict[str, float]:
    """issue(), decrypt_jwe in the issuing handle, and in another handle (p50 ms)."""
    out: dict[str, list[float]] = {"issue": [], "decrypt_same": [], "decrypt_other": []}
    with hsm.one_time_keys(SPEC, pool=2 * n, alg=ALG, name="use") as otk:
        otk.fill()
        elsewhere = OneTimeKeys(other, SPEC, pool=1, alg=ALG, name="use")
        elsewhere.close()  # decrypting needs no pool
        for i in range(2 * n):
            start = time.perf_counter()
            k = otk.issue()
            out["issue"].append((time.perf_counter() - start) * 1e3)
            token = encrypt(k.jwk)
            which = "decrypt_same" if i % 2 == 0 else "decrypt_other"
            start = time.perf_counter()
            (otk if i % 2 == 0 else elsewhere).decrypt_jwe(token)
            out[which].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(v), 3) for name, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=40, help="keys per refill round and pool size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--live", type=int, default=1000, help="live one-time keys in the token")
    ap.add_argument("--uses", type=int, default=10, help="issue/decrypt pairs per measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    [token] = make_tokens(Path(tempfile.mkdtemp(prefix="hsmbridge-otk-")), ["otk"])
    os.environ.update(token.env())
    hsm = hsmbridge.open(token.uri, pin=token.pin)
    other = hsmbridge.open(token.uri, pin=token.pin)  # another handle: its own caches
    ring = hsm.key_ring("context")
    ring.rotate(SPEC, usage="sign")
    summary: dict[str, Any] = {"spec": str(SPEC), "alg": ALG, "rounds": args.rounds}
    print("refill ...", flush=True)
    summary["refill"] = refill(hsm, args.keys, args.rounds)
    print("issue ...", flush=True)
    summary["issue_warm_pool"] = issue_latency(hsm, ring, args.keys, args.rounds, idle=False)
    summary["issue_warm_pool_refill_idle"] = issue_latency(
        hsm, ring, args.keys, args.rounds, idle=True
    )
    summary["issue_parts"] = write_latency(hsm, 4 * args.keys)
    print("use, nearly empty token ...", flush=True)
    objects_before = token_objects(hsm)
    small = use_latency(hsm, other, args.uses)
    print(f"filling the token with {args.live} live one-time keys ...", flush=True)
    started = time.perf_counter()
    fill_token(hsm, args.live)
    print("use, full token ...", flush=True)
    full = use_latency(hsm, other, args.uses)
    summary["live"] = {
        "live_keys": args.live,
        "objects_per_live_key": 4,
        "token_objects_nearly_empty": objects_before,
        "token_objects_full": token_objects(hsm),
        "fill_seconds": round(time.perf_counter() - started, 1),
        "p50_ms_nearly_empty": small,
        "p50_ms_full": full,
        # flat = 1.0; above 1 the operation slows down with the token's size
        "full_over_empty": {k: round(full[k] / small[k], 2) for k in small},
    }
    hsm.close()
    other.close()
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
