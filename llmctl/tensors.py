"""Every weight tensor of a model, derived from its config alone, with Hugging Face tensor names.

``tensor_shapes(config)`` lists the tensors a Hugging Face checkpoint of that config holds (names as in
its safetensors files, shapes as PyTorch stores them: ``(out_features, in_features)`` for linear
weights), each with a *role* that the quantization recipes key on:

    embedding   model.embed_tokens.weight
    lm_head     lm_head.weight (absent when tie_word_embeddings)
    linear      2-D projection weights of attention, MLP, experts and shared experts
    bias        1-D biases of linear layers (Qwen2's q/k/v, attention_bias, mlp_bias)
    norm        every other 1-D tensor (RMSNorm weights, MLA's q_a/kv_a layernorms, q_norm/k_norm)
    router      MoE gate weight, and DeepSeek's ``e_score_correction_bias``

``count_parameters(config)`` equals ``sum(p.numel() for p in model.parameters())`` of the transformers
model built from the same config (tests check this for every family, tiny and full size). Two things
follow transformers rather than the checkpoint: tied embeddings count once, and DeepSeek's
``e_score_correction_bias`` — a buffer in transformers, stored in the checkpoint — is listed (it takes
memory) but marked ``parameter=False`` and left out of the count. DeepSeek-V3's multi-token-prediction
layer (``num_nextn_predict_layers``) is not part of the transformers model and is not listed.

Pure: no torch, no I/O.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llmctl.config import ModelConfig

ROLES = ("embedding", "lm_head", "linear", "bias", "norm", "router")


@dataclass(frozen=True)
class TensorShape:
    """One weight tensor: its Hugging Face name, PyTorch shape, role, and decoder layer (None outside)."""

    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None = None
    parameter: bool = True  # False for buffers transformers does not count as parameters

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_shapes(config: ModelConfig) -> list[TensorShape]:
    """Every tensor of a Hugging Face checkpoint of ``config``, in checkpoint order."""
    c = config
    hidden, vocab = c.hidden_size, c.vocab_size
    out = [TensorShape("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out += _attention(c, i, p + "self_attn.")
        out += _mlp(c, i, p)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if c.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        out += [TensorShape(f"{p}{n}.weight", (hidden,), "norm", i) for n in norms]
    out.append(TensorShape("model.norm.weight", (hidden,), "norm"))
    if not c.tie_word_embeddings:
        out.append(TensorShape("lm_head.weight", (vocab, hidden), "lm_head"))
    return out


def count_parameters(config: ModelConfig) -> int:
    """Number of parameters, as transformers counts them (tied embeddings once, buffers not at all)."""
    return sum(t.numel for t in tensor_shapes(config) if t.parameter)


def _linear(name: str, out_f: int, in_f: int, layer: int, bias: bool = False) -> list[TensorShape]:
    ts = [TensorShape(f"{name}.weight", (out_f, in_f), "linear", layer)]
    if bias:
        ts.append(TensorShape(f"{name}.bias", (out_f,), "bias", layer))
    return ts


def _attention(c: ModelConfig, i: int, p: str) -> list[TensorShape]:
    h, nh = c.hidden_size, c.num_attention_heads
    if c.is_mla:  # DeepSeek V2/V3 multi-head latent attention
        assert c.kv_lora_rank and c.qk_rope_head_dim and c.qk_nope_head_dim and c.v_head_dim
        qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
        bias = c.attention_bias
        ts: list[TensorShape] = []
        if c.q_lora_rank is None:
            ts += _linear(p + "q_proj", nh * qk_head, h, i)
        else:
            ts += _linear(p + "q_a_proj", c.q_lora_rank, h, i, bias)
            ts.append(TensorShape(p + "q_a_layernorm.weight", (c.q_lora_rank,), "norm", i))
            ts += _linear(p + "q_b_proj", nh * qk_head, c.q_lora_rank, i)
        ts += _linear(p + "kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h, i, bias)
        ts.append(TensorShape(p + "kv_a_layernorm.weight", (c.kv_lora_rank,), "norm", i))
        ts += _linear(p + "kv_b_proj", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, i)
        ts += _linear(p + "o_proj", h, nh * c.v_head_dim, i, bias)
        return ts

    hd, nkv = c.head_dim, c.num_key_value_heads
    assert hd is not None and nkv is not None
    if c.fused_qkv:  # Phi-3: fused q/k/v, no biases
        return _linear(p + "qkv_proj", (nh + 2 * nkv) * hd, h, i) + _linear(p + "o_proj", h, nh * hd, i)
    qkv_bias, o_bias = c.qkv_bias, c.o_proj_bias
    ts = (
        _linear(p + "q_proj", nh * hd, h, i, qkv_bias)
        + _linear(p + "k_proj", nkv * hd, h, i, qkv_bias)
        + _linear(p + "v_proj", nkv * hd, h, i, qkv_bias)
        + _linear(p + "o_proj", h, nh * hd, i, o_bias)
    )
    if c.qk_norm:
        ts += [
            TensorShape(p + "q_norm.weight", (hd,), "norm", i),
            TensorShape(p + "k_norm.weight", (hd,), "norm", i),
        ]
    return ts


def _dense_mlp(c: ModelConfig, i: int, p: str, inter: int) -> list[TensorShape]:
    h = c.hidden_size
    if c.fused_gate_up:  # Phi-3
        return _linear(p + "gate_up_proj", 2 * inter, h, i) + _linear(p + "down_proj", h, inter, i)
    bias = c.mlp_proj_bias
    return (
        _linear(p + "gate_proj", inter, h, i, bias)
        + _linear(p + "up_proj", inter, h, i, bias)
        + _linear(p + "down_proj", h, inter, i, bias)
    )


def _mlp(c: ModelConfig, i: int, p: str) -> list[TensorShape]:
    h, e = c.hidden_size, c.num_experts
    if c.moe_layout == "block_sparse_moe":  # Mixtral
        q = p + "block_sparse_moe."
        ts = [TensorShape(q + "gate.weight", (e, h), "router", i)]
        for j in range(e):
            x = f"{q}experts.{j}."
            inter = c.intermediate_size
            ts += (
                _linear(x + "w1", inter, h, i)
                + _linear(x + "w2", h, inter, i)
                + _linear(x + "w3", inter, h, i)
            )
        return ts
    if c.moe_layout == "routed_shared" and c.layer_is_moe(i):  # DeepSeek V3
        q = p + "mlp."
        inter = c.moe_intermediate_size or c.intermediate_size
        ts = [
            TensorShape(q + "gate.weight", (e, h), "router", i),
            TensorShape(q + "gate.e_score_correction_bias", (e,), "router", i, parameter=False),
        ]
        for j in range(e):
            ts += _dense_mlp(c, i, f"{q}experts.{j}.", inter)
        if c.n_shared_experts:
            ts += _dense_mlp(c, i, q + "shared_experts.", inter * c.n_shared_experts)
        return ts
    return _dense_mlp(c, i, p + "mlp.", c.intermediate_size)


# ---- roles of tensors read from checkpoints ------------------------------------------------------
_ROUTER = re.compile(
    r"(block_sparse_moe\.gate\.weight|mlp\.gate\.weight|e_score_correction_bias"  # Hugging Face
    r"|ffn_gate_inp\.weight|exp_probs_b(\.bias)?)$"  # GGUF
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")


def tensor_role(name: str, shape: Sequence[int]) -> str:
    """The role of a checkpoint tensor from its name and shape; Hugging Face and GGUF names both work."""
    return _role(name, len(shape))


@functools.lru_cache(maxsize=1 << 17)  # DeepSeek-V3 has ~45k tensors; estimates are often repeated
def _role(name: str, ndim: int) -> str:
    if name.endswith(("embed_tokens.weight", "wte.weight")) or name == "token_embd.weight":
        return "embedding"
    if name in ("lm_head.weight", "output.weight"):
        return "lm_head"
    if _ROUTER.search(name):
        return "router"
    if ndim <= 1:
        return "bias" if name.endswith(".bias") else "norm"
    return "linear"


def tensor_layer(name: str) -> int | None:
    """The decoder layer index in a Hugging Face (``model.layers.N.``) or GGUF (``blk.N.``) name."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None
