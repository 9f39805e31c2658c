"""The registry of weight formats: the ``WeightFormat`` base class every format subclasses (registered on
subclassing in ``REGISTRY``) and ``QTensor``, one tensor in a registry format.

Each format is a small class: name, bits, group rule, ``nbytes(shape, group_size)`` (the exact storage of one
tensor in that format, scales, zero-points, block headers and per-tensor constants included), and the facts
other modules ask instead of comparing format names (``is_float``, ``family``, ``zero_bits``, ...). Formats
that can write files also implement ``quantize``/``dequantize``; ``can_quantize`` states that explicitly
instead of discovering it by catching NotImplementedError. Import ``REGISTRY`` from ``llmctl.quant.formats``,
which imports every format module, so that every format is registered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from llmctl.errors import QuantError

if TYPE_CHECKING:
    import torch

REGISTRY: dict[str, type[WeightFormat]] = {}
PER_TENSOR = 0  # fp8 group_size meaning one scale for the whole tensor (None: one per output channel)


@dataclass
class QTensor:
    """One tensor in a registry format: its named parts (the exact bytes ``nbytes`` counts) and the
    settings needed to read them back. Layouts rename and repack the parts for other engines."""

    format: str
    shape: tuple[int, ...]
    group_size: int | None
    parts: dict[str, Any]  # part name -> torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def dequantize(self, dtype: Any = None) -> torch.Tensor:
        return REGISTRY[self.format].dequantize(self, dtype)


class WeightFormat:
    name: ClassVar[str]
    bits: ClassVar[float]  # bits of one stored element, before scales
    default_group_size: ClassVar[int | None] = None  # None: no groups (per tensor / per channel)
    grouped: ClassVar[bool] = False  # rows are split into groups of group_size
    keeps_embeddings: ClassVar[bool] = True  # the default recipe keeps embeddings/lm_head in 16 bits
    can_quantize: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # parts that are the same for every chunk of rows (a code table, a per-tensor scale); the others
    # concatenate along dim 0 when a tensor is quantized in row chunks
    constant_parts: ClassVar[tuple[str, ...]] = ()
    # What other modules ask instead of comparing format names:
    family: ClassVar[str] = ""  # "float", "fp8", "int", "nf4" or "ggml": the kind of codes (kernels dispatch on it)
    is_float: ClassVar[bool] = False  # weights kept in a float dtype as they are, not quantized
    torch_dtype: ClassVar[str | None] = None  # the torch dtype an llmctl float format is stored in
    zero_bits: ClassVar[int] = 0  # bits of a zero-point per group; 0: symmetric
    double_quant: ClassVar[bool] = False  # the per-block scales are quantized again (bitsandbytes' nf4-dq)
    searchable: ClassVar[bool] = False  # the scale search (--method search, --calibration) applies to it
    default_method: ClassVar[str | None] = None  # `llmctl quantize`'s --method default (None: not searchable)
    gptq: ClassVar[bool] = False  # --method gptq quantizes to it
    more_bits: ClassVar[str | None] = None  # "one format up": what a recipe gives the tensors it favours

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    @classmethod
    def check_group(cls, row: int, group_size: int | None) -> int | None:
        """The effective group size for rows of length ``row``; refuse one that does not divide it."""
        if not cls.grouped:
            return None
        g = group_size or cls.default_group_size or row  # no default group: one scale per row
        if g <= 0:
            raise QuantError(f"group size must be a positive integer, got {g}")
        if row % g:
            raise QuantError(
                f"group size {g} does not divide the row length {row}; choose a divisor of {row} "
                f"(e.g. {_divisor_hint(row, g)})"
            )
        return g

    @classmethod
    def effective_group(cls, request: int | str | None, cols: int) -> int | None:
        """The group size a tensor with rows of ``cols`` gets for ``--group-size`` ``request`` (a size,
        "channel", "tensor", or None for the format's default); QuantError when it cannot have it."""
        if cls.is_float:
            return None
        if request == "tensor":
            raise QuantError(f"--group-size tensor applies to fp8 only; {cls.name} takes a group size or 'channel'")
        return cls.check_group(cols, cols if request == "channel" else request)  # type: ignore[arg-type]

    @classmethod
    def chunk_alignment(cls, cols: int, group_size: int | None) -> int:
        """Rows of ``cols`` values that a chunk of a tensor quantized in row chunks is a multiple of (1: any),
        so that chunks end on a block and a byte boundary."""
        return 1

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        raise NotImplementedError

    @classmethod
    def bits_per_weight(cls, shape: Sequence[int], group_size: int | None = None) -> float:
        n = math.prod(shape)
        return 8 * cls.nbytes(shape, group_size) / n if n else 0.0

    @classmethod
    def part_specs(
        cls, shape: Sequence[int], group_size: int | None = None, **opts: Any
    ) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """{part: (torch dtype, shape)} of what ``quantize`` returns; their bytes sum to ``nbytes``."""
        raise QuantError(f"llmctl cannot write weights in {cls.name}; {_writable_hint()}")

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int | None = None, **opts: Any) -> QTensor:
        raise QuantError(f"llmctl cannot write weights in {cls.name}; {_writable_hint()}")

    @classmethod
    def dequantize(cls, q: QTensor, dtype: Any = None) -> torch.Tensor:
        raise QuantError(f"llmctl cannot read weights in {cls.name}; {_writable_hint()}")


def _writable_hint() -> str:
    names = ", ".join(n for n, f in REGISTRY.items() if f.can_quantize)
    return (
        f"formats llmctl quantizes to: {names} (GGUF types and mixes: as GGUF files, "
        "`llmctl quantize --out NAME.gguf`)"
    )


def _as_2d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(1, -1) if w.dim() < 2 else w.reshape(-1, w.shape[-1])


def _divisor_hint(row: int, g: int) -> int:
    """The divisor of ``row`` nearest ``g``, preferring multiples of 32 (what the decode kernels take:
    groups of whole blocks of 32 — 576 suggests 64, not 144) where the row has any."""
    divs = [d for d in range(1, row + 1) if row % d == 0]
    fast = [d for d in divs if d % 32 == 0]
    return min(fast or divs, key=lambda d: (abs(d - g), -d))


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    cols = int(shape[-1])
    rows = math.prod(int(s) for s in shape[:-1]) if len(shape) > 1 else 1
    return rows, cols


