"""``hsmbridge bench`` and ``hsmbridge bench compare``: options, the run, the outputs."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..api import HSM
from ..errors import ConfigurationError
from ..mechanisms import Mechanism
from ..nethsm.backend import PASSWORD_ENV
from ..pkcs11 import Pkcs11HSM
from ..progress import Progress
from ..uri import parse_nethsm_uri
from . import nethsm as nethsm_baselines
from . import pkcs11 as pkcs11_baselines
from .compare import DEFAULT_THRESHOLD, compare, format_comparison, load
from .contenders import Contender, Target
from .environment import load_average, machine, now, versions
from .report import format_table, write_report
from .runner import Extra, Settings, entry, run_workload
from .schema import SCHEMA_ID
from .workloads import select

ADMIN_PASSWORD_ENV = "NETHSM_ADMIN_PASSWORD"
OPERATOR_PASSWORD_ENV = "NETHSM_OPERATOR_PASSWORD"
QUICK = Settings(threads=(1, 2), rounds=2, seconds=0.03)


def add_arguments(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The ``bench`` options (``--hsm`` and ``--json`` come from hsmbridge.cli's ``common``)."""
    p.description = (
        "Measure an HSM side by side with its C ceiling, plain loops and OpenSSL "
        "(docs/benchmarks.md). Without --hsm: an embedded SoftHSM2 token."
    )
    p.add_argument("--only", default="", help="comma-separated workload names or globs")
    p.add_argument("--threads", default=None, help="thread counts to sweep (default 1,2,4,8)")
    from ..cli import positive_int

    p.add_argument("--rounds", type=positive_int, default=None, help="rounds (default 3)")
    p.add_argument(
        "--seconds", type=float, default=None, help="length of one measurement (default 0.5)"
    )
    p.add_argument("--quick", action="store_true", help="threads 1,2, 2 rounds, 0.03 s each")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--report", metavar="DIR", help="write an HTML report with plots there")
    p.add_argument("--admin", help=f"NetHSM Administrator user (password: ${ADMIN_PASSWORD_ENV})")
    p.add_argument("--operator", help=f"NetHSM Operator user (password: ${OPERATOR_PASSWORD_ENV})")
    bench_sub = p.add_subparsers(dest="bench_command", required=False)
    c = bench_sub.add_parser(
        "compare", help="compare two JSON results; exit 1 on a regression", parents=[common]
    )
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"smallest regression that fails, as a fraction (default {DEFAULT_THRESHOLD})",
    )
    c.add_argument("--metric", choices=("ops", "cpu"), default="cpu")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or ``compare``); the exit status."""
    if args.bench_command == "compare":
        comparison = compare(load(args.old), load(args.new), args.threshold, args.metric)
        print(format_comparison(comparison))
        return 1 if comparison["regressions"] else 0
    settings = _settings(args)
    uri = args.hsm
    with tempfile.TemporaryDirectory(prefix="hsmbridge-bench-") as workdir:
        doc = measure(uri, args.only, settings, args.admin, args.operator, workdir)
    _write_outputs(doc, args.json, args.out, args.report)
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings(threads=(1, 2, 4, 8), rounds=3, seconds=0.5)
    threads = base.threads
    if args.threads:
        try:
            threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
        except ValueError:
            raise ConfigurationError(
                f"--threads takes numbers like 1,2,4,8, not {args.threads!r}"
            ) from None
        if not threads or min(threads) < 1 or max(threads) > 256:
            raise ConfigurationError("--threads takes thread counts between 1 and 256")
    rounds = args.rounds if args.rounds is not None else base.rounds
    seconds = args.seconds if args.seconds is not None else base.seconds
    if rounds < 1 or seconds <= 0:
        raise ConfigurationError("--rounds must be at least 1 and --seconds above 0")
    return Settings(threads=threads, rounds=rounds, seconds=seconds)


def measure(
    uri: str | None,
    only: str,
    settings: Settings,
    admin: str | None = None,
    operator: str | None = None,
    workdir: str | None = None,
) -> dict[str, Any]:
    """One whole run: the JSON document (docs/benchmarks.md, "The JSON result")."""
    workloads = select(only)
    sessions = max(max(settings.threads), 2)
    opened: list[HSM] = []
    progress = Progress(0)
    offered: set[Mechanism] | None = None  # None: NetHSM, decided by a first operation
    pin = None
    if uri is None:
        from ..softhsm import embedded_demo_token

        token = embedded_demo_token()
        uri, pin = token.uri, token.pin
    try:
        if uri.startswith("nethsm://"):
            hsm, extra, info = _open_nethsm(uri, admin, operator, workdir or tempfile.gettempdir())
            opened.append(hsm)
        else:
            hsm = _open_pkcs11(uri, pin, sessions, None)
            opened.append(hsm)
            python_hsm = _open_pkcs11(uri, pin, sessions, False)  # the Python engine
            opened.append(python_hsm)
            info = pkcs11_baselines.describe(hsm)
            offered = set(hsm.supported_mechanisms())

            def extra(target: Target) -> list[Contender]:
                return pkcs11_baselines.contenders(target, python_hsm)

        started, load_before = now(), load_average()
        results = []
        for w in workloads:
            if offered is not None and w.mechanism is not None and w.mechanism not in offered:
                results.append(entry(w, skipped=f"the token does not offer {w.mechanism.value}"))
            else:
                results.append(run_workload(hsm, w, settings, extra, progress))
    finally:
        progress.close()
        for h in reversed(opened):
            h.close()
    return {
        "schema": SCHEMA_ID,
        "started": started,
        "finished": now(),
        "settings": {
            "hsm": _without_secrets(uri),
            "only": only,
            "threads": list(settings.threads),
            "rounds": settings.rounds,
            "seconds": settings.seconds,
        },
        "machine": machine()
        | {"load_average_before": load_before, "load_average_after": load_average()},
        "versions": versions(),
        "hsm": info,
        "workloads": results,
    }


def _open_pkcs11(uri: str, pin: str | None, sessions: int, native: bool | None) -> Pkcs11HSM:
    import hsmbridge

    options: dict[str, Any] = {"max_sessions": sessions, "native": native}
    if pin is not None:
        options["pin"] = pin
    hsm = hsmbridge.open(uri, **options)
    assert isinstance(hsm, Pkcs11HSM)
    return hsm


def _password(env: str, option: str) -> str:
    value = os.environ.get(env)
    if not value:
        raise ConfigurationError(f"{option} needs the password in ${env}")
    return value


def _open_nethsm(
    uri: str, admin: str | None, operator: str | None, workdir: str
) -> tuple[HSM, Extra, dict[str, Any]]:
    import hsmbridge

    parsed = parse_nethsm_uri(uri)
    options: dict[str, Any] = {}
    if admin:
        options["admin"] = (admin, _password(ADMIN_PASSWORD_ENV, "--admin"))
    if operator:
        options["operator"] = (operator, _password(OPERATOR_PASSWORD_ENV, "--operator"))
    hsm = hsmbridge.open(uri, **options)
    user, password = options.get("operator") or (parsed.user, os.environ.get(PASSWORD_ENV))
    access = None
    if password:
        try:
            import nethsm  # noqa: F401 - the SDK baseline needs it
        except ImportError:
            pass
        else:
            access = nethsm_baselines.sdk_access(parsed, user, password, workdir)

    def extra(target: Target) -> list[Contender]:
        return nethsm_baselines.contenders(target, access)

    return hsm, extra, nethsm_baselines.describe(access, hsm.description)


def _write_outputs(doc: dict[str, Any], as_json: bool, out: str | None, report: str | None) -> None:
    text = json.dumps(doc, indent=1) + "\n"
    sys.stdout.write(text if as_json else format_table(doc) + "\n")
    if out:
        _write(Path(out), text)
    if report:
        index = write_report(doc, Path(report))
        print(f"report: {index}", file=sys.stderr)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None


def _without_secrets(uri: str) -> str:
    """The URI as results record it: no query (module path, PIN sources) and no PIN."""
    return re.sub(r"(?i)pin-value=[^;?&]*", "pin-value=(hidden)", uri.split("?", 1)[0])
