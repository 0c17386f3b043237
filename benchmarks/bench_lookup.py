"""Key lookups as a token fills up: hsmbridge against python-pkcs11 doing the same job.

A fresh SoftHSM2 token is filled with EC P-256 key pairs (generated in the
token through python-pkcs11, in chunks; filling is set-up, not measured) to
100, 1,000 and 10,000 pairs. At each size, side by side in every round:

- ``list_keys``: hsmbridge's ``list_keys()`` against python-pkcs11's
  two-search listing (private keys, public keys, matched by CKA_ID in memory)
  building the same label, id, type, size and usage: once reading each
  attribute with ``obj[attr]`` as python-pkcs11's documentation does, once
  with the bulk ``get_attributes``;
- ``get_key``: hsmbridge's ``get_key(label=...)`` repeated on a sample of
  labels (the first call per label searched beforehand), and the first call
  with an empty cache, against python-pkcs11's label search
  ``session.get_key(object_class=PRIVATE_KEY, label=...)``.

Before measuring, each size checks that the contenders give the same answers.
CPU time per call (SoftHSM2 runs in this process, so it is counted too) and
wall time, medians over rounds; ratios are hsmbridge / python-pkcs11 per round,
median over rounds. Run::

    .venv/bin/python -m benchmarks.bench_lookup          # 100, 1,000, 10,000 pairs (~5 min)
    .venv/bin/python -m benchmarks.bench_lookup --quick  # 100 pairs, one round, no file

The results go to ``benchmarks/results/lookup.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
COUNTS = (100, 1_000, 10_000)
LABEL_PREFIX = "bench-lookup-"
SAMPLE = 10  # labels get_key is asked for, spread over the token


def fill_pairs(session: Any, labels: Sequence[str]) -> None:
    """Generate one EC P-256 key pair per label in the token, with hsmbridge's
    templates (sensitive, never extractable) and a 4-byte id from the label's index."""
    from hsmbridge.api import EC
    from hsmbridge.pkcs11 import ec
    from hsmbridge.pkcs11.backend import allowed_mechanisms
    from hsmbridge.pkcs11.templates import key_pair_templates

    spec = EC("P-256")
    usage = frozenset({"sign"})
    allowed = allowed_mechanisms(spec, usage)
    for label in labels:
        key_id = os.urandom(8)
        public_t, private_t = key_pair_templates(key_id, label, usage, allowed)
        ec.generate(session, spec, public_t, private_t)


def label_of(index: int) -> str:
    return f"{LABEL_PREFIX}{index:05d}"


# -- the python-pkcs11 contenders -------------------------------------------------------------


def pkcs11_listing(session: Any, *, bulk: bool) -> list[tuple[str, str, str, int, list[str]]]:
    """python-pkcs11's two-search listing: (label, id, type, size, usage) per private key."""
    import pkcs11.exceptions as p11x
    from pkcs11 import Attribute, KeyType, ObjectClass

    from hsmbridge.pkcs11.lookup import PRIVATE_FIELDS

    def attrs(obj: Any, wanted: Sequence[Attribute]) -> dict[Attribute, Any]:
        if bulk:
            return dict(obj.get_attributes(list(wanted)))
        out = {}
        for a in wanted:
            try:
                out[a] = obj[a]
            except p11x.AttributeTypeInvalid:  # absent on this key type
                continue
        return out

    # what hsmbridge reads, less the private key's curve: this listing takes it from the public half
    private_fields = [f for f in PRIVATE_FIELDS if f != Attribute.EC_PARAMS]
    query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.TOKEN: True}
    privs = [attrs(o, private_fields) for o in session.get_objects(query)]
    publics: dict[tuple[bytes, Any], bytes] = {}
    for o in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
        a = attrs(o, (Attribute.ID, Attribute.KEY_TYPE, Attribute.EC_PARAMS))
        publics.setdefault(
            (bytes(a[Attribute.ID]), a[Attribute.KEY_TYPE]), a.get(Attribute.EC_PARAMS, b"")
        )
    rows = []
    for p in privs:
        key_type = p[Attribute.KEY_TYPE]
        if key_type == KeyType.RSA:
            kind, size = "rsa", len(p[Attribute.MODULUS]) * 8
        elif key_type == KeyType.EC:
            params = publics.get((bytes(p[Attribute.ID]), key_type), b"")
            kind, size = "ec", _ec_sizes().get(params, 0)
        else:
            continue
        usage = ["sign"] if p[Attribute.SIGN] else []
        if kind == "rsa" and p[Attribute.DECRYPT]:
            usage = ["decrypt", *usage]
        rows.append((p[Attribute.LABEL], bytes(p[Attribute.ID]).hex(), kind, size, usage))
    return sorted(rows)


