"""Small tensor helpers shared by the formats: packing 4-bit codes, group views, safe reciprocals.

Everything here is pure (tensor in, tensor out) and works on CPU tensors of any size; the formats in
``llmctl.quant.formats`` compose them. Shapes follow PyTorch: a weight is (rows, cols), the row last.
"""

from __future__ import annotations

import math

import torch

from llmctl.errors import QuantError

# bitsandbytes' NormalFloat-4 code (bitsandbytes/functional.py ``get_4bit_type('nf4')``): the 16 quantiles
# of N(0, 1) normalised to [-1, 1], zero exact. Stored in fp32 exactly as bitsandbytes stores it.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (``create_dynamic_map(signed=True)``), sorted, 256 fp32
    values: the code double quantization uses for the absmax of NF4 blocks."""
    data: list[float] = []
    non_sign_bits, max_exp = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign_bits - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()  # in fp32, as bitsandbytes does
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision bounds between the entries of a sorted code (as bitsandbytes computes them, in fp32)."""
    return (code[:-1] + code[1:]) / 2


def check_finite(stat: torch.Tensor) -> None:
    """Refuse weights with NaN/inf, checked on a per-group statistic (absmax, min/max) the quantizer
    computes anyway: NaN and inf propagate into it, and it is small."""
    if not bool(torch.isfinite(stat).all()):
        raise QuantError("the tensor holds NaN or infinite values; the checkpoint is corrupt — re-download it")


def safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 0 where the scale is 0 (an all-zero group quantizes to code 0)."""
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    return inv


def groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) → (rows, cols // group_size, group_size) view."""
    rows, cols = w.shape
    return w.reshape(rows, cols // group_size, group_size)  # (rows, n_groups, group_size)


def pack_nibbles(u: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """uint8 codes in [0, 16) along the last axis → bytes holding two each (last axis padded with 0).

    ``high_first=False`` puts element 2k in the low nibble (compressed-tensors, llama.cpp);
    ``high_first=True`` in the high nibble (bitsandbytes).
    """
    n = u.shape[-1]
    if n % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    pairs = u.reshape(*u.shape[:-1], -1, 2)  # (..., ceil(n/2), 2)
    first, second = pairs[..., 0], pairs[..., 1]
    if high_first:
        return (first << 4) | second
    return first | (second << 4)


def unpack_nibbles(p: torch.Tensor, n: int, high_first: bool = False) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: bytes (..., ceil(n/2)) → uint8 codes (..., n)."""
    lo, hi = p & 0x0F, p >> 4
    pair = (hi, lo) if high_first else (lo, hi)
    return torch.stack(pair, dim=-1).reshape(*p.shape[:-1], -1)[..., :n]


def int32_words(b: torch.Tensor) -> torch.Tensor:
    """Row bytes (rows, nbytes) → little-endian int32 words (rows, ceil(nbytes / 4)), zero-padded."""
    rows, nbytes = b.shape
    pad = (-nbytes) % 4
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    return b.contiguous().view(torch.int32).reshape(rows, -1)  # (rows, words)


def words_bytes(w: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Inverse of ``int32_words``: (rows, words) int32 → (rows, nbytes) uint8."""
    return w.contiguous().view(torch.uint8).reshape(w.shape[0], -1)[:, :nbytes]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
