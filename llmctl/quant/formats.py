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
from collections.abc import Callable, Sequence
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


_TORCH_FLOAT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


class _Float(WeightFormat):
    can_quantize = True

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        return math.prod(shape) * int(cls.bits) // 8

    @classmethod
    def part_specs(cls, shape, group_size=None, **opts):
        return {"weight": (_torch_dtype(_TORCH_FLOAT[cls.name]), tuple(shape))}

    @classmethod
    def quantize(cls, w, group_size=None, **opts):
        return QTensor(cls.name, tuple(w.shape), None, {"weight": w.to(_torch_dtype(_TORCH_FLOAT[cls.name]))})

    @classmethod
    def dequantize(cls, q, dtype=None):
        return q.parts["weight"].to(dtype or q.parts["weight"].dtype)


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


FP8_VARIANTS = {"e4m3": ("float8_e4m3fn", 448.0), "e5m2": ("float8_e5m2", 57344.0)}


def _tiny() -> float:
    return 1.1754943508222875e-38  # smallest normal fp32: a zero scale divides without NaN


class FP8(WeightFormat):
    """FP8 e4m3 (or e5m2): one byte a weight plus a 32-bit scale per output channel (compressed-tensors
    'float-quantized', channel strategy) — or per tensor (``group_size=PER_TENSOR``) / per group.

    scale = absmax / max_finite (448 for e4m3, 57344 for e5m2); values are divided by the scale and
    clamped to ±max_finite before rounding, so no value saturates to NaN or infinity. ``method="search"``
    (per channel or group) may shrink the scale, clamping the largest values."""

    name = "fp8"
    bits = 8
    can_quantize = True
    description = "FP8 e4m3, fp32 scale per output channel"

    @classmethod
    def _n_scales(cls, shape: Sequence[int], group_size: int | None) -> tuple[int, int]:
        rows, cols = _rows_cols(shape)
        if group_size == PER_TENSOR:
            return 1, 1
        if group_size is None:
            return rows, 1
        if group_size < 0 or cols % group_size:
            raise QuantError(
                f"group size {group_size} does not divide the row length {cols}; choose a divisor of "
                f"{cols} or leave --group-size out for one scale per output channel"
            )
        return rows, cols // group_size

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        rows, cols = _rows_cols(shape)
        r, c = cls._n_scales(shape, group_size)
        return rows * cols + 4 * r * c

    @classmethod
    def part_specs(cls, shape, group_size=None, **opts):
        import torch

        dtype, _ = FP8_VARIANTS[_fp8_variant(opts)]
        return {
            "weight": (getattr(torch, dtype), _rows_cols(shape)),
            "scale": (torch.float32, cls._n_scales(shape, group_size)),
        }

    @classmethod
    def quantize(cls, w, group_size=None, **opts):
        import torch

        from llmctl.quant.primitives import check_finite

        variant = _fp8_variant(opts)
        dtype, fmax = FP8_VARIANTS[variant]
        x = _as_2d(w).float()
        _, c = cls._n_scales(tuple(w.shape), group_size)
        if "amax" in opts:  # per-tensor scale of a tensor quantized in row chunks
            amax = torch.as_tensor(opts["amax"], dtype=torch.float32).reshape(1, 1)
        elif group_size == PER_TENSOR:
            amax = x.abs().amax().reshape(1, 1)
        else:
            amax = x.reshape(x.shape[0], c, -1).abs().amax(-1)  # (rows, n_scales)
        if "amax" not in opts:
            check_finite(amax)
        scale = amax / fmax
        importance = opts.get("importance")
        if _search_on(opts) and "amax" not in opts and group_size != PER_TENSOR:
            g = x.shape[1] // c
            xg = x.reshape(x.shape[0], c, g)
            imp = None if importance is None else importance.float().reshape(1, c, g)
            fp8 = getattr(torch, dtype)

            def roundtrip(v: Any, sc: Any) -> Any:
                sc = sc.clamp_min(_tiny())
                return (v / sc).clamp_(-fmax, fmax).to(fp8).float() * sc

            scale = _best_scale(xg, scale, _search_weights(xg, imp), roundtrip)
        s = scale.clamp_min(_tiny())
        if c == 1:
            y = x / s
        else:
            y = (x.reshape(x.shape[0], c, -1) / s.unsqueeze(-1)).reshape(x.shape)  # (rows, cols)
        q = y.clamp_(-fmax, fmax).to(getattr(torch, dtype))
        return QTensor(cls.name, tuple(w.shape), group_size, {"weight": q, "scale": scale}, {"fp8": variant})

    @classmethod
    def dequantize(cls, q, dtype=None):
        import torch

        w, scale = q.parts["weight"].float(), q.parts["scale"]
        rows, cols = w.shape
        c = scale.shape[-1]
        out = (w.reshape(rows, c, -1) * scale.reshape(-1, c, 1)).reshape(rows, cols)
        return out.reshape(q.shape).to(dtype or torch.float32)


