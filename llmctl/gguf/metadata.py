"""Model metadata in GGUF: a config's hyper-parameters written under llama.cpp's keys, and a GGUF's keys copied
to another GGUF with their value types.

(GGUF keys → ``ModelConfig`` is ``ModelConfig.from_gguf_metadata`` in llmctl/config.py, below this package.)

* **Architecture** — ``GGUF_ARCH``: ``llama`` and ``mistral`` become GGUF ``llama`` (as llama.cpp's converter
  does), ``qwen2``, ``qwen3``, ``gemma3_text`` → ``gemma3``; config.py's aliases read them back.
* **Hyper-parameters** through gguf-py's ``GGUFWriter`` helpers; Llama-3 RoPE scaling becomes the
  converter's ``rope_freqs.weight`` tensor (``llama3_rope_factors``).
* **Refused** (``UsageError``, nothing written): settings llama.cpp's loader cannot represent (Gemma 3 logit
  soft-capping or a query scale other than its own, RoPE scaling other than linear / llama3).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmctl.config import FULL, SLIDING, ModelConfig
from llmctl.errors import UsageError

# Hugging Face model_type -> GGUF general.architecture, for the families llmctl writes.
GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
}


def check_representable(folder: Path | str, cfg: ModelConfig) -> None:
    """Refuse settings llama.cpp's loader cannot represent for the family (module doc)."""
    rope = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
    if rope not in ("default", "linear", "llama3") or (
        rope == "llama3" and GGUF_ARCH[cfg.model_type] != "llama"
    ):
        raise UsageError(
            f"{folder}: RoPE scaling {rope!r} is not written to GGUF by llmctl (linear and llama3 are); "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if GGUF_ARCH[cfg.model_type] != "gemma3":  # what follows is what llama.cpp's gemma3 architecture fixes
        return
    if cfg.final_logit_softcapping or cfg.attn_logit_softcapping:
        raise UsageError(
            f"{folder}: logit soft-capping is set, which llama.cpp's gemma3 ignores; the GGUF would compute "
            "another model"
        )
    scale = cfg.head_dim if cfg.num_hidden_layers != 62 else cfg.hidden_size // cfg.num_attention_heads
    if cfg.query_pre_attn_scalar != scale:  # llama.cpp's gemma3 fixes it (27B: hidden / heads)
        raise UsageError(
            f"{folder}: query_pre_attn_scalar {cfg.query_pre_attn_scalar} differs from the {scale} llama.cpp's "
            "gemma3 uses; the GGUF would compute another model"
        )
    if cfg.rope_local_base_freq not in (None, 10000.0):
        raise UsageError(
            f"{folder}: rope_local_base_freq {cfg.rope_local_base_freq} differs from the 10000 llama.cpp's "
            "gemma3 uses for sliding layers"
        )


def add_arch_metadata(writer: Any, cfg: ModelConfig, n_vocab: int) -> list[str]:
    """Hyper-parameters as llama.cpp's loader reads them for ``writer.arch``; returns notes on settings
    llama.cpp's architecture has no place for."""
    import gguf

    arch = GGUF_ARCH[cfg.model_type]
    notes = []
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(n_vocab)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
    rope = cfg.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    kinds = cfg.layer_kinds()
    if arch == "gemma3":
        if SLIDING in kinds:
            writer.add_sliding_window(cfg.sliding_window)
            writer.add_sliding_window_pattern(_swa_pattern(kinds))
    elif SLIDING in kinds and cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        notes.append(
            f"sliding_window {cfg.sliding_window} is not kept: llama.cpp's {arch} architecture attends to the "
            "whole context (as its converter writes it)"
        )
    return notes


def _swa_pattern(kinds: list[str]) -> int | list[bool]:
    """llama.cpp's ``sliding_window_pattern``: the period n when every n-th layer is full and the others
    sliding (what llmctl and llama.cpp both read), else one flag per layer (true = sliding)."""
    for n in range(1, len(kinds) + 1):
        if kinds == [FULL if (i + 1) % n == 0 else SLIDING for i in range(len(kinds))]:
            return n
    return [k == SLIDING for k in kinds]


def llama3_rope_factors(cfg: ModelConfig) -> Any:
    """The converter's ``rope_freqs.weight`` for Llama-3 RoPE scaling: one divisor per frequency."""
    import numpy as np

    p = cfg.rope_scaling or {}
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def copy_metadata(info: Any, writer: Any) -> None:
    """Every metadata key of the GGUF ``info`` (llmctl.gguf.reader) but the ones the writer sets, with its GGUF
    value type (and array element type) as the source has it. Strings that were not valid UTF-8 are written
    back with U+FFFD in place of the bad bytes."""
    import gguf

    for key, value in info.metadata.items():
        if key.startswith("GGUF.") or key in (
            "general.architecture",
            "general.file_type",
            "general.quantized_by",
        ):
            continue
        if key == "general.alignment":  # the writer pads its tensors to it
            writer.add_custom_alignment(value)
            continue
        vtype, sub = info.metadata_types[key]
        vtype = gguf.GGUFValueType(vtype)
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = gguf.GGUFValueType(sub)
        writer.add_key_value(key, value, vtype, sub)
