"""Prefill, single-token decode and greedy generation over a ``Transformer`` and its ``KVCache``.

Generation is a generator: the caller pulls tokens one at a time, may stop whenever it likes, and keeps
the cache for the next turn. A sampler (temperature, top-k/p …) plugs in where ``greedy`` takes argmax.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from llmctl.errors import UsageError
from llmctl.runtime.kv_cache import KVCache
from llmctl.runtime.model import Transformer


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache, chunk_size: int = 512) -> torch.Tensor:
    """Run ``tokens`` (B, T) through the model at the cache's end, ``chunk_size`` positions at a time;
    return the logits (B, vocab) of the last position."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise UsageError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    T = tokens.shape[1]
    if T == 0:
        raise UsageError("prefill needs at least one token")
    for i in range(0, T, chunk_size):
        logits = model(tokens[:, i : i + chunk_size], cache, last_only=True)  # (B, 1, vocab)
    return logits[:, -1]


@torch.no_grad()
def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, vocab) after feeding one token per sequence (``token``: (B, 1))."""
    return model(token, cache)[:, -1]


def greedy(
    model: Transformer,
    cache: KVCache,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_ids: Iterable[int] = (),
    *,
    chunk_size: int = 512,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` argmax token ids after ``prompt_ids`` (appended at the cache's end).

    Stops after yielding a token of ``eos_ids``. The last yielded token is not yet in the cache (as in
    transformers): a following turn starts with it, at position ``cache.length``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        return
    eos = set(eos_ids)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)  # (1, T)
    logits = prefill(model, ids, cache, chunk_size)
    for i in range(max_new_tokens):
        token = int(logits[0].float().argmax())  # torch's bf16 argmax: ~1 ms over a 262k vocabulary, fp32's ~0.1
        yield token
        if token in eos or i == max_new_tokens - 1:
            return
        step = torch.tensor([[token]], dtype=torch.long, device=model.device)  # (1, 1)
        logits = decode_one_token(model, step, cache)
