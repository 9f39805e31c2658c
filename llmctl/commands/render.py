"""All terminal output of llmctl: the only module that imports rich.

Tables, charts and JSON go to stdout; notices go to stderr so that ``--json`` output stays parseable.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

GIB = 1024**3
_out: Console | None = None
_err: Console | None = None


def out() -> Console:
    global _out
    if _out is None:
        _out = Console(highlight=False, soft_wrap=False)
    return _out


def err() -> Console:
    global _err
    if _err is None:
        _err = Console(stderr=True, highlight=False)
    return _err


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f}"


def human_bytes(n: int | float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def notice(message: str) -> None:
    err().print(Text(message, style="dim"))


# ---- llmctl models ---------------------------------------------------------------------------------
def models_table(entries: Sequence[Any]) -> None:
    table = Table(title="Models available to llmctl", title_justify="left")
    for col in ("name", "kind", "status", "size", "path"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(
            e.name, e.kind, e.status, human_bytes(e.size_bytes) if e.size_bytes else "-", e.path or "-"
        )
    out().print(table)
    if not entries:
        out().print("no models found")


def plain(text: str) -> None:
    """Text exactly as given (a chat template): no markup, no wrapping."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


# ---- llmctl show ---------------------------------------------------------------------------------
def model_info(info: dict[str, Any]) -> None:
    m, a, w, q, t = info["model"], info["architecture"], info["weights"], info["quantization"], info["tokenizer"]
    rows: list[tuple[str, str]] = [
        ("model", f"{m['name']} ({m['kind']}{', ' + m['title'] if m['title'] else ''})"),
        ("path", m["path"]),
        ("size on disk", human_bytes(m["size_bytes"])),
        ("family", a["family"]),
        ("parameters", _count(a["parameters"])),
        ("layers", str(a["layers"])),
        ("hidden size", f"{a['hidden_size']} (MLP {a['intermediate_size']})"),
        ("attention heads", f"{a['attention_heads']} ({a['kv_heads']} KV heads, head dim {a['head_dim']})"),
        ("context length", f"{a['context_length']:,}"),
        ("vocabulary", f"{a['vocab_size']:,}"),
        ("rope theta", f"{a['rope_theta']:g}" + (f", scaling {a['rope_scaling'].get('rope_type', a['rope_scaling'].get('type', '?'))}" if a["rope_scaling"] else "")),
        ("sliding window", f"{a['sliding_window']:,} tokens" if a["sliding_window"] else "none"),
        ("tied embeddings", "yes" if a["tied_embeddings"] else "no"),
        ("weights stored as", w["stored"]),
    ]  # fmt: skip
    if q:
        rows.append(("quantization", ", ".join(f"{k} {v}" for k, v in q.items() if v is not None)))
    template = f"yes ({t['chat_template_chars']:,} characters; --template prints it)" if t["chat_template"] else "none"
    rows += [("chat template", template), ("chat mode", t["mode"]), ("license", info["license"] or "not stated")]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    out().print(table)
    if w["by_type"]:
        types = Table(title="tensors by stored type", title_justify="left")
        for col in ("type", "tensors", "size"):
            types.add_column(col, justify="left" if col == "type" else "right")
        for name, d in w["by_type"].items():
            types.add_row(name, str(d["tensors"]), human_bytes(d["bytes"]))
        out().print(types)


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit} ({n:,})"
    return f"{n:,}"


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


class _Bar:
    """A transient rich progress bar on stderr, shown only on a terminal. ``with`` yields the subclass's
    ``update`` callback, or None when nothing is shown."""

    def __init__(self, enabled: bool, *columns: Any) -> None:
        from rich.progress import Progress

        self.enabled = enabled and err().is_terminal
        self.bar = Progress(*columns, console=err(), transient=True)
        self.task: Any = None

    def __enter__(self) -> Any:
        if self.enabled:
            self.bar.start()
        return self.update if self.enabled else None

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.stop()

    def update(self, *args: Any) -> None:
        raise NotImplementedError


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


_interrupt_said = False


def interrupted(message: str) -> None:
    """What a Ctrl-C left behind: one line on stderr, never wrapped (the CLI adds none of its own after it)."""
    global _interrupt_said
    _interrupt_said = True
    err().print(Text(message, style="yellow"), soft_wrap=True)


def interrupt_said() -> bool:
    return _interrupt_said


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
PROMPT = ">>> "
CONTINUATION = "... "


def reply_piece(text: str) -> None:
    """Streamed reply text: written as is (no markup) and flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def reply_end(reply: Any, *, stats: bool) -> None:
    """End the streamed reply's line; in the REPL add a dim line with tokens, TTFT and tokens/s."""
    if not reply.text.endswith("\n"):  # an empty reply too: the shell prompt starts on a line of its own
        sys.stdout.write("\n")
    sys.stdout.flush()
    if reply.finish_reason == "interrupted":
        interrupted("[interrupted]")
    elif reply.finish_reason in ("length", "context") and stats:
        why = "--max-tokens reached" if reply.finish_reason == "length" else "context window full"
        err().print(Text(f"[reply cut: {why}]", style="yellow"))
    if not stats:
        return
    rate = f"{reply.decode_tok_s:.1f} tok/s" if reply.decode_tok_s else "- tok/s"
    line = (
        f"{reply.completion_tokens} tokens · TTFT {reply.ttft_s:.2f} s · {rate} · "
        f"prefilled {reply.prefilled_tokens}/{reply.prompt_tokens} · context {reply.context_used}/{reply.context_size}"
    )
    out().print(Text(line, style="dim"))


