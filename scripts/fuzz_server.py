#!/usr/bin/env python3
"""Coverage-guided fuzzing of the server's request decoding (atheris over hypothesis).

Runs the properties of tests/test_server_fuzz.py, one target at a time, under
atheris (libFuzzer's coverage-guided mutation; ``pip install -e '.[fuzz]'``):
each target gets ``--seconds`` of wall time, and the run prints executions,
coverage and crashes found per target. A crash stops that target and leaves
libFuzzer's ``crash-*`` input in ``--out``; turn the failing example hypothesis
prints into an ``@example`` in tests/test_server_fuzz.py.

    .venv/bin/python scripts/fuzz_server.py --seconds 600            # every target
    .venv/bin/python scripts/fuzz_server.py --seconds 60 --only app  # one target

Each target runs in a child process (libFuzzer exits the process at the end).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "basic": "test_basic_credentials",
    "json": "test_json_bodies",
    "multipart": "test_multipart_forms",
    "routes": "test_routes",
    "csr": "test_csr_subjects",
    "json-import": "test_json_key_import",
    "pem-import": "test_pem_key_import",
    "app": "check_request",
}


def _child(target: str, seconds: int, out: Path) -> None:
    """In the child: instrument hsmbridge and the parsers, then fuzz one property."""
    import atheris
    from hypothesis import given

    sys.path.insert(0, str(ROOT / "tests"))
    with atheris.instrument_imports(include=["hsmbridge", "python_multipart", "asn1crypto"]):
        import test_server_fuzz as props

    if target == "app":
        from hsmbridge import open as open_hsm
        from hsmbridge.softhsm import make_tokens

        tokens = make_tokens(out / "token", ["fuzz"])
        os.environ["SOFTHSM2_CONF"] = str(tokens[0].conf)
        hsm = open_hsm(tokens[0].uri, pin=tokens[0].pin)
        running, _bridge = props.start_app(hsm, out / "state")
        test = given(props.requests_)(lambda request: props.check_request(running, request))
    else:
        test = getattr(props, TARGETS[target])
    fuzz = test.hypothesis.fuzz_one_input
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-artifact_prefix={out}/",
            "-print_final_stats=1",
        ],
        fuzz,
    )
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--only", default="", help="comma-separated targets: " + ", ".join(TARGETS))
    parser.add_argument("--out", default="", help="where crash inputs go (default: a temp dir)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="hsmbridge-fuzz-"))
    if args.child:
        _child(args.child, args.seconds, out)
        return 0
    targets = [t for t in args.only.split(",") if t] or list(TARGETS)
    failed = 0
    for target in targets:
        (out / target).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--child", target, "--seconds", str(args.seconds)]
        result = subprocess.run(
            [*cmd, "--out", str(out / target)], capture_output=True, text=True, cwd=ROOT
        )
        log = result.stdout + result.stderr
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        cov = re.findall(r"cov: (\d+)", log)
        crashes = sorted(p.name for p in (out / target).glob("crash-*"))
        ok = result.returncode == 0 and not crashes
        failed += not ok
        executions, coverage = runs[-1] if runs else "?", cov[-1] if cov else "?"
        print(
            f"{target:12} executions {executions:>9}  coverage {coverage:>6}"
            f"  crashes {len(crashes)}  {'ok' if ok else 'FAILED'}"
        )
        if not ok:
            print(log[-4000:])
    print(f"crash inputs (if any) in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
