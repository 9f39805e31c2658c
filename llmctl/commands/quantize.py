"""`llmctl quantize MODEL --format F`: quantize a model to fp8/int8/int4/nf4 (or convert to bf16/fp16/fp32)
in a layout other engines load (compressed-tensors, bitsandbytes, Hugging Face) or llmctl's own; or, with
``--out X.gguf`` / ``--layout gguf``, to a GGUF file llama.cpp loads (llmctl.quantize.gguf_out)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from llmctl.commands import render
from llmctl.commands.render.quantize import gguf_plan, quantize_plan, quantize_progress, quantize_summary
from llmctl.errors import UsageError


def quantize(
    model: str = typer.Argument(None, help="Folder, .gguf, hub id org/name[@rev][:FILE.gguf], or bundled name."),
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
    method: str = typer.Option(
        None,
        "--method",
        help="Scales: rtn (round to nearest), search (per-group scale search) or gptq (int4/int8 with "
        "--calibration: GPTQ's error compensation) [default: search for int4/int8, rtn for nf4/fp8; search, "
        "weighted by the statistics, with --calibration].",
    ),
    gptq_damp: float = typer.Option(
        None, "--gptq-damp", help="--method gptq: damping, a fraction of the Hessian's mean diagonal [default: 0.01]."
    ),
    act_order: bool = typer.Option(
        None,
        "--act-order/--no-act-order",
        help="--method gptq: quantize columns by decreasing activation energy (static groups) [default: off].",
    ),
    calibration: str = typer.Option(
        None,
        "--calibration",
        help="Text to run the model on (file, folder, sotu:…, shakespeare:…): its activation statistics weigh "
        "the int4/int8 scale search, or become llama.cpp's importance matrix for GGUF output.",
    ),
    calibration_tokens: int = typer.Option(
        None, "--calibration-tokens", help="Tokens of --calibration text to run [default: 4096]."
    ),
    recipe: str = typer.Option(
        "uniform",
        "--recipe",
        help="Which tensors get more bits: uniform; k-m (like Q4_K_M: attention q/k/v and down_proj one "
        "format up in a half of the layers, untied lm_head too); k-l (in every layer). See docs/formats.md.",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder [default: ./<model>-<format>]."),
    layout: str = typer.Option(
        "auto", "--layout", help="auto, compressed-tensors, bnb, hf, llmctl or gguf (see docs/formats.md)."
    ),
    keep: list[str] = typer.Option(None, "--keep", help="Regex: matching tensors stay unquantized (repeatable)."),
    override: list[str] = typer.Option(
        None, "--override", help="PATTERN=FORMAT: matching tensors get FORMAT, e.g. 'down_proj=int8' (repeatable)."
    ),
    skip_indivisible: bool = typer.Option(
        False, "--skip-indivisible", help="Keep tensors whose rows the group size does not divide."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exact output size; write nothing."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="--dry-run: one row per tensor (default: one per kind)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    by: str = typer.Option(
        "auto", "--by", help="GGUF q8_0/q4_0/q4_1/q5_0/q5_1: auto (llmctl writes them) or llama.cpp (its mix)."
    ),
    threads: int = typer.Option(None, "--threads", "-t", help="Threads for llama.cpp's quantizer (GGUF mixes)."),
    pure: bool = typer.Option(
        False,
        "--pure",
        help="GGUF q8_0/q4_0/q4_1/q5_0/q5_1: every 2-D tensor in the type instead of llama.cpp's mix "
        "(which keeps the output tensor at q6_k / q8_0), as llama-quantize --pure.",
    ),
) -> None:
    """Quantize a model's linear weights and write a folder that vLLM, transformers and llmctl load, or a
    GGUF file (--out X.gguf) that llama.cpp loads."""
    if model is None:
        from llmctl.sources import DEFAULT_MODEL

        render.notice(f"no MODEL given: quantizing the bundled {DEFAULT_MODEL}")
    if layout == "gguf" or (out is not None and out.suffix == ".gguf"):
        given = {"--group-size": group_size, "--symmetric/--asymmetric": symmetric, "--keep": keep,
                 "--skip-indivisible": skip_indivisible or None, "--method": method, "--gptq-damp": gptq_damp,
                 "--act-order/--no-act-order": act_order}  # fmt: skip
        unused = [k for k, v in given.items() if v]
        if recipe != "uniform":
            raise UsageError(
                "--recipe applies to llmctl's formats; for GGUF output choose a llama.cpp mix such as "
                "q4_k_m, which carries its own per-tensor rules"
            )
        if unused:
            verb = "does" if len(unused) == 1 else "do"
            raise UsageError(f"{', '.join(unused)} {verb} not apply to GGUF output (its types fix their blocks)")
        return _quantize_gguf(
            model, format_, out, by, threads, dry_run, force, json_, override or (), calibration, calibration_tokens,
            pure, verbose,
        )  # fmt: skip
    if by != "auto" or threads is not None:
        raise UsageError("--by and --threads apply to GGUF output only (--out X.gguf)")
    if pure:
        raise UsageError(
            "--pure applies to GGUF output (--out X.gguf) of q8_0, q4_0, q4_1, q5_0, q5_1; drop it for a folder"
        )
    from llmctl.quantize.convert import check_out, default_out, run_plan
    from llmctl.quantize.plan import make_plan

    if calibration is not None and not dry_run:
        _prefetch_calibration(model, calibration, calibration_tokens)

    with _interruptible() as output, quantize_progress(
        enabled=not json_, first=f"reading {model or 'the bundled model'}"
    ) as progress:
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
            method=method,
            recipe=recipe,
            calibration=calibration,
            calibration_tokens=calibration_tokens,
            gptq_damp=gptq_damp,
            act_order=act_order,
        )
        target = out or default_out(plan)
        if not dry_run:
            output.watch(target)
            check_out(target, force)
            result = run_plan(plan, target, force=force, progress=progress)
    if dry_run:
        if json_:
            render.print_json({"dry_run": True, "out": str(target), **plan.to_dict()})
        else:
            quantize_plan(plan, target, verbose=verbose)
        return
    _remember(target, format_, model)
    if json_:
        render.print_json(result.to_dict())
    else:
        quantize_summary(result)


def _prefetch_calibration(model: str | None, data: str, tokens: int | None) -> None:
    """Tokenize the calibration text in a child process while the plan is made (torch imported, headers
    read); anything wrong with the arguments is left for the plan to report."""
    from llmctl.quantize.calibrate import DEFAULT_TOKENS, prefetch_windows
    from llmctl.sources import resolve

    tokens = DEFAULT_TOKENS if tokens is None else tokens
    if tokens < 2:
        return
    try:
        source = resolve(model)
    except Exception:  # the plan reports it
        return
    prefetch_windows(source.path, data, tokens)


def _quantize_gguf(
    model: str | None,
    fmt: str,
    out: Path | None,
    by: str,
    threads: int | None,
    dry_run: bool,
    force: bool,
    json_: bool,
    overrides: tuple[str, ...] | list[str],
    calibration: str | None,
    calibration_tokens: int | None,
    pure: bool = False,
    verbose: bool = False,
) -> None:
    from llmctl.quantize.gguf_out import gguf_request, plan_gguf, write_gguf
    from llmctl.quantize.plan import calibration_request
    from llmctl.sources import resolve

    if by not in ("auto", "llama.cpp"):
        raise UsageError(f"--by must be auto or llama.cpp, got {by!r}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    calibrate = calibration_request(calibration, calibration_tokens, "search")
    name, _ = gguf_request(fmt, by, pure, calibrate)
    source = resolve(model)
    if out is None:
        out = Path(f"{source.out_stem}-{name}.gguf")
    if dry_run:
        plan = plan_gguf(source, fmt, by, overrides, calibrate, pure)
        if json_:
            render.print_json({"dry_run": True, "out": str(out), **plan})
        else:
            gguf_plan(plan, out, verbose=verbose)
        return
    with _interruptible() as output, quantize_progress(
        enabled=not json_, first=f"reading {source.display}"
    ) as progress:
        output.watch(out)
        result = write_gguf(source, out, fmt, by=by, pure=pure, force=force, threads=threads, progress=progress,
                            overrides=overrides, calibration=calibrate)  # fmt: skip
    _remember(out, fmt, source.display)
    if json_:
        render.print_json(result.to_dict())
    else:
        quantize_summary(result)


class _Output:
    """The output path, once known, and what was there before the run (inode, mtime), for ``_interruptible``."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.before: tuple[int, int] | None = None

    def watch(self, path: Path) -> None:
        self.path, self.before = path, _identity(path)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextmanager
def _interruptible() -> Iterator[_Output]:
    """Ctrl-C: one line saying what is on disk (the run removes its partial output; an output it replaces is
    the old one, untouched, or the new one, complete), then exit code 130. Entered before the progress bar,
    so the bar is gone when the line prints."""
    output = _Output()
    try:
        yield output
    except KeyboardInterrupt:
        now = _identity(output.path) if output.path is not None else None
        if now is not None and now != output.before:
            render.interrupted(f"interrupted after the output was complete: {output.path} is written")
        elif now is not None:
            render.interrupted(f"interrupted: nothing written (the partial output was removed); {output.path} is unchanged")
        elif output.path is not None:
            render.interrupted("interrupted: nothing written (the partial output was removed)")
        else:  # before the run began writing
            render.interrupted("interrupted: nothing written")
        raise typer.Exit(130) from None


def _remember(out: Path, fmt: str, source: str | None) -> None:
    """Note the output for `llmctl models` (best-effort: an unwritable cache never fails the quantize)."""
    from llmctl.outputs import remember
    from llmctl.sources import DEFAULT_MODEL

    remember(out, fmt, source or DEFAULT_MODEL)
