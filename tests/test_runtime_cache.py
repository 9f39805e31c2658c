"""KVCache: cached decoding equals recomputation, ring buffers equal full attention, rollback, memory."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, SEQ, WINDOW

from llmctl.errors import UsageError
from llmctl.runtime.generate import decode_one_token, prefill
from llmctl.runtime.kv_cache import KVCache

ATOL = 1e-4  # max |Δlogit| in fp32 (logits are up to ~15 here)
SLIDING = ["mistral", "gemma3"]


def recompute(model, tokens):
    """Logits of every position, cache-free (full attention with a causal + sliding mask)."""
    with torch.no_grad():
        return model(tokens)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_recompute(family, loaded, tokens):
    model = loaded[family]
    full = recompute(model, tokens)
    cache = model.make_cache(SEQ, batch_size=2)
    assert max_diff(prefill(model, tokens[:, :4], cache), full[:, 3]) <= ATOL
    for p in range(4, SEQ):  # decodes well past the window of 8
        assert max_diff(decode_one_token(model, tokens[:, p : p + 1], cache), full[:, p]) <= ATOL
    assert cache.length == SEQ


@pytest.mark.parametrize("family", [*SLIDING, "qwen3"])
@pytest.mark.parametrize("chunk", [1, 3, WINDOW, WINDOW + 1, SEQ])
def test_chunked_prefill_equals_one_prefill(family, chunk, loaded, tokens):
    model = loaded[family]
    one = model.make_cache(SEQ, batch_size=2)
    chunked = model.make_cache(SEQ, batch_size=2)
    a = prefill(model, tokens[:, :-1], one, chunk_size=SEQ)
    b = prefill(model, tokens[:, :-1], chunked, chunk_size=chunk)
    assert max_diff(a, b) <= ATOL
    # The caches hold the same state: the next step agrees too.
    nxt = tokens[:, -1:]
    assert max_diff(decode_one_token(model, nxt, one), decode_one_token(model, nxt, chunked)) <= ATOL


@pytest.mark.parametrize("family", SLIDING)
@pytest.mark.parametrize("chunk", [1, 5, SEQ])
def test_ring_buffer_equals_full_attention_past_window(family, chunk, loaded, tokens):
    """A ring of `window` slots against a cache holding every position (masked to the window)."""
    model = loaded[family]
    ring = model.make_cache(SEQ, batch_size=2)
    whole = model.make_cache(SEQ, batch_size=2, rollback=SEQ)  # sliding layers keep all SEQ positions
    for i, w in enumerate(ring.windows):
        if w is not None:
            assert ring.keys[i].shape[2] == WINDOW
            assert whole.keys[i].shape[2] == SEQ
    full = recompute(model, tokens)
    with torch.no_grad():
        for start in range(0, SEQ, chunk):
            part = tokens[:, start : start + chunk]
            a, b = model(part, ring), model(part, whole)
            assert max_diff(a, b) <= ATOL
            assert max_diff(a, full[:, start : start + chunk]) <= ATOL


def test_sliding_layers_hold_only_their_window(loaded):
    model = loaded["gemma3"]  # layers: sliding, sliding, full
    cache = model.make_cache(100, batch_size=3)
    assert [k.shape for k in cache.keys] == [(3, 2, WINDOW, 16), (3, 2, WINDOW, 16), (3, 2, 100, 16)]
    assert cache.keys[0].dtype == torch.float32
    assert cache.nbytes == 2 * 3 * 2 * 16 * (WINDOW + WINDOW + 100) * 4
    full_only = loaded["llama"].make_cache(100)
    assert full_only.nbytes == 2 * 2 * (1 * 2 * 100 * 16) * 4  # layers x (k, v) x B x kv heads x len x dim
    assert KVCache(model.config, 4, dtype=torch.bfloat16).keys[0].dtype == torch.bfloat16
    assert KVCache(model.config, 4).keys[2].shape[2] == 4  # max_len below the window: no wasted slots


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_truncate_then_continue_equals_recompute(family, loaded, tokens):
    model = loaded[family]
    cache = model.make_cache(SEQ, batch_size=2, rollback=4)
    prefill(model, tokens[:, :20], cache, chunk_size=6)
    cache.truncate(15)  # roll back 5 = rollback + 1 tokens
    other = tokens.flip(1)[:, :5]  # continue differently
    with torch.no_grad():
        out = model(other, cache)
    ref = recompute(model, torch.cat((tokens[:, :15], other), dim=1))[:, 15:]
    assert max_diff(out, ref) <= ATOL
    # start_pos below the length rolls back too
    with torch.no_grad():
        again = model(other[:, :1], cache, start_pos=15)
    assert max_diff(again, ref[:, :1]) <= ATOL
    assert cache.length == 16


def test_rollback_beyond_the_ring_is_refused(loaded, tokens):
    model = loaded["gemma3"]
    cache = model.make_cache(SEQ, batch_size=2)  # no rollback reserve: the ring holds the window only
    prefill(model, tokens[:, :20], cache)
    cache.truncate(19)  # one token is always recoverable
    with pytest.raises(
        UsageError, match="cannot roll the KV cache back from 19 to 12 positions.*prefill again"
    ):
        cache.truncate(12)
    assert cache.length == 0  # reset, ready for a new prefill
    prefill(model, tokens[:, :20], cache)
    assert cache.length == 20


def test_reset_and_reuse(loaded, tokens):
    model = loaded["mistral"]
    cache = model.make_cache(SEQ, batch_size=2)
    prefill(model, tokens.flip(1), cache, chunk_size=5)  # fill the ring with other tokens
    cache.reset()
    assert cache.length == 0
    assert max_diff(prefill(model, tokens, cache, chunk_size=7), recompute(model, tokens)[:, -1]) <= ATOL


def test_cache_errors(loaded, tokens):
    model = loaded["llama"]
    cache = model.make_cache(8, batch_size=2)
    prefill(model, tokens[:, :6], cache)
    with pytest.raises(UsageError, match="context is full: 9 positions exceed the KV cache's max_len 8"):
        prefill(model, tokens[:, :3], cache)
    with pytest.raises(UsageError, match="start_pos 7 is past the cache's 6 positions"):
        model(tokens[:, :1], cache, start_pos=7)
    with pytest.raises(UsageError, match="a batch of 1 sequences does not fit a KV cache made for 2"):
        model(tokens[:1, :1], cache)
    with pytest.raises(UsageError, match="cannot truncate the KV cache to 9: it holds 6 positions"):
        cache.truncate(9)
    with pytest.raises(UsageError, match="max_len must be a positive integer, got 0"):
        KVCache(model.config, 0)
    with pytest.raises(UsageError, match="rollback must be a non-negative integer, got -1"):
        KVCache(model.config, 8, rollback=-1)


KV_DTYPES = [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("dtype", "kv_dtype"), KV_DTYPES)
def test_nbytes_equals_estimate_memory_tiny(family, dtype, kv_dtype, loaded):
    """The runtime's KV cache is exactly what estimate-memory predicts (windowed layout)."""
    from llmctl.memory.estimate import estimate

    config = loaded[family].config
    for context, batch in [(1, 1), (WINDOW - 1, 2), (WINDOW, 1), (100, 3)]:
        cache = KVCache(config, context, batch, dtype=dtype, device="meta")
        predicted = estimate(config, context=context, batch=batch, kv_dtype=kv_dtype)
        assert cache.nbytes == predicted.kv_cache_bytes, (family, context, batch)
        held = [k.shape[2] for k in cache.keys]
        assert held == list(predicted.kv_tokens_per_layer)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_nbytes_equals_estimate_memory_bundled(name):
    """Same for the bundled GGUFs' configs (Gemma 3: 512-token windows on 5 of every 6 layers), up to
    their full context, as `llmctl estimate-memory` computes it from the file."""
    from conftest import gemma3_path, smollm2_path

    from llmctl.gguf.reader import read_gguf
    from llmctl.memory.report import memory_report_for

    path = smollm2_path() if name == "smollm2" else gemma3_path()
    config = read_gguf(path).config
    for context in (7, 511, 512, 513, 4096, config.max_position_embeddings):
        for dtype, kv_dtype in KV_DTYPES:
            cache = KVCache(config, context, dtype=dtype, device="meta")
            report = memory_report_for(str(path), context=context, kv_dtype=kv_dtype)
            assert cache.nbytes == report.estimates[0].kv_cache_bytes, (context, kv_dtype)
        if name == "gemma3" and context > 512:  # the windows really are smaller than the context
            assert sorted({k.shape[2] for k in cache.keys}) == [512, context]
