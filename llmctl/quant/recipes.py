"""Which weight format each tensor of a checkpoint gets, for every format llmctl knows.

``assign_formats(tensors, weights_format, group_size, base_dtype)`` returns, for each tensor, the tensor
as it would be stored in the target (same name and shape; ``dtype`` the registry format name, ``nbytes``
its exact size from ``llmctl.quant.formats``) together with that format name. Three kinds of rules:

* **Our formats** (int8, int4, int4-asym, nf4, nf4-dq, fp8): the 2-D linear weights of attention, MLP,
  experts and shared experts are quantized; embeddings and lm_head, norms, every 1-D tensor, biases and
  MoE routers stay in the checkpoint's 16-bit dtype (``base_dtype``). This is what bitsandbytes and
  compressed-tensors do by default (both quantize ``nn.Linear`` layers and skip ``lm_head``). A named
  *recipe* (``RECIPES``: uniform, k-m, k-l) moves some of them one format up (``MORE_BITS``): k-m gives
  attention q/k/v and down_proj more bits in the layers llama.cpp's Q4_K_M picks (``use_more_bits``).
* **Float formats** (fp32, fp16, bf16): every tensor in that dtype.
* **GGUF** follows llama.cpp (``llama_tensor_get_type`` and ``tensor_type_fallback`` in
  src/llama-quant.cpp). 1-D tensors and routers (``ffn_gate_inp``) are F32, as convert_hf_to_gguf.py
  writes them and llama-quantize leaves them. A *single type* (q4_k, q5_0, iq4_xs, f16, ...) puts every
  2-D tensor in that type, token_embd included, and the output tensor (lm_head, or token_embd when the
  embeddings are tied) in q6_k for k-quant types. A *mix* (``GGUF_MIXES``: q2_k, q3_k_s/m/l, q4_k_s/m,
  q5_k_s/m, q6_k and the plain q4_0, q4_1, q5_0, q5_1, q8_0) applies llama-quantize's per-tensor rules
  for that file type: attn_v and ffn_down get more bits in some layers (``use_more_bits``), attn_output
  in q2_k/q3_k mixes, the 8-expert (Mixtral) and 70B special cases, and output → q6_k (q8_0 when its
  rows are not a multiple of the block; a q8_0 file keeps q8_0). A name that is both a mix and a type
  (q4_0, q8_0, q6_k, ...) means the mix, i.e. what ``llama-quantize MODEL q4_0`` writes.
  When a row is not a multiple of the chosen type's block, llama.cpp falls back: q4_k → q5_0,
  q5_k → q5_1, q6_k → q8_0, q2_k/q3_k → q4_0 (llama.cpp before 2025 used iq4_nl here; both are 18 bytes
  per 32 weights), iq* → iq4_nl, and f16 when even that does not fit.

Names may be Hugging Face names (``model.layers.3.self_attn.v_proj.weight``) or GGUF names
(``blk.3.attn_v.weight``). Shapes are in PyTorch order, the row (``ne[0]`` in ggml) last.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from llmctl.checkpoint import TensorInfo
from llmctl.config import ModelConfig
from llmctl.errors import QuantError, UsageError
from llmctl.quant.formats import REGISTRY
from llmctl.quant.ggml_types import GGMLType
from llmctl.quant.registry import WeightFormat
from llmctl.tensors import tensor_layer, tensor_role

FLOAT_FORMATS = tuple(n for n, f in REGISTRY.items() if f.is_float)  # fp32, fp16, bf16, GGUF's f32, f16
# Our (non-GGUF) quantized formats: the recipe quantizes linear weights only. Listed grouped formats first
# (int8, int4, int4-asym, nf4, nf4-dq, then fp8), as messages have always named them.
LINEAR_ONLY_FORMATS = tuple(
    sorted((n for n, f in REGISTRY.items() if f.can_quantize and not f.is_float), key=lambda n: not REGISTRY[n].grouped)
)

_DTYPE_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "f16": "fp16", "f32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32",
}  # fmt: skip


@dataclass(frozen=True)
class GGUFMix:
    """A llama.cpp file type (``llama-quantize`` target): a default tensor type plus per-tensor rules."""

    name: str
    default: str  # ggml type of tensors no rule moves
    ftype: int  # llama.cpp's file type (enum llama_ftype) for this mix, as its quantizer takes it
    description: str


GGUF_MIXES: dict[str, GGUFMix] = {
    m.name: m
    for m in (
        GGUFMix("q2_k", "q2_k", 10, "llama.cpp Q2_K: q2_k, attn_v q3_k/q4_k, ffn_down and attn_output q3_k"),
        GGUFMix("q3_k_s", "q3_k", 11, "llama.cpp Q3_K_S: q3_k everywhere, output q6_k"),
        GGUFMix("q3_k_m", "q3_k", 12, "llama.cpp Q3_K_M: q3_k, attn_v/attn_output/ffn_down q4_k-q5_k"),
        GGUFMix("q3_k_l", "q3_k", 13, "llama.cpp Q3_K_L: q3_k, attn_v/attn_output/ffn_down q5_k"),
        GGUFMix("q4_k_s", "q4_k", 14, "llama.cpp Q4_K_S: q4_k, first attn_v and ffn_down q5_k"),
        GGUFMix("q4_k_m", "q4_k", 15, "llama.cpp Q4_K_M: q4_k, half of attn_v and ffn_down q6_k"),
        GGUFMix("q5_k_s", "q5_k", 16, "llama.cpp Q5_K_S: q5_k everywhere, output q6_k"),
        GGUFMix("q5_k_m", "q5_k", 17, "llama.cpp Q5_K_M: q5_k, half of attn_v and ffn_down q6_k"),
        GGUFMix("q6_k", "q6_k", 18, "llama.cpp Q6_K: q6_k everywhere"),
        GGUFMix("q4_0", "q4_0", 2, "llama.cpp Q4_0: q4_0 everywhere, output q6_k"),
        GGUFMix("q4_1", "q4_1", 3, "llama.cpp Q4_1: q4_1 everywhere, output q6_k"),
        GGUFMix("q5_0", "q5_0", 8, "llama.cpp Q5_0: q5_0 everywhere, output q6_k"),
        GGUFMix("q5_1", "q5_1", 9, "llama.cpp Q5_1: q5_1 everywhere, output q6_k"),
        GGUFMix("q8_0", "q8_0", 7, "llama.cpp Q8_0: q8_0 everywhere"),
    )
}


# The GGUF names a --format can take: the types gguf-py quantizes (llmctl writes them), and the mixes
# llama.cpp's quantizer makes, with their llama_ftype: GGUF_MIXES, plus the i-quant mixes whose rules
# llmctl's recipes do not model (llama.cpp makes them; estimate-memory does not take them).
PY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_MIXES = {**{n: m.ftype for n, m in GGUF_MIXES.items()}, "iq4_xs": 30, "iq4_nl": 25}


def get_format(name: str) -> type[WeightFormat]:
    """The registry's format of that name; QuantError listing the known formats and GGUF mixes if none."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted({*REGISTRY, *GGUF_MIXES}))
        raise QuantError(f"unknown weight format {name!r}; known formats: {known}") from None


