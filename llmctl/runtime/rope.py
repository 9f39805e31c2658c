"""Rotary position embeddings: pure functions plus a table of scaling rules keyed by ``rope_type``.

Each rule maps ``(base, dim, params, max_position_embeddings, seq_len)`` to ``(inv_freq, attention_scaling)``
and follows ``transformers.modeling_rope_utils`` operation by operation, so that the cos/sin tables match
transformers bit for bit in fp32. The model precomputes cos/sin tables for every position it may see and
slices them per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llmctl.config import SLIDING, ModelConfig
from llmctl.errors import ConfigError, UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

RopeRule = Callable[[float, int, Mapping[str, Any], int, int], "tuple[torch.Tensor, float]"]


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    import torch

    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _default(base: float, dim: int, p: Mapping[str, Any], max_pos: int, seq_len: int):
    return _base_inv_freq(base, dim), 1.0


def _linear(base: float, dim: int, p: Mapping[str, Any], max_pos: int, seq_len: int):
    return _base_inv_freq(base, dim) / _param(p, "factor"), 1.0


def _dynamic(base: float, dim: int, p: Mapping[str, Any], max_pos: int, seq_len: int):
    # NTK-aware: the base grows with the context length; within max_position_embeddings it is the default.
    factor = _param(p, "factor")
    seq_len = max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def _llama3(base: float, dim: int, p: Mapping[str, Any], max_pos: int, seq_len: int):
    import torch

    inv_freq = _base_inv_freq(base, dim)
    factor = _param(p, "factor")
    low_freq_factor = _param(p, "low_freq_factor")
    high_freq_factor = _param(p, "high_freq_factor")
    old_context_len = p.get("original_max_position_embeddings", max_pos)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between interpolated smoothly.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama), 1.0


def _yarn(base: float, dim: int, p: Mapping[str, Any], max_pos: int, seq_len: int):
    import torch

    original = p.get("original_max_position_embeddings", max_pos)
    factor = p.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp  # 1 where frequencies are kept, 0 where they are interpolated
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


ROPE_RULES: dict[str, RopeRule] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "llama3": _llama3,
    "yarn": _yarn,
}


def _param(p: Mapping[str, Any], name: str) -> float:
    value = p.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(
            f"rope_scaling of type {rope_type(p)!r} needs a numeric {name!r}, got {value!r}; fix config.json"
        )
    return float(value)


def rope_type(scaling: Mapping[str, Any] | None) -> str:
    """The rule name of a ``rope_scaling`` object (older configs call the key ``type``)."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def layer_rope(config: ModelConfig, kind: str) -> tuple[float, Mapping[str, Any] | None]:
    """(base, scaling) of one layer kind. Gemma 3 sliding layers use their own base and no scaling."""
    if kind == SLIDING and config.rope_local_base_freq is not None:
        return float(config.rope_local_base_freq), None
    return float(config.rope_theta), config.rope_scaling


def inv_frequencies(config: ModelConfig, kind: str, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in fp32 and the cos/sin scaling factor for one layer kind."""
    base, scaling = layer_rope(config, kind)
    name = rope_type(scaling)
    rule = ROPE_RULES.get(name)
    if rule is None:
        raise UnsupportedArchitectureError(
            f"{config._where()}rope_scaling type {name!r} is not supported by the torch runtime; "
            f"supported: {', '.join(sorted(ROPE_RULES))}"
        )
    if config.partial_rotary_factor != 1.0:
        raise UnsupportedArchitectureError(
            f"{config._where()}partial_rotary_factor {config.partial_rotary_factor} is not supported by the "
            "torch runtime (it rotates the whole head)"
        )
    return rule(base, config.head_dim, scaling or {}, config.max_position_embeddings, seq_len)


def rope_tables(
    inv_freq: torch.Tensor, attention_scaling: float, length: int, dtype: torch.dtype, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions 0..length-1, each (length, 1, 2, head_dim // 2) in ``dtype``.

    Computed in fp32 as transformers does, then cast. The pair axis holds (cos, cos) and (-sin, sin), so
    ``apply_rope`` needs no concatenation; the head axis of size 1 broadcasts over heads.
    """
    import torch

    pos = torch.arange(length, dtype=torch.float32, device=device)
    freqs = pos[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]  # (length, head_dim/2)
    cos = freqs.cos() * attention_scaling
    sin = freqs.sin() * attention_scaling
    cos = torch.stack((cos, cos), dim=1)  # (length, 2, head_dim/2)
    sin = torch.stack((-sin, sin), dim=1)
    return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # (length, 1, 2, head_dim/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, heads, head_dim) by table slices ``cos``/``sin`` (T, 1, 2, head_dim // 2).

    The same arithmetic as transformers' ``x * cos + rotate_half(x) * sin`` (bit for bit): with halves
    (x1, x2), ``rotate_half(x)`` is (-x2, x1), i.e. the halves swapped times (-1, 1).
    """
    halves = x.unflatten(-1, (2, -1))  # (B, T, heads, 2, head_dim/2)
    return (halves * cos + halves.flip(-2) * sin).flatten(-2)  # (B, T, heads, head_dim)
