"""GGUF checkpoint -> (ModelConfig, Hugging Face-named float state dict), one torch tensor at a time.

The names and what llama.cpp's converter changed on the way into GGUF (Q/K row permutation, Gemma's norm
offset, tied embeddings) are llmctl.gguf.names's, undone here so the state dict is exactly what the Hugging
Face checkpoint held (up to quantization); the tensor data is llmctl.gguf.reader's, dequantized to float32.

Verified by parity with transformers' own GGUF loading on the bundled SmolLM2 (llama) and Gemma 3 GGUFs
(tests/test_gguf_loader.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.gguf import names as gguf_names

if TYPE_CHECKING:
    import torch

    from llmctl.config import ModelConfig
    from llmctl.gguf.reader import GGUFInfo


def dequantize_tensor(info: GGUFInfo, name: str) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor (a copy; the file stays memory-mapped)."""
    import numpy as np
    import torch

    arr = info.dequantize(name)
    if not arr.flags.writeable:  # a view of the read-only map (F32)
        arr = np.array(arr, copy=True)
    return torch.from_numpy(arr)


def iter_gguf_tensors(info: GGUFInfo, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) one at a time, dequantized and converted back to HF conventions."""
    import torch

    dtype = dtype or torch.float32
    arch = gguf_names.architecture(info)
    cfg = info.config
    names = gguf_names.hf_names(info)
    for t in info.tensors:
        hf = names.get(t.name)
        if hf is None:
            continue
        w = gguf_names.from_gguf_layout(dequantize_tensor(info, t.name), t.name, hf, arch, cfg)
        yield hf, w.to(dtype)
        del w  # the consumer holds the only reference: a loader keeps at most one tensor alive


def hf_shapes(info: GGUFInfo) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of each tensor ``iter_gguf_tensors`` yields, from the tensor table alone
    (no tensor data read)."""
    return {hf: tuple(info.tensor_info(name).shape) for name, hf in gguf_names.hf_names(info).items()}


def load_gguf_state_dict(
    path: str | Path | GGUFInfo, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF model into (config, state dict with Hugging Face names), dequantizing to ``dtype``
    (float32 by default). ``lm_head.weight`` is present only when the file has its own output matrix.
    The whole model is in host memory at once: ``runtime.loader.load_model`` streams instead."""
    from llmctl.gguf.reader import GGUFInfo, read_gguf

    info = path if isinstance(path, GGUFInfo) else read_gguf(path)
    state = dict(iter_gguf_tensors(info, dtype))
    return info.config, state