def _fp8_variant(opts: dict[str, Any]) -> str:
    v = str(opts.get("fp8") or "e4m3").lower()
    if v not in FP8_VARIANTS:
        raise QuantError(f"unknown fp8 variant {v!r}; choose e4m3 (default) or e5m2")
    return v


# The scale search (``method="search"``, ``llmctl quantize``'s default for int4/int8; llama.cpp's K-quant
# rmse search and HQQ do the same kind of thing) keeps, per group, the candidate with the smallest weighted
# squared reconstruction error, round to nearest first (kept on ties, so never worse than it by that
# measure). Asymmetric groups: the range [min, max] shrunk by 1 - j * SEARCH_DELTA for j < SEARCH_STEPS
# (down to 0.67 of it). Symmetric groups: the integer range is lopsided (-8..7 for int4), so the candidates
# send the group's largest-magnitude value, sign kept, to the long end, -2^(b-1), as llama.cpp's q4_0 does
# (a negative scale when that value is positive), at 1 + (SEARCH_WIDEN - j) * SEARCH_DELTA of it for
# j < SEARCH_SIGNED_STEPS (1.15 down to 0.76); then the winner's least-squares scale (sum w·x·q / sum w·q²,
# as llama.cpp's make_qx_quants refines), SEARCH_REFITS rounds, each kept only when it lowers the error.
# On Gemma-3-270M's linear weights, int4 g32, that weighted error is 0.72 of round to nearest's (the same
# search with positive scales only, shrinking to 0.67, two refits: 0.87); a second refit gained < 0.2%, and
# the calibrated search needs the list down to 0.76 (stopping at 0.88 left its g128 KLD at 0.35, not 0.29).
# The weights are llama.cpp's for K-quants without an importance matrix, rms(group) + |x| (plain squared
# error clips Gemma-3's outlier weights: its int4 g128 KL divergence went 0.49 -> 0.70), or with
# ``--calibration`` the mean x² of each input channel (llmctl.quantize.calibrate). docs/formats.md has what
# each buys on Gemma-3-270M.
METHODS = ("rtn", "search")
SEARCH_DELTA = 0.03
SEARCH_STEPS = 12  # asymmetric groups: ranges 1 - j * delta, j < 12
SEARCH_WIDEN = 5  # symmetric groups: 1 + (5 - j) * delta of the largest value, j < 14
SEARCH_SIGNED_STEPS = 14
SEARCH_REFITS = 1  # symmetric groups: rounds of the winner's least-squares scale, each kept only if better


def _search_on(opts: dict[str, Any]) -> bool:
    """Whether ``quantize`` runs the scale search: ``method="search"``, or calibration statistics given."""
    method = opts.get("method") or "rtn"
    if method not in METHODS:
        raise QuantError(f"unknown --method {method!r}; choose rtn (round to nearest) or search (scale search)")
    return method == "search" or opts.get("importance") is not None


def _search_weights(x: torch.Tensor, importance: Any) -> torch.Tensor:
    """Error weights for groups ``x`` (..., group): the calibration statistics of each value's input channel
    (``importance``, already shaped to broadcast), or llama.cpp's rms(group) + |x|."""
    if importance is not None:
        return importance
    return x.double().square().mean(-1, keepdim=True).sqrt_().float().add(x.abs())


def _best_scale(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, roundtrip: Callable[[Any, Any], Any]) -> Any:
    """The scale search of the formats without a native one (nf4, fp8): per group of ``x`` (..., group), the
    scale among ``scale`` · (1 - j * SEARCH_DELTA), j < SEARCH_STEPS, whose ``roundtrip(x, s)`` (the values
    as stored and read back) has the smallest weighted squared error; ``scale`` itself wins ties."""
    import torch

    best_s, best = scale, None
    for j in range(SEARCH_STEPS):
        s = scale if j == 0 else scale * float(torch.tensor(1.0 - j * SEARCH_DELTA, dtype=torch.float32))
        err = (roundtrip(x, s.unsqueeze(-1)) - x).square_().mul_(weight).sum(-1)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
    return best_s


