"""Build and run the C ceiling benchmark (``benchmarks/ceiling/ceiling.c``).

The ceiling is the throughput of a plain C loop over ``C_SignInit``/``C_Sign``
(or ``C_DecryptInit``/``C_Decrypt``) on N sessions and N threads: what any
binding of the token could reach at best (docs/design.md, "Performance method").

    from benchmarks.ceiling.build import run_ceiling
    run_ceiling(module=..., token="bench", pin="1234", key="rsa",
                mech="rsa-pkcs1-sha256", threads=2, count=3000)
    # {"ops": 3000, "threads": 2, "seconds": ..., "ops_per_s": ..., ...}

As a script, ``python benchmarks/ceiling/build.py [ceiling options]`` builds the
binary and prints its path, or runs it when options are given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCE = HERE / "ceiling.c"
HEADER = REPO / "native" / "pkcs11_min.h"
BUILD_DIR = HERE / "build"

MECHS = (
    "rsa-pkcs1-sha256",
    "rsa-pss-sha256",
    "ecdsa-sha256",
    "rsa-oaep-sha1",
    "rsa-pkcs1",
    "rsa-pss",
)


class CeilingError(RuntimeError):
    """The ceiling program could not be built or did not produce a result."""


def build_ceiling(build_dir: Path | None = None, *, force: bool = False) -> Path:
    """Compile ceiling.c (only when it or the header is newer than the binary).

    Uses ``$CC`` or the system ``cc``; returns the path of the binary.
    """
    out_dir = BUILD_DIR if build_dir is None else Path(build_dir)
    binary = out_dir / "ceiling"
    newest_source = max(SOURCE.stat().st_mtime, HEADER.stat().st_mtime)
    if not force and binary.exists() and binary.stat().st_mtime >= newest_source:
        return binary

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise CeilingError("no C compiler found (install cc/gcc or set CC)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename, so concurrent builds never see a
    # half-written binary.
    fd, tmp_name = tempfile.mkstemp(prefix=".ceiling-", dir=out_dir)
    os.close(fd)
    cmd = [
        cc,
        "-O2",
        "-pthread",
        "-std=c11",
        "-Wall",
        "-I",
        str(HEADER.parent),
        "-o",
        tmp_name,
        str(SOURCE),
        "-ldl",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CeilingError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()}")
        os.chmod(tmp_name, 0o755)
        os.replace(tmp_name, binary)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return binary


def ceiling_args(
    *,
    module: str,
    token: str,
    pin: str,
    key: str,
    mech: str,
    op: str | None = None,
    threads: int = 1,
    count: int = 1000,
    warmup: int = 1,
    session_copy: bool = False,
) -> list[str]:
    """The command-line options of the ceiling program for these settings."""
    if mech not in MECHS:
        raise ValueError(f"unknown mech {mech!r}; expected one of {', '.join(MECHS)}")
    args = [
        "--module", module,
        "--token", token,
        "--pin", pin,
        "--key", key,
        "--mech", mech,
        "--threads", str(threads),
        "--count", str(count),
        "--warmup", str(warmup),
    ]  # fmt: skip
    if op is not None:
        args += ["--op", op]
    if session_copy:
        args.append("--session-copy")
    return args


def run_ceiling(
    *,
    module: str,
    token: str,
    pin: str,
    key: str,
    mech: str,
    op: str | None = None,
    threads: int = 1,
    count: int = 1000,
    warmup: int = 1,
    session_copy: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Build if needed, run the ceiling program once and return its JSON result.

    ``env`` is added to this process's environment (e.g. ``SOFTHSM2_CONF``): the
    program initialises the module itself, in its own process.
    """
    binary = build_ceiling()
    args = ceiling_args(
        module=module,
        token=token,
        pin=pin,
        key=key,
        mech=mech,
        op=op,
        threads=threads,
        count=count,
        warmup=warmup,
        session_copy=session_copy,
    )
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [str(binary), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    result: dict[str, Any] = {}
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = {}
    if proc.returncode != 0 or "ops_per_s" not in result:
        reason = result.get("error") or proc.stderr.strip() or f"exit status {proc.returncode}"
        raise CeilingError(f"ceiling failed: {reason}")
    return result


def main(argv: list[str]) -> int:
    binary = build_ceiling()
    if not argv:
        print(binary)
        return 0
    return subprocess.run([str(binary), *argv], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
