"""Tensor names and layout between Hugging Face checkpoints and GGUF files, in both directions.

One table gives each GGUF tensor name its Hugging Face parameter name; the writer (HF → GGUF) and the
loader (GGUF → HF) both read it. llama.cpp's converter (convert_hf_to_gguf.py) also changes some tensors on
the way into GGUF; ``to_gguf_layout`` does what it does and ``from_gguf_layout`` undoes it:

* **Q/K row permutation** (``LlamaModel.permute``, GGUF architectures ``llama``/``mistral``): ggml's "normal"
  RoPE rotates adjacent pairs (x0, x1), HF rotates halves (x_i, x_{i+d/2}), so the converter reorders the
  rows of each head of ``q_proj``/``k_proj`` from [half 0, half 1] to interleaved pairs. Qwen2/3 and
  Gemma 3 use NEOX RoPE in ggml and are stored unpermuted.
* **Gemma norm offset**: HF's Gemma RMSNorm computes ``x * (1 + w)``; ggml's computes ``x * w``, so the
  converter stores ``w + 1`` for every ``*norm.weight``.
* **Tied embeddings**: no ``output.weight`` means the model ties ``lm_head`` to ``embed_tokens``; a tied
  ``lm_head`` is not written, and not expected back.

The layout functions take numpy arrays or torch tensors alike (``reshape``, ``swapaxes``, ``+``); nothing
here imports torch. tests/test_gguf_names.py checks the table against gguf-py's ``TensorNameMap``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llmctl.errors import FormatError, NotAvailableError

if TYPE_CHECKING:
    from llmctl.config import ModelConfig
    from llmctl.gguf.reader import GGUFInfo

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
# GGUF general.architecture -> its block names: the architectures whose weights llmctl loads.
ARCH_BLOCK_NAMES = {
    "llama": BLOCK_NAMES,
    "mistral": BLOCK_NAMES,
    "qwen2": BLOCK_NAMES,
    "qwen3": BLOCK_NAMES,
    "gemma3": GEMMA3_BLOCK_NAMES,
}
PERMUTED_QK_ARCHS = ("llama", "mistral")  # GGUF architectures whose Q/K rows llama.cpp permutes (module doc)
NORM_OFFSET_ARCHS = ("gemma3",)  # GGUF architectures whose norm weights are stored as w + 1
# Present in some GGUFs but not Hugging Face parameters: llama 3.x RoPE frequency factors (derived from
# config.rope_scaling by the runtime; written from it by the converter).
IGNORED_NAMES = ("rope_freqs.weight",)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


# ---- names --------------------------------------------------------------------------------------------
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


def hf_to_gguf_name(hf: str, arch: str) -> str | None:
    """The GGUF tensor name for a Hugging Face parameter name (the table read backwards), or None."""
    for gguf_stem, hf_stem in GLOBAL_NAMES.items():
        if hf == f"{hf_stem}.weight":
            return f"{gguf_stem}.weight"
    m = _HF_BLOCK_RE.fullmatch(hf)
    if m is None:
        return None
    block = {v: k for k, v in ARCH_BLOCK_NAMES.get(arch, BLOCK_NAMES).items()}.get(m.group(2))
    return None if block is None else f"blk.{m.group(1)}.{block}.{m.group(3)}"


def layer_index(name: str) -> int | None:
    """The block number in a GGUF (``blk.3.…``) or Hugging Face (``model.layers.3.…``) name, else None."""
    m = _BLOCK_RE.fullmatch(name) or _HF_BLOCK_RE.fullmatch(name)
    return None if m is None else int(m.group(1))


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


def architecture(info: GGUFInfo) -> str:
    """The file's GGUF architecture, refused unless llmctl loads its weights (``ARCH_BLOCK_NAMES``)."""
    arch = info.metadata.get("general.architecture")
    if arch not in ARCH_BLOCK_NAMES:
        raise NotAvailableError(
            f"{info.path}: loading weights of GGUF architecture {arch!r} is not supported; "
            f"llmctl loads {', '.join(ARCH_BLOCK_NAMES)}"
        )
    return arch


