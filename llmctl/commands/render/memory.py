"""What ``llmctl estimate-memory`` prints: the table per weights format, the fit table, the chart."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from llmctl.commands.render import gib, notice, out


# ---- llmctl estimate-memory -------------------------------------------------------------------------
def memory_report(report: Any) -> None:
    c = report.config
    con = out()
    kinds = c.layer_kinds()
    n_sliding = sum(k == "sliding_attention" for k in kinds)
    attn = f"{c.num_attention_heads} heads, {c.num_key_value_heads} KV heads, head_dim {c.head_dim}"
    if c.is_mla:
        attn = (
            f"MLA (kv_lora_rank {c.kv_lora_rank} + rope {c.qk_rope_head_dim}), {c.num_attention_heads} heads"
        )
    if n_sliding:
        attn += f"; {n_sliding}/{len(kinds)} layers sliding-window ({c.sliding_window})"
    moe = f", {c.num_experts} experts ({c.num_experts_per_tok} active)" if c.num_experts else ""
    con.print(
        f"[bold]{report.model}[/bold]  {c.architecture}, {report.parameters / 1e9:.3f} B parameters{moe}, "
        f"{c.num_hidden_layers} layers, {attn}; stored as {report.stored_format}"
    )
    first = report.estimates[0]
    con.print(
        f"context {first.context} tokens × batch {first.batch}, KV cache {first.kv_dtype} "
        f"({first.kv_layout} layout), tensor parallel {first.tensor_parallel}"
        + (f", recipe {first.recipe}" if first.recipe != "uniform" else "")
        + "; sizes in GiB (2^30 bytes)"
    )
    con.print(
        "attention fused (--flash-attention): no score matrix counted"
        if first.flash_attention
        else "attention unfused: fp32 score matrix counted (see --flash-attention)"
    )
    tp = first.tensor_parallel > 1
    table = Table(title="Memory per weights format" + (" (per GPU)" if tp else ""), title_justify="left")
    table.caption = (
        "bpw: bits per weight; kept: of the weights, tensors left at 16/32 bits (norms, embeddings…)"
    )
    table.caption_justify = "left"
    # every size column is per GPU (weights + KV cache + activ. + overhead = total), but "kept", a part of
    # the weights, is the whole model's
    kept = "kept (all GPUs)" if tp else "kept"
    for col in ("format", "bpw", "weights", kept, "KV cache", "activ.", "overhead", "total"):
        table.add_column(col, justify="left" if col == "format" else "right", no_wrap=True)
    for e in report.estimates:
        table.add_row(
            report.format_label(e.weights_format),
            f"{8 * e.weights_bytes / e.parameters:.2f}" if e.parameters else "-",
            gib(e.per_gpu_weights_bytes),
            gib(e.weights_breakdown.kept_bytes),
            gib(e.per_gpu_kv_cache_bytes),
            gib(e.per_gpu_activation_bytes),
            gib(e.per_gpu_overhead_bytes),
            f"[bold]{gib(e.per_gpu_total_bytes)}[/bold]",
        )
    con.print(table)
    _fit_table(report)
    _memory_chart(report)
    for note in report.notes:
        notice(f"note: {note}")


def _fit_table(report: Any) -> None:
    con = out()
    if report.gpu is not None:
        table = Table(
            title=f"Fit on {report.gpu.name} ({gib(report.gpu.vram_bytes)} GiB)", title_justify="left"
        )
        for col in ("format", "verdict", "headroom", "max context", "max batch"):
            table.add_column(col, justify="left" if col in ("format", "verdict") else "right", no_wrap=True)
        for f in report.fits:
            verdict = "[green]fits[/green]" if f.fits else "[red]does not fit[/red]"
            table.add_row(
                report.format_label(f.weights_format),
                verdict,
                f"{gib(f.headroom_bytes)} GiB",
                f"{f.max_context:,}" if f.max_context else "weights do not fit",
                f"{f.max_batch:,}" if f.max_batch else "-",
            )
        con.print(table)
        return
    formats = [e.weights_format for e in report.estimates]
    table = Table(title="Fits on (single GPU, totals above)", title_justify="left")
    table.add_column("GPU")
    table.add_column("memory", justify="right")
    for f in formats:
        table.add_column(report.format_label(f), justify="center")
    by_gpu: dict[str, dict[str, bool]] = {}
    vram: dict[str, int] = {}
    for f in report.fits:
        by_gpu.setdefault(f.gpu, {})[f.weights_format] = f.fits
        vram[f.gpu] = f.vram_bytes
    for name, verdicts in by_gpu.items():
        table.add_row(
            name,
            f"{gib(vram[name])}",
            *("[green]✓[/green]" if verdicts[f] else "[red]✗[/red]" for f in formats),
        )
    con.print(table)


def _memory_chart(report: Any, width: int = 50) -> None:
    """Total memory against context length, one bar per context and format; │ marks the GPU's memory."""
    con = out()
    contexts = report.curve_contexts
    series = report.curve
    limit = report.budget_bytes  # what the GPU lets a process use (Apple: 75% of unified memory)
    top = max(max(v) for v in series.values())
    if limit:
        top = max(top, limit)
    scale = width / top if top else 0
    con.print(Text("Total memory against context length (GiB)", style="bold"))
    labels = {f: report.format_label(f) for f in series}
    label_w = max(len(v) for v in labels.values())
    for i, ctx in enumerate(contexts):
        for j, (fmt, values) in enumerate(series.items()):
            n = values[i]
            cells = round(n * scale)
            bar = "█" * cells
            line = Text(f"{ctx:>9,} " if j == 0 else " " * 10)
            line.append(f"{labels[fmt]:<{label_w}} ", style="dim")
            if limit:
                mark = round(limit * scale)
                bar = bar.ljust(width)
                colored = Text(bar[:mark], style="green" if n <= limit else "red")
                colored.append("│", style="yellow")
                colored.append(bar[mark:], style="red")
                line.append_text(colored)
            else:
                line.append(bar, style="cyan")
            line.append(f" {gib(n)}")
            con.print(line)
    if limit:
        con.print(Text(f"{'':10}{'':{label_w}} │ = {report.gpu.name} ({gib(limit)} GiB)", style="yellow"))


# ---- llmctl quantize (issue 4) -----------------------------------------------------------------------
