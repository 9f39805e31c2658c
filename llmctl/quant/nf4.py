"""bitsandbytes NormalFloat-4 (nf4) and its double-quantized variant (nf4-dq), bit-identical to bitsandbytes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmctl.errors import QuantError
from llmctl.quant.registry import QTensor, WeightFormat
from llmctl.quant.search import _best_scale, _search_on, _search_weights

if TYPE_CHECKING:
    import torch

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
    family = "nf4"
    searchable = True
    default_method = "rtn"  # its round-to-nearest bytes are bitsandbytes' own; its search runs in eager torch
    more_bits = "int8"
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
    def effective_group(cls, request: int | str | None, cols: int) -> int | None:
        if request == "channel":
            raise QuantError(f"{cls.name} has blocks over the flattened tensor; pass a block size (64 by default)")
        return super().effective_group(request, cols)

    @classmethod
    def chunk_alignment(cls, cols: int, group_size: int | None) -> int:
        g = group_size or cls.default_group_size or 1
        return (2 * g) // math.gcd(cols, 2 * g)  # blocks (and bytes) run over the flattened tensor

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