def hf_names(info: GGUFInfo) -> dict[str, str]:
    """GGUF name -> Hugging Face name for every tensor of the file but ``IGNORED_NAMES``, failing on unknown
    names, out-of-range layers and missing parameters."""
    arch, cfg = architecture(info), info.config
    names: dict[str, str] = {}
    unknown: list[str] = []
    for t in info.tensors:
        if t.name in IGNORED_NAMES:
            continue
        hf = gguf_to_hf_name(t.name, arch)
        layer = layer_index(t.name)
        if hf is None or (layer is not None and layer >= cfg.num_hidden_layers):
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
    missing = sorted(expected_hf_names(cfg) - set(names.values()))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FormatError(
            f"{info.path}: the file lacks {', '.join(missing[:5])}{more} for a {cfg.num_hidden_layers}-layer "
            f"{arch} model; the file is incomplete"
        )
    return names


def gguf_names(
    hf_names: Iterable[str], arch: str, cfg: ModelConfig
) -> tuple[list[tuple[str, str]], list[str]]:
    """(HF name, GGUF name) for every parameter a GGUF of ``cfg`` holds, and the names with no GGUF name
    (unknown, or a layer past ``num_hidden_layers``). RoPE's ``inv_freq`` buffers and a tied ``lm_head``
    are not written."""
    out, unknown = [], []
    for hf in hf_names:
        if hf.endswith("rotary_emb.inv_freq") or (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        name = hf_to_gguf_name(hf, arch)
        layer = layer_index(hf)
        if name is None or (layer is not None and layer >= cfg.num_hidden_layers):
            unknown.append(hf)
        else:
            out.append((hf, name))
    return out, unknown


# ---- layout -------------------------------------------------------------------------------------------
def permute_qk(w: Any, n_head: int) -> Any:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from two halves to interleaved pairs."""
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's ``LlamaModel.permute`` on Q/K rows (weights (out, in) or biases (out,))."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise FormatError(
            f"cannot undo the Q/K permutation: {rows} rows do not split into {n_head} heads of pairs"
        )
    # (n_head, head_dim/2, 2, ...) -> (n_head, 2, head_dim/2, ...): interleaved pairs back to two halves
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(hf: str, arch: str, cfg: ModelConfig) -> int | None:
    """The head count whose rows llama.cpp permutes in this tensor, or None when it is stored as is."""
    if arch not in PERMUTED_QK_ARCHS:
        return None
    if hf.endswith(("q_proj.weight", "q_proj.bias")):
        return cfg.num_attention_heads
    if hf.endswith(("k_proj.weight", "k_proj.bias")):
        return cfg.num_key_value_heads
    return None


def _norm_offset(gguf_name: str, arch: str) -> bool:
    return arch in NORM_OFFSET_ARCHS and gguf_name.endswith("norm.weight")


def to_gguf_layout(w: Any, hf: str, gguf_name: str, arch: str, cfg: ModelConfig) -> Any:
    """One HF tensor as llama.cpp stores it in GGUF architecture ``arch``: Q/K permuted, Gemma norms + 1."""
    if (heads := _qk_heads(hf, arch, cfg)) is not None:
        w = permute_qk(w, heads)
    return w + 1.0 if _norm_offset(gguf_name, arch) else w


def from_gguf_layout(w: Any, gguf_name: str, hf: str, arch: str, cfg: ModelConfig) -> Any:
    """One GGUF tensor back in the Hugging Face layout: ``to_gguf_layout`` undone."""
    if (heads := _qk_heads(hf, arch, cfg)) is not None:
        w = unpermute_qk(w, heads)
    return w - 1.0 if _norm_offset(gguf_name, arch) else w
