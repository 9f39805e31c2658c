"""What `llmctl estimate-memory` shows, computed in one pure function from a resolved model.

``memory_report`` runs the estimate for each weights format, the fit check against one GPU (or the
built-in table) and the memory-vs-context curve. The command renders the result; scripts read the same
data through ``--json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmctl.checkpoint import TensorInfo
from llmctl.config import ModelConfig
from llmctl.errors import UsageError
from llmctl.memory.estimate import (
    KV_DTYPES,
    KV_LAYOUTS,
    Estimate,
    Scenario,
    estimate,
    max_batch_that_fits,
    max_context_that_fits,
)
from llmctl.memory.gpus import GPU, GPUS, find_gpu

GIB = 1024**3


@dataclass
class Fit:
    gpu: str
    vram_bytes: int
    weights_format: str
    fits: bool
    headroom_bytes: int
    # Computed only against a GPU given with --gpu/--vram (None in the verdicts on the built-in table):
    max_context: int | None  # at the requested batch; 0 when the weights alone do not fit
    max_batch: int | None  # at the requested context; 0 when not even one sequence fits


@dataclass
class Report:
    model: str
    config: ModelConfig
    parameters: int
    stored_format: str
    estimates: list[Estimate]
    fits: list[Fit]
    gpu: GPU | None
    curve_contexts: list[int]
    curve: dict[str, list[int]]  # weights format -> per-GPU total bytes per curve context
    notes: list[str] = field(default_factory=list)

    @property
    def budget_bytes(self) -> int | None:
        """The memory the given GPU lets a process use (the line on the chart); None without --gpu/--vram."""
        return self.gpu.usable_bytes if self.gpu is not None else None

    def format_label(self, weights_format: str) -> str:
        """How tables and charts name a weights format: the stored one as e.g. ``q4_k_m (stored)``."""
        return f"{self.stored_format} (stored)" if weights_format == "stored" else weights_format

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "parameters": self.parameters,
            "architecture": self.config.architecture,
            "stored_format": self.stored_format,
            "estimates": [e.to_dict() for e in self.estimates],
            "fits": [f.__dict__ for f in self.fits],
            "curve": {
                "contexts": self.curve_contexts,
                "total_bytes": self.curve,
                "gpu": self.gpu.name if self.gpu is not None else None,
                "gpu_bytes": self.budget_bytes,
            },
            "notes": self.notes,
        }


def validate_options(  # the command's own option names in the messages
    *, context: int, batch: int, group_size: int | None, kv_dtype: str, kv_layout: str, tensor_parallel: int,
    vram_gib: float | None, gpu: str | None,
) -> None:  # fmt: skip
    if context <= 0:
        raise UsageError(f"--context must be a positive number of tokens, got {context}")
    if batch <= 0:
        raise UsageError(f"--batch must be a positive integer, got {batch}")
    if group_size is not None and group_size <= 0:
        raise UsageError(f"--group-size must be a positive integer, got {group_size}")
    if kv_dtype not in KV_DTYPES:
        raise UsageError(f"unknown --kv-dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if kv_layout not in KV_LAYOUTS:
        raise UsageError(f"unknown --kv-layout {kv_layout!r}; choose one of {', '.join(KV_LAYOUTS)}")
    if tensor_parallel <= 0:
        raise UsageError(f"--tensor-parallel must be a positive integer, got {tensor_parallel}")
    if vram_gib is not None and vram_gib <= 0:
        raise UsageError(f"--vram must be a positive number of GiB, got {vram_gib}")
    if vram_gib is not None and gpu is not None:
        raise UsageError("give either --gpu or --vram, not both")


def curve_contexts(max_context: int) -> list[int]:
    out, c = [], 512
    top = max(max_context, 512)
    while c < top:
        out.append(c)
        c *= 2
    out.append(top)
    return out


def memory_report(
    model: str,
    config: ModelConfig,
    tensors: list[TensorInfo] | None,
    *,
    stored_format: str,
    weights_formats: list[str] | None = None,
    group_size: int | None = None,
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str = "f16",
    kv_layout: str = "windowed",
    tensor_parallel: int = 1,
    gpu: str | None = None,
    vram_gib: float | None = None,
    recipe: str = "uniform",
    flash_attention: bool = False,
) -> Report:
    validate_options(
        context=context, batch=batch, group_size=group_size, kv_dtype=kv_dtype, kv_layout=kv_layout,
        tensor_parallel=tensor_parallel, vram_gib=vram_gib, gpu=gpu,
    )  # fmt: skip
    formats: list[str | None] = (
        list(dict.fromkeys(f.lower() for f in weights_formats)) if weights_formats else [None]
    )
    if recipe != "uniform" and weights_formats is None:
        raise UsageError(f"--recipe {recipe} needs --weights: the format the recipe starts from (e.g. -w int4)")
    base = Scenario(
        group_size=group_size, recipe=recipe, context=context, batch=batch, kv_dtype=kv_dtype, kv_layout=kv_layout,
        tensor_parallel=tensor_parallel, flash_attention=flash_attention,
    )  # fmt: skip
    scenarios = [dataclasses.replace(base, weights_format=f) for f in formats]
    estimates = [estimate(config, sc, tensors=tensors) for sc in scenarios]

    target: GPU | None = None
    if gpu is not None:
        target = find_gpu(gpu)
    elif vram_gib is not None:
        target = GPU(name=f"{vram_gib:g} GiB", vram_bytes=int(vram_gib * GIB))
    fits: list[Fit] = []
    for gpu_ in [target] if target else GPUS:
        for sc, est in zip(scenarios, estimates, strict=True):
            budget = gpu_.usable_bytes
            fits.append(
                Fit(
                    gpu=gpu_.name,
                    vram_bytes=budget,
                    weights_format=est.weights_format,
                    fits=est.per_gpu_total_bytes <= budget,
                    headroom_bytes=budget - est.per_gpu_total_bytes,
                    max_context=max_context_that_fits(config, sc, vram_bytes=budget, tensors=tensors)
                    if target
                    else None,
                    max_batch=max_batch_that_fits(config, sc, vram_bytes=budget, tensors=tensors) if target else None,
                )
            )
    contexts = curve_contexts(max(context, config.max_position_embeddings))
    curve = {
        est.weights_format: [
            estimate(config, sc, tensors=tensors, weights=est.weights_breakdown, context=c).per_gpu_total_bytes
            for c in contexts
        ]
        for sc, est in zip(scenarios, estimates, strict=True)
    }
    return Report(
        model=model,
        config=config,
        parameters=estimates[0].parameters,
        stored_format=stored_format,
        estimates=estimates,
        fits=fits,
        gpu=target,
        curve_contexts=contexts,
        curve=curve,
    )


def gguf_file_type_name(file_type: int) -> str | None:
    """llama.cpp's name of a ``general.file_type`` (e.g. 15 -> "q4_k_m"); None for a number it does not know."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return None