def chat_banner(commands: dict[str, str]) -> None:
    chat_notice('type a message; """ starts and ends a multi-line one, a trailing \\ continues a line; /help lists commands')


def chat_help(commands: dict[str, str]) -> None:
    width = max(map(len, commands))
    for cmd, what in commands.items():
        out().print(Text(f"{cmd:<{width}}  {what}"))
    out().print(
        Text('multi-line: """ on a line of its own starts and ends a block; a line ending in \\ continues; '
             "Ctrl-C stops a reply; //text sends text starting with /", style="dim")
    )  # fmt: skip


def chat_options(options: dict[str, Any], seed: int) -> None:
    for k, v in options.items():
        shown = f"{v!r}" if k != "seed" or v is not None else f"random ({seed} this session)"
        out().print(Text(f"{k:<18} {shown}"))


def chat_stats(stats: dict[str, Any]) -> None:
    kv = stats["kv_cache_bytes"]
    rows = [
        ("backend", stats["backend"]),
        ("template", stats["template"]),
        ("turns in context", str(stats["turns"])),
        ("context", f"{stats['context_used']} / {stats['context_size']} tokens"
                    + (f" ({stats['context_pending']} to prefill with the next message)" if stats.get("context_pending") else "")),
        ("KV cache", human_bytes(kv) if kv is not None else "held by llama.cpp"),
        ("replies", str(stats["replies"])),
        ("tokens generated", str(stats["generated_tokens"])),
        ("tokens prefilled", str(stats["prefilled_tokens"])),
        ("seed", str(stats["seed"])),
    ]
    last = stats["last"]
    if last:
        rate = f"{last['tokens_per_s']:.1f} tok/s" if last["tokens_per_s"] else "-"
        rows.append(("last reply", f"{last['completion_tokens']} tokens, TTFT {last['ttft_s']:.2f} s, {rate}, "
                                   f"{last['finish_reason']}"))  # fmt: skip
    for k, v in rows:
        out().print(Text(f"{k:<17} {v}"))


def chat_notice(message: str) -> None:
    """A dim line on stderr, never wrapped (so that tools reading stderr see one line per notice)."""
    err().print(Text(message, style="dim"), soft_wrap=True)


def chat_error(message: str) -> None:
    err().print(Text("error: " + " ".join(message.split()), style="red"), soft_wrap=True)


def chat_bye() -> None:
    chat_notice("bye")


# ---- llmctl serve -----------------------------------------------------------------------------------
def serve_started(
    backend_line: str, *, url: str, model: str, chat_mode: str, auth: bool, max_queue: int
) -> None:
    """What is served where, on stderr (the URL line first-class: scripts read it for --port 0)."""
    chat_notice(backend_line)
    chat_notice(
        f"chat requests: {chat_mode}; one generation at a time, up to {max_queue} waiting; "
        + ("API key required" if auth else "no API key")
    )
    err().print(Text(f"serving {model} at {url} (OpenAI API; Ctrl-C stops)"), soft_wrap=True)


# ---- llmctl eval (issue 5) ---------------------------------------------------------------------------
class ScoringEta:
    """Rate and time left while scoring, measured from the end of the first forward on: the first one
    carries the warm-up, and the windows of one batched forward arrive at once (rates taken across them
    are meaningless). Updates closer than ``burst`` seconds to the previous one, within ``settle`` seconds
    of the first, count as that first forward. ``now`` is passed in (monotonic seconds)."""

    def __init__(self, burst: float = 0.05, settle: float = 1.0) -> None:
        self.burst, self.settle = burst, settle
        self.first: float | None = None
        self.anchor = (0.0, 0)  # (time, tokens done) the rate is measured from
        self.last = 0.0
        self.settled = False

    def update(self, done: int, total: int, now: float) -> tuple[float, float] | None:
        """(tokens per second, seconds left), or None while there is nothing to measure yet."""
        if self.first is None:
            self.first, self.anchor, self.last = now, (now, done), now
            return None
        if not self.settled and now - self.last < self.burst and now - self.first < self.settle:
            self.anchor = (now, done)  # still the first forward's windows
        else:
            self.settled = True
        self.last = now
        t0, d0 = self.anchor
        if not self.settled or done <= d0 or now <= t0:
            return None
        rate = (done - d0) / (now - t0)
        return rate, (total - done) / rate


