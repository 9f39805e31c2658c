"""One decode step through every layer in one call of llmctl's C++ extension (``native.decode_step``).

A decode step in ``model.Transformer`` is ~40 small torch operations per layer (RMSNorm, views, RoPE, the
KV-cache write, SDPA, residuals) plus Python module dispatch: at 135 M parameters that costs more than the
matrix-vector products themselves. ``decode_step`` runs the same layer — driven by the same ``ModelConfig``
flags (norm offset, q/k norms, sandwich norms, activation, attention scale, sliding windows, biases) — in
C++, calling the same matrix-vector kernels the eager path calls for llmctl's quantized weights
(``native.int4_linear`` / ``int8_linear`` / ``fp8_linear`` / ``nf4_linear``) and its own for dense ones
(``native.dense_linear``: four rows at a time with prefetch on Intel CPUs, where one ``torch.mv`` a small
matrix reached ~0.8 of the bandwidth; one row at a time front to back on AMD's, whose prefetcher follows
that at the rate of a plain read), so in fp32 the result equals the eager step up to fp32 summation order in the
products, RMSNorm, RoPE and attention.

When every linear is dense (fp32 and bf16 models) and torch has more than one thread, the step runs as one
OpenMP region: the threads share out each product's rows, the attention heads and the norms, and meet at
five barriers a layer (seven with sandwich norms) instead of starting a parallel region for each product
while one thread runs the norms, RoPE and attention alone. It computes every value as one thread does
(tests/test_fused_decode.py checks 1 and 2 threads agree bit for bit).

A bf16 model runs it too: its weights stay bf16 and its KV cache bf16 (rounded as it is written), but the
hidden state between the linears stays fp32 where the eager bf16 path rounds every intermediate to bf16.
``native.dense_linear`` widens each weight exactly to fp32, or, on a CPU with AVX512-BF16, rounds each
product's input to bf16 (as the eager path's matmuls take it) and multiplies pairs in ``vdpbf16ps``, a third
of the instructions, which is what lets it stream the weights near memory speed. It is therefore closer to
the fp32 result than the eager bf16 step is, not equal to it (tests/test_fused_decode.py bounds both against
fp32).

It runs only where all of these hold, and the Python layers run otherwise (the reference, and the path for
everything else): one token, a batch of 1, a KV cache, no autograd, the model on the CPU in fp32 or bf16
(its cache too), the C++ kernels built, every linear dense in the model's dtype or on llmctl's
int4/int8/fp8/NF4 code kernels (not torch's int4pack/int8pack, or dequantize-per-call weights).
``LLMCTL_FUSED_DECODE=0`` (or ``LLMCTL_NATIVE=0``) forces the Python layers.

With a dense embedding table in the model's dtype and an output matrix the step takes (dense, or a code
kernel's, such as the lossless int8 head of a q8_0 GGUF), the whole token runs in one call
(``native.decode_token``, ``Plan.token``): the embedding row (scaled, and rounded to bf16 as a bf16 model
holds it), every layer, the final RMSNorm and the logits, fp32 (not rounded to a bf16 model's dtype); the
Python left per token is the KV cache's bookkeeping and the sampler. Otherwise the embedding and the final
norm stay in Python (one call each) and the logits of a dense output matrix go through
``native.dense_linear`` (``Plan.head``). The plan — the per-layer tensors the C++ side holds
references to — is built at the first eligible step and dropped when the model
is moved or its projections are joined again (``Transformer._apply`` / ``fuse_projections``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from llmctl.config import FULL
from llmctl.errors import UsageError

if TYPE_CHECKING:
    from llmctl.runtime.kv_cache import KVCache
    from llmctl.runtime.model import Transformer

ENV = "LLMCTL_FUSED_DECODE"
ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu": 2}
# QuantWeight.kernel -> decode_plan's linear kind (0: dense fp32)
KINDS = {"int4-codes": 1, "int8-codes": 2, "fp8-codes": 3, "nf4-codes": 4}
DTYPES = {torch.float32: 0, torch.bfloat16: 5}  # dense weights: model dtype -> linear kind
_EMPTY = torch.empty(0)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Plan:
    """A model's layers as registered with ``native.decode_plan``; freed with this object."""

    def __init__(self, kernels: Any, handle: int, rope_kinds: list[str], windows: list[int | None]) -> None:
        self.kernels, self.handle, self.rope_kinds = kernels, handle, rope_kinds
        self.sliding = any(w is not None for w in windows)
        self.whole = False  # decode_tail registered: ``token`` runs the embedding, layers, norm and head
        self._tables: dict[tuple[int, torch.Size], torch.Tensor] = {}

    def __del__(self) -> None:
        try:
            self.kernels.decode_free(self.handle)
        except Exception:  # interpreter shutdown
            pass

    def step(
        self,
        x: torch.Tensor,
        cache: KVCache,
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
        start: int,
        path: int = 0,
    ) -> torch.Tensor:
        """x (1, 1, hidden) after every layer, for the token at ``start`` (``cache.begin`` already run)."""
        flat = x.reshape(-1).to(torch.float32).contiguous()  # fp32: a view of x, updated in place; bf16: a copy
        self.kernels.decode_step(self.handle, flat, *self._cache_args(cache, tables), start, path)
        return flat.view(x.shape).to(x.dtype)

    def token(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
        start: int,
        path: int = 0,
    ) -> torch.Tensor:
        """The fp32 logits (1, 1, vocab) of ``tokens`` (1, 1) at ``start`` (``cache.begin`` already run): the
        embedding, every layer, the final norm and the output matrix in one C++ call (``whole`` plans)."""
        return self.kernels.decode_token(self.handle, tokens, *self._cache_args(cache, tables), start, path)

    def _cache_args(self, cache: KVCache, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, ...]:
        """(keys, values, RoPE tables as fp32, ring slot positions or empty): what a step reads besides x."""
        rope = [self._fp32(t) for kind in self.rope_kinds for t in tables[kind]]
        return cache.keys, cache.values, rope, cache.slot_pos if self.sliding else _EMPTY

    def head(self, x: torch.Tensor, weight: Any) -> torch.Tensor | None:
        """The logits of a fused step through ``native.dense_linear`` when the output matrix is a dense fp32
        or bf16 CPU tensor (in the model's dtype, as ``model.linear`` gives them), else None."""
        if not isinstance(weight, torch.Tensor) or hasattr(weight, "q"):  # quantized: model.linear
            return None
        if weight.dtype not in DTYPES or weight.device.type != "cpu":
            return None
        if not weight.is_contiguous() or weight.dim() != 2:
            return None
        out = self.kernels.dense_linear(x.reshape(1, -1).to(torch.float32), weight, 0)
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    def _fp32(self, table: torch.Tensor) -> torch.Tensor:
        """A RoPE table as fp32 (a bf16 model's tables converted once, until they grow)."""
        if table.dtype == torch.float32:
            return table
        key = (table.data_ptr(), table.shape)
        if key not in self._tables:
            if len(self._tables) >= 2 * len(self.rope_kinds):  # grown: the old tables are gone
                self._tables = {}
            self._tables[key] = table.float().contiguous()
        return self._tables[key]


