"""The hot-path comparison, shared by ``hsmbridge bench`` and benchmarks/.

For each workload (RSA-2048 PKCS#1 v1.5 and PSS signing, OAEP-SHA1
decryption, ECDSA P-256 signing) it measures, side by side in one run:

- ``c-ceiling``: the C loop over C_SignInit/C_Sign on N sessions in N threads
  (benchmarks/ceiling, built on demand; only from a source checkout),
- ``python-pkcs11``: what a user writes today, a plain loop on one session,
- ``hsmbridge-single``: hsmbridge's one-operation-at-a-time loop,
- ``hsmbridge-batch``: ``sign_batch``/``decrypt_batch`` (native engine when built),
- ``hsmbridge-batch-python``: the same on the pure-Python engine,
- ``openssl-1`` / ``openssl-N``: OpenSSL through ``cryptography`` with an
  in-memory key, the physical reference.

Ratios are computed within one run; absolute numbers on a shared machine are
noise, ratios measured together are the claim.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from .api import EC, RSA, KeySpec
from .errors import ConfigurationError
from .pkcs11 import Pkcs11HSM, Pkcs11Key
from .progress import Progress

CEILING_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "ceiling"


@dataclass(frozen=True)
class Workload:
    name: str
    spec: KeySpec
    mechanism: str

    @property
    def op(self) -> str:
        return "decrypt" if "oaep" in self.mechanism else "sign"


WORKLOADS = (
    Workload("rsa2048-pkcs1-sha256-sign", RSA(2048), "rsa-pkcs1-sha256"),
    Workload("rsa2048-oaep-sha1-decrypt", RSA(2048), "rsa-oaep-sha1"),
    Workload("rsa2048-pss-sha256-sign", RSA(2048), "rsa-pss-sha256"),
    Workload("ecdsa-p256-sha256-sign", EC("P-256"), "ecdsa-sha256"),
)

CONTENDERS = (
    "c-ceiling",
    "python-pkcs11",
    "hsmbridge-single",
    "hsmbridge-batch",
    "hsmbridge-batch-python",
    "openssl-1",
    "openssl-N",
)


@dataclass
class Measurement:
    workload: str
    contender: str
    threads: int
    ops: int
    seconds: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Prepared:
    """A key in the token plus in-memory twins and inputs for one workload."""

    workload: Workload
    key: Pkcs11Key
    python_key: Pkcs11Key  # same key through a handle forced onto the Python engine
    inputs: list[bytes]
    soft_key: Any  # cryptography private key of the same type, for the OpenSSL reference
    soft_inputs: list[bytes]
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(
    hsm: Pkcs11HSM, python_hsm: Pkcs11HSM, workload: Workload, count: int, label: str
) -> Prepared:
    usage = {"decrypt"} if workload.op == "decrypt" else {"sign"}
    key = hsm.generate_key(workload.spec, label=label, usage=usage)
    python_key = python_hsm.get_key(key_id=key.id)
    soft_key: Any
    if isinstance(workload.spec, RSA):
        soft_key = rsa.generate_private_key(65537, workload.spec.bits)
    else:
        soft_key = ec.generate_private_key(ec.SECP256R1())
    if workload.op == "decrypt":
        oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
        pub = key.public_key()
        assert isinstance(pub, rsa.RSAPublicKey)
        plain = [os.urandom(32) for _ in range(min(count, 256))]
        inputs = [pub.encrypt(plain[i % len(plain)], oaep) for i in range(count)]
        soft_pub = soft_key.public_key()
        soft_inputs = [soft_pub.encrypt(plain[i % len(plain)], oaep) for i in range(count)]
    else:
        inputs = [os.urandom(32) for _ in range(count)]
        soft_inputs = inputs
    return Prepared(workload, key, python_key, inputs, soft_key, soft_inputs)


def _threads_over(n_threads: int, items: list[bytes], fn: Callable[[bytes], Any]) -> None:
    chunks = [items[i::n_threads] for i in range(n_threads)]
    workers = [
        threading.Thread(target=lambda c=c: [fn(x) for x in c])
        for c in chunks  # type: ignore[misc]
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _openssl_op(prep: Prepared) -> Callable[[bytes], Any]:
    mech = prep.workload.mechanism
    key = prep.soft_key
    if mech == "rsa-pkcs1-sha256":
        return lambda m: key.sign(m, padding.PKCS1v15(), hashes.SHA256())
    if mech == "rsa-pss-sha256":
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
        return lambda m: key.sign(m, pss, hashes.SHA256())
    if mech == "ecdsa-sha256":
        return lambda m: key.sign(m, ec.ECDSA(hashes.SHA256()))
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    return lambda c: key.decrypt(c, oaep)


def _python_pkcs11_op(prep: Prepared, session: Any) -> Callable[[bytes], Any]:
    """What a user writes with python-pkcs11: the combined mechanism where it exists."""
    from pkcs11 import MGF, Attribute, ObjectClass
    from pkcs11 import Mechanism as CKM

    obj = next(
        o
        for o in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        if int(o.handle) == prep.key.handle
    )
    mech = prep.workload.mechanism
    if mech == "rsa-pkcs1-sha256":
        return lambda m: obj.sign(m, mechanism=CKM.SHA256_RSA_PKCS)
    if mech == "rsa-pss-sha256":
        param = (CKM.SHA256, MGF.SHA256, 32)
        return lambda m: obj.sign(m, mechanism=CKM.SHA256_RSA_PKCS_PSS, mechanism_param=param)
    if mech == "ecdsa-sha256":  # SoftHSM2 has no CKM_ECDSA_SHA256: hash, then CKM_ECDSA
        return lambda m: obj.sign(hashlib.sha256(m).digest(), mechanism=CKM.ECDSA)
    oaep = (CKM.SHA_1, MGF.SHA1, None)
    return lambda c: obj.decrypt(c, mechanism=CKM.RSA_PKCS_OAEP, mechanism_param=oaep)


def _ceiling_module() -> Any | None:
    """benchmarks/ceiling/build.py (source checkouts only), or None."""
    build_py = CEILING_DIR / "build.py"
    if not build_py.exists():
        return None
    spec = importlib.util.spec_from_file_location("hsmbridge_ceiling_build", build_py)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ceiling_binary() -> Path | None:
    """Build the C ceiling (source checkouts only); None when unavailable."""
    module = _ceiling_module()
    return None if module is None else Path(module.build_ceiling())


def run_ceiling(prep: Prepared, hsm: Pkcs11HSM, pin: str, threads: int, count: int) -> Measurement:
    module = _ceiling_module()
    if module is None:
        raise ConfigurationError("the C ceiling needs a source checkout (benchmarks/ceiling)")
    try:
        result = module.run_ceiling(
            module=hsm.module.path,
            token=hsm.token.label,
            pin=pin,
            key=prep.key.label,
            mech=prep.workload.mechanism,
            op=prep.workload.op,
            threads=threads,
            count=count,
            timeout=600,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(f"the C ceiling failed: {exc}") from None
    return Measurement(
        prep.workload.name, "c-ceiling", threads, int(result["ops"]), result["seconds"]
    )


def measure(prep: Prepared, contender: str, threads: int, hsm: Pkcs11HSM, pin: str) -> Measurement:
    """Run one contender over the prepared inputs and time it."""
    w = prep.workload
    n = len(prep.inputs)
    if contender == "c-ceiling":
        return run_ceiling(prep, hsm, pin, threads, n)
    used_threads = threads
    if contender == "python-pkcs11":
        used_threads = 1
        with hsm.pool.session() as pooled:
            op = _python_pkcs11_op(prep, pooled.session)
            start = time.perf_counter()
            for item in prep.inputs:
                op(item)
            seconds = time.perf_counter() - start
    elif contender == "hsmbridge-single":
        used_threads = 1
        call = prep.key.decrypt if w.op == "decrypt" else prep.key.sign
        start = time.perf_counter()
        for item in prep.inputs:
            call(item, w.mechanism)
        seconds = time.perf_counter() - start
    elif contender in ("hsmbridge-batch", "hsmbridge-batch-python"):
        key = prep.key if contender == "hsmbridge-batch" else prep.python_key
        batch = key.decrypt_batch if w.op == "decrypt" else key.sign_batch
        start = time.perf_counter()
        batch(prep.inputs, w.mechanism, threads=threads)
        seconds = time.perf_counter() - start
    elif contender in ("openssl-1", "openssl-N"):
        used_threads = 1 if contender == "openssl-1" else threads
        op = _openssl_op(prep)
        start = time.perf_counter()
        _threads_over(used_threads, prep.soft_inputs, op)
        seconds = time.perf_counter() - start
    else:
        raise ConfigurationError(f"unknown contender {contender!r}; use one of {CONTENDERS}")
    return Measurement(w.name, contender, used_threads, n, seconds)


def ratios(results: list[Measurement]) -> dict[str, dict[str, float]]:
    """hsmbridge-batch over the C ceiling and over the python-pkcs11 loop, per workload."""
    table: dict[str, dict[str, float]] = {}
    by = {(m.workload, m.contender): m.ops_per_s for m in results}
    for w in {m.workload for m in results}:
        batch = by.get((w, "hsmbridge-batch"))
        if not batch:
            continue
        entry = table.setdefault(w, {})
        for base in ("c-ceiling", "python-pkcs11"):
            if by.get((w, base)):
                entry[f"batch/{base}"] = batch / by[(w, base)]
    return table


def machine() -> dict[str, Any]:
    import pkcs11

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "processor": platform.processor() or platform.machine(),
        "python_pkcs11": getattr(pkcs11, "__version__", "0.10.x"),
    }


def format_table(results: list[Measurement]) -> str:
    lines = [f"{'workload':<28}{'contender':<26}{'threads':>8}{'ops/s':>12}"]
    for m in results:
        lines.append(f"{m.workload:<28}{m.contender:<26}{m.threads:>8}{m.ops_per_s:>12,.0f}")
    lines.append("")
    lines.append(f"{'workload':<28}{'batch / C ceiling':>20}{'batch / python-pkcs11':>24}")
    for w, r in sorted(ratios(results).items()):
        c = r.get("batch/c-ceiling")
        p = r.get("batch/python-pkcs11")
        lines.append(f"{w:<28}{(f'{c:.2f}x' if c else '-'):>20}{(f'{p:.2f}x' if p else '-'):>24}")
    return "\n".join(lines)


def run_bench(args: Any) -> int:
    """``hsmbridge bench``: every workload x contender, a table or JSON."""
    import hsmbridge
    from hsmbridge.uri import parse_pkcs11_uri

    if args.hsm:
        uri = args.hsm
    else:
        from .softhsm import embedded_demo_token

        token = embedded_demo_token()
        uri = token.uri + f"&pin-value={token.pin}"
    parsed = parse_pkcs11_uri(uri)
    if parsed.pin is None:
        raise ConfigurationError("hsmbridge bench needs the token PIN (URI or HSMBRIDGE_PIN)")
    hsm = hsmbridge.open(uri)
    python_hsm = hsmbridge.open(uri, native=False)
    if not isinstance(hsm, Pkcs11HSM) or not isinstance(python_hsm, Pkcs11HSM):
        raise ConfigurationError("hsmbridge bench measures PKCS#11 tokens; give a pkcs11: URI")
    only = {s for s in args.only.split(",") if s}
    workloads = [w for w in WORKLOADS if not only or w.name in only or w.mechanism in only]
    contenders = list(CONTENDERS)
    if ceiling_binary() is None:
        contenders.remove("c-ceiling")
        print("note: no benchmarks/ceiling here; the C ceiling is skipped", file=sys.stderr)
    results: list[Measurement] = []
    progress = Progress(len(workloads) * len(contenders))
    try:
        for w in workloads:
            count = args.count * (5 if isinstance(w.spec, EC) else 1)
            prep = prepare(hsm, python_hsm, w, count, f"bench-{w.name}-{os.getpid()}")
            try:
                for contender in contenders:
                    progress.update(progress.done, f"{w.name} {contender}")
                    results.append(measure(prep, contender, args.threads, hsm, parsed.pin.value))
                    progress.advance(1, f"{w.name} {contender}")
            finally:
                prep.key.delete()
    finally:
        progress.close()
        python_hsm.close()
        hsm.close()
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "results": [asdict(m) | {"ops_per_s": m.ops_per_s} for m in results],
                    "ratios": ratios(results),
                },
                indent=2,
            )
        )
    else:
        print(format_table(results))
    return 0
