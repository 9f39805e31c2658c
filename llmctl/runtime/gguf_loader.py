"""GGUF checkpoint -> (ModelConfig, Hugging Face-named float state dict), one tensor at a time.

llama.cpp's converter (convert_hf_to_gguf.py) changes some tensors on the way into GGUF; we undo that here
so the state dict is exactly what the Hugging Face checkpoint held (up to quantization):

* **Q/K row permutation** (``LlamaModel.permute``, architectures ``llama``/``mistral``): ggml's "normal" RoPE
  rotates adjacent pairs (x0, x1), HF rotates halves (x_i, x_{i+d/2}), so the converter reorders the rows
  of each head of ``q_proj``/``k_proj`` from [half 0, half 1] to interleaved pairs. Qwen2/3 and Gemma 3 use
  NEOX RoPE in ggml and are stored unpermuted.
* **Gemma norm offset**: HF's Gemma RMSNorm computes ``x * (1 + w)``; ggml's computes ``x * w``, so the
  converter stores ``w + 1`` for every ``*norm.weight``. We subtract 1.
* **Tied embeddings**: no ``output.weight`` means the model ties ``lm_head`` to ``embed_tokens``; then
  ``lm_head.weight`` is absent from the state dict and ``config.tie_word_embeddings`` is true.

Verified by parity with transformers' own GGUF loading on the bundled SmolLM2 (llama) and Gemma 3 GGUFs
(tests/test_gguf_loader.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.errors import FormatError, NotAvailableError

if TYPE_CHECKING:
    import torch

    from llmctl.config import ModelConfig
    from llmctl.gguf_file import GGUFInfo

# GGUF tensor names shared by every supported architecture.
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Per-block names: blk.{i}.<gguf> -> model.layers.{i}.<hf>.
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block; its "ffn_norm" is the pre-feed-forward one.
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
ARCH_BLOCK_NAMES = {
    "llama": BLOCK_NAMES,
    "mistral": BLOCK_NAMES,
    "qwen2": BLOCK_NAMES,
    "qwen3": BLOCK_NAMES,
    "gemma3": GEMMA3_BLOCK_NAMES,
}
PERMUTED_QK_ARCHS = ("llama", "mistral")  # see the module docstring
NORM_OFFSET_ARCHS = ("gemma3",)
# Present in some GGUFs but not Hugging Face parameters: llama 3.x RoPE frequency factors (derived from
# config.rope_scaling by the runtime).
IGNORED_NAMES = ("rope_freqs.weight",)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def _gguf_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    # Types gguf.quants.dequantize handles (gguf-py 0.19); test_gguf_loader checks this list against it.
    dequantizable = {
        Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
        Q.Q6_K, Q.TQ1_0, Q.TQ2_0, Q.MXFP4, Q.NVFP4, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
        Q.IQ1_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS,
    }  # fmt: skip
    plain = {Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}  # cast directly
    return Q, dequantizable, plain


def gguf_to_hf_name(name: str, arch: str) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name, or None if the name is unknown."""
    stem, dot, suffix = name.rpartition(".")
    if dot and stem in GLOBAL_NAMES and suffix == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"
    m = _BLOCK_RE.fullmatch(name)
    if m is None:
        return None
    hf = ARCH_BLOCK_NAMES.get(arch, BLOCK_NAMES).get(m.group(2))
    return None if hf is None else f"model.layers.{m.group(1)}.{hf}.{m.group(3)}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``LlamaModel.permute`` on Q/K rows (weights (out, in) or biases (out,))."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise FormatError(
            f"cannot undo the Q/K permutation: {rows} rows do not split into {n_head} heads of pairs"
        )
    # (n_head, head_dim/2, 2, ...) -> (n_head, 2, head_dim/2, ...): interleaved pairs back to two halves
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(info: GGUFInfo, name: str) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor (a copy; the file stays memory-mapped)."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    Q, dequantizable, plain = _gguf_types()
    qtype = info.ggml_type(name)
    data = info.tensor_data(name)
    if qtype in plain:
        arr = data.astype(np.float32)
    elif qtype in dequantizable:
        arr = dequantize(data, qtype)
        if qtype == Q.F32:
            arr = np.array(arr, copy=True)  # a view of the read-only map otherwise
    else:
        raise NotAvailableError(
            f"{info.path}: tensor {name!r} is stored as {qtype.name}, which gguf-py {_gguf_version()} "
            "cannot dequantize; re-quantize the model to another type (e.g. Q8_0, Q4_K_M)"
        )
    return torch.from_numpy(arr.reshape(info.tensor_info(name).shape))


