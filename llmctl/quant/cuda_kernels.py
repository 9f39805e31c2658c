"""The quantized products ``QuantWeight`` runs off the CPU: on CUDA, and on the meta device (moves, shapes).

Each format gets the fastest product torch or bitsandbytes has for it on the device, else the weight
dequantized for each call:

==============  ==========================================================================================
kernel          what it runs
==============  ==========================================================================================
int8-rows       int8 with one scale per output channel: ``F.linear`` on the codes cast to the activations'
                dtype, then the scales (in fp16 the scales go first: the unscaled sums can pass 65504)
fp8-rows        fp8 with one scale per channel or per tensor: the same (fp8 values are exact in bf16/fp16)
int4-tinygemm   int4 / int4-asym, groups of 32-256, on CUDA with compute capability >= 8.0: torch's
                ``aten._weight_int4pack_mm`` (gpt-fast's tinygemm, bf16 in and out) on its own packing
nf4-bnb         NF4 / NF4-DQ when bitsandbytes imports: ``bitsandbytes.matmul_4bit`` on the stored bytes,
                which are bitsandbytes' own layout (``formats.NF4``)
dequantize      anything else (int8 and fp8 in groups, int4 that tinygemm does not take, meta tensors)
==============  ==========================================================================================

tinygemm's packing, from torch's ``_convert_weight_to_int4pack_cuda`` (aten/src/ATen/native/cuda/int4mm.cu)
and torchao's ``TensorCoreTiledLayout.from_plain``: codes as unsigned 0..15 (stored value + 8), two a byte
with the even column in the high nibble, (rows, cols / 2) uint8, then ``_convert_weight_to_int4pack`` with
2, 4 or 8 inner k-tiles (cols a multiple of 16 × that) into its tensor-core tiles; scales and zero-points
as one (groups, rows, 2) bf16 tensor, the weight being ``(u - 8) · scale + zero`` — the convention of the
CPU kernel (``_weight_int4pack_mm_for_cpu``) too, so asymmetric weights store ``zero = -zp · scale``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llmctl.quant.formats import REGISTRY
from llmctl.quant.registry import QTensor

KERNELS = ("int8-rows", "fp8-rows", "int4-tinygemm", "nf4-bnb")
TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_DTYPE = torch.bfloat16  # the only activation, scale and output dtype tinygemm takes


def prepare(q: QTensor, device: torch.device) -> tuple[str, tuple[Any, ...], QTensor]:
    """(kernel, its tensors, the QTensor to keep) for a weight whose parts are on ``device`` (not the CPU).
    int4-tinygemm keeps only its packed copy (the returned QTensor has no parts)."""
    fmt, rows_cols = q.format, len(q.shape) == 2
    f = REGISTRY[fmt]
    if f.family == "int" and f.bits == 8 and rows_cols and q.group_size == q.shape[-1]:
        return "int8-rows", (q.parts["weight"], q.parts["scale"].reshape(-1).float()), q
    if f.family == "fp8" and rows_cols and q.parts["scale"].shape[-1] == 1:  # per channel or per tensor
        return "fp8-rows", (q.parts["weight"], q.parts["scale"].reshape(-1).float()), q
    if f.family == "int" and f.bits == 4 and tinygemm_takes(q) and tinygemm_device(device):
        packed, sz = tinygemm_pack(q)
        return "int4-tinygemm", (packed, q.group_size, sz), QTensor(fmt, q.shape, q.group_size, {}, q.meta)
    if f.family == "nf4" and device.type == "cuda" and (bnb := bitsandbytes()) is not None:
        return "nf4-bnb", (q.parts["weight"], nf4_quant_state(q, bnb)), q
    return "dequantize", (), q


def linear(kernel: str, args: tuple[Any, ...], x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a weight prepared as ``kernel`` (bias not included)."""
    if kernel in ("int8-rows", "fp8-rows"):
        codes, scale = args
        if x.dtype == torch.float16:
            return F.linear(x, codes.to(x.dtype) * scale.to(x.dtype).unsqueeze(-1))
        return F.linear(x, codes.to(x.dtype)) * scale.to(x.dtype)
    if kernel == "int4-tinygemm":
        packed, g, sz = args
        x2 = x.reshape(-1, x.shape[-1]).to(TINYGEMM_DTYPE).contiguous()  # (tokens, in_features)
        y = torch.ops.aten._weight_int4pack_mm(x2, packed, g, sz)  # (tokens, out_features)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)
    if kernel == "nf4-bnb":
        weight, state = args
        return bitsandbytes().matmul_4bit(x, weight.t(), quant_state=state)
    raise ValueError(f"no CUDA kernel {kernel!r}")


