"""The memory estimate: exact bytes per format, recipes, KV cache against transformers and llama.cpp.

Fast tests use configs and tiny random models; the ``slow`` ones load the two bundled GGUFs with
llama.cpp and compare the KV cache size it reports with ours.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import gemma3_path, smollm2_path
from test_tensors import FULL, TINY, hf_config, tiny_dict

from llmctl.checkpoint import TensorInfo
from llmctl.config import ModelConfig
from llmctl.errors import QuantError, UsageError
from llmctl.memory.estimate import (
    GIB,
    MIB,
    OVERHEAD_FIXED_BYTES,
    OVERHEAD_FRACTION,
    activation_bytes,
    estimate,
    kv_cache_bytes,
    kv_tokens_per_layer,
    kv_widths,
    llama_cpp_n_ctx,
    max_batch_that_fits,
    max_context_that_fits,
)
from llmctl.memory.gpus import GPUS, find_gpu
from llmctl.quant.formats import REGISTRY
from llmctl.quant.ggml_types import GGMLType
from llmctl.quant.recipes import GGUF_MIXES, assign_formats, gguf_category, use_more_bits
from llmctl.tensors import count_parameters, tensor_shapes

N = 4096 * 4096  # weights in the (4096, 4096) test matrix


def cfg(name: str) -> ModelConfig:
    return ModelConfig.from_dict(FULL[name])


# ---- exact bytes per format ----------------------------------------------------------------------------
# Bytes of a (4096, 4096) linear weight, written out from each format's definition.
EXPECTED_BYTES = {
    "fp32": 4 * N,
    "fp16": 2 * N,
    "bf16": 2 * N,
    "fp8": N + 4 * 4096,  # one byte a weight + fp32 scale per output channel
    "int8": N + 2 * 4096,  # + fp16 scale per output channel (the default; -g 128 gives per group)
    "int4": N // 2 + 2 * (N // 128),
    "int4-asym": N // 2 + 2 * (N // 128) + (N // 128) // 2,  # + 4-bit zero-point per group
    "nf4": N // 2 + 4 * (N // 64) + 16 * 4,  # fp32 absmax per 64, 16-entry code table
    "nf4-dq": N // 2 + N // 64 + 4 * math.ceil(N // 64 / 256) + 4 + 256 * 4 + 16 * 4,
    "q4_0": N // 32 * 18,  # fp16 scale + 32 nibbles
    "q4_1": N // 32 * 20,
    "q5_0": N // 32 * 22,
    "q5_1": N // 32 * 24,
    "q8_0": N // 32 * 34,  # fp16 scale + 32 bytes
    "q2_k": N // 256 * 84,
    "q3_k": N // 256 * 110,
    "q4_k": N // 256 * 144,
    "q5_k": N // 256 * 176,
    "q6_k": N // 256 * 210,
    "iq4_nl": N // 32 * 18,
    "iq4_xs": N // 256 * 136,
    "f16": 2 * N,
    "f32": 4 * N,
}


@pytest.mark.parametrize("fmt", sorted(EXPECTED_BYTES))
def test_exact_bytes_per_format(fmt: str) -> None:
    t = TensorInfo("model.layers.0.mlp.up_proj.weight", (4096, 4096), "BF16", 2 * N)  # no mix rule
    [(out, name)] = assign_formats([t], fmt, None, "bf16")
    assert name == fmt
    assert out.nbytes == EXPECTED_BYTES[fmt]
    assert (out.name, out.shape, out.dtype) == (t.name, t.shape, name)


def test_every_registered_format_has_an_expected_size() -> None:
    ours = {n for n, f in REGISTRY.items() if not issubclass(f, GGMLType)}
    assert ours <= set(EXPECTED_BYTES)


@pytest.mark.parametrize(
    "bits", [("q4_0", 4.5), ("q8_0", 8.5), ("q4_k", 4.5), ("q6_k", 6.5625), ("nf4", 4.5)]
)
def test_bits_per_weight(bits: tuple[str, float]) -> None:
    fmt, bpw = bits
    assert REGISTRY[fmt].bits_per_weight((4096, 4096)) == pytest.approx(bpw, abs=1e-3)


def test_group_size_that_does_not_divide_a_row_is_refused() -> None:
    with pytest.raises(
        QuantError,
        match=r"model\.layers\.0\.self_attn\.q_proj\.weight \[4096, 4096\]: group size 100 does not divide "
        r"the row length 4096; choose a divisor of 4096",
    ):
        estimate(cfg("Llama-3.1-8B"), weights_format="int4", group_size=100)
    with pytest.raises(QuantError, match=r"group size 100 does not divide the row length 4096"):
        estimate(cfg("Llama-3.1-8B"), weights_format="fp8", group_size=100)


def test_unknown_format_lists_the_known_ones() -> None:
    with pytest.raises(QuantError, match=r"unknown weight format 'int3'; known formats: .*q4_k_m"):
        estimate(cfg("Llama-3.1-8B"), weights_format="int3")


def test_group_size_changes_scale_bytes() -> None:
    c = cfg("Llama-3.1-8B")
    g128 = estimate(c, weights_format="int4").weights_breakdown.quantized_bytes
    g32 = estimate(c, weights_format="int4", group_size=32).weights_breakdown.quantized_bytes
    linear = sum(t.numel for t in tensor_shapes(c) if t.role == "linear")
    assert g128 == linear // 2 + 2 * linear // 128
    assert g32 == linear // 2 + 2 * linear // 32


# ---- recipes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym", "nf4", "nf4-dq", "fp8"])
def test_our_formats_quantize_linear_weights_only(fmt: str) -> None:
    c = ModelConfig.from_dict(tiny_dict("qwen2") | {"hidden_size": 128, "intermediate_size": 256})
    shapes = tensor_shapes(c)
    infos = [TensorInfo(s.name, s.shape, "BF16", 2 * s.numel) for s in shapes]
    for s, (_, name) in zip(shapes, assign_formats(infos, fmt, None, "bf16"), strict=True):
        assert name == (fmt if s.role == "linear" else "bf16"), s.name
    wb = estimate(c, weights_format=fmt).weights_breakdown
    kept = sum(2 * s.numel for s in shapes if s.role != "linear")
    assert wb.kept_bytes == kept
    assert wb.by_format["bf16"] == kept
    assert wb.quantized_bytes == wb.by_format[fmt] == wb.total - kept


def test_gguf_single_type_rules() -> None:
    c = ModelConfig.from_dict(FULL["gemma-3-270m"])  # rows of 640 are not a multiple of 256
    infos = [TensorInfo(s.name, s.shape, "BF16", 2 * s.numel) for s in tensor_shapes(c)]
    got = {t.name: f for t, f in assign_formats(infos, "q4_k", None, "bf16", config=c)}
    assert got["model.embed_tokens.weight"] == "q8_0"  # tied → output rule → q6_k → fallback q8_0
    assert got["model.layers.0.self_attn.q_proj.weight"] == "q5_0"  # q4_k fallback for 640-wide rows
    assert got["model.layers.0.mlp.down_proj.weight"] == "q4_k"  # rows of 2048
    assert got["model.layers.0.input_layernorm.weight"] == "f32"
    c8 = cfg("Llama-3.1-8B")
    infos = [TensorInfo(s.name, s.shape, "BF16", 2 * s.numel) for s in tensor_shapes(c8)]
    got = {t.name: f for t, f in assign_formats(infos, "q4_k", None, "bf16", config=c8)}
    assert got["model.embed_tokens.weight"] == "q4_k"  # untied: token_embd in the type itself
    assert got["lm_head.weight"] == "q6_k"
    assert {f for n, f in got.items() if ".layers." in n and "norm" not in n} == {"q4_k"}


def _mix(name: str, config: ModelConfig) -> dict[str, str]:
    infos = [TensorInfo(s.name, s.shape, "BF16", 2 * s.numel) for s in tensor_shapes(config)]
    return {t.name: f for t, f in assign_formats(infos, name, None, "bf16", config=config)}


def test_q4_k_m_gives_more_bits_to_some_attn_v_and_ffn_down() -> None:
    got = _mix("q4_k_m", cfg("Llama-3.1-8B"))
    more = {i for i in range(32) if use_more_bits(i, 32)}
    assert more == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        want = "q6_k" if i in more else "q4_k"
        assert got[f"model.layers.{i}.self_attn.v_proj.weight"] == want
        assert got[f"model.layers.{i}.mlp.down_proj.weight"] == want
        assert got[f"model.layers.{i}.self_attn.q_proj.weight"] == "q4_k"
    assert got["lm_head.weight"] == "q6_k"
    assert got["model.embed_tokens.weight"] == "q4_k"


def test_mix_special_cases() -> None:
    mixtral = _mix("q4_k_m", cfg("Mixtral-8x7B"))  # 8 experts: attn_v/attn_k q8_0, attn_output q5_k
    assert mixtral["model.layers.7.self_attn.v_proj.weight"] == "q8_0"
    assert mixtral["model.layers.7.self_attn.k_proj.weight"] == "q8_0"
    assert mixtral["model.layers.7.self_attn.o_proj.weight"] == "q5_k"
    assert mixtral["model.layers.7.block_sparse_moe.gate.weight"] == "f32"
    assert mixtral["model.layers.6.block_sparse_moe.experts.5.w2.weight"] == "q6_k"  # ffn_down, layer 6
    assert mixtral["model.layers.7.block_sparse_moe.experts.5.w2.weight"] == "q4_k"
    q3km = _mix("q3_k_m", cfg("Llama-3.1-8B"))
    assert [q3km[f"model.layers.{i}.self_attn.v_proj.weight"] for i in range(3)] == ["q5_k", "q5_k", "q4_k"]
    assert q3km["model.layers.1.mlp.down_proj.weight"] == "q5_k"  # i < n/16
    assert q3km["model.layers.2.mlp.down_proj.weight"] == "q4_k"
    assert q3km["model.layers.2.self_attn.o_proj.weight"] == "q4_k"
    q2k = _mix("q2_k", cfg("Llama-3.1-8B"))  # 4 heads per KV head → attn_v q4_k
    assert q2k["model.layers.5.self_attn.v_proj.weight"] == "q4_k"
    assert q2k["model.layers.5.mlp.down_proj.weight"] == "q3_k"
    assert q2k["model.layers.5.mlp.up_proj.weight"] == "q2_k"
    seventy = ModelConfig.from_dict(
        FULL["Llama-3.1-8B"] | {"num_hidden_layers": 80, "num_attention_heads": 64, "hidden_size": 8192}
    )
    assert _mix("q4_k_s", seventy)["model.layers.40.self_attn.v_proj.weight"] == "q5_k"  # the 70B rule
    assert _mix("q8_0", cfg("Llama-3.1-8B"))["lm_head.weight"] == "q8_0"
    assert _mix("q4_0", cfg("Llama-3.1-8B"))["lm_head.weight"] == "q6_k"  # llama-quantize's output rule
    ds = _mix("q4_k_m", cfg("DeepSeek-V3"))
    assert ds["model.layers.3.mlp.gate.e_score_correction_bias"] == "f32"
    assert ds["model.layers.0.self_attn.kv_b_proj.weight"] == "q6_k"  # attn_kv_b counts as attn_v
    assert ds["model.layers.0.self_attn.kv_a_layernorm.weight"] == "f32"


def test_gguf_categories_of_both_naming_schemes() -> None:
    pairs = {
        "blk.0.attn_v.weight": "attn_v",
        "model.layers.0.self_attn.v_proj.weight": "attn_v",
        "blk.0.attn_qkv.weight": "attn_qkv",
        "model.layers.0.self_attn.qkv_proj.weight": "attn_qkv",
        "model.layers.0.self_attn.kv_b_proj.weight": "attn_kv_b",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": "other",
        "model.layers.0.self_attn.q_a_proj.weight": "other",
        "blk.0.ffn_down_exps.weight": "ffn_down",
        "model.layers.0.mlp.gate_up_proj.weight": "ffn_up",
        "model.layers.0.block_sparse_moe.experts.1.w1.weight": "ffn_gate",
        "model.layers.0.block_sparse_moe.experts.1.w3.weight": "ffn_up",
        "output.weight": "output",
        "lm_head.weight": "output",
    }
    for name, cat in pairs.items():
        assert gguf_category(name, (64, 64)) == cat, name


def test_mix_sizes_are_in_the_published_range() -> None:
    """Llama-3.1-8B: llama.cpp's Q4_K_M is 4.92 GB (4.58 GiB), Q8_0 8.54 GB."""
    c = cfg("Llama-3.1-8B")
    assert estimate(c, weights_format="q4_k_m").weights_bytes / 1e9 == pytest.approx(4.92, abs=0.01)
    assert estimate(c, weights_format="q8_0").weights_bytes / 1e9 == pytest.approx(8.54, abs=0.01)
    assert set(GGUF_MIXES) >= {"q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m"}