def stored_format(
    tensors: list[TensorInfo] | None, config: ModelConfig, gguf_file_type: int | None = None
) -> str:
    """How the checkpoint is stored: a GGUF's declared file type (e.g. q4_k_m), else its dominant tensor
    type by bytes, else the config's torch_dtype."""
    if gguf_file_type is not None and (name := gguf_file_type_name(gguf_file_type)) is not None:
        return name
    if not tensors:
        return (
            (config.torch_dtype or "bfloat16")
            .replace("bfloat16", "bf16")
            .replace("float16", "fp16")
            .replace("float32", "fp32")
        )
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.dtype] = by_type.get(t.dtype, 0) + t.nbytes
    main = max(by_type, key=by_type.__getitem__)
    return {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(main, main.lower())


def memory_report_for(spec: str, **options: Any) -> Report:
    """Resolve MODEL (configs and headers only, no weights downloaded) and build its report."""
    from llmctl.sources import resolve

    source = resolve(spec, need_weights=False, allow_config=True)
    config = source.config
    tensors = source.tensors()
    file_type = source.gguf.metadata.get("general.file_type") if source.is_gguf else None
    stored = stored_format(tensors, config, file_type if isinstance(file_type, int) else None)
    report = memory_report(source.display, config, tensors, stored_format=stored, **options)
    report.notes = [*source.notes, *report.notes]
    return report
