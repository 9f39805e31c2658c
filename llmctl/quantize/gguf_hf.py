"""A Hugging Face safetensors folder as a GGUF source: metadata, tokenizer and tensors as llama.cpp's
converter (convert_hf_to_gguf.py) writes them, for llmctl.quantize.gguf_out's writer.

* **Architecture** — ``llama`` and ``mistral`` become GGUF ``llama`` (as the converter does), ``qwen2``,
  ``qwen3``, ``gemma3_text`` → ``gemma3``; hyper-parameters through gguf-py's ``GGUFWriter`` helpers.
* **Tensor names** — gguf-py's ``TensorNameMap`` for the architecture; a tied ``lm_head`` is not written
  (no ``output.weight`` means tied embeddings to llama.cpp).
* **Layout** — llama.cpp's Q/K row permutation for GGUF ``llama`` (ggml's normal RoPE rotates adjacent
  pairs, Hugging Face rotates halves); Gemma's norms are stored as ``w + 1`` (HF computes ``x * (1 + w)``,
  ggml ``x * w``). Qwen2/3 and Gemma 3 run NEOX RoPE in ggml: unpermuted. Llama-3 RoPE scaling becomes
  the converter's ``rope_freqs.weight`` tensor.
* **Tokenizer** (from ``tokenizer.json``; special ids, add_bos/add_eos, merges and chat template through
  gguf-py's ``SpecialVocab``, which reads tokenizer.json, tokenizer_config.json, config.json and
  chat_template.jinja):
  - byte-level BPE → ``tokenizer.ggml.model = "gpt2"``: tokens, token types, merges, and
    ``tokenizer.ggml.pre``, llama.cpp's name for the pre-tokenizer, read off tokenizer.json's
    ``pre_tokenizer`` (see ``PRE_TOKENIZERS``); one llmctl does not know is refused rather than guessed;
  - SentencePiece-style BPE (byte fallback, "▁" for spaces) → ``"llama"``: tokens, token types and
    scores. tokenizer.json has merges, not SentencePiece scores; llama.cpp's SPM tokenizer merges the
    adjacent pair whose *result* scores highest, so each token gets minus the rank of the first merge
    that makes it (the order the merges apply in), added tokens −1000 and byte tokens 0 as the converter
    gives them.
* **Refused** (``UsageError``, nothing written): families the runtime does not run, a folder without
  tokenizer.json, an already-quantized folder, settings llama.cpp's loader cannot represent (Gemma 3 logit
  soft-capping or a query scale other than its own, RoPE scaling other than linear / llama3).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.config import FULL, SLIDING, ModelConfig
from llmctl.errors import UsageError


@dataclass
class GGUFSource:
    """What gguf_out's writer reads from a source (see its module doc): a GGUF file or a folder."""

    arch: str
    add_metadata: Callable[[Any], None]  # writes every key but general.file_type / general.quantized_by
    tensors: list[tuple[str, tuple[int, ...], int, str]]  # (GGUF name, numpy shape (rows last), bytes, dtype)
    read: Callable[[], Iterator[Any]]  # each tensor as fp32 numpy in that shape, in that order
    config: Any = None
    notes: list[str] = field(default_factory=list)


GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
}
PERMUTED_QK = ("llama",)  # GGUF architectures whose Q/K rows llama.cpp permutes (see module doc)
NORM_SHIFT = ("gemma3",)  # GGUF architectures whose norm weights are stored as w + 1
ADDED_TOKEN_SCORE = -1000.0  # the converter's score for added (control / user-defined) tokens

# tokenizer.json pre-tokenizers → llama.cpp's pre-tokenizer name (tokenizer.ggml.pre). A byte-level BPE's
# pre-tokenizer is a ByteLevel step, alone (GPT-2's split) or after a Digits or regex Split step; these are
# the Split patterns of the published tokenizers (Llama 3, Qwen2, Mistral's Tekken) and the names llama.cpp
# gives them. tests/test_quant_gguf_hf.py checks each against transformers' GGUF table and llama.cpp.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",  # llama.cpp: \p{N} split, then GPT-2's
    ("Split(" + _LLAMA3_SPLIT + ")", "ByteLevel"): "llama-bpe",
    ("Split(" + _QWEN2_SPLIT + ")", "ByteLevel"): "qwen2",
    ("Split(" + _TEKKEN_SPLIT + ")", "ByteLevel"): "tekken",
}


