"""The token's ceiling for one key: the native C loop, no Python per operation.

:func:`run_ceiling` hands ``hsmbridge._native.ceiling`` the same module
instance, pooled sessions, key object and mechanism the native engine uses, so the only difference
between the ceiling and a batch is what the batch does around the two
PKCS#11 calls per item. It ships inside the package: no source checkout or
compiler needed at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api import RSA, Op
from ..errors import ConfigurationError
from ..mechanisms import Mechanism
from . import rsa
from .errormap import exception_for_rv
from .key import Pkcs11Key


@dataclass(frozen=True)
class CeilingRun:
    """``count`` operations on ``threads`` sessions took ``seconds`` (``cpu_seconds`` of CPU)."""

    count: int
    threads: int
    seconds: float
    cpu_seconds: float


def run_ceiling(
    key: Pkcs11Key,
    op: Op,
    mech: Mechanism,
    item: bytes,
    *,
    count: int,
    threads: int,
    warmup: int = 1,
) -> CeilingRun:
    """Run ``count`` operations on ``item`` (prepared input: digest/DigestInfo or ciphertext)."""
    hsm = key.hsm
    native = hsm.native
    if native is None:
        raise ConfigurationError(
            "the ceiling needs the native extension hsmbridge._native and a module that "
            "allows OS locking; reinstall hsmbridge with a C compiler available"
        )
    hsm.capabilities.require(mech)
    ckm, _ = key._mechanism(mech)
    param = rsa.native_param(mech) if isinstance(key.spec, RSA) else None
    sessions = hsm.pool.acquire_many(threads)
    try:
        seconds, cpu, rv = native.ceiling(
            hsm.module.path,
            0 if op == "sign" else 1,
            [s.handle for s in sessions],
            key.handle,
            int(ckm),
            param,
            item,
            key._output_length(),
            count,
            warmup,
        )
    finally:
        for s in sessions:
            hsm.pool.release(s)
    if rv:
        raise key._op_error(exception_for_rv(rv), op, mech)
    return CeilingRun(count, len(sessions), seconds, cpu)
