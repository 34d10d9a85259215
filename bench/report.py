"""The results: a printed Markdown table, JSON, Markdown, and an SVG of the distributions.

The SVG is written by hand: per case a row, ours and the floor on a log axis of their
own (unit in the label), each as a box (p25-p75), a median tick, whiskers to the
extremes, and every sample as a dot.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from bench.model import CaseResult, Unit
from bench.stats import Summary, percentile

OURS_COLOUR = "#1f77b4"
FLOOR_COLOUR = "#8c8c8c"
VERDICT_COLOUR = {"ok": "#2ca02c", "MISSED": "#d62728", "FAILED": "#d62728"}


def fmt(value: float, unit: Unit) -> str:
    if math.isnan(value):
        return "-"
    if unit == "s":
        if value < 0.01:
            return f"{value * 1000:.2f} ms"
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "MiB/s":
        return f"{value:.0f} MiB/s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:.0f}"


def ratio_text(case: CaseResult) -> str:
    ours, floor = case.ours_summary, case.floor_summary
    if case.target.kind == "growth_max":
        if ours.n == 0 or floor.n == 0:
            return "-"
        grown = ours.p50 - floor.p50
        return f"{grown:+.1f} MiB" if case.unit == "MiB" else f"{grown:+.0f}"
    return "-" if math.isnan(case.ratio) else f"{case.ratio:.2f}x"


HEADER = ("case", "ours p50", "ours p99", "floor p50", "ratio", "target", "verdict")


def table_rows(cases: Sequence[CaseResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for case in cases:
        ours, floor = case.ours_summary, case.floor_summary
        verdict: str = case.verdict
        if case.error:
            verdict = f"FAILED: {case.error.splitlines()[0][:120]}"
        elif case.not_run:
            verdict = f"not run: {case.not_run}"
        rows.append((
            f"{case.title} (vs {case.floor_name})", fmt(ours.p50, case.unit),
            fmt(ours.p99, case.unit), fmt(floor.p50, case.unit), ratio_text(case),
            case.target.text, verdict,
        ))  # fmt: skip
    return rows


def markdown_table(cases: Sequence[CaseResult]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(HEADER), line(["---"] * len(HEADER))]
    out += [line(row) for row in table_rows(cases)]
    return "\n".join(out)


def breakdown_lines(case: CaseResult) -> list[str]:
    """Where the time goes: the daemon's stages (and answered requests) during the case,
    and the floor's own steps."""
    lines = []
    stages = [m for m in case.stages if m.metric.endswith("stage_duration_seconds")]
    requests = [m for m in case.stages if m.metric.endswith("request_duration_seconds")]
    if stages:
        parts = [f"{m.part} {fmt(m.mean, 's')} x{m.count}" for m in stages]
        lines.append("daemon stages (mean): " + ", ".join(parts))
    if requests:
        parts = [f"{m.part} {fmt(m.mean, 's')} x{m.count}" for m in requests]
        lines.append("daemon requests (mean): " + ", ".join(parts))
    if case.floor_steps:
        parts = [
            f"{name} {fmt(Summary.of(v).mean, 's')} x{len(v)}"
            for name, v in case.floor_steps.items()
        ]
        lines.append("floor steps (mean): " + ", ".join(parts))
    return lines + case.notes


def markdown(cases: Sequence[CaseResult], meta: dict[str, Any], svg_name: str) -> str:
    out = [
        f"# rbdplugin benchmarks, {meta['date']}",
        "",
        f"`{meta['command']}` on {meta['host']} ({meta['cpus']} CPUs), mode {meta['mode']}, "
        f"{meta['seconds']:.0f} s. Ratio = ours / floor (p50; for the data-path rows and the "
        "parallel Create + Mount, whose few rounds run ours and the floor back to back, the "
        "median of the per-round ratios); "
        "the floor is the same work done by the bare library call or the hand-run tools, "
        "measured in the same run.",
        "",
        markdown_table(cases),
        "",
        f"![latency distributions against their floors]({svg_name})",
        "",
        "## Where the time goes",
        "",
    ]
    for case in cases:
        lines = breakdown_lines(case)
        if lines:
            out.append(f"- **{case.title}**")
            out += [f"  - {line}" for line in lines]
    return "\n".join(out) + "\n"


# -- SVG -----------------------------------------------------------------------------------

WIDTH, ROW, TOP = 1180, 58, 56
LABEL_W, PLOT_X0, PLOT_X1 = 360, 380, 1010


