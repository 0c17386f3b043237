"""What a run looks like: the text table, and the HTML report with SVG plots.

The plots are SVG written here directly rather than through matplotlib: two
chart shapes (lines over thread counts, latency percentiles) take less code
than an optional dependency would, the report stays one self-contained file
that opens offline, and the tests can parse every plot as XML.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .contenders import CONTENDERS

#: line colours and styles per contender; the references are dashed
STYLE: dict[str, tuple[str, str]] = {
    "c-ceiling": ("#000000", "6,4"),
    "python-pkcs11": ("#1f77b4", ""),
    "nethsm-sdk": ("#17becf", ""),
    "hsmbridge-single": ("#ff7f0e", ""),
    "hsmbridge-batch": ("#d62728", ""),
    "hsmbridge-batch-python": ("#9467bd", ""),
    "openssl": ("#7f7f7f", "2,3"),
}
WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 190, 30, 50


# -- the text table -----------------------------------------------------------------------


def format_table(doc: dict[str, Any]) -> str:
    """Per workload: ops/s (median, spread), CPU per op and latency percentiles per contender."""
    lines = [f"{doc['hsm']['description']}; {doc['machine']['cpus']} CPUs; "
             f"{doc['settings']['rounds']} rounds of ~{doc['settings']['seconds']} s"]  # fmt: skip
    head = (
        f"  {'contender':<24}{'thr':>4}{'ops/s':>11}{'±':>6}{'CPU µs/op':>11}"
        f"{'p50 µs':>9}{'p95 µs':>9}{'p99 µs':>9}"
    )
    for w in doc["workloads"]:
        lines.append("")
        if w["skipped"]:
            lines.append(f"{w['name']}: skipped ({w['skipped']})")
            continue
        lines += [w["name"], head]
        for r in _ordered(w["results"]):
            lat = r["latency_us"] or {}
            cells = "".join(
                f"{lat[p]:>9,.0f}" if p in lat else f"{'-':>9}" for p in ("p50", "p95", "p99")
            )
            lines.append(
                f"  {r['contender']:<24}{r['threads']:>4}{r['ops_per_s']['median']:>11,.0f}"
                f"{r['ops_per_s']['spread'] * 100:>5.0f}%{r['cpu_us_per_op']['median']:>11,.0f}"
                + cells
            )
        for q in w["ratios"]:
            if q["contender"] == "hsmbridge-batch":
                s = q["ops_per_s"]
                lines.append(
                    f"  batch / {q['over']} at {q['threads']} threads: {s['median']:.2f}x "
                    f"({s['min']:.2f}-{s['max']:.2f})"
                )
    return "\n".join(lines)


def _ordered(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {name: i for i, name in enumerate(CONTENDERS)}
    return sorted(results, key=lambda r: (rank.get(r["contender"], 99), r["threads"]))


# -- SVG ----------------------------------------------------------------------------------


def _svg(body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>'
        f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    return float(next(m * exp for m in (1, 2, 2.5, 5, 10) if m * exp >= value))


def _legend(entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """(name, colour, dash) per line."""
    out = []
    x = WIDTH - RIGHT + 15
    for i, (name, colour, dash) in enumerate(entries):
        y = TOP + 14 + 16 * i
        out.append(
            f'<line x1="{x}" y1="{y - 4}" x2="{x + 22}" y2="{y - 4}" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="{dash}"/>'
            f'<text x="{x + 28}" y="{y}">{html.escape(name)}</text>'
        )
    return out


def _axes(x_labels: Sequence[tuple[float, str]], y_max: float, x_title: str, y_title: str,
          y_fmt: str = "{:,.0f}") -> list[str]:  # fmt: skip
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bottom = TOP + plot_h
    out = [
        f'<line x1="{LEFT}" y1="{bottom}" x2="{LEFT + plot_w}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="black"/>',
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" text-anchor="middle">'
        f"{html.escape(x_title)}</text>",
        f'<text transform="translate(14,{TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_title)}</text>",
    ]  # fmt: skip
    for i in range(5):
        value = y_max * i / 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{y_fmt.format(value)}</text>'
        )
    for fx, label in x_labels:
        x = LEFT + plot_w * fx
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{html.escape(label)}</text>'
        )
    return out


def throughput_svg(workload: dict[str, Any]) -> str:
    """ops/s against threads, one line per contender (min-max bars), references dashed."""
    title = f"{workload['name']}: throughput (median, min-max over rounds)"
    return _lines_svg(workload, "ops_per_s", title, "operations per second")


def cpu_svg(workload: dict[str, Any]) -> str:
    """CPU time per operation against threads: the steadier figure on a shared machine."""
    title = f"{workload['name']}: CPU time per operation (median, min-max)"
    return _lines_svg(workload, "cpu_us_per_op", title, "CPU µs per operation")


def _lines_svg(workload: dict[str, Any], field: str, title: str, y_title: str) -> str:
    results = workload["results"]
    threads = sorted({r["threads"] for r in results})
    y_max = _nice_max(max(r[field]["max"] for r in results))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def fx(t: int) -> float:
        return 0.5 if len(threads) == 1 else 0.05 + 0.9 * threads.index(t) / (len(threads) - 1)

    def px(t: int) -> float:
        return LEFT + plot_w * fx(t)

    def py(v: float) -> float:
        return TOP + plot_h - plot_h * v / y_max

    body = _axes([(fx(t), str(t)) for t in threads], y_max, "threads", y_title)
    names = [n for n in CONTENDERS if any(r["contender"] == n for r in results)]
    for name in names:
        colour, dash = STYLE[name]
        rows = sorted((r for r in results if r["contender"] == name), key=lambda r: r["threads"])
        points = " ".join(f"{px(r['threads']):.1f},{py(r[field]['median']):.1f}" for r in rows)
        body.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-dasharray="{dash}"/>'
        )
        for r in rows:
            x, s = px(r["threads"]), r[field]
            body.append(
                f'<line x1="{x:.1f}" y1="{py(s["min"]):.1f}" x2="{x:.1f}" y2="{py(s["max"]):.1f}" '
                f'stroke="{colour}"/><circle cx="{x:.1f}" cy="{py(s["median"]):.1f}" r="2.5" '
                f'fill="{colour}"/>'
            )
    body += _legend([(n, *STYLE[n]) for n in names])
    return _svg(body, title)


def latency_svg(workload: dict[str, Any]) -> str | None:
    """Single-operation latency percentiles (log scale), per contender at each thread count."""
    rows = [r for r in _ordered(workload["results"]) if r["latency_us"]]
    if not rows:
        return None
    low = max(min(r["latency_us"]["quantiles"][0] for r in rows), 1.0)
    high = max(r["latency_us"]["quantiles"][-1] for r in rows)
    lo_exp, hi_exp = math.floor(math.log10(low)), math.ceil(math.log10(max(high, low * 10)))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(us: float) -> float:
        return LEFT + plot_w * (math.log10(max(us, low)) - lo_exp) / (hi_exp - lo_exp)

    x_labels = [((e - lo_exp) / (hi_exp - lo_exp), f"{10**e:,}") for e in range(lo_exp, hi_exp + 1)]
    body = _axes(x_labels, 100, "latency of one operation (µs, log scale)", "percentile", "{:.0f}")
    entries = []
    thread_counts = sorted({r["threads"] for r in rows})
    for r in rows:
        colour, _ = STYLE.get(r["contender"], ("#333333", ""))
        step = thread_counts.index(r["threads"])
        dash = f"{2 + step},{step}" if step else ""
        qs = r["latency_us"]["quantiles"]
        points = " ".join(
            f"{px(v):.1f},{TOP + plot_h - plot_h * i / (len(qs) - 1):.1f}" for i, v in enumerate(qs)
        )
        body.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5" '
            f'stroke-dasharray="{dash}"/>'
        )
        entries.append((f"{r['contender']} x{r['threads']}", colour, dash))
    body += _legend(entries[:18])
    return _svg(body, f"{workload['name']}: latency distribution")


# -- the HTML report ----------------------------------------------------------------------


def write_report(doc: dict[str, Any], directory: Path) -> Path:
    """index.html (plots inline, no external resources), one SVG per plot, result.json."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sections = []
        for w in doc["workloads"]:
            if w["skipped"]:
                sections.append(f"<h2>{html.escape(w['name'])}</h2><p>skipped: "
                                f"{html.escape(w['skipped'])}</p>")  # fmt: skip
                continue
            plots = [
                ("throughput", throughput_svg(w)),
                ("cpu", cpu_svg(w)),
                ("latency", latency_svg(w)),
            ]
            figures = []
            for kind, svg in plots:
                if svg is None:
                    continue
                (directory / f"{kind}-{w['name']}.svg").write_text(svg)
                figures.append(svg)
            sections.append(
                f"<h2>{html.escape(w['name'])}</h2>" + "".join(figures) + _html_table(w)
            )
        (directory / "result.json").write_text(json.dumps(doc, indent=1) + "\n")
        index = directory / "index.html"
        index.write_text(_page(doc, sections))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the report in {directory}: {exc.strerror}"
        ) from None
    return index


