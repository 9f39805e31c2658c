"""Write a GGUF file from a ``GGUFSource``, tensor by tensor, each in the type it is given.

A ``GGUFSource`` is what the writer reads: a GGUF architecture, a function writing the metadata, the tensors'
GGUF names and shapes, and a reader yielding them as fp32 numpy arrays in that order. ``file_source`` makes
one from a GGUF file (its metadata copied key by key, ``llmctl.gguf.metadata.copy_metadata``); a Hugging
Face folder's (read through llmctl.quantize.inputs) is llmctl.quantize.gguf_source's.

``write_file`` writes the header, the metadata (with ``general.file_type`` and ``general.quantized_by``), the
tensor infos and then each tensor's bytes as it is read, with gguf-py's ``GGUFWriter``, measuring the error
each type adds (``sqnr_db``). How an fp32 tensor becomes its type's bytes is the caller's ``encode``:
gguf-py's quantizers or ggml's C quantizer, chosen in llmctl.quantize.gguf_out, the layer that may call
llama.cpp's library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.gguf import metadata

if TYPE_CHECKING:
    import numpy as np

    from llmctl.gguf.reader import GGUFInfo


@dataclass
class GGUFSource:
    """What the writer reads from a source (see the module doc): a GGUF file or a folder."""

    arch: str
    add_metadata: Callable[[Any], None]  # writes every key but general.file_type / general.quantized_by
    tensors: list[tuple[str, tuple[int, ...], int, str]]  # (GGUF name, numpy shape (rows last), bytes, dtype)
    read: Callable[[], Iterator[Any]]  # each tensor as fp32 numpy in that shape, in that order
    config: Any = None
    notes: list[str] = field(default_factory=list)


@dataclass
class GGUFTensor:
    """One written tensor: its type, values, bytes in the source and in the output, and the error its type
    added (None: not quantized, exact, or not measured)."""

    name: str
    format: str
    params: int
    src_bytes: int
    out_bytes: int
    sqnr_db: float | None


def file_source(info: GGUFInfo) -> GGUFSource:
    """Tensors and metadata from llmctl's reader (llmctl.gguf.reader: validated, memory-mapped; it keeps each
    value's GGUF type, and a 2M-token vocabulary costs its strings, not gguf-py's per-field arrays)."""
    tensors = [(t.name, tuple(t.shape), t.nbytes, t.dtype) for t in info.tensors]  # numpy order: rows last

    def read() -> Iterator[Any]:
        for name, _, _, _ in tensors:
            yield info.dequantize(name)

    arch = info.metadata["general.architecture"]
    return GGUFSource(arch, lambda w: metadata.copy_metadata(info, w), tensors, read, info.config)


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB from the sums of squares (inf when exact)."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else 0.0


def write_file(
    src: GGUFSource,
    dst: Path,
    file_type: int,
    types: Sequence[str],
    encode: Callable[[np.ndarray, str, Any], np.ndarray],
    step: Callable[[int, int, str, int, int], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[GGUFTensor]:
    """Every tensor of ``src`` written to ``dst`` in its entry of ``types`` (ggml type names, in the source's
    order). ``encode(x, type, qtype)``: the fp32 array ``x`` as that type's data (f32/f16 values, or uint8
    in gguf-py's byte shape), ``qtype`` being its ``GGMLQuantizationType``; ``file_type``: llama.cpp's
    ``general.file_type``; ``extra``: metadata keys to add (str or int values); ``step(tensors done,
    tensors, name, values done, values)`` before each tensor and once at the end (name "")."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    from llmctl import __version__

    writer = gguf.GGUFWriter(str(dst), src.arch)
    src.add_metadata(writer)
    writer.add_file_type(file_type)
    writer.add_string("general.quantized_by", f"llmctl {__version__}")
    for key, value in (extra or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)
    plan = []
    for (name, shape, nbytes, _), kind in zip(src.tensors, types, strict=True):
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        if kind in ("f32", "f16"):
            dtype, info_shape = np.dtype(np.float32 if kind == "f32" else np.float16), shape
        else:  # the quantizers give bytes: the info takes their shape
            dtype, info_shape = np.dtype(np.uint8), tuple(gguf.quant_shape_to_byte_shape(shape, qtype))
        writer.add_tensor_info(
            name, info_shape, dtype, math.prod(info_shape) * dtype.itemsize, raw_dtype=qtype
        )
        plan.append((name, shape, nbytes, kind, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(math.prod(shape) for _, shape, _, _, _ in plan)  # the progress's work: values
    done = 0
    results: list[GGUFTensor] = []
    for (name, shape, nbytes, kind, qtype), x in zip(plan, src.read(), strict=True):
        if step is not None:
            step(len(results), len(plan), name, done, total)
        data = encode(x, kind, qtype)
        writer.write_tensor_data(data)
        sqnr = None
        if kind != "f32":
            noise = float(np.square(dequantize(data, qtype).reshape(shape).astype(np.float64) - x).sum())
            if noise:  # exact tensors (an f16 file from f16 weights) are left out, as unquantized ones
                sqnr = sqnr_db(float(np.square(x.astype(np.float64)).sum()), noise)
        results.append(GGUFTensor(name, kind, math.prod(shape), nbytes, int(data.nbytes), sqnr))
        done += math.prod(shape)
    writer.close()
    if step is not None:
        step(len(plan), len(plan), "", total, total)
    return results
