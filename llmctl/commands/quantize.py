"""`llmctl quantize MODEL --format F`: quantize a model to fp8/int8/int4/nf4 (or convert to bf16/fp16/fp32)
in a layout other engines load (compressed-tensors, bitsandbytes, Hugging Face) or llmctl's own."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands import render


def quantize(
    model: str = typer.Argument(None, help="Folder, .gguf, hub id org/name[@rev], or bundled name."),
    format_: str = typer.Option(
        ..., "--format", "-f", help="fp8, int8, int4, int4-asym, nf4, nf4-dq, or bf16/fp16/fp32 (conversion)."
    ),
    group_size: str = typer.Option(
        None,
        "--group-size",
        "-g",
        help="Values per scale: a divisor of the row (int4: 128), 'channel' (one per row; int8's default), "
        "'tensor' (fp8); NF4 block size (64).",
    ),
    symmetric: bool = typer.Option(
        None, "--symmetric/--asymmetric", help="int4 with or without zero-points [default: symmetric]."
    ),
    fp8: str = typer.Option("e4m3", "--fp8", help="FP8 variant: e4m3 or e5m2 (llmctl layout)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder [default: ./<model>-<format>]."),
    layout: str = typer.Option(
        "auto", "--layout", help="auto, compressed-tensors, bnb, hf or llmctl (see docs/formats.md)."
    ),
    keep: list[str] = typer.Option(None, "--keep", help="Regex: matching tensors stay unquantized (repeatable)."),
    override: list[str] = typer.Option(
        None, "--override", help="PATTERN=FORMAT: matching tensors get FORMAT, e.g. 'down_proj=int8' (repeatable)."
    ),
    skip_indivisible: bool = typer.Option(
        False, "--skip-indivisible", help="Keep tensors whose rows the group size does not divide."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exact output size; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Quantize a model's linear weights and write a folder that vLLM, transformers and llmctl load."""
    from llmctl.quant.convert import check_out, default_out, make_plan, run_plan

    plan = make_plan(
        model,
        format_,
        group_size=group_size,
        symmetric=symmetric,
        layout=layout,
        keep=keep or (),
        overrides=override or (),
        skip_indivisible=skip_indivisible,
        fp8=fp8,
    )
    target = out or default_out(plan)
    if dry_run:
        if json_:
            render.print_json({"dry_run": True, "out": str(target), **plan.to_dict()})
        else:
            render.quantize_plan(plan, target)
        return
    check_out(target, force)
    with render.quantize_progress(enabled=not json_) as progress:
        result = run_plan(plan, target, force=force, progress=progress)
    if json_:
        render.print_json(result.to_dict())
    else:
        render.quantize_summary(result)