# tensor_type_fallback: the type used when a row is not a multiple of the chosen type's block.
_FALLBACK = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    **dict.fromkeys(("q2_k", "q3_k", "tq1_0", "tq2_0"), "q4_0"),
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
}


def normalize_dtype(dtype: str | None, default: str = "bf16") -> str:
    """A float dtype as a registry name: 'bfloat16' / 'BF16' → 'bf16', 'float16' / 'F16' → 'fp16', ..."""
    if not dtype:
        return default
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPE_ALIASES:
        raise QuantError(
            f"base dtype {dtype!r} is not a float dtype; use one of bf16, fp16, fp32 for the tensors "
            "that stay unquantized"
        )
    return _DTYPE_ALIASES[name]


def stored_format_name(dtype: str) -> str:
    """The name a checkpoint dtype is reported under: safetensors 'BF16' → 'bf16', 'F32' → 'fp32', a GGUF
    type name as it is ('q4_k')."""
    d = dtype.lower()
    return {"f16": "fp16", "f32": "fp32", "f64": "fp64"}.get(d, d)


def is_quantized(format_name: str) -> bool:
    """Whether tensors in this format are quantized (as opposed to kept in a float dtype)."""
    return format_name.lower() not in (*FLOAT_FORMATS, "fp64", "f64")