# ---- weights in the estimate -------------------------------------------------------------------------
def test_weights_as_stored_from_config_and_from_tensors() -> None:
    c = cfg("Qwen2.5-7B")
    e = estimate(c)
    assert e.weights_format == "stored"
    assert e.weights_bytes == 2 * count_parameters(c) == e.weights_breakdown.kept_bytes
    assert e.parameters == count_parameters(c)
    tiny = ModelConfig.from_dict(tiny_dict("llama-tied"))
    tensors = [TensorInfo(s.name, s.shape, "F32", 4 * s.numel) for s in tensor_shapes(tiny)]
    tensors.append(TensorInfo("lm_head.weight", (128, 32), "F32", 4 * 128 * 32))  # a tied copy
    e = estimate(tiny, tensors=tensors)
    assert e.weights_bytes == 4 * count_parameters(tiny)  # tied embeddings counted once
    assert e.weights_breakdown.by_format == {"fp32": e.weights_bytes}


def test_gguf_stored_mixed_types_and_recipe_reproduce_smollm2(smollm2: tuple) -> None:
    config, tensors = smollm2
    e = estimate(config, tensors=tensors)
    assert e.weights_bytes == sum(t.nbytes for t in tensors) == 96_576_768
    assert set(e.weights_breakdown.by_format) == {"q4_1", "q8_0", "fp32"}
    assert e.parameters == count_parameters(config) == sum(t.numel for t in tensors)
    got = assign_formats(tensors, "q4_1", config=config)
    assert [f for _, f in got] == [t.dtype for t in tensors]  # llama-quantize's choices, tensor by tensor