def iter_gguf_tensors(info: GGUFInfo, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) one at a time, dequantized and converted back to HF conventions."""
    import torch

    dtype = dtype or torch.float32
    arch = _architecture(info)
    cfg = info.config
    names = _check_names(info, arch, cfg)
    for t in info.tensors:
        hf = names.get(t.name)
        if hf is None:
            continue
        w = dequantize_tensor(info, t.name)
        if arch in PERMUTED_QK_ARCHS and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif arch in PERMUTED_QK_ARCHS and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        if arch in NORM_OFFSET_ARCHS and t.name.endswith("norm.weight"):
            w = w - 1.0
        yield hf, w.to(dtype)
        del w  # the consumer holds the only reference: a loader keeps at most one tensor alive


def hf_shapes(info: GGUFInfo) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of each tensor ``iter_gguf_tensors`` yields, from the tensor table alone
    (no tensor data read)."""
    names = _check_names(info, _architecture(info), info.config)
    return {hf: tuple(info.tensor_info(name).shape) for name, hf in names.items()}


def _architecture(info: GGUFInfo) -> str:
    arch = info.metadata.get("general.architecture")
    if arch not in ARCH_BLOCK_NAMES:
        raise NotAvailableError(
            f"{info.path}: loading weights of GGUF architecture {arch!r} is not supported; "
            f"llmctl loads {', '.join(ARCH_BLOCK_NAMES)}"
        )
    return arch


def load_gguf_state_dict(
    path: str | Path | GGUFInfo, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF model into (config, state dict with Hugging Face names), dequantizing to ``dtype``
    (float32 by default). ``lm_head.weight`` is present only when the file has its own output matrix.
    The whole model is in host memory at once: ``runtime.loader.load_model`` streams instead."""
    from llmctl.gguf_file import GGUFInfo, read_gguf

    info = path if isinstance(path, GGUFInfo) else read_gguf(path)
    state = dict(iter_gguf_tensors(info, dtype))
    return info.config, state


def expected_hf_names(cfg: ModelConfig) -> set[str]:
    """The parameter names a GGUF of this config must provide (lm_head only when untied)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    per_layer = ["input_layernorm", "post_attention_layernorm"]
    per_layer += [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    if cfg.qk_norm:
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    if cfg.sandwich_norms:
        per_layer += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(cfg.num_hidden_layers):
        names.update(f"model.layers.{i}.{p}.weight" for p in per_layer)
        if cfg.attention_bias:
            names.update(f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv")
    return names


def _check_names(info: GGUFInfo, arch: str, cfg: ModelConfig) -> dict[str, str]:
    """Map every tensor name, failing on unknown names, out-of-range layers and missing parameters."""
    names: dict[str, str] = {}
    unknown: list[str] = []
    for t in info.tensors:
        if t.name in IGNORED_NAMES:
            continue
        hf = gguf_to_hf_name(t.name, arch)
        m = _BLOCK_RE.fullmatch(t.name)
        if hf is None or (m is not None and int(m.group(1)) >= cfg.num_hidden_layers):
            unknown.append(t.name)
        else:
            names[t.name] = hf
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise FormatError(
            f"{info.path}: unknown tensor name(s) for architecture {arch!r} with "
            f"{cfg.num_hidden_layers} layers: {', '.join(unknown[:5])}{more}; the file is not a plain "
            f"{arch} model llmctl can load"
        )
    hf_names = set(names.values())
    missing = sorted(expected_hf_names(cfg) - hf_names)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FormatError(
            f"{info.path}: the file lacks {', '.join(missing[:5])}{more} for a {cfg.num_hidden_layers}-layer "
            f"{arch} model; the file is incomplete"
        )
    return names


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