def assign_formats(
    tensors: Sequence[TensorInfo],
    weights_format: str,
    group_size: int | None = None,
    base_dtype: str = "bf16",
    *,
    config: ModelConfig | None = None,
    recipe: str = "uniform",
    manual: Collection[str] = (),
    imatrix: bool = False,
) -> list[tuple[TensorInfo, str]]:
    """Each tensor as stored in ``weights_format``, with the registry format it gets.

    ``base_dtype`` is the dtype of the tensors our formats keep unquantized. ``config`` (optional) gives
    the GGUF mixes what llama.cpp reads from the model: heads per KV head, expert count, layer count;
    without it they are inferred from the tensor names. ``recipe``: a name in ``RECIPES``, for our
    quantized formats only. Raises QuantError, naming the tensor, for a group size that does not divide
    a row. For GGUF mixes, ``manual`` names the tensors an override types (llama.cpp's per-category layer
    counters skip them, which moves the layers its rules pick) and ``imatrix`` says the quantizer has an
    importance matrix (q4_0/q5_0 then give the first eighth of ffn_down q4_1/q5_1).
    """
    name = weights_format.lower()
    rec = check_recipe(recipe, name)
    if name in GGUF_MIXES:
        return _gguf(tensors, GGUF_MIXES[name], None, config, frozenset(manual), imatrix)
    fmt = get_format(name)  # QuantError listing the known formats for an unknown name
    if issubclass(fmt, GGMLType):
        return _gguf(tensors, None, fmt.name, config)
    if name in FLOAT_FORMATS:
        return [(_as(t, name, fmt.nbytes(t.shape)), name) for t in tensors]
    base = normalize_dtype(base_dtype)
    base_fmt = REGISTRY[base]
    n_layers = layer_count((t.name for t in tensors), config) if rec.layers else 0
    out = []
    for t in tensors:
        role = tensor_role(t.name, t.shape)
        if moved := recipe_format(rec, fmt.name, t.name, t.shape, n_layers):
            out.append((_as(t, moved[0], _nbytes(t, moved[0], group_size)), moved[0]))
        elif role == "linear" or (not fmt.keeps_embeddings and role in ("embedding", "lm_head")):
            out.append((_as(t, fmt.name, _nbytes(t, fmt.name, group_size)), fmt.name))
        else:
            out.append((_as(t, base, base_fmt.nbytes(t.shape)), base))
    return out


def _as(t: TensorInfo, fmt: str, nbytes: int) -> TensorInfo:
    return TensorInfo(t.name, tuple(t.shape), fmt, nbytes)


def _nbytes(t: TensorInfo, fmt_name: str, group_size: int | None) -> int:
    fmt = REGISTRY[fmt_name]
    try:
        return fmt.nbytes(t.shape, group_size)  # QuantError for a group that does not divide the row
    except QuantError as e:
        raise QuantError(f"{t.name} {list(t.shape)}: {e}") from None


# ---- GGUF --------------------------------------------------------------------------------------------
_CATEGORIES = [  # (category, pattern); first match wins, in llama.cpp's order
    ("attn_qkv", re.compile(r"(?:^|\.)(?:attn_qkv|qkv_proj)\.weight$")),
    ("attn_kv_b", re.compile(r"(?:^|\.)(?:attn_kv_b|kv_b_proj)\.weight$")),
    ("attn_v", re.compile(r"(?:^|\.)(?:attn_v|v_proj)\.weight$")),
    ("attn_k", re.compile(r"(?:^|\.)(?:attn_k|k_proj)\.weight$")),
    ("attn_q", re.compile(r"(?:^|\.)(?:attn_q|q_proj)\.weight$")),
    ("attn_output", re.compile(r"(?:^|\.)(?:attn_output|o_proj)\.weight$")),
    ("ffn_up", re.compile(r"ffn_up|(?:^|\.)(?:up_proj|gate_up_proj|w3)\.weight$")),
    ("ffn_gate", re.compile(r"ffn_gate|(?:^|\.)(?:gate_proj|w1)\.weight$")),
    ("ffn_down", re.compile(r"ffn_down|(?:^|\.)(?:down_proj|w2)\.weight$")),
]
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def gguf_category(name: str, shape: Sequence[int]) -> str:
    """llama.cpp's tensor category (token_embd, output, attn_v, ffn_down, ..., other) for a HF or GGUF name."""
    return _category(name, tensor_role(name, shape))


@functools.lru_cache(maxsize=1 << 17)
def _category(name: str, role: str) -> str:
    if role == "embedding":
        return "token_embd"
    if role == "lm_head":
        return "output"
    for category, pattern in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@functools.cache
def _block(ggml_name: str) -> int:
    fmt = REGISTRY[ggml_name]
    return fmt.block()[0] if issubclass(fmt, GGMLType) else 1


@functools.cache
def _block_bytes(ggml_name: str) -> tuple[int, int]:
    fmt = REGISTRY[ggml_name]
    return fmt.block() if issubclass(fmt, GGMLType) else (1, fmt.nbytes((1,)))


def ggml_nbytes(ggml_name: str, shape: Sequence[int]) -> int:
    """REGISTRY[ggml_name].nbytes(shape) for a row that fits the block, without per-call imports."""
    block, size = _block_bytes(ggml_name)
    return math.prod(shape) // block * size