@functools.cache
def _ec_sizes() -> dict[bytes, int]:
    from pkcs11.util.ec import encode_named_curve_parameters

    return {encode_named_curve_parameters(n): b for n, b in
            (("secp256r1", 256), ("secp384r1", 384), ("secp521r1", 521))}  # fmt: skip


def pkcs11_label_search(session: Any, label: str) -> Any:
    from pkcs11 import ObjectClass

    return session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)


# -- timing ---------------------------------------------------------------------------------


def timed(call: Callable[[], Any], *, min_calls: int, min_cpu: float) -> tuple[float, float]:
    """(CPU s, wall s) per call, over at least ``min_calls`` calls and ``min_cpu`` CPU seconds."""
    calls = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while calls < min_calls or time.process_time() - cpu0 < min_cpu:
        call()
        calls += 1
    return (time.process_time() - cpu0) / calls, (time.perf_counter() - wall0) / calls


def hsmbridge_listing(hsm: Any) -> list[tuple[str, str, str, int, list[str]]]:
    return sorted((i.label, i.id, i.key_type, i.size, sorted(i.usage)) for i in hsm.list_keys())


def check_same_answers(hsm: Any, session: Any, count: int) -> None:
    """The contenders do the same job: equal listings, and get_key finds what python-pkcs11 does."""
    ours = hsmbridge_listing(hsm)
    for bulk in (False, True):
        theirs = pkcs11_listing(session, bulk=bulk)
        if ours != theirs:
            raise AssertionError(
                f"listings differ (bulk={bulk}): {len(ours)} vs {len(theirs)} rows"
            )
    labels = [r[0] for r in ours if r[0].startswith(LABEL_PREFIX)]
    if len(labels) != count or len(set(labels)) != count:
        raise AssertionError(f"expected {count} distinct bench keys, listed {len(labels)}")
    from pkcs11 import Attribute

    for label in sample_labels(count):
        key = hsm.get_key(label)
        theirs_id = bytes(pkcs11_label_search(session, label)[Attribute.ID]).hex()
        if (key.label, key.id) != (label, theirs_id):
            raise AssertionError(f"get_key({label!r}) found {key.id}, python-pkcs11 {theirs_id}")


