"""GGUF -> Hugging Face state dicts: name mapping, llama.cpp's Q/K permutation and Gemma norm offset undone,
parity with transformers' own GGUF loading on the bundled models."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import gemma3_path, smollm2_path

from llmctl.errors import FormatError, NotAvailableError
from llmctl.gguf.names import expected_hf_names, gguf_to_hf_name, unpermute_qk
from llmctl.gguf.reader import gguf_types as _gguf_types
from llmctl.gguf.reader import read_gguf
from llmctl.runtime.gguf_loader import dequantize_tensor, load_gguf_state_dict

Q = gguf.GGMLQuantizationType
H, FF, L, N_HEAD, N_KV, VOCAB = 64, 128, 2, 4, 2, 96  # hidden, intermediate, layers, heads, kv heads
HEAD_DIM = H // N_HEAD


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py's LlamaModel.permute does to q_proj/k_proj rows (written from its
    description: each head's two rotary halves become interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state(arch: str, *, untied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    sd = {"model.embed_tokens.weight": r(VOCAB, H), "model.norm.weight": r(H)}
    if untied:
        sd["lm_head.weight"] = r(VOCAB, H)
    for i in range(L):
        p = f"model.layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": r(N_HEAD * HEAD_DIM, H),
            p + "self_attn.k_proj.weight": r(N_KV * HEAD_DIM, H),
            p + "self_attn.v_proj.weight": r(N_KV * HEAD_DIM, H),
            p + "self_attn.o_proj.weight": r(H, N_HEAD * HEAD_DIM),
            p + "mlp.gate_proj.weight": r(FF, H),
            p + "mlp.up_proj.weight": r(FF, H),
            p + "mlp.down_proj.weight": r(H, FF),
            p + "input_layernorm.weight": r(H),
            p + "post_attention_layernorm.weight": r(H),
        }
        if arch == "qwen2":
            sd |= {
                p + f"self_attn.{x}_proj.bias": r(n * HEAD_DIM)
                for x, n in (("q", N_HEAD), ("k", N_KV), ("v", N_KV))
            }
        if arch in ("qwen3", "gemma3"):
            sd |= {p + "self_attn.q_norm.weight": r(HEAD_DIM), p + "self_attn.k_norm.weight": r(HEAD_DIM)}
        if arch == "gemma3":
            sd |= {
                p + "pre_feedforward_layernorm.weight": r(H),
                p + "post_feedforward_layernorm.weight": r(H),
            }
    return sd


# HF -> GGUF names, written out independently of the loader's table.
TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
TO_GGUF_GEMMA3 = {
    **TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def to_gguf_name(hf: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{(TO_GGUF_GEMMA3 if arch == 'gemma3' else TO_GGUF)[module]}.{suffix}"


def write_model_gguf(
    path: Path,
    arch: str,
    sd: dict[str, np.ndarray],
    *,
    types: dict[str, Q] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``sd`` the way llama.cpp's converter would: GGUF names, Q/K permuted for llama, Gemma norms + 1."""
    types = types or {}
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    for hf, arr in sd.items():
        if arch == "llama" and ".q_proj." in hf:
            arr = llama_cpp_permute(arr, N_HEAD)
        if arch == "llama" and ".k_proj." in hf:
            arr = llama_cpp_permute(arr, N_KV)
        if arch == "gemma3" and hf.endswith("norm.weight"):
            arr = arr + 1
        qtype = types.get(hf, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(to_gguf_name(hf, arch), arr)
        elif qtype == Q.F16:
            w.add_tensor(to_gguf_name(hf, arch), arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(to_gguf_name(hf, arch), q, raw_shape=q.shape, raw_dtype=qtype)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- mapping and transforms ----------------------------------------------------------------------
@pytest.mark.parametrize(("n_head", "head_dim", "cols"), [(4, 16, 64), (3, 64, 32), (1, 8, 0), (8, 128, 5)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int) -> None:
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)  # weights and biases
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    back = unpermute_qk(torch.from_numpy(llama_cpp_permute(w, n_head)), n_head)
    assert torch.equal(back, torch.from_numpy(w))
    with pytest.raises(FormatError, match="do not split into 5 heads"):
        unpermute_qk(torch.zeros(12, 3), 5)


def test_name_mapping() -> None:
    assert gguf_to_hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output.weight", "qwen3") == "lm_head.weight"
    assert gguf_to_hf_name("blk.7.attn_q.bias", "qwen2") == "model.layers.7.self_attn.q_proj.bias"
    assert (
        gguf_to_hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert (
        gguf_to_hf_name("blk.0.ffn_norm.weight", "gemma3")
        == "model.layers.0.pre_feedforward_layernorm.weight"
    )
    assert (
        gguf_to_hf_name("blk.0.post_ffw_norm.weight", "gemma3")
        == "model.layers.0.post_feedforward_layernorm.weight"
    )
    assert gguf_to_hf_name("blk.0.post_ffw_norm.weight", "llama") is None
    assert gguf_to_hf_name("blk.0.attn_qkv.weight", "llama") is None


def test_dequantizable_types_match_installed_gguf_py() -> None:
    _, dequantizable, _ = _gguf_types()
    registered = set(gguf.quants._type_traits) | {Q.F32, Q.F16}
    assert dequantizable == registered, "gguf-py's dequantizers changed; update _gguf_types()"


# ---- synthetic models per architecture -----------------------------------------------------------
def test_llama_permutation_undone_and_tied(tmp_path: Path) -> None:
    sd = hf_state("llama")
    types = {"model.layers.0.mlp.up_proj.weight": Q.F16, "model.layers.1.mlp.down_proj.weight": Q.Q8_0}
    path = tmp_path / "llama.gguf"
    write_model_gguf(path, "llama", sd, types=types)
    cfg, got = load_gguf_state_dict(path)
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings and cfg.num_key_value_heads == N_KV
    assert set(got) == set(sd) == expected_hf_names(cfg)
    for name, ref in sd.items():
        if name in types:
            continue
        assert torch.equal(got[name], torch.from_numpy(ref)), name  # exact: F32 and a pure permutation
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[up], torch.from_numpy(sd[up].astype(np.float16).astype(np.float32)))
    down = "model.layers.1.mlp.down_proj.weight"
    q8 = gguf.quants.dequantize(gguf.quants.quantize(sd[down], Q.Q8_0), Q.Q8_0)
    assert torch.equal(got[down], torch.from_numpy(q8))
    assert all(t.dtype == torch.float32 for t in got.values())
    _, bf16 = load_gguf_state_dict(path, dtype=torch.bfloat16)
    assert bf16["model.norm.weight"].dtype == torch.bfloat16


def test_quantized_q_proj_is_unpermuted(tmp_path: Path) -> None:
    sd = hf_state("llama", seed=3)
    q = "model.layers.1.self_attn.q_proj.weight"
    path = tmp_path / "q.gguf"
    write_model_gguf(path, "llama", sd, types={q: Q.Q8_0})
    _, got = load_gguf_state_dict(path)
    err = (got[q] - torch.from_numpy(sd[q])).abs().max().item()
    assert err < 0.05  # Q8_0 rounding only; a wrong row order would be off by O(1)


def test_untied_llama_keeps_lm_head(tmp_path: Path) -> None:
    sd = hf_state("llama", untied=True)
    path = tmp_path / "untied.gguf"
    write_model_gguf(path, "llama", sd)
    cfg, got = load_gguf_state_dict(path)
    assert not cfg.tie_word_embeddings
    assert torch.equal(got["lm_head.weight"], torch.from_numpy(sd["lm_head.weight"]))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
def test_other_architectures_roundtrip_exactly(tmp_path: Path, arch: str) -> None:
    sd = hf_state(arch)
    path = tmp_path / f"{arch}.gguf"
    write_model_gguf(path, arch, sd)
    cfg, got = load_gguf_state_dict(path)
    assert set(got) == set(sd) == expected_hf_names(cfg)
    for name, ref in sd.items():
        # Gemma: stored w + 1, loaded back as w (float32 rounding of the +1/-1 only).
        tol = 1e-6 if arch == "gemma3" and name.endswith("norm.weight") else 0
        torch.testing.assert_close(got[name], torch.from_numpy(ref), rtol=0, atol=tol, msg=name)
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.qk_norm == (arch != "qwen2")


def test_unknown_and_missing_tensors(tmp_path: Path) -> None:
    sd = hf_state("llama")
    path = tmp_path / "extra.gguf"
    write_model_gguf(path, "llama", sd, extra={"blk.0.attn_qkv.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(
        FormatError,
        match=r"unknown tensor name\(s\) for architecture 'llama' with 2 layers: blk.0.attn_qkv.weight",
    ):
        load_gguf_state_dict(path)
    path = tmp_path / "layer.gguf"
    write_model_gguf(path, "llama", sd, extra={"blk.2.attn_norm.weight": np.zeros(H, np.float32)})
    with pytest.raises(FormatError, match="unknown tensor name.*blk.2.attn_norm.weight"):
        load_gguf_state_dict(path)
    del sd["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "missing.gguf"
    write_model_gguf(path, "llama", sd)
    with pytest.raises(
        FormatError, match="lacks model.layers.1.mlp.up_proj.weight for a 2-layer llama model"
    ):
        load_gguf_state_dict(path)


def test_rope_freqs_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "rope.gguf"
    write_model_gguf(
        path, "llama", hf_state("llama"), extra={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)}
    )
    _, got = load_gguf_state_dict(path)
    assert not any("rope" in k for k in got)


def test_type_gguf_py_cannot_dequantize(tmp_path: Path) -> None:
    path = tmp_path / "q8k.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("t", np.zeros((2, 292), np.uint8), raw_shape=(2, 292), raw_dtype=Q.Q8_K)  # 2 x 256 values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_gguf(path)
    assert info.tensors[0].dtype == "q8_k" and info.tensors[0].shape == (2, 256)
    with pytest.raises(
        NotAvailableError, match="tensor 't' is stored as Q8_K, which gguf-py .* cannot dequantize"
    ):
        dequantize_tensor(info, "t")


# ---- parity with transformers on the bundled models ----------------------------------------------


@pytest.fixture
def parse_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers parses a GGUF with gguf-py twice per from_pretrained (config, then tensors), ~10 s each
    for Gemma's vocabulary; reuse the reader so the oracle stays fast. Its loading logic is unchanged."""
    cache: dict[tuple[str, str], gguf.GGUFReader] = {}
    real = gguf.GGUFReader

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in cache:
            cache[key] = real(path, mode)
        return cache[key]

    monkeypatch.setattr(gguf, "GGUFReader", reader)


def assert_parity_with_transformers(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    cfg, ours = load_gguf_state_dict(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = model.state_dict()
    assert model.config.tie_word_embeddings == cfg.tie_word_embeddings
    if cfg.tie_word_embeddings:
        assert ref["lm_head.weight"] is ref["model.embed_tokens.weight"] or torch.equal(
            ref["lm_head.weight"], ref["model.embed_tokens.weight"]
        )
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    worst = 0.0
    for name, t in ours.items():
        assert t.shape == ref[name].shape, name
        worst = max(worst, (t - ref[name]).abs().max().item())
    return ours, worst


@pytest.mark.slow
def test_smollm2_parity_with_transformers(parse_once: None) -> None:
    ours, worst = assert_parity_with_transformers(smollm2_path())
    assert len(ours) == 272 and worst == 0.0  # Q/K unpermuted exactly as transformers does


@pytest.mark.slow
def test_gemma3_parity_with_transformers(parse_once: None) -> None:
    path = gemma3_path()
    ours, worst = assert_parity_with_transformers(path)
    assert len(ours) == 236 and worst == 0.0
    # HF convention (x * (1 + w)): the stored norm weights are w + 1, ours are w.
    stored = dequantize_tensor(read_gguf(path), "blk.0.attn_norm.weight")
    assert torch.equal(ours["model.layers.0.input_layernorm.weight"], stored - 1)