def _html_table(w: dict[str, Any]) -> str:
    titles = ("contender", "threads", "ops/s", "spread", "CPU µs/op", "p50 µs", "p95 µs", "p99 µs")
    head = "".join(f"<th>{h}</th>" for h in titles)
    rows = []
    for r in _ordered(w["results"]):
        lat = r["latency_us"] or {}
        cells = [
            html.escape(r["contender"]),
            str(r["threads"]),
            f"{r['ops_per_s']['median']:,.0f}",
            f"{r['ops_per_s']['spread'] * 100:.0f}%",
            f"{r['cpu_us_per_op']['median']:,.0f}",
            *(f"{lat[p]:,.0f}" if p in lat else "-" for p in ("p50", "p95", "p99")),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _page(doc: dict[str, Any], sections: list[str]) -> str:
    facts = {
        "HSM": doc["hsm"]["description"],
        "settings": json.dumps(doc["settings"]),
        "machine": json.dumps(doc["machine"]),
        "versions": json.dumps(doc["versions"]),
        "run": f"{doc['started']} to {doc['finished']}",
    }
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in facts.items()
    )
    legend = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in CONTENDERS.items()
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>hsmbridge bench report</title><style>"
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:right}th{background:#f3f3f3}svg{margin:0.5em 0}"
        "</style></head><body><h1>hsmbridge bench report</h1>"
        f"<table>{rows}</table><p>Contenders:</p><ul>{legend}</ul>"
        "<p>Absolute numbers on a shared machine are noisy; ratios within one run and "
        "CPU time per operation are the claim (docs/benchmarks.md).</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