def sample_labels(count: int) -> list[str]:
    step = max(1, count // SAMPLE)
    return [label_of(i) for i in range(0, count, step)][:SAMPLE]


def measure_size(hsm: Any, session: Any, count: int, rounds: int) -> dict[str, Any]:
    labels = sample_labels(count)
    cycle = {"i": 0}

    def next_label() -> str:
        cycle["i"] += 1
        return labels[cycle["i"] % len(labels)]

    def cold_get() -> None:
        hsm.keys.clear()
        hsm.get_key(next_label())

    def listing(bulk: bool) -> Callable[[], Any]:
        return lambda: pkcs11_listing(session, bulk=bulk)

    # (op, contender): (call, at least this many calls, at least this much CPU time)
    contenders: dict[tuple[str, str], tuple[Callable[[], Any], int, float]] = {
        ("list_keys", "hsmbridge"): (hsm.list_keys, 1, 0.2),
        ("list_keys", "python-pkcs11 obj[attr]"): (listing(False), 1, 0.2),
        ("list_keys", "python-pkcs11 get_attributes"): (listing(True), 1, 0.2),
        ("get_key", "hsmbridge repeated"): (lambda: hsm.get_key(next_label()), 200, 0.3),
        ("get_key", "hsmbridge first call"): (cold_get, 3, 0.3),
        ("get_key", "python-pkcs11 label search"): (
            lambda: pkcs11_label_search(session, next_label()),
            3,
            0.3,
        ),
    }
    for label in labels:
        hsm.get_key(label)  # the repeated contender's first calls
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for key, (call, min_calls, min_cpu) in contenders.items():
            if key == ("get_key", "hsmbridge repeated"):
                for label in labels:  # the cold contender emptied the cache
                    hsm.get_key(label)
            runs[key].append(timed(call, min_calls=min_calls, min_cpu=min_cpu))
    rows = [
        {
            "keys": count,
            "op": op,
            "contender": who,
            "cpu_s": statistics.median(c for c, _ in r),
            "wall_s": statistics.median(w for _, w in r),
            "runs_cpu_s": [c for c, _ in r],
        }
        for (op, who), r in runs.items()
    ]
    ratios = []
    for op, ours, base in (
        ("list_keys", "hsmbridge", "python-pkcs11 obj[attr]"),
        ("list_keys", "hsmbridge", "python-pkcs11 get_attributes"),
        ("get_key", "hsmbridge repeated", "python-pkcs11 label search"),
        ("get_key", "hsmbridge first call", "python-pkcs11 label search"),
    ):
        per_round = [a[0] / b[0] for a, b in zip(runs[(op, ours)], runs[(op, base)], strict=True)]
        ratios.append(
            {
                "keys": count,
                "op": op,
                "ours": ours,
                "over": base,
                "cpu_ratio": statistics.median(per_round),
                "runs": per_round,
            }
        )
    return {"rows": rows, "ratios": ratios}


def table(results: list[dict[str, Any]]) -> str:
    """The README table: per size, times per call and the ratios."""
    lines = [
        "| pairs | list_keys hsmbridge | python-pkcs11 obj[attr] | python-pkcs11 get_attributes "
        "| ratio (vs faster) | get_key repeated | get_key first call | python-pkcs11 label search "
        "| repeated ratio | first-call ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in results:
        cpu = {(r["op"], r["contender"]): r["cpu_s"] for r in size["rows"]}
        ratio = {(r["op"], r["ours"], r["over"]): r["cpu_ratio"] for r in size["ratios"]}
        n = size["rows"][0]["keys"]
        listing_ratio = max(
            ratio[("list_keys", "hsmbridge", "python-pkcs11 obj[attr]")],
            ratio[("list_keys", "hsmbridge", "python-pkcs11 get_attributes")],
        )
        lines.append(
            f"| {n:,} | {_ms(cpu[('list_keys', 'hsmbridge')])} "
            f"| {_ms(cpu[('list_keys', 'python-pkcs11 obj[attr]')])} "
            f"| {_ms(cpu[('list_keys', 'python-pkcs11 get_attributes')])} "
            f"| **{listing_ratio:.2f}** "
            f"| {_ms(cpu[('get_key', 'hsmbridge repeated')])} "
            f"| {_ms(cpu[('get_key', 'hsmbridge first call')])} "
            f"| {_ms(cpu[('get_key', 'python-pkcs11 label search')])} "
            f"| **{ratio[('get_key', 'hsmbridge repeated', 'python-pkcs11 label search')]:.2g}** "
            f"| {ratio[('get_key', 'hsmbridge first call', 'python-pkcs11 label search')]:.2f} |"
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.3f} ms" if seconds < 0.01 else f"{seconds * 1000:,.0f} ms"


def run(counts: Sequence[int], rounds: int, out: Path | None) -> dict[str, Any]:
    from hsmbridge.softhsm import make_tokens

    directory = Path(tempfile.mkdtemp(prefix="hsmbridge-bench-lookup-"))
    try:
        token = make_tokens(directory, ["bench-lookup"])[0]
        os.environ["SOFTHSM2_CONF"] = str(token.conf)  # before the module is loaded
        import hsmbridge
        from hsmbridge.bench import machine
        from hsmbridge.pkcs11 import Pkcs11HSM

        hsm = hsmbridge.open(token.uri, pin=token.pin)
        assert isinstance(hsm, Pkcs11HSM)
        session = hsm.token.open()  # plain python-pkcs11 session; the process is logged in
        results = []
        filled = 0
        try:
            for count in sorted(counts):
                started = time.perf_counter()
                with hsm.pool.admin() as admin:
                    for start in range(filled, count, 500):
                        fill_pairs(
                            admin, [label_of(i) for i in range(start, min(count, start + 500))]
                        )
                        print(f"  filled {min(count, start + 500):,} pairs", file=sys.stderr)
                filled = count
                print(
                    f"{count:,} pairs ({time.perf_counter() - started:.0f} s to fill)",
                    file=sys.stderr,
                )
                check_same_answers(hsm, session, count)
                results.append(measure_size(hsm, session, count, rounds))
        finally:
            session.close()
            hsm.close()
        summary = {
            "machine": machine(),
            "rounds": rounds,
            "sizes": results,
            "table": table(results),
        }
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "lookup.json")
    parser.add_argument("--quick", action="store_true", help="100 pairs, one round, no file")
    args = parser.parse_args(argv)
    if args.quick:
        args.counts, args.rounds, args.out = [100], 1, None
    summary = run(args.counts, args.rounds, args.out)
    print(summary["table"])
    if args.out is not None:
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