def test_tensor_parallel_splits_weights_and_kv_heads() -> None:
    c = cfg("Llama-3.1-8B")
    one = estimate(c, context=8192)
    two = estimate(c, context=8192, tensor_parallel=2)
    wb = two.weights_breakdown
    assert two.per_gpu_weights_bytes == wb.sharded_bytes // 2 + wb.replicated_bytes
    assert wb.replicated_bytes == 2 * (32 * 2 * 4096 + 4096)  # the norms
    assert two.per_gpu_kv_cache_bytes == one.kv_cache_bytes // 2
    assert two.total_bytes == one.total_bytes and one.per_gpu_total_bytes == one.total_bytes
    sixteen = estimate(c, context=8192, tensor_parallel=16)  # 8 KV heads over 16 GPUs: replicated
    assert sixteen.per_gpu_kv_cache_bytes == one.kv_cache_bytes // 8
    assert any("replicated KV head" in n for n in sixteen.notes)
    ds = estimate(cfg("DeepSeek-V3"), context=8192, tensor_parallel=8)
    assert ds.per_gpu_kv_cache_bytes == ds.kv_cache_bytes  # the MLA latent is not split


# ---- KV cache: formulas ------------------------------------------------------------------------------
def test_kv_70b_example_from_the_docs() -> None:
    base = dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64,
    )  # fmt: skip
    mha = ModelConfig.from_dict(base)
    gqa = ModelConfig.from_dict(base | {"num_key_value_heads": 8})
    assert kv_cache_bytes(mha, 8192) == 2 * 80 * 64 * 128 * 8192 * 2 == 20 * GIB
    assert kv_cache_bytes(gqa, 8192) == 2.5 * GIB


