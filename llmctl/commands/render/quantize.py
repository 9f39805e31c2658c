"""What ``llmctl quantize`` prints: the plan (dry run), the progress of each phase, the summary."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from llmctl.commands.render import GIB, _Bar, human_bytes, notice, out


def _kinds(rows: Sequence[tuple[str, tuple[Any, ...], int]]) -> list[tuple[str, int, int, tuple[Any, ...]]]:
    """(name with layer numbers as N, count, bytes, columns) per distinct pair, in first-seen order: the dry
    run's summary (``model.layers.N.mlp.down_proj.weight`` stands for every layer's)."""
    groups: dict[tuple[str, tuple[Any, ...]], list[int]] = {}
    for name, columns, nbytes in rows:
        g = groups.setdefault((re.sub(r"(?<=[.])\d+(?=[.])", "N", name), columns), [0, 0])
        g[0] += 1
        g[1] += nbytes
    return [(name, n, b, columns) for (name, columns), (n, b) in groups.items()]


def quantize_plan(plan: Any, out_path: Any, *, verbose: bool = False) -> None:
    """The dry-run: the exact output size and each tensor's format — one row per kind of tensor (same
    role, formats, group and reason), every tensor with ``verbose``."""
    con = out()
    recipe = f"recipe {plan.recipe}, " if plan.recipe != "uniform" else ""
    table = Table(title=f"Plan: {plan.source.display} → {plan.format} ({recipe}{plan.layout.name} layout)", title_justify="left")
    cols = ("tensor", "shape", "from", "to", "group", "bytes", "why") if verbose else ("tensors", "count", "from", "to", "group", "bytes", "why")
    for col in cols:
        table.add_column(col, justify="right" if col in ("bytes", "group", "count") else "left", overflow="fold")

    def group_of(t: Any) -> str:
        return "-" if t.group_size is None else "tensor" if t.group_size == 0 else str(t.group_size)

    if verbose:
        for t in plan.tensors:
            table.add_row(t.name, "×".join(map(str, t.shape)), t.src_dtype, t.format, group_of(t), f"{t.nbytes:,}", t.reason)
    else:
        rows = [(t.name, (t.src_dtype, t.format, group_of(t), t.reason), t.nbytes) for t in plan.tensors]
        for name, n, nbytes, (src, to, group, why) in _kinds(rows):
            table.add_row(name, str(n), src, to, group, f"{nbytes:,}", why)
    con.print(table)
    if not verbose:
        notice(f"{len(plan.tensors)} tensors in {table.row_count} kinds; --verbose lists every tensor")
    files = ", ".join(f"{f.name} ({f.nbytes:,} B)" for f in plan.files)
    con.print(
        f"output {out_path}: [bold]{plan.out_bytes:,} bytes[/bold] ({human_bytes(plan.out_bytes)}) of safetensors "
        f"in {files}, from {human_bytes(plan.src_bytes)} of weights; plus config.json and tokenizer files"
    )
    for note in plan.notes:
        notice(f"note: {note}")


def gguf_plan(plan: dict, out_path: Any, *, verbose: bool = False) -> None:
    """The dry-run of a GGUF output: each kind of tensor's type and bytes (every tensor with ``verbose``)."""
    con = out()
    table = Table(title=f"Plan: {plan['model']} → {plan['format']} GGUF, written by {plan['written_by']}", title_justify="left")
    cols = ("tensor", "shape", "from", "to", "bytes") if verbose else ("tensors", "count", "from", "to", "bytes")
    for col in cols:
        table.add_column(col, justify="right" if col in ("bytes", "count") else "left", overflow="fold")
    if verbose:
        for t in plan["tensors"]:
            table.add_row(t["name"], "×".join(map(str, t["shape"])), t["from"], t["to"], f"{t['bytes']:,}")
    else:
        rows = [(t["name"], (t["from"], t["to"]), t["bytes"]) for t in plan["tensors"]]
        for name, n, nbytes, (src, to) in _kinds(rows):
            table.add_row(name, str(n), src, to, f"{nbytes:,}")
    con.print(table)
    if not verbose:
        notice(f"{len(plan['tensors'])} tensors in {table.row_count} kinds; --verbose lists every tensor")
    con.print(
        f"output {out_path}: [bold]{plan['tensor_bytes']:,} bytes[/bold] ({human_bytes(plan['tensor_bytes'])}) of "
        "tensor data, plus the metadata copied from the source (tokenizer included)"
    )


