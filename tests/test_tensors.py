"""Tensor shapes and parameter counts derived from configs, checked against transformers' own models.

Every family is built with transformers on the meta device (no memory, no network), tiny and at full
size, and its parameter count compared with ``count_parameters``; for the dense families the names and
shapes must match ``named_parameters()`` one for one.
"""

from __future__ import annotations

import pytest

from llmctl.config import ModelConfig
from llmctl.tensors import ROLES, count_parameters, tensor_layer, tensor_role, tensor_shapes

_TINY_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Tiny configs exercising each family's switches (biases, qk-norm, explicit head_dim, ties, MoE, MLA).
TINY = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(sliding_window=200),
    "qwen2": dict(use_sliding_window=True, sliding_window=200, max_window_layers=1),
    "qwen3": dict(head_dim=16, attention_bias=True),
    "gemma3_text": dict(head_dim=8, sliding_window=200),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=200),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
    ),
    "deepseek_v3-no-q-lora": dict(
        model_type="deepseek_v3",
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=2,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        attention_bias=True,
    ),
    "phi3": dict(sliding_window=200),
}


def tiny_dict(key: str) -> dict:
    extra = dict(TINY[key])
    model_type = extra.pop("model_type", key)
    return {"model_type": model_type, **_TINY_COMMON, **extra}