def test_kv_dtypes_count_block_scales() -> None:
    c = cfg("Llama-3.1-8B")  # K and V rows of 8 × 128 = 1024 values per layer
    per_value = {"f32": 4, "f16": 2, "bf16": 2, "fp8": 1, "q8_0": 34 / 32, "q4_0": 18 / 32}
    for dtype, b in per_value.items():
        assert kv_cache_bytes(c, 1000, kv_dtype=dtype, batch=3) == 3 * 1000 * 32 * 2 * 1024 * b
    odd = ModelConfig.from_dict(tiny_dict("llama") | {"num_key_value_heads": 1, "hidden_size": 40})
    with pytest.raises(
        QuantError, match="KV cache dtype q8_0 stores blocks of 32 values but this model's K/V rows hold 10"
    ):
        kv_cache_bytes(odd, 100, kv_dtype="q8_0")


def test_mla_latent_and_expanded() -> None:
    c = cfg("DeepSeek-V3")
    assert kv_widths(c) == (512 + 64, 0)
    assert kv_cache_bytes(c, 4096) == 61 * 4096 * (512 + 64) * 2
    assert kv_cache_bytes(c, 4096, kv_layout="llama.cpp") == kv_cache_bytes(c, 4096)
    assert kv_widths(c, "expanded-mla") == (128 * (128 + 64), 128 * 128)
    assert kv_cache_bytes(c, 4096, kv_layout="expanded-mla") == 61 * 4096 * 128 * (192 + 128) * 2
    dense = cfg("Llama-3.1-8B")
    assert kv_cache_bytes(dense, 999, kv_layout="expanded-mla") == kv_cache_bytes(dense, 999)


