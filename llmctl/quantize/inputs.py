"""A quantize source's tensors by Hugging Face name, read without holding the model: the one reader of
safetensors folders and GGUF files for ``llmctl quantize`` (the writer in llmctl.quantize.convert, the
calibration's layer stream in llmctl.quantize.calibrate).

Safetensors are read by name with positioned reads, a row chunk at a time. A GGUF is dequantized tensor by
tensor in file order (llama.cpp writes layer after layer); a tensor read past before it is asked for is
kept until it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmctl.errors import QuantError


@dataclass
class TensorInput:
    """Source tensors by Hugging Face name."""

    infos: list[tuple[str, tuple[int, ...], str, int]]  # (name, shape, dtype, bytes)
    read: Callable[[str, int], Iterator[Any]]  # (name, rows per chunk) -> chunks (rows, cols), source dtype
    tensor: Callable[[str], Any]  # name -> the whole tensor (safetensors: its dtype; GGUF: float32)
    dtype: str  # registry name of the float dtype kept tensors get


def open_input(source: Any) -> TensorInput:
    """The tensors of ``source`` (a resolved llmctl.sources.ModelSource: a folder or a .gguf); QuantError
    for a checkpoint that is not floating point."""
    if source.is_gguf:
        return _gguf_input(source)
    from llmctl.checkpoint import safetensors_files
    from llmctl.quant import safetensors_io

    entries: dict[str, safetensors_io.Entry] = {}
    for f in safetensors_files(source.path):
        entries.update(safetensors_io.index_file(f))
    infos = [
        (n, e.shape, e.dtype, e.nbytes) for n, e in entries.items() if not n.endswith(".rotary_emb.inv_freq")
    ]
    bad = [(n, d) for n, _, d, _ in infos if d not in ("BF16", "F16", "F32")]
    if bad:
        raise QuantError(
            f"{source.path}: tensor {bad[0][0]} is {bad[0][1]}: the checkpoint is already quantized or not "
            "floating point; quantize from the bf16/fp16/fp32 original"
        )

    def entry(name: str) -> Any:
        if name not in entries:
            raise QuantError(f"{source.path}: no tensor {name} in the checkpoint")
        return entries[name]

    def read(name: str, rows: int) -> Iterator[Any]:
        e = entry(name)
        total = math.prod(e.shape) // (e.shape[-1] if e.shape else 1)
        for start in range(0, total, rows):
            yield safetensors_io.read_rows(e, start, min(total, start + rows))

    def tensor(name: str) -> Any:
        e = entry(name)
        return safetensors_io.read_rows(e).reshape(e.shape)

    dtypes = {d for _, _, d, _ in infos}
    kept = "bf16" if "BF16" in dtypes or dtypes == {"F32"} else "fp16"
    torch_dtype = str(source.config.torch_dtype or "").removeprefix("torch.")
    kept = {"bfloat16": "bf16", "float16": "fp16"}.get(torch_dtype, kept)
    return TensorInput(infos, read, tensor, kept)


def _gguf_input(source: Any) -> TensorInput:
    from llmctl.gguf.names import IGNORED_NAMES, gguf_to_hf_name
    from llmctl.runtime.gguf_loader import iter_gguf_tensors

    info = source.gguf
    arch = info.metadata.get("general.architecture")
    infos = []
    for t in info.tensors:
        if t.name in IGNORED_NAMES:
            continue
        hf = gguf_to_hf_name(t.name, arch) or t.name
        infos.append((hf, tuple(t.shape), t.dtype, t.nbytes))
    tensors = iter_gguf_tensors(info)  # validates names; yields in file order, one at a time
    held: dict[str, Any] = {}  # read past, not yet asked for
    last: list[str] = []  # the tensor asked for last, kept for a second read (fp8's absmax pass)

    def tensor(name: str) -> Any:
        while name not in held:
            try:
                hf, w = next(tensors)
            except StopIteration:
                raise QuantError(f"{source.path}: no tensor {name} in the file (or asked for twice)") from None
            held[hf] = w
        if last and last[0] != name:
            held.pop(last[0], None)
        last[:] = [name]
        return held[name]

    def read(name: str, rows: int) -> Iterator[Any]:
        w = tensor(name)
        w2 = w.reshape(-1, w.shape[-1]) if w.dim() else w.reshape(1, 1)
        for start in range(0, w2.shape[0], rows):
            yield w2[start : start + rows]

    return TensorInput(infos, read, tensor, "bf16")