# Full-size configs as their config.json files give them (Gemma 3: the text part of gemma-3-27b).
_GEMMA_270M_LAYERS = (["sliding_attention"] * 5 + ["full_attention"]) * 3
FULL = {
    "Llama-3.1-8B": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "torch_dtype": "bfloat16",
    },
    "Mistral-7B-v0.1": {
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "Qwen2.5-7B": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 28, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "Qwen3-8B": {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "sliding_window": None, "use_sliding_window": False,
        "max_window_layers": 36, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "attention_bias": False, "torch_dtype": "bfloat16",
    },
    "gemma-3-270m": {
        "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "max_position_embeddings": 32768, "sliding_window": 512, "query_pre_attn_scalar": 256,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "torch_dtype": "bfloat16",
        "layer_types": _GEMMA_270M_LAYERS,
    },
    "gemma-3-27b": {
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376, "intermediate_size": 21504,
        "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
        "max_position_embeddings": 131072, "sliding_window": 1024, "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
    },
    "Mixtral-8x7B": {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "sliding_window": None, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "DeepSeek-V3": {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8,
        "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "max_position_embeddings": 163840,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "Phi-3-mini-4k": {
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "sliding_window": 2047, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "pad_token_id": 32000,
        "bos_token_id": 1, "eos_token_id": 32000,
    },
}  # fmt: skip
# Published sizes, to catch a config typo that both sides would share.
PUBLISHED_BILLIONS = {
    "Llama-3.1-8B": 8.03, "Mistral-7B-v0.1": 7.24, "Qwen2.5-7B": 7.62, "Qwen3-8B": 8.19,
    "gemma-3-270m": 0.268, "gemma-3-27b": 27.0, "Mixtral-8x7B": 46.7, "DeepSeek-V3": 671.0,
    "Phi-3-mini-4k": 3.82,
}  # fmt: skip


def hf_config(d: dict):
    """The transformers config class of d's model_type, built from the same dict (no network)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[d["model_type"]](**{k: v for k, v in d.items() if k != "model_type"})


def meta_model(d: dict):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(d))


def test_transformers_has_every_family() -> None:
    from transformers import CONFIG_MAPPING

    from llmctl.config import FAMILIES

    for model_type, arch in FAMILIES.items():
        assert model_type in CONFIG_MAPPING, model_type
        assert type(meta_model(tiny_dict(model_type))).__name__ == arch


@pytest.mark.parametrize("key", sorted(TINY))
def test_tiny_count_equals_transformers(key: str) -> None:
    d = tiny_dict(key)
    model = meta_model(d)
    assert count_parameters(ModelConfig.from_dict(d)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"])
def test_dense_names_and_shapes_equal_transformers(key: str) -> None:
    d = tiny_dict(key)
    ours = {t.name: t.shape for t in tensor_shapes(ModelConfig.from_dict(d))}
    theirs = {n: tuple(p.shape) for n, p in meta_model(d).named_parameters()}
    assert ours == theirs


@pytest.mark.parametrize("key", ["mixtral", "deepseek_v3"])
def test_moe_names_follow_the_checkpoint_layout(key: str) -> None:
    """transformers 5 fuses experts into 3-D parameters; checkpoints (and we) keep one tensor each."""
    cfg = ModelConfig.from_dict(tiny_dict(key))
    names = {t.name for t in tensor_shapes(cfg)}
    if key == "mixtral":
        assert "model.layers.2.block_sparse_moe.gate.weight" in names
        assert {f"model.layers.2.block_sparse_moe.experts.3.w{k}.weight" for k in (1, 2, 3)} <= names
    else:
        assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace = 1
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in names
        assert {
            "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.experts.3.down_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight",
            "model.layers.1.self_attn.q_a_layernorm.weight",
            "model.layers.1.self_attn.kv_b_proj.weight",
        } <= names


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_count_equals_transformers(name: str) -> None:
    d = FULL[name]
    theirs = sum(p.numel() for p in meta_model(d).parameters())
    ours = count_parameters(ModelConfig.from_dict(d))
    assert ours == theirs
    assert ours / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)


def test_deepseek_v3_details() -> None:
    cfg = ModelConfig.from_dict(FULL["DeepSeek-V3"])
    shapes = {t.name: t for t in tensor_shapes(cfg)}
    assert shapes["model.layers.5.self_attn.kv_a_proj_with_mqa.weight"].shape == (512 + 64, 7168)
    assert shapes["model.layers.5.self_attn.kv_b_proj.weight"].shape == (128 * (128 + 128), 512)
    assert shapes["model.layers.5.self_attn.q_b_proj.weight"].shape == (128 * 192, 1536)
    assert shapes["model.layers.5.mlp.shared_experts.gate_proj.weight"].shape == (2048, 7168)
    bias = shapes["model.layers.5.mlp.gate.e_score_correction_bias"]
    assert (bias.role, bias.parameter) == ("router", False)  # a buffer: memory yes, parameter no
    assert "model.layers.2.mlp.gate_proj.weight" in shapes  # dense: first_k_dense_replace = 3
    assert sum(".experts.0.down_proj." in n for n in shapes) == 61 - 3


def test_tied_embeddings_count_once() -> None:
    untied = ModelConfig.from_dict(tiny_dict("llama") | {"attention_bias": False, "mlp_bias": False})
    tied = ModelConfig.from_dict(tiny_dict("llama-tied"))
    assert count_parameters(untied) - count_parameters(tied) == 128 * 32
    assert "lm_head.weight" not in {t.name for t in tensor_shapes(tied)}


def test_gemma3_ties_by_default_like_transformers() -> None:
    """Gemma 3 config.json files omit tie_word_embeddings; transformers' default (True) applies."""
    d = {k: v for k, v in FULL["gemma-3-270m"].items()}
    assert "tie_word_embeddings" not in d
    assert ModelConfig.from_dict(d).tie_word_embeddings is True
    assert hf_config(d).tie_word_embeddings is True


@pytest.mark.parametrize("key", sorted(TINY))
def test_roles_from_names_match_derived_roles(key: str) -> None:
    for t in tensor_shapes(ModelConfig.from_dict(tiny_dict(key))):
        assert t.role in ROLES
        assert tensor_role(t.name, t.shape) == t.role, t.name
        assert tensor_layer(t.name) == t.layer, t.name
        assert (t.role == "linear") == (
            len(t.shape) == 2 and t.role not in ("embedding", "lm_head", "router")
        )


@pytest.mark.parametrize(
    ("name", "shape", "role"),
    [
        ("token_embd.weight", (49152, 576), "embedding"),
        ("output.weight", (49152, 576), "lm_head"),
        ("blk.3.attn_norm.weight", (576,), "norm"),
        ("blk.3.attn_q.bias", (576,), "bias"),
        ("blk.3.ffn_gate_inp.weight", (8, 4096), "router"),
        ("blk.3.exp_probs_b.bias", (256,), "router"),
        ("blk.3.ffn_down_exps.weight", (8, 4096, 14336), "linear"),
        ("model.layers.3.mlp.gate_proj.weight", (11008, 4096), "linear"),
    ],
)
def test_roles_of_gguf_and_hf_names(name: str, shape: tuple, role: str) -> None:
    assert tensor_role(name, shape) == role