class _EvalProgress(_Bar):
    """One line per step of ``evaluate`` (tokenizing, loading each model, scoring, saving) on stderr, only on
    a terminal: a spinner and the time each step took; scoring has a bar, tokens fed, rate and ETA."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

        class ScoringBar(BarColumn):  # the other steps have no measure of how far they are
            def render(self, task: Any) -> Any:
                return super().render(task) if task.fields.get("bar") else Text("")

        super().__init__(
            enabled,
            SpinnerColumn(finished_text="[green]✓[/green]"),
            TextColumn("{task.description}"),
            ScoringBar(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
        )
        self.what: str | None = None

    def update(self, e: Any) -> None:
        import time

        if e.what != self.what:
            self._finish()
            scoring = e.phase == "score"
            self.task = self.bar.add_task(e.what, total=e.total if scoring else None, count="", eta="", bar=scoring)
            self.what, self.eta = e.what, ScoringEta()
            if scoring:
                self.bar.update(self.task, count=f"0/{e.total:,} tokens", eta="ETA after the first forward")
            return
        if e.phase == "score":
            measured = self.eta.update(e.done, e.total, time.monotonic())
            eta = "ETA after the first forward"
            if measured is not None:
                rate, left = measured
                eta = f"{rate:,.0f} tok/s, ETA {int(left) // 60}:{int(left) % 60:02d}"
            self.bar.update(self.task, completed=e.done, count=f"{e.done:,}/{e.total:,} tokens", eta=eta)

    def _finish(self) -> None:
        if self.task is not None:
            self.bar.update(self.task, total=1, completed=1, eta="")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._finish()
        super().__exit__(*exc)


def eval_progress(enabled: bool = True) -> _EvalProgress:
    """A context manager yielding the progress callback for ``evaluate`` (None when stderr is not a
    terminal)."""
    return _EvalProgress(enabled)


def _documents(r: Any) -> str:
    n = f"{r.documents} document{'s' * (r.documents != 1)}"
    if r.documents_in_data <= r.documents:
        return n
    return f"{n} of {r.documents_in_data}" + (" scored" if r.protocol == "documents" else " read")


def eval_report(r: Any) -> None:
    con = out()
    settings = f"context {r.context}" + (f", stride {r.stride}" if r.stride is not None else "")
    con.print(
        f"[bold]{r.model}[/bold] on {r.data} ({_documents(r)}); protocol "
        f"{r.protocol} ({settings}), {r.windows} windows; {r.backend} backend, {r.device}"
    )
    table = Table(title="Perplexity", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("[bold]perplexity[/bold]", f"[bold]{r.perplexity:.4f} ± {r.stderr:.4f}[/bold]")
    table.add_row("mean nll (nats/token)", f"{r.nll:.5f}")
    if r.word_perplexity is not None:
        table.add_row("word perplexity", f"{r.word_perplexity:.4f} ({r.words:,} words)")
        table.add_row("byte perplexity", f"{r.byte_perplexity:.5f} ({r.bytes:,} bytes)")
        table.add_row("bits per byte", f"{r.bits_per_byte:.5f}")
    table.add_row("tokens scored", f"{r.tokens:,}")
    table.add_row("tokens through the model", f"{r.tokens_fed:,}")
    table.add_row("speed", f"{r.tokens_per_second:,.1f} tok/s ({r.scored_per_second:,.1f} scored tok/s)")
    table.add_row("elapsed", f"{r.elapsed_s:.2f} s (+ {r.load_s:.2f} s loading)")
    con.print(table)
    if r.kl is not None:
        k = r.kl
        kl = Table(title=f"Against the baseline {r.baseline}", title_justify="left")
        kl.add_column("measure")
        kl.add_column("value", justify="right")
        kl.add_row("[bold]mean KL divergence[/bold]", f"[bold]{k.mean:.6f} ± {k.mean_stderr:.6f}[/bold]")
        kl.add_row("median / 90% / 99% / max KLD", f"{k.median:.6f} / {k.p90:.6f} / {k.p99:.6f} / {k.maximum:.6f}")
        kl.add_row("PPL(base)", f"{k.ppl_base:.4f} ± {k.ppl_base_stderr:.4f}")
        kl.add_row("PPL − PPL(base)", f"{k.delta_ppl:+.4f} ± {k.delta_ppl_stderr:.4f}")
        kl.add_row("ln(PPL / PPL(base))", f"{k.ln_ppl_ratio:+.6f} ± {k.ln_ppl_ratio_stderr:.6f}")
        kl.add_row("same top-1 token", f"{100 * k.same_top:.3f} ± {100 * k.same_top_stderr:.3f} %")
        kl.add_row("mean Δp (correct token)", f"{100 * k.delta_p_mean:+.3f} ± {100 * k.delta_p_stderr:.3f} %")
        kl.add_row("median Δp / RMS Δp", f"{100 * k.delta_p_median:+.3f} % / {100 * k.delta_p_rms:.3f} %")
        con.print(kl)
    if r.saved_logits:
        con.print(f"saved the top-k log-probabilities to {r.saved_logits} (use it with --baseline-logits)")
    for note in r.notes:
        notice(f"note: {note}")