def svg(cases: Sequence[CaseResult], title: str) -> str:
    height = TOP + ROW * len(cases) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{PLOT_X0}" y="30" width="12" height="8" fill="{OURS_COLOUR}"/>'
        f'<text x="{PLOT_X0 + 16}" y="38">ours</text>',
        f'<rect x="{PLOT_X0 + 60}" y="30" width="12" height="8" fill="{FLOOR_COLOUR}"/>'
        f'<text x="{PLOT_X0 + 76}" y="38">floor</text>',
        f'<text x="{PLOT_X0 + 130}" y="38" fill="#555">box p25-p75, tick p50, whiskers '
        "min-max, dots every sample; log axis per row</text>",
    ]
    for i, case in enumerate(cases):
        parts += _row(case, TOP + i * ROW)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _row(case: CaseResult, y: int) -> list[str]:
    out = [
        f'<line x1="0" y1="{y}" x2="{WIDTH}" y2="{y}" stroke="#eee"/>',
        f'<text x="10" y="{y + 22}">{escape(_short(case.title, 52))}</text>',
        f'<text x="10" y="{y + 40}" fill="#666">vs {escape(_short(case.floor_name, 48))}</text>',
    ]
    verdict = case.verdict
    colour = VERDICT_COLOUR.get(verdict, "#555")
    label = f"{ratio_text(case)} {verdict}" if not (case.error or case.not_run) else verdict
    out.append(
        f'<text x="{PLOT_X1 + 14}" y="{y + 26}" fill="{colour}">{escape(_short(label, 24))}</text>'
    )
    out.append(
        f'<text x="{PLOT_X1 + 14}" y="{y + 42}" fill="#666">{escape(case.target.text)}</text>'
    )
    values = [v for v in (*case.ours, *case.floor) if v > 0]
    if not values:
        return out
    lo, hi = _decades(min(values), max(values))

    def x(v: float) -> float:
        v = max(v, lo)
        return PLOT_X0 + (PLOT_X1 - PLOT_X0) * (math.log10(v) - math.log10(lo)) / (
            math.log10(hi) - math.log10(lo)
        )

    out.append(f'<line x1="{PLOT_X0}" y1="{y + 48}" x2="{PLOT_X1}" y2="{y + 48}" stroke="#999"/>')
    for tick in _ticks(lo, hi):
        tx = x(tick)
        out.append(f'<line x1="{tx:.1f}" y1="{y + 45}" x2="{tx:.1f}" y2="{y + 51}" stroke="#999"/>')
        out.append(
            f'<text x="{tx:.1f}" y="{y + 57}" font-size="9" text-anchor="middle" fill="#666">'
            f"{escape(fmt(tick, case.unit))}</text>"
        )
    for samples, colour, cy in (
        (case.ours, OURS_COLOUR, y + 17),
        (case.floor, FLOOR_COLOUR, y + 35),
    ):
        out += _strip(samples, colour, cy, x)
    return out


def _strip(samples: Sequence[float], colour: str, cy: int, x: Any) -> list[str]:
    positive = [v for v in samples if v > 0]
    if not positive:
        return []
    low, high = min(positive), max(positive)
    q1, q2, q3 = (percentile(positive, q) for q in (25, 50, 75))
    out = [
        f'<line x1="{x(low):.1f}" y1="{cy}" x2="{x(high):.1f}" y2="{cy}" stroke="{colour}"/>',
        f'<rect x="{x(q1):.1f}" y="{cy - 6}" width="{max(x(q3) - x(q1), 1.5):.1f}" height="12" '
        f'fill="{colour}" fill-opacity="0.25" stroke="{colour}"/>',
        f'<line x1="{x(q2):.1f}" y1="{cy - 8}" x2="{x(q2):.1f}" y2="{cy + 8}" stroke="{colour}" '
        'stroke-width="2.5"/>',
    ]
    out += [
        f'<circle cx="{x(v):.1f}" cy="{cy}" r="1.8" fill="{colour}" fill-opacity="0.5"/>'
        for v in positive
    ]
    return out


def _decades(low: float, high: float) -> tuple[float, float]:
    lo = 10 ** math.floor(math.log10(low))
    hi = 10 ** math.ceil(math.log10(high))
    if hi <= lo:
        hi = lo * 10
    return lo, hi


def _ticks(lo: float, hi: float) -> list[float]:
    decades = round(math.log10(hi / lo))
    steps = (1, 2, 5) if decades <= 2 else (1,)
    ticks = []
    for d in range(decades + 1):
        for step in steps:
            tick = lo * 10**d * step
            if tick <= hi * 1.0001:
                ticks.append(tick)
    return ticks


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- files ---------------------------------------------------------------------------------


def write(cases: Sequence[CaseResult], meta: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = str(meta["date"])
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "svg")}
    data = {"meta": meta, "cases": [case.to_json() for case in cases]}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["md"].write_text(markdown(cases, meta, paths["svg"].name))
    paths["svg"].write_text(svg(cases, f"rbdplugin benchmarks {stem} ({meta['mode']})"))
    # Plain copies (not symlinks), so that GitHub shows them; latest.md links latest.svg.
    (out_dir / "latest.md").write_text(markdown(cases, meta, "latest.svg"))
    shutil.copyfile(paths["svg"], out_dir / "latest.svg")
    return paths
