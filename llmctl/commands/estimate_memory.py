"""`llmctl estimate-memory MODEL`: will it fit? Weights, KV cache, activations and overhead per format."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands import render
from llmctl.commands.render.memory import memory_report


def estimate_memory(
    model: str = typer.Argument(
        ..., help="Folder, config.json, .gguf, hub id org/name[@rev][:FILE.gguf], or bundled name."
    ),
    context: str = typer.Option("4096", "--context", "-c", help="Context length in tokens: 8192, 32k, 128k (k = 1024)."),
    batch: int = typer.Option(1, "--batch", "-b", help="Sequences decoded at once."),
    weights: list[str] = typer.Option(
        None,
        "--weights",
        "-w",
        help="Weights format (repeatable): fp32 fp16 bf16 fp8 int8 int4 nf4, GGUF types "
        "q8_0 q4_0 q4_k …, or mixes q4_k_m q5_k_m …  [default: as stored]",
    ),
    group_size: int = typer.Option(None, "--group-size", "-g", help="Group size for int4/int8/nf4 scales."),
    recipe: str = typer.Option(
        "uniform", "--recipe", help="Which tensors get more bits, as `llmctl quantize --recipe`: uniform, k-m, k-l."
    ),
    kv_dtype: str = typer.Option("f16", "--kv-dtype", help="KV cache dtype: f32 f16 bf16 fp8 q8_0 q4_0."),
    kv_layout: str = typer.Option(
        "windowed",
        "--kv-layout",
        help="windowed: sliding-window layers hold only their window (transformers, "
        "vLLM); llama.cpp: full-size cache on every layer.",
    ),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", "--tp", help="GPUs the model is split over."),
    gpu: list[str] = typer.Option(None, "--gpu", help="Check the fit on this GPU (e.g. 'RTX 4090', H100)."),
    vram: float = typer.Option(None, "--vram", help="Check the fit on this much memory, in GiB."),
    flash_attention: bool = typer.Option(
        False,
        "--flash-attention",
        help="Attention runs fused (FlashAttention, SDPA's flash/memory-efficient kernels, vLLM, llama.cpp "
        "-fa on): no batch × heads × tokens × context fp32 score matrix is counted.  [default: counted]",
    ),
    plot: Path = typer.Option(
        None, "--plot", metavar="FILE", help="Also write the memory-vs-context chart to FILE.csv, .svg or .png."
    ),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Estimate the memory a model needs to run, and whether it fits a GPU."""
    from llmctl.errors import UsageError
    from llmctl.memory import chart
    from llmctl.memory.report import memory_report_for

    if gpu and len(gpu) > 1:
        raise UsageError(f"--gpu given {len(gpu)} times ({', '.join(map(repr, gpu))}); check one GPU per run")
    gpu = gpu[0] if gpu else None
    context = token_count(context, "--context")
    if plot is not None:
        chart.check_path(plot)

    report = memory_report_for(
        model,
        weights_formats=weights or None,
        group_size=group_size,
        context=context,
        batch=batch,
        kv_dtype=kv_dtype,
        kv_layout=kv_layout,
        tensor_parallel=tensor_parallel,
        gpu=gpu,
        vram_gib=vram,
        recipe=recipe,
        flash_attention=flash_attention,
    )
    if plot is not None:
        chart.write(report, plot)
    if json_:
        render.print_json(report.to_dict())
    else:
        memory_report(report)
    if plot is not None:
        render.notice(f"wrote the memory-vs-context chart to {plot}")


def token_count(text: str, flag: str) -> int:
    """``8192``, ``32k`` or ``128K`` (k = 1024 tokens, as model cards count contexts), ``1m`` (1024²)."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1024, "m": 1024**2}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.removeprefix("-").isdigit():  # a negative count is refused by the estimate, with the rule
        from llmctl.errors import UsageError

        raise UsageError(f"{flag} {text!r}: expected a token count such as 8192, 32k or 128k")
    return int(digits) * scale