class _IntGroup(WeightFormat):
    """Integers of ``bits`` bits in groups of ``group_size`` along each row, one scale per group.

    Symmetric: scale = absmax / ((2^b - 1) / 2), q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1),
    x ≈ q · scale (compressed-tensors' min-max rule). Asymmetric: scale = (max - min) / (2^b - 1) over a
    range that includes 0, zero_point = clamp(qmin - round(min / scale)), q = clamp(round(x / scale) + zp),
    x ≈ (q - zp) · scale. Scales are rounded to fp16 first and the codes computed with the rounded scale,
    so what is stored is what is used. The scale search (``method="search"``) may store a negative
    symmetric scale, sending a positive extreme to -2^(b-1) as llama.cpp's q4_0 does."""

    grouped = True
    can_quantize = True
    default_group_size = 128
    scale_bytes: ClassVar[int] = 2  # one fp16 scale per group (compressed-tensors)
    zero_bits: ClassVar[int] = 0  # asymmetric variants store a zero-point per group

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        rows, cols = _rows_cols(shape)
        g = cls.check_group(cols, group_size)
        assert g is not None
        groups = rows * (cols // g)
        return (
            rows * math.ceil(cols * cls.bits / 8)
            + groups * cls.scale_bytes
            + math.ceil(groups * cls.zero_bits / 8)
        )

    @classmethod
    def part_specs(cls, shape, group_size=None, **opts):
        import torch

        rows, cols = _rows_cols(shape)
        g = cls.check_group(cols, group_size)
        assert g is not None
        ng = cols // g
        specs: dict[str, tuple[Any, tuple[int, ...]]] = {
            "weight": (
                (torch.int8, (rows, cols)) if cls.bits == 8 else (torch.uint8, (rows, math.ceil(cols / 2)))
            ),
            "scale": (torch.float16, (rows, ng)),
        }
        if cls.zero_bits:
            specs["zero_point"] = (torch.uint8, (math.ceil(rows * ng / 2),))
        return specs

    @classmethod
    def quantize(cls, w, group_size=None, **opts):
        import torch

        from llmctl.quant import native
        from llmctl.quant.primitives import check_finite

        bits = int(cls.bits)
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        x = _as_2d(w)
        rows, cols = x.shape
        g = cls.check_group(cols, group_size)
        assert g is not None
        importance = opts.get("importance")  # per input channel, from --calibration (quantize.calibrate)
        steps = 1 if not _search_on(opts) else SEARCH_STEPS if cls.zero_bits else SEARCH_SIGNED_STEPS
        kernels = native.get() if importance is None else None
        if kernels is not None:  # the same arithmetic in one pass (llmctl.quant.native)
            q, scale, zp = kernels.int_group(
                x, g, bits, bool(cls.zero_bits), steps, SEARCH_DELTA, SEARCH_WIDEN, SEARCH_REFITS
            )
            check_finite(scale)
            if bits == 8:
                return cls._pack(tuple(w.shape), g, q, scale, zp if cls.zero_bits else None)
            parts = {"weight": q, "scale": scale} | ({"zero_point": zp} if cls.zero_bits else {})
            return QTensor(cls.name, tuple(w.shape), g, parts)  # 4 bits: the kernel packs the nibbles
        x = x.float().reshape(rows, cols // g, g)  # (rows, n_groups, group_size)
        if cls.zero_bits:
            lo0 = x.amin(-1).clamp_(max=0)
            hi0 = x.amax(-1).clamp_(min=0)
            check_finite(lo0 + hi0)

            def candidate(alpha: float) -> tuple[Any, Any, Any]:  # (fp16 scale, fp32 scale, zero-point)
                lo = lo0 * alpha  # alpha = 1 (round to nearest): exactly lo0
                scale = _round_up_fp16((hi0 * alpha - lo) / (qmax - qmin))
                s = scale.float().clamp_min_(_tiny())
                return scale, s, (qmin - torch.round(lo / s)).clamp_(qmin, qmax)  # (rows, n_groups)
        else:
            amax = x.abs().amax(-1)
            check_finite(amax)
            zero = torch.zeros_like(amax)

            def candidate(alpha: float) -> tuple[Any, Any, Any]:  # round to nearest: amax/scale <= qmax + 1/2
                scale = _round_up_fp16(amax * alpha / ((qmax - qmin) / 2))
                return scale, scale.float().clamp_min_(_tiny()), zero

            def signed(magnitude: Any, negative: Any) -> tuple[Any, Any, Any]:
                scale = torch.where(negative, -magnitude, magnitude)
                s = magnitude.float().clamp_min_(_tiny())
                return scale, torch.where(negative, -s, s), zero

            def extreme(alpha: float, flip: Any) -> tuple[Any, Any, Any]:  # flip: the extreme is positive
                return signed(_round_up_fp16(amax * alpha / float(-qmin)), flip)

        def codes(s: Any, zp: Any) -> Any:
            return torch.round(x / s.unsqueeze(-1)).add_(zp.unsqueeze(-1)).clamp_(qmin, qmax)

        weight = None
        if steps > 1:  # an error in column j reaches the output scaled by x_j: weigh it E[x_j²] when known
            weight = _search_weights(x, None if importance is None else importance.float().reshape(1, cols // g, g))

        def error(s: Any, zp: Any) -> Any:  # ranks candidates: x · (1/s) as the native kernel does
            q = torch.round(x * s.reciprocal().unsqueeze(-1)).add_(zp.unsqueeze(-1)).clamp_(qmin, qmax)
            return ((q - zp.unsqueeze(-1)) * s.unsqueeze(-1) - x).square_().mul_(weight).sum(-1)

        def refit(s: Any) -> tuple[Any, Any, Any]:  # the least-squares scale of the codes ``s`` gives
            q = torch.round(x * s.reciprocal().unsqueeze(-1)).clamp_(qmin, qmax)
            wq = q * weight  # fp32 sums, as the native kernel's (in another order: the rounding to fp16 hides it)
            ls = (wq * x).sum(-1) / (wq * q).sum(-1).clamp_min_(_tiny())  # sum w·x·q / sum w·q²
            same = (ls != 0) & ((ls > 0) == (s > 0))  # a least-squares scale of the other sign is no refit
            return signed(_round_up_fp16(torch.where(same, ls, s).abs()), s < 0)

        scale, s, zp = candidate(1.0)
        if steps > 1:  # the scale search: keep each group's candidate with the smallest squared error
            best = error(s, zp)

            def keep(c_scale: Any, c_s: Any, c_zp: Any) -> Any:
                nonlocal best, scale, s, zp
                err = error(c_s, c_zp)
                better = err < best
                best = torch.where(better, err, best)
                scale, s, zp = (torch.where(better, new, old) for new, old in ((c_scale, scale), (c_s, s), (c_zp, zp)))
                return better

            if cls.zero_bits:
                for j in range(1, steps):
                    keep(*candidate(float(torch.tensor(1.0 - j * SEARCH_DELTA, dtype=torch.float32))))
            else:  # the candidates send the largest-magnitude value (the first, on ties), sign kept, to qmin
                flip = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1) > 0
                for j in range(steps):
                    alpha = float(torch.tensor(1.0 + (SEARCH_WIDEN - j) * SEARCH_DELTA, dtype=torch.float32))
                    keep(*extreme(alpha, flip))
                for _ in range(SEARCH_REFITS):  # then the winner's least-squares scale
                    if not bool(keep(*refit(s)).any()):
                        break
        q = codes(s, zp)
        return cls._pack(tuple(w.shape), g, q.reshape(rows, cols), scale, zp if cls.zero_bits else None)

    @classmethod
    def _pack(cls, shape: tuple[int, ...], g: int, q: torch.Tensor, scale: torch.Tensor, zp: Any) -> QTensor:
        """Codes (rows, cols) and zero-points (rows, groups), as integers of any dtype → stored parts."""
        import torch

        from llmctl.quant.primitives import pack_nibbles

        if cls.bits == 8:
            parts = {"weight": q.to(torch.int8), "scale": scale}
        else:
            parts = {"weight": pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8)), "scale": scale}
        if zp is not None:
            parts["zero_point"] = pack_nibbles((zp.reshape(-1).to(torch.int16) + 8).to(torch.uint8))
        return QTensor(cls.name, shape, g, parts)

    @classmethod
    def codes(cls, q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(signed integer codes (rows, cols) as int8, zero-points (rows, n_groups) as int8 or None)."""
        import torch

        from llmctl.quant.primitives import unpack_nibbles

        rows, cols = _rows_cols(q.shape)
        if cls.bits == 8:
            codes = q.parts["weight"]
        else:
            codes = (unpack_nibbles(q.parts["weight"], cols).to(torch.int16) - 8).to(torch.int8)
        zp = None
        if cls.zero_bits:
            ng = cols // q.group_size
            zp = unpack_nibbles(q.parts["zero_point"], rows * ng).to(torch.int16) - 8
            zp = zp.to(torch.int8).reshape(rows, ng)
        return codes, zp

    @classmethod
    def dequantize(cls, q, dtype=None):
        import torch

        rows, cols = _rows_cols(q.shape)
        g = q.group_size
        codes, zp = cls.codes(q)
        x = codes.float().reshape(rows, cols // g, g)  # (rows, n_groups, group_size)
        if zp is not None:
            x = x - zp.float().unsqueeze(-1)
        out = (x * q.parts["scale"].float().unsqueeze(-1)).reshape(q.shape)
        return out.to(dtype or torch.float32)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 and moved one ulp up where rounding went down: a stored scale never shrinks the
    range, so only values beyond it are clamped (half a step at most)."""
    import torch

    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


class Int8(_IntGroup):
    """Per output channel by default: what compressed-tensors' W8A16 writes, what torch's int8 CPU kernel
    (``_weight_int8pack_mm``) runs, and a row of any length takes it."""

    name = "int8"
    bits = 8
    default_group_size = None
    description = "int8 symmetric, fp16 scale per output channel (or per group)"


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
    offset and a 256-entry fp32 code table.

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(w, quant_type='nf4')``: blocks run over the
    flattened tensor; each value is multiplied by 1 / absmax (fp32), clamped to [-1, 1] and given the
    code whose midpoint interval holds it; two codes a byte, the first in the high nibble."""

    name = "nf4"
    bits = 4
    grouped = True
    can_quantize = True
    default_group_size = 64
    double_quant: ClassVar[bool] = False
    constant_parts = ("quant_map", "nested_quant_map")
    description = "bitsandbytes NF4, fp32 absmax per block of 64"

    @classmethod
    def check_group(cls, row: int, group_size: int | None) -> int | None:
        g = group_size or cls.default_group_size
        if g is None or g <= 0:
            raise QuantError(f"group size must be a positive integer, got {g}")
        if g not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantError(
                f"NF4 block size {g} is not one bitsandbytes reads; choose 64 (default), 128, 256, 512, "
                "1024, 2048 or 4096"
            )
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

    @classmethod
    def part_specs(cls, shape, group_size=None, **opts):
        import torch

        n = math.prod(shape)
        g = cls.check_group(0, group_size)
        assert g is not None
        blocks = math.ceil(n / g)
        specs: dict[str, tuple[Any, tuple[int, ...]]] = {"weight": (torch.uint8, (math.ceil(n / 2), 1))}
        if cls.double_quant:
            specs["absmax"] = (torch.uint8, (blocks,))
            specs["nested_absmax"] = (torch.float32, (math.ceil(blocks / 256),))
            specs["nested_quant_map"] = (torch.float32, (256,))
            specs["offset"] = (torch.float32, (1,))
        else:
            specs["absmax"] = (torch.float32, (blocks,))
        specs["quant_map"] = (torch.float32, (16,))
        return specs

    @classmethod
    def quantize(cls, w, group_size=None, **opts):
        import torch

        from llmctl.quant import native
        from llmctl.quant.primitives import check_finite, midpoints, nf4_code, pack_nibbles

        g = cls.check_group(0, group_size)
        assert g is not None
        code = nf4_code()
        kernels = native.get()
        importance = opts.get("importance")
        search = _search_on(opts)
        if kernels is not None and not search:  # the same arithmetic in one pass (llmctl.quant.native)
            packed, absmax = kernels.nf4(w, g, midpoints(code))
            check_finite(absmax)
            parts = {"weight": packed.reshape(-1, 1), "absmax": absmax}
            if cls.double_quant:
                parts.update(double_quantize(absmax))
            parts["quant_map"] = code
            return QTensor(cls.name, tuple(w.shape), g, parts)
        flat = w.reshape(-1).float()
        n = flat.numel()
        full = n - n % g
        blocks = flat[:full].reshape(-1, g)  # (n_blocks, block)
        absmax = blocks.abs().amax(-1)
        if search and full:  # the scale search (eager torch): the absmax shrunk, values beyond it clamped to ±1
            check_finite(absmax)
            mids = midpoints(code)
            imp = None
            if importance is not None:  # blocks run over the flattened tensor: each value's input channel
                imp = importance.float().repeat(n // importance.numel())[:full].reshape(-1, g)

            def roundtrip(v: Any, am: Any) -> Any:
                scaled = torch.clamp(v * (1.0 / am.clamp(min=1e-38)), -1, 1)
                return code[torch.bucketize(scaled, mids)] * am

            absmax = _best_scale(blocks, absmax, _search_weights(blocks, imp), roundtrip)
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).unsqueeze(-1)), -1, 1).reshape(-1)
        if n % g:
            tail = flat[full:]
            am = tail.abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.reshape(1)])
            scaled = torch.cat([scaled, torch.clamp(tail / am, -1, 1)])
        check_finite(absmax)
        q = torch.bucketize(scaled, midpoints(code), out_int32=True).to(torch.uint8)
        if n % 2:  # bitsandbytes pads the scaled values with 0.0, whose code is 7
            q = torch.cat([q, torch.full((1,), 7, dtype=torch.uint8)])
        parts = {"weight": pack_nibbles(q, high_first=True).reshape(-1, 1), "absmax": absmax}
        if cls.double_quant:
            parts.update(double_quantize(absmax))
        parts["quant_map"] = code
        return QTensor(cls.name, tuple(w.shape), g, parts)

    @classmethod
    def absmax(cls, q: QTensor) -> torch.Tensor:
        """The fp32 absmax per block (undoing double quantization)."""
        if not cls.double_quant:
            return q.parts["absmax"]
        p = q.parts
        nested = p["nested_quant_map"][p["absmax"].long()]  # (n_blocks,)
        n = nested.numel()
        scale = p["nested_absmax"].repeat_interleave(256)[:n]
        return nested * scale + p["offset"]

    @classmethod
    def dequantize(cls, q, dtype=None):
        import torch

        from llmctl.quant.primitives import unpack_nibbles

        n = math.prod(q.shape)
        g = q.group_size
        codes = unpack_nibbles(q.parts["weight"].reshape(-1), n, high_first=True)
        values = q.parts["quant_map"][codes.long()]  # (n,)
        absmax = cls.absmax(q)
        full = n - n % g
        out = torch.empty(n, dtype=torch.float32, device=values.device)
        out[:full] = (values[:full].reshape(-1, g) * absmax[: full // g].unsqueeze(-1)).reshape(-1)
        if n % g:
            out[full:] = values[full:] * absmax[-1]
        return out.reshape(q.shape).to(dtype or torch.float32)


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes' ``compress_statistics``: absmax - mean(absmax), in blocks of 256, to the signed
    8-bit dynamic code (uint8 index, fp32 absmax per 256 blocks), as bitsandbytes' CPU kernel
    (csrc/common.cpp ``quantize_block``) does it: value / block absmax, the code entry at or left of it,
    moved right when the right neighbour is strictly closer. The kernel searches with code[0] set to -1.0
    (the stored code keeps bitsandbytes' -0.993)."""
    import torch

    from llmctl.quant.primitives import dynamic_code

    stored = dynamic_code()
    code = stored.clone()
    code[0] = -1.0
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    n_blocks = -(-n // 256)
    pad = n_blocks * 256 - n
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(n_blocks, 256)  # (n_blocks, 256)
    if pad:  # the last block's absmax covers its real values only
        nested = torch.cat([xb[:-1].abs().amax(-1), x[(n_blocks - 1) * 256 :].abs().amax().reshape(1)])
    else:
        nested = xb.abs().amax(-1)
    normed = (xb / nested.unsqueeze(-1)).reshape(-1)[:n]
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp_(0, 255)
    right = (left + 1).clamp_(max=255)
    closer = (normed - code[right]).abs() < (normed - code[left]).abs()
    q = (left + closer.long()).to(torch.uint8)
    return {
        "absmax": q,
        "nested_absmax": nested,
        "nested_quant_map": stored,
        "offset": offset.reshape(1).float(),
    }


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