# ---- checks -------------------------------------------------------------------------------------------
def read_folder_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The folder's ModelConfig and raw config.json, refusing what cannot become a GGUF (see module doc)."""
    from llmctl.config import RUNTIME_FAMILIES

    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if isinstance(raw, dict) and raw.get("quantization_config"):
        raise UsageError(
            f"{folder}: the model is already quantized (config.json has quantization_config); "
            "write GGUF from the bf16/fp16/fp32 original"
        )
    cfg = ModelConfig.from_json_file(folder / "config.json")
    if cfg.model_type not in RUNTIME_FAMILIES:
        raise UsageError(
            f"{folder}: GGUF output supports {', '.join(RUNTIME_FAMILIES)} folders, not {cfg.model_type}; "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(
            f"{folder}: no tokenizer.json; a GGUF carries its tokenizer, so add the model's tokenizer.json "
            "(and tokenizer_config.json) to the folder"
        )
    _check_representable(folder, cfg)
    return cfg, raw


def _check_representable(folder: Path, cfg: ModelConfig) -> None:
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


# ---- metadata -----------------------------------------------------------------------------------------
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


def read_tokenizer(folder: Path) -> dict[str, Any]:
    """The folder's tokenizer.json, refused unless llmctl can write it as a GGUF tokenizer."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UsageError(
            f"{folder / 'tokenizer.json'}: a {model.get('type')!r} tokenizer; llmctl writes GGUF tokenizers "
            "for BPE models (byte-level or SentencePiece-style)"
        )
    if not model.get("byte_fallback"):
        pre_tokenizer_name(tok, folder / "tokenizer.json")
    return tok


def add_tokenizer(writer: Any, folder: Path, tok: dict[str, Any], n_vocab: int) -> None:
    """tokenizer.ggml.* and the chat template from the folder's tokenizer files (see module doc)."""
    import gguf

    model = tok["model"]
    tokens, types = _vocab(tok, n_vocab, folder)
    quiet = logging.getLogger("gguf.vocab")  # library code never prints: gguf-py warns through logging
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=not model.get("byte_fallback"), n_vocab=n_vocab)
    finally:
        quiet.setLevel(level)
    for key in ("bos", "eos"):  # a tokenizer.json that adds no such token: say so, not llama.cpp's default
        special.add_special_token.setdefault(key, False)
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, types, _merges(model)))  # it ranks by scores, not merges
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(tok))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tok, folder / "tokenizer.json"))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(tok))
    special.add_to_gguf(writer, quiet=True)


def _vocab(tok: dict[str, Any], n_vocab: int, folder: Path) -> tuple[list[str], list[int]]:
    """Tokens by id (padded with ``[PAD{i}]`` up to the embedding's rows, as the converter does) and their
    llama.cpp token types."""
    import gguf

    T = gguf.TokenType
    by_id: dict[int, str] = {int(i): t for t, i in tok["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    by_id.update((i, a["content"]) for i, a in added.items())
    if by_id and max(by_id) >= n_vocab:
        raise UsageError(
            f"{folder / 'tokenizer.json'}: token id {max(by_id)} is past the embedding's {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )
    unk = tok["model"].get("unk_token")
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            tokens.append(t)
            byte = tok["model"].get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)
            types.append(T.BYTE if byte else T.UNKNOWN if t == unk else T.NORMAL)
    return tokens, [int(t) for t in types]


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges, "a b" strings or [a, b] pairs, as pairs."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges") or []]


