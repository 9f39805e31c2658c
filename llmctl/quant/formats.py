"""The one registry of weight formats: name, bits, group size and exact bytes per group.

Each format is a small class registered on subclassing. ``nbytes(shape, group_size)`` is the exact
storage of one tensor in that format, scales, zero-points, block headers and per-tensor constants
included. Formats that can write files also implement ``quantize``/``dequantize`` (issue 4 of 7);
``can_quantize`` states that explicitly instead of discovering it by catching NotImplementedError.

GGUF types take their block geometry from gguf-py's ``GGML_QUANT_SIZES`` (the same table llama.cpp
uses); GGUF *mixes* such as q4_k_m are recipes over those types (see ``llmctl.quant.recipes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from llmctl.errors import QuantError

REGISTRY: dict[str, type[WeightFormat]] = {}


class WeightFormat:
    name: ClassVar[str]
    bits: ClassVar[float]  # bits of one stored element, before scales
    default_group_size: ClassVar[int | None] = None  # None: no groups (per tensor / per channel)
    grouped: ClassVar[bool] = False  # rows are split into groups of group_size
    keeps_embeddings: ClassVar[bool] = True  # the default recipe keeps embeddings/lm_head in 16 bits
    can_quantize: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    @classmethod
    def check_group(cls, row: int, group_size: int | None) -> int | None:
        """The effective group size for rows of length ``row``; refuse one that does not divide it."""
        if not cls.grouped:
            return None
        g = group_size or cls.default_group_size
        assert g is not None
        if g <= 0:
            raise QuantError(f"group size must be a positive integer, got {g}")
        if row % g:
            raise QuantError(
                f"group size {g} does not divide the row length {row}; choose a divisor of {row} "
                f"(e.g. {_divisor_hint(row, g)})"
            )
        return g

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        raise NotImplementedError

    @classmethod
    def bits_per_weight(cls, shape: Sequence[int], group_size: int | None = None) -> float:
        n = math.prod(shape)
        return 8 * cls.nbytes(shape, group_size) / n if n else 0.0


def _divisor_hint(row: int, g: int) -> int:
    divs = [d for d in range(1, row + 1) if row % d == 0]
    return min(divs, key=lambda d: (abs(d - g), -d))


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    cols = int(shape[-1])
    rows = math.prod(int(s) for s in shape[:-1]) if len(shape) > 1 else 1
    return rows, cols


class _Float(WeightFormat):
    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        return math.prod(shape) * int(cls.bits) // 8


class F32(_Float):
    name = "fp32"
    bits = 32
    description = "32-bit float, no quantization"


class F16(_Float):
    name = "fp16"
    bits = 16
    description = "16-bit float, no quantization"


class BF16(_Float):
    name = "bf16"
    bits = 16
    description = "bfloat16, no quantization"


class FP8(WeightFormat):
    """FP8 e4m3 (or e5m2): one byte a weight plus a 32-bit scale per output channel (compressed-tensors
    'float-quantized', channel strategy) — or per tensor/per group when asked."""

    name = "fp8"
    bits = 8
    description = "FP8 e4m3, fp32 scale per output channel"

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        rows, cols = _rows_cols(shape)
        scales = rows * (cols // group_size if group_size else 1)
        return rows * cols + 4 * scales


class _IntGroup(WeightFormat):
    grouped = True
    default_group_size = 128
    scale_bytes: ClassVar[int] = 2  # one fp16/bf16 scale per group (compressed-tensors)
    zero_bits: ClassVar[int] = 0  # asymmetric variants store a zero-point per group

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        rows, cols = _rows_cols(shape)
        g = cls.check_group(cols, group_size)
        assert g is not None
        groups = rows * (cols // g)
        return (
            math.ceil(rows * cols * cls.bits / 8)
            + groups * cls.scale_bytes
            + math.ceil(groups * cls.zero_bits / 8)
        )


class Int8(_IntGroup):
    name = "int8"
    bits = 8
    description = "int8 symmetric, fp16 scale per group of 128"


class Int4(_IntGroup):
    name = "int4"
    bits = 4
    description = "int4 symmetric, two per byte, fp16 scale per group of 128"


class Int4Asym(_IntGroup):
    name = "int4-asym"
    bits = 4
    zero_bits = 4
    description = "int4 asymmetric, fp16 scale and packed 4-bit zero-point per group of 128"


class NF4(WeightFormat):
    """bitsandbytes NormalFloat-4: 4-bit codes, one fp32 absmax per block of 64, the 16-entry code table.
    With double quantization the absmax is stored as uint8 with one fp32 scale per 256 blocks, an fp32
    offset and a 256-entry fp32 code table."""

    name = "nf4"
    bits = 4
    grouped = True
    default_group_size = 64
    double_quant: ClassVar[bool] = False
    description = "bitsandbytes NF4, fp32 absmax per block of 64"

    @classmethod
    def check_group(cls, row: int, group_size: int | None) -> int | None:
        g = group_size or cls.default_group_size
        if g is None or g <= 0:
            raise QuantError(f"group size must be a positive integer, got {g}")
        return g  # bitsandbytes blocks run over the flattened tensor, rows need not divide

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        n = math.prod(shape)
        g = cls.check_group(0, group_size)
        assert g is not None
        blocks = math.ceil(n / g)
        packed = math.ceil(n / 2)
        code = 16 * 4
        if not cls.double_quant:
            return packed + 4 * blocks + code
        nested_blocks = math.ceil(blocks / 256)
        return packed + blocks + 4 * nested_blocks + 4 + 256 * 4 + code


class NF4DQ(NF4):
    name = "nf4-dq"
    double_quant = True
    description = "bitsandbytes NF4 with double-quantized absmax"


class GGMLType(WeightFormat):
    """A single GGUF tensor type; block geometry from gguf-py."""

    ggml_name: ClassVar[str]
    keeps_embeddings = False

    @classmethod
    def block(cls) -> tuple[int, int]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType[cls.ggml_name]]

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        block, type_size = cls.block()
        rows, cols = _rows_cols(shape)
        if cols % block:
            raise QuantError(
                f"GGUF type {cls.name} needs rows that are a multiple of {block}; a row of {cols} is not"
            )
        return rows * (cols // block) * type_size


# Bits per weight of the GGUF types users name most; sizes come from gguf-py at run time. GGUF's BF16 is
# the registry's bf16 (same bytes); f32/f16 name the GGUF types (norms kept f32, llama.cpp's recipe).
_GGML_TYPES = {
    "f32": 32, "f16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5, "q5_0": 5.5, "q5_1": 6,
    "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q8_k": 9.125,
    "iq4_nl": 4.5, "iq4_xs": 4.25, "iq3_s": 3.4375, "iq2_xxs": 2.0625, "iq2_xs": 2.3125,
    "iq2_s": 2.5625, "iq3_xxs": 3.0625, "iq1_s": 1.5625, "iq1_m": 1.75, "tq1_0": 1.6875, "tq2_0": 2.0625,
}  # fmt: skip

for _n, _b in _GGML_TYPES.items():
    type(f"GGML_{_n.upper()}", (GGMLType,), {"name": _n, "ggml_name": _n.upper(), "bits": _b})


def get_format(name: str) -> type[WeightFormat]:
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        from llmctl.quant.recipes import GGUF_MIXES

        known = ", ".join(sorted({*REGISTRY, *GGUF_MIXES}))
        raise QuantError(f"unknown weight format {name!r}; known formats: {known}") from None


def ggml_type_format(ggml_type: int) -> type[WeightFormat]:
    """The registry entry for a GGUF tensor type number (as stored in a GGUF tensor table)."""
    from gguf import GGMLQuantizationType

    try:
        name = GGMLQuantizationType(ggml_type).name.lower()
    except ValueError:
        raise QuantError(f"unknown GGUF tensor type {ggml_type}") from None
    if name not in REGISTRY:
        type(f"GGML_{name.upper()}", (GGMLType,), {"name": name, "ggml_name": name.upper(), "bits": 0})
    return REGISTRY[name]
