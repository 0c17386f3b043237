"""``hsmbridge bench compare OLD.json NEW.json``: did anything get slower?

For every workload, contender and thread count in both results it prints
new over old (above 1 is better, whatever the metric) next to the noise of
both runs (the relative spread over rounds). A hsmbridge contender that got
worse by more than ``max(threshold, noise)`` is a regression, and the command
exits 1: a gate for CI. Baselines (the ceiling, python-pkcs11, the SDK,
OpenSSL) are shown but never fail the gate: they move with the machine, not
with hsmbridge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .schema import SCHEMA_ID

DEFAULT_THRESHOLD = 0.10
#: metric name -> (result field, True when higher is better)
METRICS = {"ops": ("ops_per_s", True), "cpu": ("cpu_us_per_op", False)}


def load(path: str | Path) -> dict[str, Any]:
    """A JSON result written by ``hsmbridge bench --out FILE`` (or ``--json``)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigurationError(
            f"{path} is not an hsmbridge bench result ({SCHEMA_ID}; found {found!r}); "
            "make one with hsmbridge bench --out FILE"
        )
    return doc


def _index(doc: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (w["name"], r["contender"], r["threads"]): r
        for w in doc["workloads"]
        if not w["skipped"]
        for r in w["results"]
    }


def compare(
    old: dict[str, Any],
    new: dict[str, Any],
    threshold: float = DEFAULT_THRESHOLD,
    metric: str = "cpu",
) -> dict[str, Any]:
    """Rows of new/old per (workload, contender, threads) and the regressions among them."""
    if metric not in METRICS:
        raise ConfigurationError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not 0 < threshold < 1:
        raise ConfigurationError("the threshold is a fraction between 0 and 1, e.g. 0.1")
    field, higher_better = METRICS[metric]
    before, after = _index(old), _index(new)
    rows = []
    for key in sorted(before.keys() & after.keys()):
        o, n = before[key][field], after[key][field]
        if not o["median"] or not n["median"]:
            continue
        ratio = n["median"] / o["median"] if higher_better else o["median"] / n["median"]
        noise = max(o["spread"], n["spread"])
        tolerance = max(threshold, noise)
        gated = key[1].startswith("hsmbridge-")
        rows.append(
            {
                "workload": key[0],
                "contender": key[1],
                "threads": key[2],
                "old": o["median"],
                "new": n["median"],
                "ratio": ratio,
                "noise": noise,
                "tolerance": tolerance,
                "regression": gated and ratio < 1 - tolerance,
            }
        )
    return {
        "metric": metric,
        "threshold": threshold,
        "rows": rows,
        "regressions": [r for r in rows if r["regression"]],
        "only_old": sorted({k[0] for k in before} - {k[0] for k in after}),
        "only_new": sorted({k[0] for k in after} - {k[0] for k in before}),
    }


def format_comparison(c: dict[str, Any]) -> str:
    field, _ = METRICS[c["metric"]]
    lines = [
        f"new / old by {field} (above 1 is better); a hsmbridge contender fails below "
        f"1 - max({c['threshold']:.2f}, noise)",
        f"{'workload':<28}{'contender':<24}{'thr':>4}{'old':>12}{'new':>12}{'new/old':>9}"
        f"{'noise':>8}  verdict",
    ]
    for r in c["rows"]:
        verdict = "REGRESSION" if r["regression"] else ""
        lines.append(
            f"{r['workload']:<28}{r['contender']:<24}{r['threads']:>4}{r['old']:>12,.1f}"
            f"{r['new']:>12,.1f}{r['ratio']:>9.2f}{r['noise']:>8.2f}  {verdict}"
        )
    for name, side in (("only_old", "only in OLD"), ("only_new", "only in NEW")):
        if c[name]:
            lines.append(f"{side}: {', '.join(c[name])}")
    n = len(c["regressions"])
    lines.append(f"{n} regression{'s' if n != 1 else ''}" if n else "no regression")
    return "\n".join(lines)