def _linear(weight: Any, bias: torch.Tensor | None) -> tuple[int, list[torch.Tensor]] | None:
    """(kind, [a, b, c, bias]) for decode_plan, or None when the fused step does not take this weight."""
    from llmctl.quant.qlinear import QuantWeight

    if bias is not None and (bias.dtype not in DTYPES or bias.device.type != "cpu"):
        return None
    b = _EMPTY if bias is None else bias.detach().float().contiguous()  # bf16: an fp32 copy, held by the plan
    if isinstance(weight, QuantWeight):
        kind = KINDS.get(weight.kernel)
        if kind is None:
            return None
        args = list(weight._kernel_args)
        if weight.kernel == "fp8-codes":  # the codes stay in the QTensor; the kernel args are (lut, scale)
            args = [weight.q.parts["weight"].view(torch.uint8), *args]
        elif weight.kernel == "nf4-codes":  # (code, absmax); the codes flat, two a byte, as (rows, cols / 2)
            args = [weight.q.parts["weight"].reshape(weight.shape[0], -1), *args]
        return kind, [*args, *[_EMPTY] * (3 - len(args)), b]
    if weight.dtype not in DTYPES or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not weight.is_contiguous():
        return None
    return DTYPES[weight.dtype], [weight.detach(), _EMPTY, _EMPTY, b]


