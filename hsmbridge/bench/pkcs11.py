"""PKCS#11 baselines: the token's C ceiling, a plain python-pkcs11 loop, the Python engine.

These reach below hsmbridge's key API on purpose (module path, pooled
sessions, object handles): a baseline is what hsmbridge is measured against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from pkcs11 import ObjectClass

from ..mechanisms import Mechanism, signing_input, signing_preparer
from ..pkcs11 import Pkcs11HSM, Pkcs11Key
from ..pkcs11 import ec as p11_ec
from ..pkcs11 import rsa as p11_rsa
from ..pkcs11.ceiling import run_ceiling
from .contenders import Contender, Target, batch
from .timing import Sample, parallel


def contenders(target: Target, python_hsm: Pkcs11HSM | None) -> list[Contender]:
    """c-ceiling, python-pkcs11 and hsmbridge-batch-python, where they apply."""
    key = target.key
    if key is None:  # keygen: no loop below hsmbridge to compare with
        return []
    assert isinstance(key, Pkcs11Key)
    out = []
    if key.hsm.native is not None:
        out.append(Contender("c-ceiling", lambda t, n: _ceiling(target, key, t, n)))
    out.append(Contender("python-pkcs11", lambda t, n: _python_pkcs11(target, key, t, n)))
    if key.hsm.native is not None and python_hsm is not None:
        slow = python_hsm.get_key(key_id=key.id)
        out.append(Contender("hsmbridge-batch-python", lambda t, n: batch(slow, target, t, n)))
    return out


def _ceiling(target: Target, key: Pkcs11Key, threads: int, count: int) -> Sample:
    op = target.workload.kind
    assert op in ("sign", "decrypt")
    mech, item = target.mechanism, target.inputs[0]
    if op == "sign":
        item = signing_input(mech, item, prehashed=False)
    run = run_ceiling(key, op, mech, item, count=count, threads=threads, warmup=1)
    return Sample(run.count, run.seconds, run.cpu_seconds)


def _python_pkcs11(target: Target, key: Pkcs11Key, threads: int, count: int) -> Sample:
    """What a user writes: find the key by its id, call sign/decrypt in a loop."""
    op = _user_operation(target.workload.kind, target.mechanism)
    items = target.items(count)
    key_id = bytes.fromhex(key.id)

    @contextlib.contextmanager
    def worker(_i: int) -> Iterator[Callable[[int], object]]:
        with key.hsm.pool.session() as pooled:
            obj = pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
            yield lambda j: op(obj, items[j])

    return parallel(threads, count, worker)  # a failure comes back as an HSMError


def _user_operation(kind: str, mech: Mechanism) -> Callable[[Any, bytes], object]:
    """python-pkcs11 calls for ``mech``: hash in Python, then the raw mechanism.

    hsmbridge's keys allow only the raw mechanisms their usage needs
    (CKA_ALLOWED_MECHANISMS), so a combined hash-and-sign such as
    CKM_SHA256_RSA_PKCS is refused on them, as it would be for any user.
    """
    on_curve = mech.key_type != "rsa"
    ckm, param = p11_ec.mechanism(mech) if on_curve else p11_rsa.mechanism(mech)
    if kind == "decrypt":
        return lambda obj, c: obj.decrypt(c, mechanism=ckm, mechanism_param=param)
    prepare = signing_preparer(mech, prehashed=False)
    return lambda obj, m: obj.sign(prepare(m), mechanism=ckm, mechanism_param=param)


def describe(hsm: Pkcs11HSM) -> dict[str, Any]:
    """Module and token as the module reports them (for the JSON result)."""
    lib, token = hsm.module.lib, hsm.token

    def text(value: Any) -> str:
        if isinstance(value, tuple):  # (major, minor)
            return ".".join(str(v) for v in value)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        return str(value).strip()

    return {
        "backend": "pkcs11",
        "description": hsm.description,
        "module": {
            "path": hsm.module.path,
            "manufacturer": text(getattr(lib, "manufacturer_id", "")),
            "description": text(getattr(lib, "library_description", "")),
            "version": text(getattr(lib, "library_version", "")),
            "cryptoki_version": text(getattr(lib, "cryptoki_version", "")),
            "thread_safe": hsm.module.thread_safe,
            "native_engine": hsm.native is not None,
        },
        "token": {
            "label": text(token.label),
            "manufacturer": text(token.manufacturer_id),
            "model": text(token.model),
            "serial": text(token.serial),
        },
        "mechanisms": [m.value for m in hsm.supported_mechanisms()],
    }
