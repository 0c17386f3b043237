"""What a result was measured on: the machine, its load, and the versions of everything."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """CPUs, platform, processor and Python; also used by the other suites in benchmarks/."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """hsmbridge (and whether its native engine is built), python-pkcs11, OpenSSL, the SDK."""
    from cryptography.hazmat.backends.openssl.backend import backend

    from ..pkcs11.module import load_native

    return {
        "hsmbridge": _version("hsmbridge"),
        "native_engine": load_native() is not None,
        "python_pkcs11": _version("python-pkcs11"),
        "cryptography": _version("cryptography"),
        "openssl": backend.openssl_version_text(),
        "nethsm_sdk": _version("nethsm"),
    }