def test_sliding_window_layouts() -> None:
    g = cfg("gemma-3-27b")  # window 1024, every 6th layer global: 10 full + 52 sliding layers
    assert kv_tokens_per_layer(g, 8192).count(8192) == 10
    assert kv_tokens_per_layer(g, 8192).count(1024) == 52
    row = 2 * 16 * 128 * 2
    assert kv_cache_bytes(g, 8192) == row * (10 * 8192 + 52 * 1024)
    assert kv_cache_bytes(g, 500) == row * 62 * 500  # shorter than the window
    assert kv_cache_bytes(g, 8192, kv_layout="llama.cpp") == row * 62 * 8192  # swa_full: no shrinking
    assert kv_cache_bytes(g, 8000, kv_layout="llama.cpp-swa") == row * (10 * 8192 + 52 * 1536)
    assert llama_cpp_n_ctx(4000) == 4096 and llama_cpp_n_ctx(4096) == 4096 and llama_cpp_n_ctx(1) == 256
    q = cfg("Qwen2.5-7B")  # use_sliding_window false: every layer full
    assert set(kv_tokens_per_layer(q, 200_000)) == {200_000}


# ---- KV cache against transformers ---------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(TINY))
def test_kv_matches_transformers_tiny(key: str) -> None:
    """Real forward pass on CPU (fp32), then the bytes transformers' DynamicCache holds.

    Sliding-window layers (DynamicSlidingWindowLayer) keep sliding_window - 1 tokens between steps;
    our windowed layout counts sliding_window, hence ≤ 1% with a window of 200. DeepSeek's MLA is
    cached compressed by transformers 5 (K = kv_lora_rank, V = rope part), exactly our latent rows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    d = tiny_dict(key)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(d)).eval()
    ids = torch.randint(3, 128, (2, 256))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    theirs = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    ours = kv_cache_bytes(ModelConfig.from_dict(d), 256, batch=2, kv_dtype="f32")
    assert ours == pytest.approx(theirs, rel=0.01)
    if key.startswith("deepseek"):
        assert ours == theirs
        # What an engine without an MLA-aware cache holds: K and V expanded per head by kv_b_proj.
        attn, layer = model.model.layers[0].self_attn, cache.layers[0]
        k, v = attn.expand_kv(layer.keys, layer.values)
        expanded = kv_cache_bytes(
            ModelConfig.from_dict(d), 256, batch=2, kv_dtype="f32", kv_layout="expanded-mla"
        )
        assert expanded == len(cache.layers) * (k.nbytes + v.nbytes)


@pytest.mark.parametrize("name", sorted(FULL))
def test_kv_matches_transformers_full_size_on_meta(name: str) -> None:
    """Full-size models, forward on the meta device (shapes only), 5000 tokens × 2 sequences in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(FULL[name]), dtype=torch.bfloat16)
    ids = torch.zeros((2, 5000), dtype=torch.long, device="meta")
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    theirs = sum(
        (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in cache.layers
    )
    ours = kv_cache_bytes(cfg(name), 5000, batch=2, kv_dtype="bf16")
    assert ours == pytest.approx(theirs, rel=0.01)


def test_importing_has_no_cycle_and_no_torch() -> None:
    import subprocess
    import sys

    modules = ("llmctl.quant.recipes", "llmctl.tensors", "llmctl.memory", "llmctl.quant.formats",
               "llmctl.memory.chart")  # fmt: skip
    for module in modules:
        code = f"import sys, {module}, llmctl.memory as m; assert callable(m.estimate); assert 'torch' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True)


# ---- activations and overhead ------------------------------------------------------------------------
def test_activation_formula_by_hand() -> None:
    c = ModelConfig.from_dict(tiny_dict("llama") | {"attention_bias": False, "mlp_bias": False})
    hidden = 2 * 512 * 32 * 2
    qkv = 512 * (4 + 2 + 2) * 8 * 2
    scores = 4 * 512 * 1000 * 4
    mlp = 3 * 512 * 48 * 2
    logits = 512 * 128 * 4
    assert activation_bytes(c, 1000) == hidden + qkv + scores + logits
    assert activation_bytes(c, 1000, flash_attention=True) == hidden + mlp + logits
    assert (
        activation_bytes(c, 100, batch=2)
        == 2 * (2 * 100 * 32 * 2) + 2 * 100 * 8 * 8 * 2 + 2 * 4 * 100 * 100 * 4 + 2 * 100 * 128 * 4
    )


def test_flash_attention_reaches_every_figure_of_the_report() -> None:
    """memory_report passes flash_attention to the estimates, the fit search and the curve alike."""
    from llmctl.memory.report import memory_report

    c = cfg("Llama-3.1-8B")
    reports = {
        fa: memory_report("x", c, None, stored_format="bf16", weights_formats=["q4_k_m"], context=32768,
                          gpu="RTX 4090", flash_attention=fa)
        for fa in (False, True)
    }  # fmt: skip
    eager, fused = reports[False], reports[True]
    assert (eager.estimates[0].flash_attention, fused.estimates[0].flash_attention) == (False, True)
    scores = 32 * 512 * 32768 * 4  # heads × chunk × keys × fp32 at the 32k context: 2 GiB
    qkv = 512 * 48 * 128 * 2
    mlp = 3 * 512 * 14336 * 2
    assert eager.estimates[0].activation_bytes - fused.estimates[0].activation_bytes == qkv + scores - mlp
    assert fused.fits[0].max_context > eager.fits[0].max_context  # type: ignore[operator]
    assert fused.curve["q4_k_m"][-1] < eager.curve["q4_k_m"][-1]
    assert eager.to_dict()["estimates"][0]["flash_attention"] is False


def test_no_gpu_means_no_max_context() -> None:
    from llmctl.memory.report import memory_report

    r = memory_report("x", cfg("Llama-3.1-8B"), None, stored_format="bf16")
    assert r.gpu is None and r.budget_bytes is None
    assert len(r.fits) == len(GPUS) and all(f.max_context is None and f.max_batch is None for f in r.fits)


def test_chart_files_from_the_report_figures() -> None:
    import csv
    import xml.etree.ElementTree as ET

    from llmctl.memory import chart
    from llmctl.memory.report import memory_report

    r = memory_report("a <model> & co", cfg("Phi-3-mini-4k"), None, stored_format="bf16", vram_gib=8)
    rows = list(csv.reader(chart.to_csv(r).splitlines()))
    assert rows[0] == ["context", "stored", "gpu_bytes"]
    assert [int(row[0]) for row in rows[1:]] == r.curve_contexts == [512, 1024, 2048, 4096]
    assert [int(row[1]) for row in rows[1:]] == r.curve["stored"]
    assert {int(row[2]) for row in rows[1:]} == {8 * GIB}
    root = ET.fromstring(chart.to_svg(r))  # the model's name is escaped
    assert "a <model> & co" in "".join(root.itertext())
    assert "bf16 (stored)" in "".join(root.itertext())


def test_totals_add_up_and_overhead_rule() -> None:
    e = estimate(cfg("Mistral-7B-v0.1"), weights_format="q4_k_m", context=32768, batch=2, kv_dtype="q8_0")
    assert e.total_bytes == e.weights_bytes + e.kv_cache_bytes + e.activation_bytes + e.overhead_bytes
    assert e.overhead_bytes == OVERHEAD_FIXED_BYTES + math.ceil(
        OVERHEAD_FRACTION * (e.weights_bytes + e.kv_cache_bytes + e.activation_bytes)
    )
    assert e.kv_cache_bytes == 2 * 32 * 4096 * 2 * 1024 * 34 // 32  # the 4096-token window, q8_0
    assert e.to_dict()["weights_breakdown"]["by_format"]["q4_k"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": 0}, "context must be a positive integer, got 0"),
        ({"batch": -1}, "batch must be a positive integer, got -1"),
        (
            {"kv_dtype": "int4"},
            "unknown KV cache dtype 'int4'; choose one of f32, f16, bf16, fp8, q8_0, q4_0",
        ),
        ({"kv_layout": "paged"}, "unknown KV layout 'paged'; choose one of windowed, llama.cpp"),
        ({"tensor_parallel": 0}, "tensor_parallel must be a positive integer, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        estimate(cfg("Llama-3.1-8B"), **kwargs)


# ---- what fits ---------------------------------------------------------------------------------------
def test_max_context_and_batch_are_the_largest_that_fit() -> None:
    c = cfg("Llama-3.1-8B")
    vram = find_gpu("RTX 4090").vram_bytes
    ctx = max_context_that_fits(c, vram_bytes=vram, weights_format="q4_k_m")
    assert 0 < ctx < c.max_position_embeddings
    assert estimate(c, weights_format="q4_k_m", context=ctx).per_gpu_total_bytes <= vram
    assert estimate(c, weights_format="q4_k_m", context=ctx + 1).per_gpu_total_bytes > vram
    b = max_batch_that_fits(c, vram_bytes=vram, weights_format="q4_k_m", context=4096)
    assert estimate(c, weights_format="q4_k_m", context=4096, batch=b).per_gpu_total_bytes <= vram
    assert estimate(c, weights_format="q4_k_m", context=4096, batch=b + 1).per_gpu_total_bytes > vram
    assert 0 < max_context_that_fits(c, vram_bytes=vram) < ctx  # bf16: 15 GiB of weights leave less room
    assert max_context_that_fits(cfg("Mixtral-8x7B"), vram_bytes=vram) == 0  # 87 GiB of weights
    assert max_batch_that_fits(cfg("Mixtral-8x7B"), vram_bytes=vram) == 0
    small = max_context_that_fits(cfg("Phi-3-mini-4k"), vram_bytes=80 * GIB)
    assert small == 4096  # capped at max_position_embeddings


# ---- GPUs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rtx4090", "RTX 4090", "4090", "NVIDIA GeForce RTX 4090", "rtx_4090"])
def test_find_gpu_is_forgiving(name: str) -> None:
    assert find_gpu(name).name == "RTX 4090"
    assert find_gpu(name).vram_bytes == 24 * GIB


def test_gpu_table() -> None:
    want = {"RTX 3060": 12, "RTX 3080 10GB": 10, "RTX 3080 12GB": 12, "RTX 3090": 24, "RTX 4060": 8,
            "RTX 4060 Ti 16GB": 16, "RTX 4070": 12, "RTX 4080": 16, "RTX 5090": 32, "A10": 24, "L4": 24,
            "T4": 16, "A100 40GB": 40, "A100 80GB": 80, "L40S": 48, "H100 80GB": 80, "H200": 141,
            "B200": 192, "MI300X": 192}  # fmt: skip
    table = {g.name: g.vram_bytes for g in GPUS}
    for name, gib in want.items():
        assert table[name] == gib * GIB, name
    assert find_gpu("h100").name == "H100 80GB" and find_gpu("a100 40gb").name == "A100 40GB"
    assert any(g.vendor == "Apple" and g.usable_bytes < g.vram_bytes for g in GPUS)


def test_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(
        UsageError, match=r"unknown GPU 'rtx 9090'; known GPUs: RTX 3060, .*H100 80GB.*--vram"
    ):
        find_gpu("rtx 9090")


# ---- bundled GGUFs -------------------------------------------------------------------------------------
def read_gguf(path: Path) -> tuple[ModelConfig, list[TensorInfo]]:
    """Config and tensor table of a GGUF via gguf-py; shapes reversed to PyTorch order (row last)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {}
    for key, f in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            meta[key] = [None] * len(f.data)
        elif not key.startswith("tokenizer.ggml.") or key.endswith(("bos_token_id", "eos_token_id")):
            meta[key] = f.contents()
    tensors = [
        TensorInfo(
            t.name, tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name.lower(), int(t.n_bytes)
        )
        for t in reader.tensors
    ]
    config = ModelConfig.from_gguf_metadata(meta, str(path), tensor_names=[t.name for t in tensors])
    return config, tensors


SMOLLM2 = smollm2_path()


@pytest.fixture(scope="session")
def smollm2() -> tuple[ModelConfig, list[TensorInfo]]:
    return read_gguf(SMOLLM2)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return gemma3_path()


@pytest.mark.slow
def test_q4_k_m_recipe_reproduces_gemma_gguf(gemma_path: Path) -> None:
    config, tensors = read_gguf(gemma_path)
    assert config.tie_word_embeddings and config.sliding_window == 512 and config.head_dim == 256
    assert [f for _, f in assign_formats(tensors, "q4_k_m", config=config)] == [t.dtype for t in tensors]
    # From the config alone (Hugging Face names), the same bytes as the real file's tensors.
    stored = sum(t.nbytes for t in tensors)
    assert estimate(config, weights_format="q4_k_m").weights_bytes == stored == 246_587_904
    assert estimate(config, tensors=tensors).weights_bytes == stored
    assert count_parameters(config) == sum(t.numel for t in tensors) == 268_098_176


def llama_cpp_kv_mib(capfd: pytest.CaptureFixture, path: Path, n_ctx: int, **kw: object) -> float:
    """Load with llama.cpp and add up the 'llama_kv_cache: size = X MiB' lines it logs (one per cache;
    two for sliding-window models)."""
    from llama_cpp import Llama

    capfd.readouterr()
    llm = Llama(str(path), n_ctx=n_ctx, vocab_only=False, n_gpu_layers=0, verbose=True, **kw)
    err = capfd.readouterr().err
    del llm
    sizes = [float(m) for m in re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", err)]
    assert sizes, err[-2000:]
    return sum(sizes)


@pytest.mark.slow
@pytest.mark.parametrize(("n_ctx", "mib"), [(4096, 90.0), (4000, 90.0), (1000, 22.5)])
def test_llama_cpp_kv_size_smollm2(
    capfd: pytest.CaptureFixture, smollm2: tuple, n_ctx: int, mib: float
) -> None:
    """n_ctx is padded to a multiple of 256: 4000 → 4096 cells, 1000 → 1024."""
    config, _ = smollm2
    theirs = llama_cpp_kv_mib(capfd, SMOLLM2, n_ctx)
    ours = kv_cache_bytes(config, n_ctx, kv_layout="llama.cpp") / MIB
    assert round(ours, 2) == theirs == mib


@pytest.mark.slow
def test_llama_cpp_kv_size_quantized_cache(capfd: pytest.CaptureFixture, smollm2: tuple) -> None:
    """q8_0 K and V (flash attention on): 34 bytes per 32 values, as llama.cpp allocates."""
    config, _ = smollm2
    theirs = llama_cpp_kv_mib(capfd, SMOLLM2, 1000, type_k=8, type_v=8, flash_attn=True)
    ours = kv_cache_bytes(config, 1000, kv_dtype="q8_0", kv_layout="llama.cpp")
    assert ours == 2 * 30 * 1024 * 192 // 32 * 34
    assert round(ours / MIB, 2) == theirs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n_ctx", "swa_full", "layout"),
    [(4096, None, "llama.cpp"), (4096, False, "llama.cpp-swa"), (1000, False, "llama.cpp-swa")],
)
def test_llama_cpp_kv_size_gemma(
    capfd: pytest.CaptureFixture, gemma_path: Path, n_ctx: int, swa_full: bool | None, layout: str
) -> None:
    """Gemma 3: 3 full + 15 sliding layers. llama.cpp's default (swa_full) gives the sliding layers the
    full context (72 MiB at 4096); with swa_full=False they hold pad256(512 + n_ubatch) = 1024 cells."""
    config, _ = read_gguf(gemma_path)
    kw = {} if swa_full is None else {"swa_full": swa_full}
    theirs = llama_cpp_kv_mib(capfd, gemma_path, n_ctx, **kw)
    ours = kv_cache_bytes(config, n_ctx, kv_layout=layout)
    assert round(ours / MIB, 2) == theirs
    assert estimate(config, context=n_ctx, kv_layout="windowed").kv_cache_bytes < ours or n_ctx <= 512
