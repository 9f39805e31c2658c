"""One Transformer for the Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Gemma 3 (text).

Every difference between the families is a flag derived from ``ModelConfig``:

=====================  ==========================================================================
qkv / o bias           ``attention_bias`` (Qwen2: q/k/v always, o never)
q/k norm               ``config.qk_norm`` (Qwen3, Gemma 3): RMSNorm over each head
sandwich norms         Gemma 3: norms after attention and feed-forward, before adding the residual
norm offset            Gemma 3: RMSNorm scales by ``1 + weight``
embedding scale        Gemma 3: ``sqrt(hidden_size)``, rounded to the compute dtype
activation             ``hidden_act`` (silu; Gemma 3 gelu_pytorch_tanh)
attention scale        Gemma 3: ``query_pre_attn_scalar ** -0.5``; others ``head_dim ** -0.5``
sliding windows        ``config.layer_kinds()`` + ``sliding_window``; Gemma 3 local RoPE base
RoPE scaling           ``rope_scaling`` via ``rope.ROPE_RULES``
tied embeddings        ``tie_word_embeddings``: logits reuse ``embed_tokens.weight``
logit soft-capping     ``final_logit_softcapping``
=====================  ==========================================================================

Parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``), so HF safetensors load
without renaming. ``model(tokens, cache, start_pos)`` returns logits (B, T, vocab); without a cache the
forward is a plain causal (and windowed) pass over the batch, for evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.config import FULL, RUNTIME_FAMILIES, SLIDING, ModelConfig
from llmctl.errors import UnsupportedArchitectureError, UsageError
from llmctl.runtime import device as devices
from llmctl.runtime.kv_cache import CAUSAL, layer_windows, self_mask
from llmctl.runtime.rope import apply_rope, inv_frequencies, rope_tables

if TYPE_CHECKING:
    from llmctl.runtime.kv_cache import KVCache

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def check_supported(config: ModelConfig) -> None:
    """Raise UnsupportedArchitectureError for configs the torch runtime cannot run."""
    where = config._where()
    if config.model_type not in RUNTIME_FAMILIES:
        raise UnsupportedArchitectureError(
            f"{where}the torch runtime does not run {config.model_type!r} models (memory estimates only); "
            f"it runs: {', '.join(RUNTIME_FAMILIES)}"
        )
    if config.hidden_act not in ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"{where}hidden_act {config.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
        )
    if config.attn_logit_softcapping is not None:
        raise UnsupportedArchitectureError(
            f"{where}attn_logit_softcapping (Gemma 2) is not supported by the torch runtime"
        )
    with torch.device("cpu"):  # not loader.empty_model's meta device, where it would import torch._dynamo (~1 s)
        inv_frequencies(config, FULL)  # validates rope_scaling


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 as transformers does; ``offset`` scales by (1 + weight) (Gemma)."""

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset, self.shape = eps, offset, (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return F.rms_norm(x.float(), self.shape, 1.0 + self.weight.float(), self.eps).type_as(x)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on the rows flattened to one 2-D matrix (torch's CPU bf16 path for a 3-D input against a
    large matrix is up to ~20x slower: 9.4 s vs 0.5 s for Gemma 3's 262k-row vocabulary); a single row goes
    through ``torch.mv``, which on CPU runs bf16 GEMV ~1.5x faster."""
    if type(weight) is not torch.Tensor and hasattr(weight, "q"):  # quantized (llmctl.quant.qlinear): its kernel
        return weight.linear(x, bias)
    if x.numel() != x.shape[-1]:
        return F.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)
    y = torch.mv(weight, x.reshape(-1))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


@torch.no_grad()
def fuse(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Stack the weights (and biases) of ``linears`` into one matrix and make each module's parameters
    views of it: one matmul serves all of them, and their names and state dict stay as they were.
    Quantized weights (llmctl.quant.qlinear) join through their own ``concat`` (None where they cannot)."""
    kinds = {type(m.weight) for m in linears}
    if len(kinds) > 1:  # some quantized, some kept: each runs on its own
        return None
    concat = getattr(kinds.pop(), "concat", None)
    if concat is not None:
        joined = concat([m.weight for m in linears])
        if joined is None:
            return None
        return joined, torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


def fused_linear(
    x: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor | None] | None, *linears: nn.Linear
) -> torch.Tensor:
    """The outputs of ``linears`` concatenated: one matmul while ``fused`` still backs their weights
    (``model.to(...)`` replaces them, and then each runs on its own)."""
    parts = projections(fused, *linears)
    if len(parts) == 1:
        return linear(x, *parts[0])
    return torch.cat([linear(x, w, b) for w, b in parts], dim=-1)


def projections(
    fused: tuple[torch.Tensor, torch.Tensor | None] | None, *linears: nn.Linear
) -> list[tuple[Any, torch.Tensor | None]]:
    """The (weight, bias) pairs ``fused_linear`` multiplies: the joined one while it still backs the
    linears' weights, else each linear's own."""
    if fused is not None and _backs(fused[0], linears[0].weight):
        return [fused]
    return [(m.weight, m.bias) for m in linears]


def _backs(joined: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``joined`` (from ``fuse``) still holds ``weight``: ``model.to(...)`` replaces the parameters."""
    members = getattr(joined, "members", None)
    if members:
        return members[0] is weight
    return joined.data_ptr() == weight.data_ptr()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        qkv_bias, o_bias = config.qkv_bias, config.o_proj_bias
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, KV * D, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, KV * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=o_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps, offset=config.norm_offset)
            self.k_norm = RMSNorm(D, config.rms_norm_eps, offset=config.norm_offset)
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, D
        self.scale = float(config.query_pre_attn_scalar or D) ** -0.5
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        self.qkv = fuse(self.q_proj, self.k_proj, self.v_proj)

    def qkv_projections(self) -> list[tuple[Any, torch.Tensor | None]]:
        return projections(self.qkv, self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Any,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = fused_linear(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        qkv = qkv.view(B, T, H + 2 * KV, D)  # (B, T, n_heads + 2 * n_kv_heads, head_dim)
        if self.qk_norm:
            q, k, v = qkv.split((H, KV, KV), dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)  # (B, T, n_heads + n_kv_heads, head_dim)
        else:
            qk, v = qkv.split((H + KV, KV), dim=2)
        q, k = apply_rope(qk, *rope).split((H, KV), dim=2)  # rotate queries and keys together
        q = q.transpose(1, 2)  # (B, n_heads, T, head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)  # (B, n_kv_heads, L, head_dim)
        if T == 1:
            # One query: fold the heads sharing a kv head into the query axis, so k/v are never repeated.
            q = q.reshape(B, KV, H // KV, D)  # (B, n_kv_heads, n_rep, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            out = attend(q, k, v, mask, self.scale)  # (B, n_heads, T, head_dim)
            out = out.transpose(1, 2)  # (B, T, n_heads, head_dim)
        out = out.reshape(B, T, H * D)  # (B, T, n_heads * head_dim)
        return linear(out, self.o_proj.weight, self.o_proj.bias)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float, repeat_kv: bool | None = None
) -> torch.Tensor:
    """SDPA of queries (B, n_heads, T, head_dim) over keys/values (B, n_kv_heads, L, head_dim).

    ``CAUSAL`` (L == T) runs ``is_causal=True`` without a mask: CUDA's flash kernel takes it in fp16/bf16,
    grouped heads included. Any other case with grouped heads on CUDA repeats the keys and values per query
    head (``repeat_kv``; None: decide so), since the memory-efficient kernel (masks, fp32) does not take
    ``enable_gqa``, which would drop SDPA to the math kernel. On the CPU ``enable_gqa`` keeps k/v unrepeated."""
    n_rep = q.shape[1] // k.shape[1]
    causal = mask is CAUSAL
    mask = None if causal else mask
    if repeat_kv is None:
        flash = causal and q.dtype in (torch.float16, torch.bfloat16)
        repeat_kv = q.device.type == "cuda" and not flash
    if n_rep > 1 and repeat_kv:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, n_heads, L, head_dim)
        v = v.repeat_interleave(n_rep, dim=1)
        n_rep = 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=n_rep > 1
    )


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_proj_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up = fuse(self.gate_proj, self.up_proj)

    def gate_up_projections(self) -> list[tuple[Any, torch.Tensor | None]]:
        return projections(self.gate_up, self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, self.gate_up, self.gate_proj, self.up_proj).chunk(2, dim=-1)
        return linear(self.act(gate) * up, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        offset = config.norm_offset
        eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = FeedForward(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        # Llama: the norm before the MLP. Gemma 3 (sandwich norms): the norm of the attention output.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)

    def forward(self, x: torch.Tensor, rope, mask, cache, layer: int) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """The ``model.`` prefix of Hugging Face names: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:  # initialising on the meta device (loader.empty_model) imports torch._dynamo: ~1 s
            nn.init.normal_(weight)  # as nn.Embedding initialises it
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)


class Transformer(nn.Module):
    """The causal LM: ``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head`` (absent when
    tied)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = Body(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.windows = layer_windows(config)
        self.kinds = [FULL if w is None else SLIDING for w in self.windows]
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_len, self._rope_key = 0, None
        self._embed_scale = 1.0
        # What the logits multiply instead of the embeddings / lm_head weight, when a loader finds a cheaper
        # exact form of it (llmctl.quant.qlinear.lossless_int8); None: the weight itself.
        self.head: torch.Tensor | None = None
        # llmctl.runtime.fused's plan of one-token decode steps: None not tried yet, False not covered
        self._fused: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def make_cache(self, max_len: int, batch_size: int = 1, rollback: int = 0) -> KVCache:
        """A KV cache for this model in its dtype and on its device; refused when it would not fit in the
        memory the device has free (a context of 2**31 tokens asks for terabytes)."""
        from llmctl.runtime.kv_cache import KVCache

        args = (self.config, max_len, batch_size)
        need = KVCache(*args, dtype=self.dtype, device="meta", rollback=rollback).nbytes  # sizes, no memory
        free = devices.free_bytes(self.device)
        if free is not None and need > free:
            raise UsageError(
                f"a KV cache of {max_len} positions needs {need / 2**30:.1f} GiB but {self.device} has "
                f"{free / 2**30:.1f} GiB free; pass a smaller --context (about {max_len * free // need} fits)"
            )
        return KVCache(*args, dtype=self.dtype, device=self.device, rollback=rollback)

    def fuse_projections(self) -> Transformer:
        """Serve q/k/v and gate/up with one matmul each (loaders call this once the weights are in)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self._fused = None
        return self

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda() … replace every parameter
        self._fused = None  # the fused decode plan holds the old tensors
        if self.head is not None:  # the int8 head is a CPU kernel's form of the weight: elsewhere, the weight
            if fn(torch.empty(0, device=self.head.device)).device.type != "cpu":
                self.head = None
        moved = self._moved_quant_weights(fn)  # first: a weight that cannot move fails before anything moved
        fused = any(layer.self_attn.qkv is not None for layer in self.model.layers)
        for layer in self.model.layers:
            layer.self_attn.qkv = layer.mlp.gate_up = None
        super()._apply(fn, recurse)
        for module, name, weight in moved:
            setattr(module, name, weight)
        return self.fuse_projections() if fused else self

    def _moved_quant_weights(self, fn) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """Quantized weights (llmctl.quant.qlinear) are plain attributes, which ``nn.Module._apply`` skips:
        each is moved to the device and dtype ``fn`` gives an empty tensor like it."""
        from llmctl.quant.qlinear import QuantWeight

        moved = []
        for module in self.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, QuantWeight):
                    probe = fn(torch.empty(0, dtype=value.cdtype, device=value.device))
                    moved.append((module, name, value.moved(probe.device, probe.dtype)))
        return moved

    def _fused_plan(self, B: int, T: int, cache: KVCache | None) -> Any:
        """llmctl.runtime.fused's plan when this step can run it (one token, batch 1, an fp32 or bf16 CPU
        cache, no autograd, not turned off), else None: the Python layers run."""
        if T != 1 or B != 1 or cache is None or torch.is_grad_enabled() or self._fused is False:
            return None
        from llmctl.runtime import fused

        if not fused.enabled():
            return None
        k = cache.keys[0]
        if k.dtype not in (torch.float32, torch.bfloat16) or k.device.type != "cpu":
            return None
        if self._fused is None:
            self._fused = fused.build(self) or False
        return self._fused or None

    def _precompute(self, end: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """RoPE cos/sin tables (length, 1, 2, head_dim // 2) per layer kind covering positions below
        ``end``, and the embedding scale, for the current dtype and device."""
        key = (self.dtype, self.device)
        if end > self._rope_len or key != self._rope_key:
            # Grow geometrically, but past max_position_embeddings only on demand (dynamic RoPE depends on it).
            length = max(end, min(max(2 * self._rope_len, 256), self.config.max_position_embeddings))
            for kind in set(self.kinds):
                inv_freq, scaling = inv_frequencies(self.config, kind, seq_len=length)
                self._rope[kind] = rope_tables(inv_freq, scaling, length, self.dtype, self.device)
            self._rope_len, self._rope_key = length, key
            self._embed_scale = float(torch.tensor(self.config.hidden_size**0.5).to(self.dtype))
        return self._rope

    def positions(self, start: int, T: int, masked: bool = True) -> tuple[dict[str, Any], dict[int | None, Any]]:
        """What the layers take for positions ``start``..``start + T - 1``: RoPE (cos, sin) per layer kind and,
        when ``masked`` (no KV cache), the causal / sliding-window mask per window (``self.windows[i]``)."""
        tables = self._precompute(start + T)
        rope = {kind: (cos.narrow(0, start, T), sin.narrow(0, start, T)) for kind, (cos, sin) in tables.items()}
        masks = {w: self_mask(start, T, w, self.device) for w in set(self.windows)} if masked else {}
        return rope, masks

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first layer's input (B, T, hidden) for ``tokens`` (B, T): embeddings, scaled where the family
        scales them."""
        x = self.model.embed_tokens(tokens)
        if self.config.embed_scale:
            self._precompute(1)  # the scale rounded to the current dtype
            x = x * self._embed_scale
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for ``tokens`` (B, T) at positions ``start_pos`` (default: the cache length).

        With a cache, keys/values are stored and earlier ones attended to; without, a causal (and
        sliding-window) mask covers the batch. ``last_only`` returns only the last position's logits.

        The logits are in the model's dtype, except a one-token step that llmctl.runtime.fused runs whole
        (embedding to logits in one C++ call): its logits are fp32, as its output matrix accumulates them.
        """
        B, T = tokens.shape
        start = (cache.length if cache is not None else 0) if start_pos is None else start_pos
        plan = self._fused_plan(B, T, cache)
        if plan is not None and plan.whole and cache is not None and cache.batch_size == 1:
            # one token through everything in one C++ call (llmctl.runtime.fused): fp32 logits
            tables = self._precompute(start + 1)
            cache.begin(start, 1, masks=False)
            return self._softcap(plan.token(tokens, cache, tables, start))
        rope, masks = self.positions(start, T, cache is None)
        tables = self._rope  # the full tables positions() made sure of, for the fused step
        if cache is not None:
            if B != cache.batch_size:
                raise UsageError(
                    f"a batch of {B} sequences does not fit a KV cache made for {cache.batch_size}"
                )
            cache.begin(start, T)
        x = self.embed(tokens)  # (B, T, hidden)
        if plan is not None:  # one token: every layer in one C++ call (llmctl.runtime.fused)
            x = plan.step(x, cache, tables, start)
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, rope[self.kinds[i]], masks.get(self.windows[i]), cache, i)
        if last_only:
            x = x[:, -1:]  # (B, 1, hidden)
        x = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.head is not None and x.shape[1] * x.shape[0] <= 8:  # decode steps; prefill keeps the weight
            weight = self.head
        logits = plan.head(x, weight) if plan is not None else None
        if logits is None:
            logits = linear(x, weight)  # (B, T, vocab)
        return self._softcap(logits)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
