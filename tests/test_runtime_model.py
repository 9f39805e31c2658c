"""The torch runtime against transformers: logits, cached decoding, greedy generation, RoPE, loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, SEQ, build_hf_model

from llmctl.config import ModelConfig
from llmctl.errors import FormatError, SourceError, UnsupportedArchitectureError, UsageError
from llmctl.runtime.device import compute_dtype, parse_dtype, pick_device, set_threads
from llmctl.runtime.generate import decode_one_token, greedy, prefill
from llmctl.runtime.loader import load_model, load_state_dict
from llmctl.runtime.model import Transformer
from llmctl.runtime.rope import inv_frequencies

TOL = 1e-4  # max |Δlogit| against transformers in fp32


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


# ---- agreement with transformers -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_transformers(family, tiny_models, loaded, tokens):
    """Cache-free forward over a batch of 2 (the evaluation path), past the sliding window."""
    ref = hf_logits(tiny_models[family][1], tokens)
    with torch.no_grad():
        out = loaded[family](tokens)
    assert out.shape == ref.shape == (2, SEQ, 96)
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_matches_transformers(family, tiny_models, loaded, tokens):
    """Chunked prefill (all chunk logits compared) then one decode step, batch of 2."""
    model = loaded[family]
    ref = hf_logits(tiny_models[family][1], tokens)
    cache = model.make_cache(max_len=SEQ, batch_size=2)
    with torch.no_grad():
        for start in range(0, SEQ - 1, 5):
            end = min(start + 5, SEQ - 1)
            out = model(tokens[:, start:end], cache)
            assert (out - ref[:, start:end]).abs().max().item() <= TOL
        last = decode_one_token(model, tokens[:, -1:], cache)
    assert cache.length == SEQ
    assert (last - ref[:, -1]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family, tiny_models, loaded):
    hf = tiny_models[family][1]
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # An explicit mask: the prompt holds token 0, which transformers would mask as Gemma's pad id.
        mask = torch.ones_like(prompt)
        ref = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=16, eos_token_id=None)
        ref = ref[0, 12:].tolist()
    model = loaded[family]
    cache = model.make_cache(max_len=28)
    got = list(greedy(model, cache, prompt[0].tolist(), max_new_tokens=16, chunk_size=5))
    assert got == ref
    assert cache.length == 12 + 16 - 1  # the last token is yielded, not yet fed


def test_greedy_stops_at_eos(loaded):
    model = loaded["llama"]
    prompt = [5, 6, 7]
    first = list(greedy(model, model.make_cache(32), prompt, 8))
    eos = first[3]
    stopped = list(greedy(model, model.make_cache(32), prompt, 8, eos_ids=[eos]))
    assert stopped == first[: first.index(eos) + 1]
    assert list(greedy(model, model.make_cache(32), prompt, 0)) == []


def test_prefill_returns_last_logits(loaded, tokens):
    model = loaded["qwen3"]
    with torch.no_grad():
        full = model(tokens)
    logits = prefill(model, tokens, model.make_cache(SEQ, batch_size=2), chunk_size=7)
    assert logits.shape == (2, 96)
    assert torch.allclose(logits, full[:, -1], atol=1e-5)
    with pytest.raises(UsageError, match="chunk_size must be a positive integer"):
        prefill(model, tokens, model.make_cache(SEQ, batch_size=2), chunk_size=0)


def test_bf16_forward_close_to_fp32(tiny_models, tokens):
    folder, hf = tiny_models["gemma3"]
    model = load_model(folder, dtype="bf16")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(tokens).float()
    assert (out - hf_logits(hf, tokens)).abs().max().item() < 0.5
    # Converting a loaded model gives the same model, projections fused again.
    converted = load_model(folder).to(torch.bfloat16)
    assert converted.model.layers[0].self_attn.qkv[0].dtype == torch.bfloat16
    assert (
        converted.model.layers[0].self_attn.qkv[0].data_ptr()
        == converted.model.layers[0].self_attn.q_proj.weight.data_ptr()
    )
    with torch.no_grad():
        assert torch.equal(converted(tokens).float(), out)


# ---- RoPE ------------------------------------------------------------------------------------------
ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("name", ROPES)
def test_rope_rules_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {**ROPES[name], "rope_theta": 50000.0}
    hf_config = LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=512, rope_parameters=params
    )
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, None)
    config = ModelConfig.from_dict(hf_config.to_dict())
    inv, scale = inv_frequencies(config, "full_attention")
    assert torch.equal(inv, ref_inv)
    assert scale == pytest.approx(ref_scale, rel=1e-12)


def test_legacy_rope_scaling_key():
    """Older config.json files name the rule ``type`` (Llama 2 linear scaling)."""
    config = ModelConfig.from_dict(_tiny_dict(rope_scaling={"type": "linear", "factor": 2.0}))
    plain = ModelConfig.from_dict(_tiny_dict())
    assert torch.equal(
        inv_frequencies(config, "full_attention")[0], inv_frequencies(plain, "full_attention")[0] / 2
    )


def test_unknown_rope_type_is_refused():
    config = ModelConfig.from_dict(
        {**_tiny_dict(), "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, source="config.json"
    )
    with pytest.raises(UnsupportedArchitectureError, match="'longrope' is not supported.*llama3, yarn"):
        Transformer(config)


# ---- architectures, loading ------------------------------------------------------------------------
def _tiny_dict(**kw):
    return {
        "model_type": "llama",
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **kw,
    }


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "phi3"])
def test_estimate_only_families_are_refused(model_type):
    extra = {"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
    config = ModelConfig.from_dict(_tiny_dict(model_type=model_type, **extra))
    with pytest.raises(
        UnsupportedArchitectureError, match=f"'{model_type}'.*runs: llama, mistral, qwen2, qwen3, gemma3_text"
    ):
        Transformer(config)


def test_gemma3_config_reads_hidden_activation(tiny_models):
    folder = tiny_models["gemma3"][0]
    raw = json.loads((folder / "config.json").read_text())
    assert "hidden_act" not in raw and raw["hidden_activation"] == "gelu_pytorch_tanh"
    config = ModelConfig.from_json_file(folder / "config.json")
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert (config.rope_theta, config.rope_local_base_freq) == (1000000.0, 10000.0)
    assert config.rope_scaling["rope_type"] == "linear"


def test_hf_parameter_names(tiny_models, loaded):
    for family in ("llama", "qwen2", "gemma3_untied"):
        hf = tiny_models[family][1]
        ours = dict(loaded[family].named_parameters())
        theirs = {n for n, _ in hf.named_parameters()}
        assert set(ours) == theirs


def test_sharded_folder_and_state_dict(tiny_models, tmp_path, tokens):
    _, hf = tiny_models["qwen2"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ref = hf_logits(hf, tokens)
    with torch.no_grad():
        assert (load_model(tmp_path)(tokens) - ref).abs().max().item() <= TOL
        model = load_state_dict(ModelConfig.from_dict(hf.config.to_dict()), hf.state_dict())
        assert (model(tokens) - ref).abs().max().item() <= TOL


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(SourceError, match="pickle checkpoints are refused"):
        load_model(tmp_path)
    with pytest.raises(SourceError, match="no such file or folder"):
        load_model(tmp_path / "org" / "name")  # never taken for a hub id


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    hf = build_hf_model("llama")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(
        FormatError,
        match=r"missing model\.layers\.1\.mlp\.up_proj\.weight; unexpected model\.layers\.0\.self_attn\.extra\.weight",
    ):
        load_model(tmp_path)


def test_integer_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    hf = build_hf_model("llama")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(
        FormatError, match=r"model\.norm\.weight is I8; the torch runtime loads floating-point"
    ):
        load_model(tmp_path)


def test_wrong_shape_is_named():
    hf = build_hf_model("llama")
    sd = dict(hf.state_dict())
    sd["model.norm.weight"] = torch.ones(3)
    with pytest.raises(FormatError, match=r"model\.norm\.weight is \[3\], expected \[64\]"):
        load_state_dict(ModelConfig.from_dict(hf.config.to_dict()), sd)


# ---- device ----------------------------------------------------------------------------------------
def test_device_and_dtype_choices():
    cpu = pick_device("cpu")
    assert cpu.type == "cpu"
    assert compute_dtype(cpu) == torch.float32
    assert compute_dtype(cpu, "bf16") == torch.bfloat16
    assert parse_dtype("float16") == torch.float16
    with pytest.raises(UsageError, match="unknown compute dtype 'int8'"):
        parse_dtype("int8")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no usable CUDA"):
            pick_device("cuda")
    with pytest.raises(UsageError, match="thread count must be a positive integer"):
        set_threads(0)
    assert set_threads(None) == torch.get_num_threads()


# ---- real models --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_bundled_gguf_matches_transformers(name):
    """The bundled GGUFs (dequantized) against transformers' own GGUF loading: logits over 600 tokens, past
    Gemma 3's 512-token window; then the same 32 greedy tokens after a fixed prompt, decoded through the
    cache, continuing the 600 tokens (so Gemma's sliding layers decode from a wrapped ring buffer)."""
    from transformers import AutoModelForCausalLM

    from llmctl.runtime.tokenizer import load_tokenizer
    from llmctl.sources import resolve

    path = resolve(name).path  # installed by scripts/install.sh: missing is a failure
    model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 30000, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= TOL
    tok = load_tokenizer(path)
    prompt = tok.encode("The history of the United States of America begins", add_bos=True)
    ids = torch.cat((ids, torch.tensor([prompt])), dim=1)  # (1, 600 + prompt)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=32, eos_token_id=None)
    n = ids.shape[1]
    got = list(greedy(model, model.make_cache(n + 32), ids[0].tolist(), 32, chunk_size=256))
    assert len(got) == 32 and got == ref[0, n:].tolist()


def test_a_meta_model_is_built_without_torch_dynamo(tiny_models):
    """``loader.empty_model`` builds the model on the meta device, and every load and calibration starts with
    it. Initialising an embedding or computing RoPE frequencies on meta tensors runs torch's reference
    implementations, which import torch._dynamo and sympy: about 1 s of a quantize or chat start-up."""
    import subprocess
    import sys

    folder, _ = tiny_models["gemma3"]
    code = (
        "import sys, torch\n"
        "from llmctl.runtime.loader import empty_model\n"
        "from llmctl.sources import resolve\n"
        f"m = empty_model(resolve({str(folder)!r}).config)\n"
        "assert m.model.embed_tokens.weight.is_meta\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_model_built_on_the_cpu_has_initialised_embeddings():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(_tiny_dict()))
    w = model.model.embed_tokens.weight
    assert w.device.type == "cpu" and 0.8 < float(w.std()) < 1.2 and abs(float(w.mean())) < 0.1