def build(model: Transformer) -> Plan | None:
    """The fused plan of ``model``, or None when some part of it is not covered (the Python layers run)."""
    from llmctl.quant import native

    config = model.config
    if model.device.type != "cpu" or model.dtype not in DTYPES or config.hidden_act not in ACTS:
        return None
    try:
        kernels = native.get()
    except UsageError:  # a build folder others could write: never loaded (the quantized paths say so)
        return None
    if kernels is None or not hasattr(kernels, "decode_step"):
        return None
    rope_kinds = sorted(set(model.kinds), key=lambda k: k != FULL)
    tensors: list[torch.Tensor] = []
    ints = [
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        config.intermediate_size, ACTS[config.hidden_act], 0, int(config.qk_norm), len(model.model.layers), 0,
    ]  # fmt: skip
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        ints[6], ints[9] = int(layer.sandwich), int(layer.input_layernorm.offset)
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += (
            [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
            if layer.sandwich
            else [None] * 2
        )
        norms += [attn.q_norm, attn.k_norm] if attn.qk_norm else [None] * 2
        for norm in norms:
            w = _EMPTY if norm is None else norm.weight.detach().float().contiguous()  # bf16: an fp32 copy
            tensors.append(w)
        qkv, gate_up = attn.qkv_projections(), mlp.gate_up_projections()
        slots = [*qkv, *[None] * (3 - len(qkv)), (attn.o_proj.weight, attn.o_proj.bias), *gate_up,
                 *[None] * (2 - len(gate_up)), (mlp.down_proj.weight, mlp.down_proj.bias)]  # fmt: skip
        window = model.windows[i]
        ints += [window or 0, rope_kinds.index(model.kinds[i])]
        for slot in slots:
            spec = None if slot is None else _linear(*slot)
            if slot is not None and spec is None:
                return None
            ints.append(-1 if spec is None else spec[0])
            tensors += [_EMPTY] * 4 if spec is None else spec[1]
    scale = attn.scale
    handle = kernels.decode_plan(tensors, ints, [float(config.rms_norm_eps), float(scale)])
    plan = Plan(kernels, handle, rope_kinds, model.windows)
    _tail(plan, model)
    return plan


def _tail(plan: Plan, model: Transformer) -> None:
    """Register the embedding, final norm and output matrix with the plan (``plan.whole``) when the C++ step
    can run them: a dense embedding table in the model's dtype and an output matrix ``_linear`` takes. The
    output matrix is the one ``Transformer.forward`` multiplies at a decode step (``model.head`` if set)."""
    embed = model.model.embed_tokens.weight
    if type(embed) not in (torch.Tensor, torch.nn.Parameter) or embed.dtype != model.dtype or embed.dim() != 2:
        return
    if not embed.is_contiguous():
        return
    weight = embed if model.lm_head is None else model.lm_head.weight
    if model.head is not None:
        weight = model.head
    spec = _linear(weight, None)
    if spec is None:
        return
    scale = 0.0
    if model.config.embed_scale:
        scale = float(torch.tensor(model.config.hidden_size**0.5).to(model.dtype))  # as Transformer.embed
    norm = model.model.norm
    plan.kernels.decode_tail(
        plan.handle,
        [embed.detach(), norm.weight.detach().float().contiguous(), *spec[1]],
        [spec[0], int(model.dtype == torch.bfloat16), int(norm.offset)],
        [scale],
    )
    plan.whole = True