class _QuantProgress(_Bar):
    """One line per phase of the run (llmctl.quantize.convert.Progress): what it is doing, its own counter
    (which never goes backwards), elapsed time, and an ETA only where the phase's length is known. A phase
    of unknown length (loading, converting a tokenizer) shows a moving bar. A finished phase stays, at
    100 %, until the run ends."""

    def __init__(self, enabled: bool, first: str | None = None) -> None:
        from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn

        class Eta(ProgressColumn):
            """The phase's remaining work at its average rate so far; none before 5 % of it and 1 s."""

            def render(self, task: Any) -> Text:
                if task.total is None or task.finished:
                    return Text("")
                elapsed = task.elapsed or 0.0
                if task.completed < task.total / 20 or elapsed < 1:
                    return Text("ETA -:--:--", style="cyan")
                left = elapsed * (task.total - task.completed) / task.completed
                m, sec = divmod(int(left + 0.5), 60)
                return Text(f"ETA {m // 60}:{m % 60:02d}:{sec:02d}", style="cyan")

        super().__init__(
            enabled,
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            Eta(),
        )
        self.phase: str | None = None
        self.first = first

    def __enter__(self) -> Any:
        update = super().__enter__()
        if update is not None and self.first:
            self.phase = self.first
            self.task = self.bar.add_task(self.first, total=None, count="")
        return update

    def update(self, p: Any) -> None:
        work = p.work_total if p.work_total is not None else p.total
        done = p.work_done if p.work_total is not None else p.done
        count = f"{p.unit} {p.done}/{p.total}" if p.total is not None else ""
        if p.phase != self.phase:
            if self.task is not None:  # the previous phase is over
                t = self.bar.tasks[-1]
                if t.total is None:
                    self.bar.update(self.task, total=1, completed=1)
                else:
                    self.bar.update(self.task, completed=t.total)
                self.bar.stop_task(self.task)
            self.phase = p.phase
            self.task = self.bar.add_task(p.phase, total=work, completed=done or 0, count=count)
            return
        self.bar.update(self.task, total=work, completed=done or 0, count=count)


def quantize_progress(enabled: bool = True, first: str | None = None) -> _QuantProgress:
    """A context manager yielding the progress callback (None when stderr is not a terminal); ``first``: a
    phase shown from the start (what runs before the first event, such as reading the model)."""
    return _QuantProgress(enabled, first)


def _summed(values: Sequence[int], total: int) -> tuple[list[str], str]:
    """Byte counts and their total in the total's unit with two decimals, the rows rounded (largest
    remainder, each within 0.01 of its value) so that the shown rows add up to the shown total."""
    unit, size = next(((u, n) for u, n in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)) if total >= n), ("B", 1))
    scale = 1 if unit == "B" else 100
    exact = [v * scale / size for v in values]
    shown = [int(x) for x in exact]
    target = int(total * scale / size + 0.5)
    for i in sorted(range(len(exact)), key=lambda i: shown[i] - exact[i])[: max(target - sum(shown), 0)]:
        shown[i] += 1

    def fmt(n: int) -> str:
        return f"{n} B" if unit == "B" else f"{n // 100}.{n % 100:02d} {unit}"

    return [fmt(n) for n in shown], fmt(target)


def quantize_summary(result: Any) -> None:
    d = result.to_dict()
    con = out()
    by = f", written by {d['written_by']}" if "written_by" in d else ""
    recipe = f", recipe {d['recipe']}" if d.get("recipe", "uniform") != "uniform" else ""
    table = Table(title=f"{d['model']} → {d['out']} ({d['format']}{recipe}, {d['layout']} layout{by})", title_justify="left")
    for col in ("format", "tensors", "params", "before", "after", "bits/weight"):
        table.add_column(col, justify="left" if col == "format" else "right")
    rows = list(d["by_format"].items())
    extra = d.get("non_tensor")
    if extra and (extra["source_bytes"] or extra["output_bytes"]):  # headers, metadata: the totals hold them
        rows.append((extra["what"], None))
    by = [s or extra for _, s in rows]
    before, before_total = _summed([s["source_bytes"] for s in by], d["source_bytes"])
    after, after_total = _summed([s["output_bytes"] for s in by], d["output_bytes"])
    for (fmt, s), b, a in zip(rows, before, after, strict=True):
        if s is None:
            table.add_row(fmt, "-", "-", b, a, "-")
        else:
            table.add_row(fmt, str(s["tensors"]), f"{s['params']:,}", b, a, f"{s['bits_per_weight']:.3f}")
    table.add_row(
        "[bold]total[/bold]", str(sum(s["tensors"] for s in d["by_format"].values())), f"{d['params']:,}",
        before_total, f"[bold]{after_total}[/bold]", f"{d['bits_per_weight']:.3f}",
    )  # fmt: skip
    con.print(table)
    rate = d["params_per_second"] or 0
    con.print(
        f"{d['seconds']:.1f} s, {rate / 1e6:.1f} M params/s; output files (headers included) "
        f"{d['output_bytes']:,} bytes"
    )
    if d["worst_sqnr"]:
        worst = Table(title="Worst tensors by SQNR (signal-to-quantization-noise, higher is better)", title_justify="left")
        for col in ("tensor", "format", "SQNR dB"):
            worst.add_column(col, justify="right" if col == "SQNR dB" else "left")
        for w in d["worst_sqnr"]:
            worst.add_row(w["name"], w["format"], f"{w['sqnr_db']:.2f}")
        con.print(worst)
    for note in d["notes"]:
        notice(f"note: {note}")


# ---- llmctl chat (issue 3) --------------------------------------------------------------------------