def dequantize(kernel: str, args: tuple[Any, ...], q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (rows, cols) in ``dtype``."""
    if kernel == "int4-tinygemm":  # the kernel's own dequantization: multiply the identity
        eye = torch.eye(q.shape[-1], dtype=TINYGEMM_DTYPE, device=args[0].device)
        return linear(kernel, args, eye).t().to(dtype).contiguous()
    return REGISTRY[q.format].dequantize(q, dtype)


# ---- int4: torch's tinygemm --------------------------------------------------------------------------
def tinygemm_takes(q: QTensor) -> bool:
    """Shapes tinygemm multiplies: 2-D, groups of 32-256, rows a multiple of 8 (its n tiles), columns a
    multiple of 32 (two k-tiles of 16)."""
    return (
        len(q.shape) == 2 and q.group_size in TINYGEMM_GROUPS and q.shape[0] % 8 == 0 and q.shape[1] % 32 == 0
    )


def tinygemm_device(device: torch.device) -> bool:
    """CUDA with compute capability >= 8.0 (tinygemm uses bf16 tensor-core instructions)."""
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def inner_k_tiles(cols: int) -> int:
    """The most k-tiles of 16 packed together (8, 4 or 2) that divide a row of ``cols``."""
    return next(t for t in (8, 4, 2) if cols % (16 * t) == 0)


def tinygemm_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes (rows, cols) in [-8, 7] → (rows, cols / 2) uint8 as ``_convert_weight_to_int4pack``
    reads them: code + 8, column 2j in the high nibble of byte j, column 2j + 1 in the low one."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()


def tinygemm_scales(q: QTensor, zp: torch.Tensor | None) -> torch.Tensor:
    """(groups, rows, 2) bf16: each group's scale and zero, the weight being (u - 8) · scale + zero."""
    scale = q.parts["scale"].float()  # (rows, groups)
    zero = torch.zeros_like(scale) if zp is None else -zp.float() * scale
    return torch.stack([scale.t(), zero.t()], dim=-1).to(TINYGEMM_DTYPE).contiguous()


def tinygemm_pack(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales and zeros) for ``aten._weight_int4pack_mm``."""
    codes, zp = REGISTRY[q.format].codes(q)
    packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_nibbles(codes), inner_k_tiles(q.shape[1]))
    return packed, tinygemm_scales(q, zp)


# ---- NF4: bitsandbytes -------------------------------------------------------------------------------
def bitsandbytes() -> Any:
    """The bitsandbytes module, or None where it does not import."""
    try:
        import bitsandbytes
    except Exception:  # ImportError, or a broken CUDA setup raising at import
        return None
    return bitsandbytes


def nf4_quant_state(q: QTensor, bnb: Any) -> Any:
    """bitsandbytes' ``QuantState`` for llmctl's NF4 parts (the same bytes bitsandbytes writes):
    blocks of ``group_size`` over the flattened weight, the nested state when double-quantized."""
    p = q.parts
    QuantState = bnb.functional.QuantState
    nested = None
    offset = None
    if "nested_absmax" in p:
        nested = QuantState(
            absmax=p["nested_absmax"], code=p["nested_quant_map"], blocksize=256, dtype=torch.float32
        )
        offset = p["offset"].reshape(())  # bitsandbytes takes a 0-d tensor
    return QuantState(
        absmax=p["absmax"],
        shape=torch.Size(q.shape),
        code=p["quant_map"],
        blocksize=q.group_size,
        quant_type="nf4",
        dtype=torch.float32,
        offset=offset,
        state2=nested,
    )
