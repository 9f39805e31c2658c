"""llmctl.gguf.names: one table of tensor names in both directions, checked against gguf-py's TensorNameMap
(the names llama.cpp's converter writes), and the layout changes undone by their inverse on numpy and torch."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import _COMMON

from llmctl.config import ModelConfig
from llmctl.gguf.names import (
    ARCH_BLOCK_NAMES,
    from_gguf_layout,
    gguf_names,
    gguf_to_hf_name,
    hf_to_gguf_name,
    to_gguf_layout,
)

FAMILY_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def _config(family: str) -> ModelConfig:
    return ModelConfig.from_dict({**_COMMON, "model_type": family, "head_dim": 16})


def _hf_names(arch: str, layers: int) -> list[str]:
    block = ARCH_BLOCK_NAMES[arch].values()
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return names + [
        f"model.layers.{i}.{p}.{s}" for i in range(layers) for p in block for s in ("weight", "bias")
    ]


@pytest.mark.parametrize("arch", sorted(set(FAMILY_ARCH.values())))
def test_table_is_gguf_pys_tensor_name_map(arch: str) -> None:
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    reference = gguf.get_tensor_name_map(model_arch, 2)
    for hf in _hf_names(arch, 2):
        theirs = reference.get_name(hf, try_suffixes=(".weight", ".bias"))
        if theirs is None:  # a name gguf-py's map has not for this architecture (llama's q_norm)
            continue
        assert hf_to_gguf_name(hf, arch) == theirs, hf
        assert gguf_to_hf_name(theirs, arch) == hf, theirs


def test_out_of_range_layers_and_unknown_names() -> None:
    cfg = _config("llama")
    n = cfg.num_hidden_layers
    pairs, unknown = gguf_names(
        [f"model.layers.{n}.mlp.up_proj.weight", "model.rotary_emb.inv_freq", "vision.x.weight",
         "model.layers.0.mlp.up_proj.weight"], "llama", cfg,
    )  # fmt: skip
    assert pairs == [("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight")]
    assert unknown == [f"model.layers.{n}.mlp.up_proj.weight", "vision.x.weight"]


@pytest.mark.parametrize("family", sorted(FAMILY_ARCH))
def test_layout_round_trips_on_numpy_and_torch(family: str) -> None:
    cfg = _config(family)
    arch = FAMILY_ARCH[family]
    rows = cfg.num_attention_heads * cfg.head_dim
    w = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    for hf, name in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                     ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight")):  # fmt: skip
        x = w if "proj" in hf else w[0]
        stored = to_gguf_layout(x, hf, name, arch, cfg)
        permuted = arch == "llama" and "proj" in hf
        shifted = arch == "gemma3" and "norm" in hf
        assert np.array_equal(stored, x) == (not permuted and not shifted)
        exact = {"rtol": 0, "atol": 1e-6 if shifted else 0}  # (w + 1) - 1 rounds in float32
        np.testing.assert_allclose(from_gguf_layout(stored, name, hf, arch, cfg), x, **exact)
        back = from_gguf_layout(torch.from_numpy(np.ascontiguousarray(stored)), name, hf, arch, cfg)
        np.testing.assert_allclose(back.numpy(), x, **exact)


def test_importing_the_package_loads_no_torch() -> None:
    code = (
        "import sys, llmctl.gguf.reader, llmctl.gguf.names, llmctl.gguf.metadata, llmctl.gguf.vocab, "
        "llmctl.gguf.writer; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