def gguf_fallback(ggml_name: str, cols: int) -> str:
    if cols % _block(ggml_name) == 0:
        return ggml_name
    alt = _FALLBACK.get(ggml_name, "f16")
    return alt if cols % _block(alt) == 0 else "f16"


@dataclass
class _ModelFacts:
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    tied: bool


def _facts(tensors: Sequence[TensorInfo], config: ModelConfig | None) -> _ModelFacts:
    tied = not any(tensor_role(t.name, t.shape) == "lm_head" for t in tensors)
    if config is not None:
        nkv = config.num_key_value_heads or config.num_attention_heads
        n_layer = config.num_hidden_layers
        return _ModelFacts(
            n_layer=n_layer,
            n_gqa=config.num_attention_heads // nkv,
            n_expert=config.num_experts,
            # llama.cpp's LLM_TYPE_70B: 80-layer Llama with GQA, 80-layer Qwen2
            is_70b=n_layer == 80
            and config.model_type in ("llama", "qwen2")
            and (config.model_type == "qwen2" or nkv != config.num_attention_heads),
            tied=tied,
        )
    n_layer = layer_count(t.name for t in tensors)
    experts = {int(m.group(1)) for t in tensors if (m := _EXPERT.search(t.name))}
    n_expert = len(experts) or max((t.shape[0] for t in tensors if "_exps." in t.name), default=0)
    return _ModelFacts(n_layer=n_layer, n_gqa=1, n_expert=n_expert, is_70b=False, tied=tied)


def _layer_key(name: str) -> int:
    i = tensor_layer(name)
    return -1 if i is None else i


def _gguf(
    tensors: Sequence[TensorInfo],
    mix: GGUFMix | None,
    single: str | None,
    config: ModelConfig | None,
    manual: frozenset[str] = frozenset(),
    imatrix: bool = False,
) -> list[tuple[TensorInfo, str]]:
    facts = _facts(tensors, config)
    cats = [gguf_category(t.name, t.shape) for t in tensors]
    # llama.cpp walks tensors sorted by (layer, name), counting attn_v-like and ffn_down tensors as it
    # types them; a tensor typed by an override is not counted.
    order = sorted(range(len(tensors)), key=lambda k: (_layer_key(tensors[k].name), tensors[k].name))
    n_attn_v = sum(c in _ATTN_V_LIKE for c in cats)
    i_attn_v: dict[int, int] = {}
    i_ffn_down: dict[int, int] = {}
    for k in order:
        if tensors[k].name in manual:
            continue
        if cats[k] in _ATTN_V_LIKE:
            i_attn_v[k] = len(i_attn_v)
        elif cats[k] == "ffn_down":
            i_ffn_down[k] = len(i_ffn_down)

    out = []
    for k, t in enumerate(tensors):
        role = tensor_role(t.name, t.shape)
        if len(t.shape) < 2 or role == "router" or re.search(r"_norm\.weight$", t.name):
            out.append((_as(t, "f32", 4 * t.numel), "f32"))
            continue
        cols = t.shape[-1]
        category = cats[k]
        if mix is not None:
            i_ffn = i_ffn_down.get(k, 0) if facts.n_expert <= 1 else _layer_key(t.name)
            ggml = _mix_type(mix, category, cols, facts, i_attn_v.get(k, 0), n_attn_v, i_ffn, imatrix)
        else:
            assert single is not None
            ggml = single
            if single.endswith("_k") and (category == "output" or (facts.tied and category == "token_embd")):
                ggml = "q6_k"
        ggml = gguf_fallback(ggml, cols)
        out.append((_as(t, ggml, ggml_nbytes(ggml, t.shape)), ggml))
    return out