def _spm_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece-style scores from BPE merges: minus the rank of the first merge that makes a token
    (normal tokens no merge makes rank after every merge); added tokens −1000, bytes 0."""
    import gguf

    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    last = float(len(merges))
    scores = []
    for t, kind in zip(tokens, types, strict=True):
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED):
            scores.append(ADDED_TOKEN_SCORE)
        elif kind in (gguf.TokenType.BYTE, gguf.TokenType.UNKNOWN):
            scores.append(0.0)
        else:
            scores.append(-float(first.get(t, last)))
    return scores


def _adds_space_prefix(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a space before the text: a "▁" Prepend normalizer, a Metaspace that
    prepends, or a ByteLevel step with add_prefix_space."""

    def steps(node: Any, key: str) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        return (
            [s for sub in node.get(key, []) for s in steps(sub, key)]
            if node.get("type") == "Sequence"
            else [node]
        )

    norm = steps(tok.get("normalizer"), "normalizers")
    pre = steps(tok.get("pre_tokenizer"), "pretokenizers")
    return any(s.get("type") == "Prepend" for s in norm) or any(
        (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never")
        or (s.get("type") == "ByteLevel" and s.get("add_prefix_space"))
        for s in pre
    )


def pre_tokenizer_name(tok: dict[str, Any], folder: Path | str = "tokenizer.json") -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json, from its pre_tokenizer."""
    node = tok.get("pre_tokenizer") or {}
    steps = node.get("pretokenizers", []) if node.get("type") == "Sequence" else [node]
    key = tuple(_step(s) for s in steps)
    if key not in PRE_TOKENIZERS:
        raise UsageError(
            f"{folder}: llmctl does not know llama.cpp's name for this pre-tokenizer ({' + '.join(key) or 'none'}); "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return PRE_TOKENIZERS[key]


def _step(s: dict[str, Any]) -> str:
    kind = s.get("type", "?")
    if kind == "ByteLevel":
        return "ByteLevel(regex)" if s.get("use_regex", True) else "ByteLevel"
    if kind == "Digits":
        return "Digits(individual)" if s.get("individual_digits") else "Digits"
    if kind == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
        return f"Split({(s.get('pattern') or {}).get('Regex')})"
    return kind


# ---- tensors ------------------------------------------------------------------------------------------
def tensor_names(cfg: ModelConfig, hf_names: list[str], folder: Path) -> list[tuple[str, str]]:
    """(HF name, GGUF name) for every tensor written, through gguf-py's TensorNameMap; refuses unknown names."""
    import gguf

    arch = GGUF_ARCH[cfg.model_type]
    mapping = gguf.get_tensor_name_map(_model_arch(arch), cfg.num_hidden_layers)
    out, unknown = [], []
    for hf in hf_names:
        if hf.endswith("rotary_emb.inv_freq") or (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        name = mapping.get_name(hf, try_suffixes=(".weight", ".bias"))
        (out.append((hf, name)) if name else unknown.append(hf))
    if unknown:
        raise UsageError(
            f"{folder}: tensor(s) {', '.join(unknown[:3])} have no llama.cpp name for architecture {arch}; "
            "the folder is not a plain text model of its family"
        )
    return out


def _model_arch(arch: str) -> Any:
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def permute_qk(w: Any, n_head: int) -> Any:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from two halves to interleaved pairs."""
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(w: Any, hf: str, gguf_name: str, cfg: ModelConfig) -> Any:
    """One HF tensor (fp32 numpy) as llama.cpp stores it: Q/K permuted, Gemma norms + 1 (module doc)."""
    arch = GGUF_ARCH[cfg.model_type]
    if arch in PERMUTED_QK and hf.endswith(("q_proj.weight", "q_proj.bias")):
        w = permute_qk(w, cfg.num_attention_heads)
    elif arch in PERMUTED_QK and hf.endswith(("k_proj.weight", "k_proj.bias")):
        w = permute_qk(w, cfg.num_key_value_heads)
    if arch in NORM_SHIFT and gguf_name.endswith("norm.weight"):
        w = w + 1.0
    return w


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


def folder_source(folder: Path) -> Any:
    """The folder as a ``GGUFSource``: architecture, metadata writer, tensors (names, shapes) and
    a reader yielding each as fp32 numpy in GGUF layout."""
    from llmctl.checkpoint import safetensors_files
    from llmctl.quant import stio

    cfg, _ = read_folder_config(folder)
    entries: dict[str, stio.Entry] = {}
    for f in safetensors_files(folder):
        entries.update(stio.index_file(f))
    bad = [(n, e.dtype) for n, e in entries.items() if e.dtype not in ("BF16", "F16", "F32")]
    if bad:
        raise UsageError(
            f"{folder}: tensor {bad[0][0]} is {bad[0][1]}: the checkpoint is quantized or not floating point; "
            "write GGUF from the bf16/fp16/fp32 original"
        )
    names = tensor_names(cfg, list(entries), folder)
    tok = read_tokenizer(folder)  # refused here, so that --dry-run refuses it too
    embed = entries.get("model.embed_tokens.weight")
    n_vocab = embed.shape[0] if embed is not None else cfg.vocab_size
    tensors = [
        (g, tuple(entries[hf].shape), entries[hf].nbytes, entries[hf].dtype.lower()) for hf, g in names
    ]
    rope = (cfg.rope_scaling or {}).get("rope_type")
    if rope == "llama3":
        tensors.append(("rope_freqs.weight", (cfg.head_dim // 2,), 0, "f32"))
    notes: list[str] = []

    def add_metadata(writer: Any) -> None:
        writer.add_name(folder.resolve().name)
        notes.extend(add_arch_metadata(writer, cfg, n_vocab))
        add_tokenizer(writer, folder, tok, n_vocab)

    def read() -> Iterator[Any]:
        import numpy as np

        for hf, g in names:
            e = entries[hf]
            w = stio.read_rows(e).float().numpy().reshape(e.shape)
            yield to_gguf_layout(w, hf, g, cfg).astype(np.float32, copy=False)
        if rope == "llama3":
            yield llama3_rope_factors(cfg)

    return GGUFSource(GGUF_ARCH[cfg.model_type], add_metadata, tensors, read, cfg, notes)
