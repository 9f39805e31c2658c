"""The memory-vs-context curve of an estimate-memory ``Report`` as a file: CSV, SVG or PNG.

The numbers are the report's own (``Report.curve``: the per-GPU total for each weights format at each
context of ``Report.curve_contexts``, and ``Report.budget_bytes``, the memory the given GPU lets a
process use); nothing is recomputed here. CSV and SVG are written with the standard library; PNG needs
matplotlib. Files are written atomically (``llmctl.atomic``): a failed run leaves nothing behind.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from llmctl import atomic
from llmctl.errors import UsageError
from llmctl.memory.report import Report

SUFFIXES = (".csv", ".svg", ".png")
GIB = 1024**3
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")
_BUDGET_COLOR = "#d62728"


def check_path(path: Path) -> Path:
    """Refuse, before any work, a --plot FILE that cannot be written: unknown suffix, missing folder,
    a folder at that name, or PNG without matplotlib."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(
            f"--plot {path}: unknown file type {suffix or '(no suffix)'!r}; name it .csv, .svg or .png"
        )
    if path.is_dir():
        raise UsageError(f"--plot {path} is a folder; give a file name ending in {suffix}")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: folder {path.parent} does not exist; create it first")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            f"--plot {path}: PNG needs matplotlib (pip install matplotlib), or write .svg or .csv instead"
        )
    return path


def write(report: Report, path: Path) -> None:
    """The chart in the format the suffix names (see ``check_path``), written atomically."""
    suffix = check_path(path).suffix.lower()
    if suffix == ".csv":
        data = to_csv(report).encode()
    elif suffix == ".svg":
        data = to_svg(report).encode()
    else:
        data = to_png(report)
    atomic.write_bytes(path, data, public=True)


def to_csv(report: Report) -> str:
    """One row per context: ``context`` (tokens), one column per weights format named as in the JSON's
    ``curve.total_bytes`` (per-GPU total, bytes), and ``gpu_bytes`` when a GPU was given."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    budget = report.budget_bytes
    w.writerow(["context", *report.curve, *(["gpu_bytes"] if budget is not None else [])])
    for i, ctx in enumerate(report.curve_contexts):
        w.writerow([ctx, *(v[i] for v in report.curve.values()), *([budget] if budget is not None else [])])
    return buf.getvalue()


def _context_label(n: int) -> str:
    if n >= 1024**2 and n % 1024**2 == 0:
        return f"{n // 1024**2}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _title(report: Report) -> str:
    e = report.estimates[0]
    tp = f", per GPU of {e.tensor_parallel}" if e.tensor_parallel > 1 else ""
    fa = ", FlashAttention" if e.flash_attention else ""
    return f"{report.model}: memory vs context (batch {e.batch}, KV {e.kv_dtype}{fa}{tp})"


def _gib_step(top_gib: float) -> float:
    """A 1-2-5 step giving at most ~6 ticks up to ``top_gib``."""
    raw = max(top_gib, 1e-9) / 6
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def to_svg(report: Report, width: int = 800, height: int = 480) -> str:
    """A line chart: context on a log₂ axis, per-GPU total in GiB, one line per weights format and a dashed
    line at the GPU's memory. Each series is a ``<polyline class="series" data-format="...">``."""
    left, right, top_m, bottom = 70, 190, 40, 50
    pw, ph = width - left - right, height - top_m - bottom
    contexts = report.curve_contexts
    budget = report.budget_bytes
    top = max([*(max(v) for v in report.curve.values()), *([budget] if budget else [])])
    step = _gib_step(top / GIB)
    y_max = math.ceil(top / GIB / step) * step or step
    lo, hi = math.log2(contexts[0]), math.log2(contexts[-1])
    span = (hi - lo) or 1.0

    def x(ctx: int) -> float:
        return left + (math.log2(ctx) - lo) / span * pw

    def y(nbytes: float) -> float:
        return top_m + ph - nbytes / GIB / y_max * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="14" font-weight="bold">{escape(_title(report))}</text>',
    ]
    n_ticks = round(y_max / step)
    for k in range(n_ticks + 1):
        v = k * step
        yy = y(v * GIB)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:g}</text>')
    for ctx in contexts:
        xx = x(ctx)
        out.append(f'<line x1="{xx:.1f}" y1="{top_m}" x2="{xx:.1f}" y2="{top_m + ph}" stroke="#f0f0f0"/>')
        out.append(
            f'<text x="{xx:.1f}" y="{top_m + ph + 16}" text-anchor="middle">{_context_label(ctx)}</text>'
        )
    out.append(
        f'<rect x="{left}" y="{top_m}" width="{pw}" height="{ph}" fill="none" stroke="black"/>'
        f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">context (tokens, log scale)</text>'
        f'<text x="18" y="{top_m + ph / 2}" text-anchor="middle" '
        f'transform="rotate(-90 18 {top_m + ph / 2})">total memory (GiB)</text>'
    )
    legend_y = top_m + 10
    if budget is not None and report.gpu is not None:
        yy = y(budget)
        label = f"{report.gpu.name} ({budget / GIB:.2f} GiB)"
        out.append(
            f'<line class="gpu" data-bytes="{budget}" x1="{left}" y1="{yy:.1f}" x2="{left + pw}" '
            f'y2="{yy:.1f}" stroke="{_BUDGET_COLOR}" stroke-dasharray="6 4" stroke-width="1.5"/>'
        )
        out.append(_legend(left + pw + 12, legend_y, _BUDGET_COLOR, label, dashed=True))
        legend_y += 20
    for j, (fmt, values) in enumerate(report.curve.items()):
        color = _COLORS[j % len(_COLORS)]
        points = " ".join(f"{x(c):.1f},{y(v):.1f}" for c, v in zip(contexts, values, strict=True))
        label = report.format_label(fmt)
        out.append(
            f'<polyline class="series" data-format={quoteattr(fmt)} fill="none" stroke="{color}" '
            f'stroke-width="2" points="{points}"><title>{escape(label)}</title></polyline>'
        )
        out.append(_legend(left + pw + 12, legend_y, color, label))
        legend_y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend(x0: float, y0: float, color: str, label: str, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    return (
        f'<line x1="{x0}" y1="{y0}" x2="{x0 + 20}" y2="{y0}" stroke="{color}" stroke-width="2"{dash}/>'
        f'<text x="{x0 + 26}" y="{y0 + 4}">{escape(label)}</text>'
    )


def to_png(report: Report) -> bytes:
    """The same chart as ``to_svg``, drawn by matplotlib (no pyplot, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=100)
    ax = fig.subplots()
    contexts = report.curve_contexts
    for fmt, values in report.curve.items():
        ax.plot(contexts, [v / GIB for v in values], marker="o", markersize=3, label=report.format_label(fmt))
    budget = report.budget_bytes
    if budget is not None and report.gpu is not None:
        ax.axhline(
            budget / GIB,
            color=_BUDGET_COLOR,
            linestyle="--",
            label=f"{report.gpu.name} ({budget / GIB:.2f} GiB)",
        )
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(contexts, [_context_label(c) for c in contexts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context (tokens, log scale)")
    ax.set_ylabel("total memory (GiB)")
    ax.set_title(_title(report), fontsize=10)
    ax.grid(True, color="#e0e0e0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
