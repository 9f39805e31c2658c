"""How much accelerator memory a model needs: a pure function of (config, format, context, batch, KV dtype).

``estimate(config, ...)`` returns an ``Estimate`` with four parts and their sum:

* **weights**: exact bytes of every tensor in its format (scales, zero-points and block headers
  included), from the checkpoint's real tensor table when given, else from shapes derived from the config
  (``llmctl.tensors``). Which tensor gets which format is ``llmctl.quant.recipes``.
* **KV cache**: per layer, tokens held × (K width + V width) × bytes per value, times the batch. See
  ``kv_cache_bytes`` for the layouts (sliding windows, llama.cpp's padding, MLA).
* **activations**: the working set of one prefill chunk (``ubatch`` tokens per sequence, 512 like
  llama.cpp); see ``activation_bytes``.
* **overhead**: ``OVERHEAD_FIXED_BYTES`` per GPU plus ``OVERHEAD_FRACTION`` of the rest.

The formulas, with worked examples, are in docs/memory.md. Nothing here reads files or imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llmctl.quant.recipes as recipes
from llmctl.checkpoint import TensorInfo
from llmctl.config import FULL, SLIDING, ModelConfig
from llmctl.errors import QuantError, UsageError
from llmctl.tensors import count_parameters, tensor_role, tensor_shapes

MIB = 1024**2
GIB = 1024**3

KV_DTYPES = ("f32", "f16", "bf16", "fp8", "q8_0", "q4_0")
KV_LAYOUTS = ("windowed", "llama.cpp", "llama.cpp-swa", "expanded-mla")
DEFAULT_UBATCH = 512  # llama.cpp's default n_ubatch: prompt tokens processed per forward pass
LLAMA_CPP_CTX_PAD = 256  # llama.cpp rounds n_ctx (and its SWA cache size) up to a multiple of this

ACTIVATION_BYTES = 2  # hidden states and MLP intermediates in 16 bits
SCORE_BYTES = 4  # attention scores and logits in fp32
OVERHEAD_FIXED_BYTES = 512 * MIB  # CUDA context + cuBLAS workspaces, per GPU
OVERHEAD_FRACTION = 0.05  # allocator rounding and fragmentation, of weights + KV + activations

_KV_FORMAT = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0"}
_SHARDED_ROLES = ("linear", "embedding", "lm_head")  # split across tensor-parallel ranks


@dataclass(frozen=True)
class WeightsBreakdown:
    """Where the weight bytes go. ``quantized_bytes + kept_bytes == total``."""

    quantized_bytes: int  # tensors in a quantized format (scales and zero-points included)
    kept_bytes: int  # tensors kept in a float dtype (norms, biases, routers, embeddings, ...)
    by_format: dict[str, int]  # format name -> bytes
    by_role: dict[str, int]  # embedding / lm_head / linear / bias / norm / router -> bytes
    sharded_bytes: int  # linear, embedding and lm_head: split across tensor-parallel ranks
    replicated_bytes: int  # norms, biases, routers: a full copy on every rank
    tensors: int

    @property
    def total(self) -> int:
        return self.quantized_bytes + self.kept_bytes


@dataclass(frozen=True)
class Estimate:
    """Memory for one configuration. ``*_bytes`` are for the whole model on one device; ``per_gpu_*``
    are for each of ``tensor_parallel`` GPUs (equal to the former when tensor_parallel is 1)."""

    model_type: str
    weights_format: str  # the format asked for, or "stored"
    group_size: int | None
    context: int
    batch: int
    kv_dtype: str
    kv_layout: str
    tensor_parallel: int
    ubatch: int
    parameters: int
    weights_bytes: int
    weights_breakdown: WeightsBreakdown
    kv_cache_bytes: int
    kv_tokens_per_layer: tuple[int, ...]  # tokens each layer's cache holds, per sequence
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    per_gpu_weights_bytes: int
    per_gpu_kv_cache_bytes: int
    per_gpu_activation_bytes: int
    per_gpu_overhead_bytes: int
    per_gpu_total_bytes: int
    notes: tuple[str, ...] = field(default=())
    recipe: str = "uniform"  # llmctl.quant.recipes.RECIPES: which tensors got one format up
    flash_attention: bool = False  # fused attention: no batch × heads × u × kv_len score matrix counted

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kv_tokens_per_layer"] = list(self.kv_tokens_per_layer)
        d["notes"] = list(self.notes)
        return d


# ---- KV cache ----------------------------------------------------------------------------------------
def llama_cpp_n_ctx(context: int) -> int:
    """The context llama.cpp allocates for a requested n_ctx: rounded up to a multiple of 256."""
    return -(-context // LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD


def kv_widths(config: ModelConfig, kv_layout: str = "windowed") -> tuple[int, int]:
    """Values per token per layer in the K and the V cache.

    GQA: ``num_key_value_heads × head_dim`` each. MLA (DeepSeek) caches one latent "head" of
    ``kv_lora_rank + qk_rope_head_dim`` values and no separate V (transformers ≥ 5 stores the latent
    as K = kv_lora_rank, V = rope part; llama.cpp as one K row) — except in the ``expanded-mla``
    layout, which caches per-head K (``qk_nope + qk_rope``) and V (``v_head_dim``) for all heads, as
    engines without an MLA-aware cache (and transformers < 5) do.
    """
    c = config
    if c.is_mla:
        assert c.kv_lora_rank and c.qk_rope_head_dim and c.qk_nope_head_dim and c.v_head_dim
        if kv_layout == "expanded-mla":
            nh = c.num_attention_heads
            return nh * (c.qk_nope_head_dim + c.qk_rope_head_dim), nh * c.v_head_dim
        return c.kv_lora_rank + c.qk_rope_head_dim, 0
    assert c.num_key_value_heads and c.head_dim
    w = c.num_key_value_heads * c.head_dim
    return w, w


def kv_tokens_per_layer(
    config: ModelConfig, context: int, kv_layout: str = "windowed", ubatch: int = DEFAULT_UBATCH
) -> list[int]:
    """Tokens each layer's cache holds for one sequence of ``context`` tokens.

    * windowed / expanded-mla: full-attention layers hold ``context``, sliding-window layers
      ``min(sliding_window, context)`` (transformers' DynamicSlidingWindowLayer keeps one token less,
      ``sliding_window - 1``, between steps).
    * llama.cpp: every layer holds ``n_ctx`` = context rounded up to 256 — sliding layers too, as
      llama.cpp's default ``swa_full = true`` gives them the full size.
    * llama.cpp-swa: ``swa_full = false``: sliding layers hold
      ``min(n_ctx, pad256(sliding_window + ubatch))``.
    """
    _check_layout(kv_layout)
    window = config.sliding_window
    kinds = [k if window else FULL for k in config.layer_kinds()]
    if kv_layout in ("windowed", "expanded-mla"):
        return [min(window, context) if k == SLIDING and window else context for k in kinds]
    n_ctx = llama_cpp_n_ctx(context)
    if kv_layout == "llama.cpp":
        return [n_ctx] * len(kinds)
    swa = min(n_ctx, llama_cpp_n_ctx((window or 0) + min(ubatch, n_ctx)))
    return [swa if k == SLIDING else n_ctx for k in kinds]


def kv_row_bytes(width: int, kv_dtype: str) -> int:
    """Bytes of one token's row of ``width`` values in the KV cache; q8_0/q4_0 count their block scales
    (34 and 18 bytes per 32 values), fp8 is one byte a value (its per-tensor scale is negligible)."""
    if kv_dtype not in KV_DTYPES:
        raise UsageError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if width == 0:
        return 0
    if kv_dtype == "fp8":
        return width
    from llmctl.quant.formats import REGISTRY

    try:
        return REGISTRY[_KV_FORMAT[kv_dtype]].nbytes((1, width))
    except QuantError:
        raise QuantError(
            f"KV cache dtype {kv_dtype} stores blocks of 32 values but this model's K/V rows hold {width}; "
            "use --kv-dtype f16 or fp8"
        ) from None


def kv_cache_bytes(
    config: ModelConfig,
    context: int,
    *,
    batch: int = 1,
    kv_dtype: str = "f16",
    kv_layout: str = "windowed",
    ubatch: int = DEFAULT_UBATCH,
) -> int:
    """KV cache bytes: Σ over layers of tokens held × (row bytes of K + row bytes of V), times batch."""
    k, v = kv_widths(config, kv_layout)
    per_token = kv_row_bytes(k, kv_dtype) + kv_row_bytes(v, kv_dtype)
    return batch * per_token * sum(kv_tokens_per_layer(config, context, kv_layout, ubatch))


# ---- activations -------------------------------------------------------------------------------------
def activation_bytes(
    config: ModelConfig,
    context: int,
    *,
    batch: int = 1,
    kv_layout: str = "windowed",
    ubatch: int = DEFAULT_UBATCH,
    flash_attention: bool = False,
    tensor_parallel: int = 1,
) -> int:
    """Peak working memory of one prefill chunk of ``u = min(ubatch, context)`` tokens per sequence
    (``T = batch × u`` tokens), the last chunk of the context, which attends to the most keys:

        hidden   = 2 · T · hidden_size · 2            residual stream + normed copy, 16-bit
        attn(l)  = T · (q + k + v widths) · 2         this chunk's projections
                 + batch · heads · u · kv_len(l) · 4  fp32 scores (0 with flash attention)
                 [MLA: + batch · kv_len(l) · heads · (qk_head + v_head) · 2, K/V expanded from the latent]
        mlp(l)   = 3 · T · I(l) · 2                   gate, up, and their product
        logits   = T · vocab_size · 4                 fp32 logits of the chunk
        peak     = hidden + max over layers of max(attn(l), mlp(l)) + logits

    ``kv_len(l)`` = the tokens the chunk attends to: the layer's cache plus the chunk, at most the
    context (llama.cpp layouts: the padded cache size). ``I(l)`` is intermediate_size for dense
    layers; for MoE layers ``num_experts_per_tok × expert size`` plus the shared experts. With tensor
    parallelism the per-layer term is split over the ranks; hidden states and logits are not.
    """
    c = config
    u = min(ubatch, context)
    t = batch * u
    nh = c.num_attention_heads
    held = kv_tokens_per_layer(c, context, kv_layout, ubatch)
    kinds = c.layer_kinds()
    peak_layer = 0
    for i in range(c.num_hidden_layers):
        cap = held[i] if kv_layout.startswith("llama.cpp") else context
        kv_len = held[i] if kinds[i] == FULL else min(cap, held[i] + u)
        if c.is_mla:
            assert c.qk_nope_head_dim and c.qk_rope_head_dim and c.v_head_dim and c.kv_lora_rank
            qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim
            proj = t * (nh * qk_head + c.kv_lora_rank + c.qk_rope_head_dim)
            expanded = batch * kv_len * nh * (qk_head + c.v_head_dim)
            attn = (proj + expanded) * ACTIVATION_BYTES
        else:
            assert c.head_dim and c.num_key_value_heads
            attn = t * (nh + 2 * c.num_key_value_heads) * c.head_dim * ACTIVATION_BYTES
        if not flash_attention:
            attn += batch * nh * u * kv_len * SCORE_BYTES
        mlp = 3 * t * _mlp_width(c, i) * ACTIVATION_BYTES
        peak_layer = max(peak_layer, attn, mlp)
    hidden = 2 * t * c.hidden_size * ACTIVATION_BYTES
    logits = t * c.vocab_size * SCORE_BYTES
    return hidden + -(-peak_layer // tensor_parallel) + logits


def _mlp_width(c: ModelConfig, i: int) -> int:
    if not c.layer_is_moe(i):
        return c.intermediate_size
    k = c.num_experts_per_tok or 1
    if c.moe_layout == "block_sparse_moe":  # Mixtral: experts of intermediate_size, no shared ones
        return k * c.intermediate_size
    expert = c.moe_intermediate_size or c.intermediate_size
    return (k + (c.n_shared_experts or 0)) * expert


# ---- weights -----------------------------------------------------------------------------------------
def weights_breakdown(
    config: ModelConfig,
    *,
    tensors: Sequence[TensorInfo] | None = None,
    weights_format: str | None = None,
    group_size: int | None = None,
    recipe: str = "uniform",
) -> WeightsBreakdown:
    """Exact weight bytes: as stored (``weights_format=None``) or converted to ``weights_format`` with
    ``recipe`` (what ``llmctl quantize --recipe`` writes)."""
    stored = _stored_tensors(config, tensors)
    if weights_format is None:
        if recipe != "uniform":
            raise UsageError(f"--recipe {recipe} needs a weights format to convert to (--weights int4, ...)")
        items = [(t, recipes.stored_format_name(t.dtype)) for t in stored]
    else:
        base = _base_dtype(config, stored)
        items = recipes.assign_formats(
            stored, weights_format, group_size, base, config=_tied(config, stored), recipe=recipe
        )
    by_format: dict[str, int] = {}
    by_role: dict[str, int] = {}
    quantized = kept = sharded = 0
    for t, fmt in items:
        fmt = recipes.stored_format_name(fmt)  # one spelling for both paths: f32/F32 → fp32, f16 → fp16
        by_format[fmt] = by_format.get(fmt, 0) + t.nbytes
        role = tensor_role(t.name, t.shape)
        by_role[role] = by_role.get(role, 0) + t.nbytes
        if recipes.is_quantized(fmt):
            quantized += t.nbytes
        else:
            kept += t.nbytes
        if role in _SHARDED_ROLES:
            sharded += t.nbytes
    return WeightsBreakdown(
        quantized_bytes=quantized,
        kept_bytes=kept,
        by_format=dict(sorted(by_format.items(), key=lambda kv: -kv[1])),
        by_role=by_role,
        sharded_bytes=sharded,
        replicated_bytes=quantized + kept - sharded,
        tensors=len(items),
    )


def _stored_tensors(config: ModelConfig, tensors: Sequence[TensorInfo] | None) -> list[TensorInfo]:
    """The checkpoint's tensors (tied lm_head dropped: counted once), or the config's shapes in its dtype."""
    if tensors is not None:
        if config.tie_word_embeddings and any(tensor_role(t.name, t.shape) == "embedding" for t in tensors):
            return [t for t in tensors if tensor_role(t.name, t.shape) != "lm_head"]
        return list(tensors)
    from llmctl.quant.formats import REGISTRY

    dtype = recipes.normalize_dtype(config.torch_dtype)
    return [
        TensorInfo(s.name, s.shape, dtype, REGISTRY[dtype].nbytes(s.shape)) for s in tensor_shapes(config)
    ]


def _tied(config: ModelConfig, tensors: Sequence[TensorInfo]) -> ModelConfig:
    """The config with tie_word_embeddings as the tensor table shows it (a tied model has no lm_head)."""
    has_head = any(tensor_role(t.name, t.shape) == "lm_head" for t in tensors)
    if config.tie_word_embeddings == (not has_head):
        return config
    return dataclasses.replace(config, tie_word_embeddings=not has_head)


def _base_dtype(config: ModelConfig, tensors: Sequence[TensorInfo]) -> str:
    if config.torch_dtype:
        return recipes.normalize_dtype(config.torch_dtype)
    from llmctl.quant.formats import REGISTRY

    counts: dict[str, int] = {}
    for t in tensors:
        name = recipes.stored_format_name(t.dtype)
        fmt = REGISTRY.get(name)
        if fmt is not None and fmt.torch_dtype and fmt.bits == 16:  # bf16, fp16
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else "bf16"


# ---- the estimate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """What is estimated besides the model: the weights' format and the serving shape. ``weights_format``: a
    registry format or GGUF mix to convert to; None keeps the stored formats. ``recipe``: which tensors get
    one format up (``llmctl.quant.recipes.RECIPES``). ``tensor_parallel``: GPUs the model is split over
    (see ``Estimate.per_gpu_*``)."""

    weights_format: str | None = None
    group_size: int | None = None
    recipe: str = "uniform"
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "f16"
    kv_layout: str = "windowed"
    tensor_parallel: int = 1
    ubatch: int = DEFAULT_UBATCH
    flash_attention: bool = False

    def checked(self) -> Scenario:
        """This scenario validated (UsageError naming the bad field), its weights format normalized."""
        for name in ("context", "batch", "tensor_parallel", "ubatch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise UsageError(f"unknown KV cache dtype {self.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        _check_layout(self.kv_layout)
        fmt = self.weights_format.lower() if self.weights_format else None
        return dataclasses.replace(self, weights_format=None if fmt in ("stored", "as-stored") else fmt)


def scenario_of(scenario: Scenario | None, settings: dict[str, Any]) -> Scenario:
    """``scenario`` (default: ``Scenario()``) with ``settings`` (its field names) replaced, validated."""
    base = scenario or Scenario()
    return (dataclasses.replace(base, **settings) if settings else base).checked()


def estimate(
    config: ModelConfig,
    scenario: Scenario | None = None,
    *,
    tensors: Sequence[TensorInfo] | None = None,
    weights: WeightsBreakdown | None = None,
    **settings: Any,
) -> Estimate:
    """Memory needed to run ``config`` in ``scenario`` (``Scenario``'s fields may also be given by name:
    ``estimate(config, context=8192, weights_format="int4")``): ``batch`` sequences of ``context`` tokens.

    ``tensors``: the checkpoint's tensor table (safetensors headers or a GGUF's; shapes in PyTorch
    order). ``weights``: the ``weights_breakdown(...)`` of the same config/tensors/format/group size, to
    skip recomputing it when estimating many contexts (DeepSeek-V3 has ~45k tensors).
    """
    sc = scenario_of(scenario, settings)
    wb = weights or _weights(config, tensors, sc)
    return _assemble(config, wb, tensors, sc)


def _weights(config: ModelConfig, tensors: Sequence[TensorInfo] | None, sc: Scenario) -> WeightsBreakdown:
    return weights_breakdown(
        config, tensors=tensors, weights_format=sc.weights_format, group_size=sc.group_size, recipe=sc.recipe
    )


def _assemble(config: ModelConfig, wb: WeightsBreakdown, tensors: Sequence[TensorInfo] | None, sc: Scenario) -> Estimate:
    c = config
    context, batch, kv_layout, ubatch, tp = sc.context, sc.batch, sc.kv_layout, sc.ubatch, sc.tensor_parallel
    held = kv_tokens_per_layer(c, context, kv_layout, ubatch)
    kv = kv_cache_bytes(c, context, batch=batch, kv_dtype=sc.kv_dtype, kv_layout=kv_layout, ubatch=ubatch)
    act_kw = dict(batch=batch, kv_layout=kv_layout, ubatch=ubatch, flash_attention=sc.flash_attention)
    act = activation_bytes(c, context, **act_kw)  # type: ignore[arg-type]
    overhead = OVERHEAD_FIXED_BYTES + math.ceil(OVERHEAD_FRACTION * (wb.total + kv + act))

    notes: list[str] = []
    if tp > 1:
        gpu_w = -(-wb.sharded_bytes // tp) + wb.replicated_bytes
        gpu_kv = _kv_per_gpu(c, kv, tp, kv_layout, notes)
        gpu_act = activation_bytes(c, context, tensor_parallel=tp, **act_kw)  # type: ignore[arg-type]
        if c.num_attention_heads % tp:
            notes.append(
                f"num_attention_heads ({c.num_attention_heads}) is not a multiple of tensor_parallel ({tp}); "
                "vLLM and TGI refuse such a split"
            )
    else:
        gpu_w, gpu_kv, gpu_act = wb.total, kv, act
    gpu_overhead = OVERHEAD_FIXED_BYTES + math.ceil(OVERHEAD_FRACTION * (gpu_w + gpu_kv + gpu_act))
    return Estimate(
        model_type=c.model_type,
        weights_format=sc.weights_format or "stored",
        group_size=sc.group_size,
        context=context,
        batch=batch,
        kv_dtype=sc.kv_dtype,
        kv_layout=kv_layout,
        tensor_parallel=tp,
        ubatch=ubatch,
        parameters=_parameters(c, tensors),
        weights_bytes=wb.total,
        weights_breakdown=wb,
        kv_cache_bytes=kv,
        kv_tokens_per_layer=tuple(held),
        activation_bytes=act,
        overhead_bytes=overhead,
        total_bytes=wb.total + kv + act + overhead,
        per_gpu_weights_bytes=gpu_w,
        per_gpu_kv_cache_bytes=gpu_kv,
        per_gpu_activation_bytes=gpu_act,
        per_gpu_overhead_bytes=gpu_overhead,
        per_gpu_total_bytes=gpu_w + gpu_kv + gpu_act + gpu_overhead,
        notes=tuple(notes),
        recipe=sc.recipe,
        flash_attention=sc.flash_attention,
    )


def _kv_per_gpu(c: ModelConfig, kv: int, tp: int, kv_layout: str, notes: list[str]) -> int:
    """KV heads are split across ranks; with fewer KV heads than ranks each rank keeps one (replicated).
    MLA's latent has no heads to split: every rank holds all of it."""
    if c.is_mla and kv_layout != "expanded-mla":
        notes.append("the MLA latent cache cannot be split by heads: every GPU holds all of it")
        return kv
    heads = c.num_attention_heads if c.is_mla else c.num_key_value_heads
    assert heads
    per_rank = -(-heads // tp)
    if heads < tp:
        notes.append(f"{heads} KV heads over {tp} GPUs: each GPU holds a replicated KV head")
    return -(-kv * per_rank // heads)


def _parameters(config: ModelConfig, tensors: Sequence[TensorInfo] | None) -> int:
    return count_parameters(_tied(config, tensors) if tensors is not None else config)


def _check_layout(kv_layout: str) -> None:
    if kv_layout not in KV_LAYOUTS:
        raise UsageError(f"unknown KV layout {kv_layout!r}; choose one of {', '.join(KV_LAYOUTS)}")


# ---- what fits ---------------------------------------------------------------------------------------
def max_context_that_fits(
    config: ModelConfig,
    scenario: Scenario | None = None,
    *,
    vram_bytes: int,
    tensors: Sequence[TensorInfo] | None = None,
    limit: int | None = None,
    **settings: Any,
) -> int:
    """The longest context (≤ ``limit``, default max_position_embeddings) whose per-GPU total fits in
    ``vram_bytes`` in ``scenario`` (its context aside); 0 when not even one token fits. Binary search: the
    total grows with the context."""
    sc = scenario_of(scenario, {**settings, "context": 1})
    wb = _weights(config, tensors, sc)

    def fits(ctx: int) -> bool:
        return _assemble(config, wb, tensors, dataclasses.replace(sc, context=ctx)).per_gpu_total_bytes <= vram_bytes

    return _largest(fits, limit or config.max_position_embeddings)


def max_batch_that_fits(
    config: ModelConfig,
    scenario: Scenario | None = None,
    *,
    vram_bytes: int,
    tensors: Sequence[TensorInfo] | None = None,
    limit: int = 1 << 16,
    **settings: Any,
) -> int:
    """The largest batch (≤ ``limit``) of ``scenario.context``-token sequences whose per-GPU total fits in
    ``vram_bytes``; 0 when not even one sequence fits."""
    sc = scenario_of(scenario, {**settings, "batch": 1})
    wb = _weights(config, tensors, sc)

    def fits(b: int) -> bool:
        return _assemble(config, wb, tensors, dataclasses.replace(sc, batch=b)).per_gpu_total_bytes <= vram_bytes

    return _largest(fits, limit)


def _largest(fits: Any, limit: int) -> int:
    """Largest n in [1, limit] with fits(n), for a monotone fits; 0 if fits(1) is false."""
    if limit < 1 or not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
