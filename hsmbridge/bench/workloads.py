"""What ``hsmbridge bench`` measures: one table row per workload.

A workload is a key type and what is done with it: ``sign`` or ``decrypt``
with one mechanism, or ``keygen`` (the key generation rate). Adding one is
adding a row to :data:`WORKLOADS`; which ones a given HSM can run is decided
at run time (``supported_mechanisms()`` on PKCS#11, a first operation on
NetHSM), and the rest are reported as skipped with the reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import hsmbridge

from ..api import EC, RSA, KeySpec
from ..errors import ConfigurationError
from ..mechanisms import Mechanism

Kind = Literal["sign", "decrypt", "keygen"]


@dataclass(frozen=True)
class Workload:
    name: str
    kind: Kind
    spec: KeySpec
    mechanism: Mechanism | None  # None for keygen

    @property
    def key(self) -> str:
        """The key type as ``hsmbridge keygen --type`` spells it (``rsa:2048``, ``ec:p256``)."""
        return _key_name(self.spec)


def _key_name(spec: KeySpec) -> str:
    if isinstance(spec, RSA):
        return f"rsa:{spec.bits}"  # as a name: rsa-2048-keygen
    if isinstance(spec, EC):
        return "ec:" + spec.curve.lower().replace("-", "")
    return str(spec).lower()


def _rows() -> list[Workload]:
    rows: list[Workload] = []
    for bits in (2048, 3072, 4096):
        key = RSA(bits)
        rows += [
            Workload(f"rsa{bits}-pkcs1-sha256-sign", "sign", key, Mechanism.RSA_PKCS1_SHA256),
            Workload(f"rsa{bits}-pss-sha256-sign", "sign", key, Mechanism.RSA_PSS_SHA256),
        ]
        rows += [
            Workload(f"rsa{bits}-oaep-{h}-decrypt", "decrypt", key, Mechanism(f"rsa-oaep-{h}"))
            for h in ("sha1", "sha256", "sha384", "sha512")
        ]
        rows.append(Workload(f"rsa{bits}-pkcs1-decrypt", "decrypt", key, Mechanism.RSA_PKCS1))
    for curve, h in (("P-256", "sha256"), ("P-384", "sha384"), ("P-521", "sha512")):
        name = curve.lower().replace("-", "")
        rows.append(Workload(f"ecdsa-{name}-{h}-sign", "sign", EC(curve), Mechanism(f"ecdsa-{h}")))
    ed25519 = getattr(hsmbridge, "Ed25519", None)  # where this build has it
    eddsa = next((m for m in Mechanism if m.value in ("ed25519", "eddsa")), None)
    if ed25519 is not None and eddsa is not None:
        rows.append(Workload("ed25519-sign", "sign", ed25519(), eddsa))
    specs: list[KeySpec] = [RSA(2048), RSA(3072), RSA(4096), EC("P-256"), EC("P-384"), EC("P-521")]
    if ed25519 is not None:
        specs.append(ed25519())
    rows += [Workload(f"{_key_name(s).replace(':', '-')}-keygen", "keygen", s, None) for s in specs]
    return rows


WORKLOADS: tuple[Workload, ...] = tuple(_rows())


def select(only: str) -> list[Workload]:
    """The workloads ``--only`` names: comma-separated names or globs (all when empty)."""
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    if not patterns:
        return list(WORKLOADS)
    chosen = [w for w in WORKLOADS if any(fnmatch.fnmatchcase(w.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(w.name, p) for w in WORKLOADS)]
    if unmatched:
        raise ConfigurationError(
            f"--only {', '.join(unmatched)} matches no workload; workloads are: "
            + ", ".join(w.name for w in WORKLOADS)
        )
    return chosen
