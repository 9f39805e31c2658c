"""The formats that keep weights in a float dtype: fp32, fp16, bf16 (no quantization) and FP8 (e4m3/e5m2
with an fp32 scale per output channel, group or tensor)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from llmctl.errors import QuantError
from llmctl.quant.registry import PER_TENSOR, QTensor, WeightFormat, _as_2d, _rows_cols
from llmctl.quant.search import _best_scale, _search_on, _search_weights, _tiny


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


class _Float(WeightFormat):
    can_quantize = True
    family = "float"
    is_float = True

    @classmethod
    def nbytes(cls, shape: Sequence[int], group_size: int | None = None) -> int:
        return math.prod(shape) * int(cls.bits) // 8

    @classmethod
    def part_specs(cls, shape, group_size=None, **opts):
        return {"weight": (_torch_dtype(cls.torch_dtype), tuple(shape))}

    @classmethod
    def quantize(cls, w, group_size=None, **opts):
        return QTensor(cls.name, tuple(w.shape), None, {"weight": w.to(_torch_dtype(cls.torch_dtype))})

    @classmethod
    def dequantize(cls, q, dtype=None):
        return q.parts["weight"].to(dtype or q.parts["weight"].dtype)


class F32(_Float):
    name = "fp32"
    bits = 32
    torch_dtype = "float32"
    description = "32-bit float, no quantization"


class F16(_Float):
    name = "fp16"
    bits = 16
    torch_dtype = "float16"
    description = "16-bit float, no quantization"


class BF16(_Float):
    name = "bf16"
    bits = 16
    torch_dtype = "bfloat16"
    description = "bfloat16, no quantization"


FP8_VARIANTS = {"e4m3": ("float8_e4m3fn", 448.0), "e5m2": ("float8_e5m2", 57344.0)}


class FP8(WeightFormat):
    """FP8 e4m3 (or e5m2): one byte a weight plus a 32-bit scale per output channel (compressed-tensors
    'float-quantized', channel strategy) — or per tensor (``group_size=PER_TENSOR``) / per group.

    scale = absmax / max_finite (448 for e4m3, 57344 for e5m2); values are divided by the scale and
    clamped to ±max_finite before rounding, so no value saturates to NaN or infinity. ``method="search"``
    (per channel or group) may shrink the scale, clamping the largest values."""

    name = "fp8"
    bits = 8
    can_quantize = True
    family = "fp8"
    searchable = True
    default_method = "rtn"  # its round-to-nearest bytes are compressed-tensors' own; its search runs in eager torch
    more_bits = "fp8"  # 8 bits: nothing above but 16
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
    def effective_group(cls, request: int | str | None, cols: int) -> int | None:
        """One scale per output channel (None, "channel"), per tensor ("tensor": ``PER_TENSOR``) or per group."""
        if request in (None, "channel"):
            return None
        if request == "tensor":
            return PER_TENSOR
        cls.nbytes((1, cols), int(request))  # raises for a group that does not divide
        return int(request)

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