def _mix_type(
    mix: GGUFMix,
    category: str,
    cols: int,
    facts: _ModelFacts,
    i_attn_v: int,
    n_attn_v: int,
    i_ffn_down: int,
    imatrix: bool = False,
) -> str:
    """llama_tensor_get_type for the file types in GGUF_MIXES."""
    ftype, t = mix.name, mix.default
    if category == "output" or (facts.tied and category == "token_embd"):
        if cols % _block(t):
            return "q8_0"
        return t if t == "q8_0" else "q6_k"
    if category in _ATTN_V_LIKE:
        if ftype == "q2_k":
            t = "q4_k" if facts.n_gqa >= 4 else "q3_k"
        elif ftype == "q3_k_m":
            t = "q5_k" if i_attn_v < 2 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
            t = "q6_k"
        elif ftype == "q4_k_s" and i_attn_v < 4:
            t = "q5_k"
        if facts.is_70b and t in ("q3_k", "q4_k"):
            t = "q5_k"
        if facts.n_expert == 8:
            t = "q8_0"
        return t
    if category == "attn_k":
        return "q8_0" if facts.n_expert == 8 else t
    if category == "ffn_down":
        i, n = i_ffn_down, facts.n_layer
        if ftype == "q2_k":
            t = "q3_k"
        elif ftype == "q3_k_m":
            t = "q5_k" if i < n // 16 else "q4_k"
        elif ftype == "q3_k_l":
            t = "q5_k"
        elif ftype in ("q4_k_m", "q5_k_m"):
            if use_more_bits(i, n):
                t = "q6_k"
        elif ftype == "q4_k_s" and i < n // 8:
            t = "q5_k"
        elif ftype in ("q4_0", "q5_0") and imatrix and i < n // 8:  # llama.cpp's guard, with an imatrix only
            t = {"q4_0": "q4_1", "q5_0": "q5_1"}[ftype]
        return t
    if category == "attn_output":
        if facts.n_expert == 8:
            return "q5_k" if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else t
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype, t)
    return t


# ---- recipes for our formats ------------------------------------------------------------------------
# "One format up" for each base format (its ``more_bits`` in the registry): what a recipe gives the tensors
# it favours. 4-bit formats go to int8 (every layout that holds them mixed holds int8 too, except
# bitsandbytes'); 8-bit formats have nothing above them but 16 bits, so they stay.
MORE_BITS = {n: f.more_bits for n, f in REGISTRY.items() if f.more_bits}
# The attention projections engines fuse into one layer (vLLM's qkv_proj; llama.cpp's attn_qkv): a recipe
# moves them together, so a compressed-tensors file keeps one scheme per fused layer.
_ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_kv_b")


def _every_layer(i_layer: int, n_layers: int) -> bool:
    return True


@dataclass(frozen=True)
class Recipe:
    """Which tensors get one format up (``MORE_BITS``) instead of the base format."""

    name: str
    description: str
    layers: Callable[[int, int], bool] | None  # (layer, layers) -> attention q/k/v and down_proj move up
    lm_head: bool  # an untied lm_head is quantized, one format up (a tied one stays with the embeddings)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "uniform", "every linear weight in the base format; embeddings and lm_head 16-bit", None, False
        ),
        Recipe(
            "k-m",
            "like llama.cpp's Q4_K_M: attention q/k/v and down_proj one format up in the first and last "
            "eighth of the layers and every third between; an untied lm_head one format up",
            use_more_bits,
            True,
        ),
        Recipe(
            "k-l",
            "attention q/k/v and down_proj one format up in every layer; an untied lm_head one format up",
            _every_layer,
            True,
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def check_recipe(name: str, weights_format: str) -> Recipe:
    """The recipe, refused for formats it does not apply to (floats, GGUF types and mixes)."""
    rec = get_recipe(name)
    if rec.layers is not None and weights_format.lower() not in LINEAR_ONLY_FORMATS:
        hint = (
            "; GGUF mixes such as q4_k_m carry llama.cpp's own per-tensor rules"
            if weights_format.lower() not in FLOAT_FORMATS
            else ""
        )
        raise UsageError(
            f"--recipe {rec.name} applies to {', '.join(LINEAR_ONLY_FORMATS)}, not {weights_format}{hint}"
        )
    return rec


def layer_count(names: Iterable[str], config: ModelConfig | None = None) -> int:
    """Decoder layers: the config's, else the highest layer index in the tensor names plus one."""
    if config is not None:
        return config.num_hidden_layers
    return max((i for n in names if (i := tensor_layer(n)) is not None), default=-1) + 1


def recipe_format(
    rec: Recipe, base: str, name: str, shape: Sequence[int], n_layers: int
) -> tuple[str, str] | None:
    """(format, rule) for a tensor the recipe moves off the base format; None for one it leaves to the
    base rules (linear weights in ``base``, the rest 16-bit)."""
    if rec.layers is None or len(shape) < 2:
        return None
    role = tensor_role(name, shape)
    if role == "lm_head" and rec.lm_head:
        return MORE_BITS[base], "lm_head one format up"
    if role != "linear":
        return None
    category = gguf_category(name, shape)
    if category not in (*_ATTENTION, "ffn_down"):
        return None
    i = tensor_layer(name)
    if i is None or not rec.layers(i, n_layers):
        return None
    what = "down_proj" if category == "ffn_down" else "attention q/k/v"
    return MORE_BITS[base], f"{what}, layer {i} of {n_layers}"
