"""The GGUF tensor types as registry formats: block geometry from gguf-py's ``GGML_QUANT_SIZES`` (the same
table llama.cpp uses). GGUF *mixes* such as q4_k_m are recipes over these types (``llmctl.quant.recipes``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from llmctl.errors import QuantError
from llmctl.quant.registry import REGISTRY, WeightFormat, _rows_cols


class GGMLType(WeightFormat):
    """A single GGUF tensor type; block geometry from gguf-py."""

    ggml_name: ClassVar[str]
    keeps_embeddings = False
    family = "ggml"

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
    type(f"GGML_{_n.upper()}", (GGMLType,), {"name": _n, "ggml_name": _n.upper(), "bits": _b, "is_float": _b >= 16})


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
