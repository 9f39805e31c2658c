"""The GPU path, checked on the CPU where it can be: the dtype rule per CUDA device, attention without
masks, penalties without host syncs, streaming GGUF loads, llama.cpp offload, and quantized weights that
move with their model and pick CUDA kernels. What needs a GPU is in scripts/gpu-check.sh."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, SEQ

from llmctl.runtime import device as device_mod
from llmctl.runtime.device import compute_dtype


# ---- c. compute dtype: native bf16 by compute capability, per cuda:N ---------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    """cuda:0 a Turing card (7.5: bf16 only emulated), cuda:1 an Ampere one (8.0); the current device 0."""
    caps = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: caps[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_auto_dtype_is_bf16_only_where_the_device_computes_it(two_gpus) -> None:
    assert compute_dtype(torch.device("cuda:0")) == torch.float16  # emulated bf16 does not count
    assert compute_dtype(torch.device("cuda:1")) == torch.bfloat16
    assert compute_dtype(torch.device("cuda")) == torch.float16  # the current device, 0
    assert compute_dtype(torch.device("cuda:1"), "auto") == torch.bfloat16
    assert compute_dtype(torch.device("cuda:0"), "fp32") == torch.float32  # an explicit choice stands
    assert device_mod.native_bf16(torch.device("cuda:1"))


# ---- d. attention: is_causal without a mask where the chunk starts at 0 ------------------------------
def _old_attend(q, k, v, mask, scale, repeat_kv=None):
    """What Attention ran before: a boolean mask always, grouped heads by enable_gqa."""
    from llmctl.runtime.kv_cache import CAUSAL

    if mask is CAUSAL:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_attention_equals_the_masked_path(family, loaded, tokens, monkeypatch) -> None:
    """Cache-free forward and a chunked prefill from position 0 give the logits of the old masked path
    (fp32 rounding); sliding windows that bite (Gemma 3, Mistral past 8 tokens) still get their mask."""
    from llmctl.runtime import model as model_mod

    model = loaded[family]
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    def run():
        with torch.no_grad():
            whole = model(tokens)
            cache = model.make_cache(max_len=SEQ, batch_size=2)
            chunks = [model(tokens[:, s : s + 6], cache) for s in range(0, SEQ, 6)]
        return whole, torch.cat(chunks, dim=1)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    new = run()
    ran = list(calls)  # the old path below calls SDPA too
    monkeypatch.setattr(model_mod, "attend", _old_attend)
    old = run()
    for a, b in zip(new, old, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    windowed = model.config.sliding_window is not None
    # the cache-free pass over 24 tokens and the first chunk (6 tokens at 0) run unmasked where no
    # window bites; later chunks (start > 0) and biting windows keep a mask
    assert any(causal and no_mask for _, _, no_mask, causal in ran)
    assert all(no_mask for _, _, no_mask, causal in ran if causal)
    assert all(not causal for T, L, _, causal in ran if L != T)  # later chunks attend to the cache
    if windowed:
        assert any(T == SEQ and not no_mask for T, _, no_mask, _ in ran)  # the window bites at 24
    else:
        assert all(causal for T, _, _, causal in ran if T == SEQ)


def test_repeated_kv_equals_grouped_heads() -> None:
    """The CUDA branch (k/v repeated per query head, for the memory-efficient kernel) computes what
    enable_gqa computes."""
    from llmctl.runtime.kv_cache import CAUSAL
    from llmctl.runtime.model import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 7, 16, generator=g) for n in (8, 2, 2))
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask[:, 0] = True
    for m in (mask, CAUSAL):
        a = attend(q, k, v, m, 0.25, repeat_kv=True)
        b = attend(q, k, v, m, 0.25, repeat_kv=False)
        assert (a - b).abs().max().item() <= 1e-6


# ---- g. penalties: running counts, no host syncs ---------------------------------------------------
def _old_penalties(logits, recent, rp, fp, pp):
    """The formula with bincount, as it was."""
    if not recent or (rp == 1.0 and fp == 0.0 and pp == 0.0):
        return logits
    ids = torch.as_tensor(list(recent), dtype=torch.long)
    counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    seen = counts > 0
    out = logits
    if rp != 1.0:
        out = torch.where(seen, torch.where(out <= 0, out * rp, out / rp), out)
    return out - counts * fp - seen.to(logits.dtype) * pp


@pytest.mark.parametrize("last_n", [-1, 0, 1, 5, 64])
def test_running_penalty_counts_equal_the_bincount_formula(last_n, monkeypatch) -> None:
    """A reply streamed token by token: the sampler's running counts give bit-identical penalised logits
    to the bincount formula, and after the first step it never counts afresh (no copy to the device)."""
    from llmctl.runtime import sampler as sampler_mod
    from llmctl.runtime.sampler import Sampler, SamplingOptions

    fresh = []
    real = sampler_mod.token_counts
    monkeypatch.setattr(sampler_mod, "token_counts", lambda *a: fresh.append(1) or real(*a))
    o = SamplingOptions(
        repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.2, repeat_last_n=last_n
    )
    s = Sampler(o)
    g = torch.Generator().manual_seed(5)
    seen = [45, *torch.randint(0, 40, (12,), generator=g).tolist()]  # 45: outside the vocabulary
    for step in range(30):
        logits = torch.randn(40, generator=g)
        ours = s._penalised(logits, seen)
        window = seen if last_n < 0 else seen[-last_n:] if last_n else []
        assert torch.equal(ours, _old_penalties(logits, window, 1.3, 0.4, -0.2)), step
        seen.append(int(torch.randint(0, 40, (1,), generator=g)))
    assert len(fresh) == (0 if last_n == 0 else 1)
    other = [3, 3, 1]  # an unrelated history is counted afresh, not patched
    assert torch.equal(
        s._penalised(logits, other), _old_penalties(logits, list(s.window(other)), 1.3, 0.4, -0.2)
    )


# ---- e. GGUF through torch: streamed tensor by tensor ------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_gguf_streams_into_the_model(arch, tmp_path, monkeypatch) -> None:
    """load_model builds no state dict: each dequantized tensor is dead before the next is made, and the
    model equals the one built from load_gguf_state_dict (which bench/ still uses)."""
    import weakref

    from test_gguf_loader import hf_state, write_model_gguf

    from llmctl.runtime import gguf_loader
    from llmctl.runtime.gguf_loader import load_gguf_state_dict
    from llmctl.runtime.loader import load_model, load_state_dict

    path = tmp_path / f"{arch}.gguf"
    write_model_gguf(path, arch, hf_state(arch))
    want = load_state_dict(*load_gguf_state_dict(path), dtype=torch.bfloat16, device="cpu")
    inner = gguf_loader.iter_gguf_tensors
    alive_before_next = []

    def watched(info, dtype=None):
        made = []
        for name, t in inner(info, dtype):
            alive_before_next.append(sum(r() is not None for r in made))
            made.append(weakref.ref(t))
            yield name, t

    monkeypatch.setattr(gguf_loader, "iter_gguf_tensors", watched)
    monkeypatch.setattr(gguf_loader, "load_gguf_state_dict", None)  # not called by load_model
    got = load_model(path, dtype=torch.bfloat16, device="cpu")
    assert len(alive_before_next) == len(dict(want.named_parameters())) and not any(alive_before_next)
    for (n, a), (m, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert n == m and a.dtype == torch.bfloat16 and torch.equal(a, b), n


_PEAK = """
import resource, sys, torch
from llmctl.runtime.loader import load_model
import llmctl.runtime.gguf_loader, gguf.quants  # imported before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = load_model(sys.argv[1], dtype=torch.bfloat16, device="cpu")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = list(m.parameters())
print(peak - base, sum(p.numel() * p.element_size() for p in params), max(p.numel() for p in params) * 4)
"""


@pytest.mark.slow
def test_gguf_load_peak_memory_is_the_model_plus_one_tensor() -> None:
    """Loading the bundled SmolLM2 GGUF in bf16 raises the process's peak RSS by at most the model, its
    largest tensor in fp32, the file's mapped pages and 64 MiB (the old fp32 state dict took 888 MiB over
    the baseline; the sum here is about 525)."""
    import subprocess
    import sys

    from conftest import smollm2_path

    path = smollm2_path()
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True)
    grew, model_bytes, largest_fp32 = map(int, out.stdout.split())
    assert grew <= model_bytes + largest_fp32 + path.stat().st_size + 64 * 2**20, out.stdout


# ---- f. llama.cpp offloads every layer where it can --------------------------------------------------
@pytest.mark.parametrize("offload", [False, True])
def test_llama_cpp_gpu_layers(offload, monkeypatch) -> None:
    import llama_cpp

    from llmctl.errors import UsageError
    from llmctl.runtime.llamacpp import gpu_layers

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: offload)
    every = -1 if offload else 0
    assert gpu_layers(None) == gpu_layers("auto") == every
    assert gpu_layers("cpu") == 0
    for name in ("cuda", "gpu", "mps"):
        if offload:
            assert gpu_layers(name) == -1
        else:
            with pytest.raises(
                UsageError, match=f"--device {name}: the llama.cpp backend runs on the CPU here"
            ):
                gpu_layers(name)
    with pytest.raises(UsageError, match="--device cuda:1: the llama.cpp backend takes auto, cpu or cuda"):
        gpu_layers("cuda:1")


@pytest.mark.parametrize("device", [None, "cuda"])
def test_llama_cpp_backends_pass_gpu_layers(device, monkeypatch) -> None:
    """Chat's backend and eval's scorer hand llama.cpp the offload choice (a stand-in Llama records it)."""
    import llama_cpp
    from conftest import smollm2_path

    from llmctl.errors import FormatError
    from llmctl.runtime.llamacpp import LlamaCppBackend
    from llmctl.runtime.perplexity import LlamaCppScorer

    seen = []
    real = llama_cpp.Llama

    def fake_llama(*args, **kwargs):
        if kwargs.get("vocab_only"):  # the tokenizer
            return real(*args, **kwargs)
        seen.append(kwargs.get("n_gpu_layers"))
        raise ValueError("stand-in")

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(llama_cpp, "Llama", fake_llama)
    for make in (LlamaCppBackend, LlamaCppScorer):
        with pytest.raises(FormatError, match="stand-in"):
            make(smollm2_path(), 128, device=device)
    assert seen == [-1, -1]
