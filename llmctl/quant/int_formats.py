"""The integer formats: int8, int4 and int4-asym, symmetric or with a zero-point, one fp16 scale per group."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from llmctl.quant.registry import QTensor, WeightFormat, _as_2d, _rows_cols
from llmctl.quant.search import (
    SEARCH_DELTA,
    SEARCH_REFITS,
    SEARCH_SIGNED_STEPS,
    SEARCH_STEPS,
    SEARCH_WIDEN,
    _search_on,
    _search_weights,
    _tiny,
)

if TYPE_CHECKING:
    import torch

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
    family = "int"
    searchable = True
    default_method = "search"
    gptq = True
    more_bits = "int8"  # every layout that holds 4-bit formats mixed holds int8 too, except bitsandbytes'

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
        kernels = native.get()
        if kernels is not None:  # the same arithmetic in one pass (llmctl.quant.native)
            imp = torch.empty(0) if importance is None else importance.float().reshape(cols)
            q, scale, zp = kernels.int_group(
                x, g, bits, bool(cls.zero_bits), steps, SEARCH_DELTA, SEARCH_WIDEN, SEARCH_REFITS, imp
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
            if importance is None:
                return ((q - zp.unsqueeze(-1)) * s.unsqueeze(-1) - x).square_().mul_(weight).sum(-1)
            # calibration weights span decades (a few inputs can outweigh the rest of a group): float64, as
            # the native kernel, where q·s − x is exact and only the order of the sums differs
            d = (q - zp.unsqueeze(-1)).double() * s.double().unsqueeze(-1) - x.double()
            return d.square_().mul_(weight.double()).sum(-1)

        def refit(s: Any) -> tuple[Any, Any, Any]:  # the least-squares scale of the codes ``s`` gives
            q = torch.round(x * s.reciprocal().unsqueeze(-1)).clamp_(qmin, qmax)
            # sum w·x·q / sum w·q², w·q in fp32 and the rest in float64 as the native kernel does: exact
            # products, terms >= 0, so the kernel's order of summation gives the same fp32 quotient
            wq = (q * weight).double()
            ls = ((wq * x.double()).sum(-1) / (wq * q.double()).sum(-1).clamp_min_(_tiny())).float()
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

        cols = _rows_cols(q.shape)[1]
        if cls.bits == 8:
            codes = q.parts["weight"]
        else:
            codes = (unpack_nibbles(q.parts["weight"], cols).to(torch.int16) - 8).to(torch.int8)
        return codes, cls.zero_points(q)

    @classmethod
    def zero_points(cls, q: QTensor) -> torch.Tensor | None:
        """The zero-points (rows, n_groups) as int8, or None (symmetric)."""
        import torch

        from llmctl.quant.primitives import unpack_nibbles

        if not cls.zero_bits:
            return None
        rows, cols = _rows_cols(q.shape)
        ng = cols // q.group_size
        zp = unpack_nibbles(q.parts["zero_point"], rows * ng).to(torch.int16) - 8
        return zp.to(torch.int8).reshape(rows, ng)

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


