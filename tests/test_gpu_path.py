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


# ---- a. quantized weights: CUDA kernels, moves with the model ----------------------------------------
def _weight(fmt: str, group: int | None = None, rows: int = 96, cols: int = 256):
    from llmctl.quant.formats import REGISTRY

    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2)) * 0.05
    w[3] = 0  # an all-zero row
    return REGISTRY[fmt].quantize(w, group)


@pytest.mark.parametrize(
    "fmt,group,kernel",
    [("int8", None, "int8-rows"), ("fp8", None, "fp8-rows"), ("fp8", 0, "fp8-rows"), ("int8", 32, "dequantize"),
     ("fp8", 64, "dequantize"), ("nf4", None, "dequantize"), ("nf4-dq", None, "dequantize"), ("int4", 32, "dequantize")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_equal_the_dequantized_product(fmt, group, kernel, dtype) -> None:
    """cuda_kernels.prepare/linear run on any device; on CPU tensors they must give F.linear of the
    dequantized weight (int8/fp8 rows scale after the product, fp16 before). tinygemm and bitsandbytes
    have their own tests below; off CUDA those formats dequantize."""
    from llmctl.quant import cuda_kernels

    q = _weight(fmt, group)
    name, args, kept = cuda_kernels.prepare(q, torch.device("cpu"))
    assert name == kernel and kept is q
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = F.linear(x.float(), q.dequantize(torch.float32))
    if kernel == "dequantize":
        got = F.linear(x, cuda_kernels.dequantize(name, args, kept, dtype))
    else:
        got = cuda_kernels.linear(name, args, x)
    assert got.shape == want.shape and got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_bitsandbytes_reads_llmctl_nf4_as_stored(fmt) -> None:
    """The QuantState built for bitsandbytes' matmul_4bit (CUDA's NF4 kernel; bitsandbytes runs it on the
    CPU too) gives exactly the product of llmctl's dequantized weight, and dequantize_4bit its weight."""
    import bitsandbytes as bnb

    from llmctl.quant import cuda_kernels

    q = _weight(fmt)
    state = cuda_kernels.nf4_quant_state(q, bnb)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    dense = q.dequantize(torch.float32)
    assert torch.equal(cuda_kernels.linear("nf4-bnb", (q.parts["weight"], state), x), F.linear(x, dense))
    assert torch.equal(bnb.functional.dequantize_4bit(q.parts["weight"], state), dense)


def _tinygemm_weight(nibbles: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The weight tinygemm reconstructs from the bytes it is given, written from int4mm.cu's comments:
    column 2j in byte j's high nibble, 2j + 1 in its low one; (u - 8) · scale + zero per group, in bf16."""
    u = (
        torch.stack([nibbles >> 4, nibbles & 15], dim=-1).reshape(nibbles.shape[0], -1).float()
    )  # (rows, cols)
    scale = sz[..., 0].t().float().repeat_interleave(group, dim=1)  # (rows, cols)
    zero = sz[..., 1].t().float().repeat_interleave(group, dim=1)
    return (u - 8) * scale + zero


@pytest.mark.parametrize("fmt", ["int4", "int4-asym"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_tinygemm_packing_reconstructs_the_weight(fmt, group) -> None:
    """The bytes and scale/zero tensor handed to _convert_weight_to_int4pack / _weight_int4pack_mm describe
    the stored weight (to bf16 rounding of scales and zeros, which tinygemm computes in)."""
    from llmctl.quant import cuda_kernels
    from llmctl.quant.formats import REGISTRY

    q = _weight(fmt, group)
    codes, zp = REGISTRY[fmt].codes(q)
    nibbles = cuda_kernels.tinygemm_nibbles(codes)
    assert nibbles.shape == (96, 128) and nibbles.dtype == torch.uint8
    assert torch.equal(
        (nibbles[:, :1] >> 4).to(torch.int16) - 8, codes[:, :1].to(torch.int16)
    )  # column 0 high
    sz = cuda_kernels.tinygemm_scales(q, zp)
    assert sz.shape == (256 // group, 96, 2) and sz.dtype == torch.bfloat16
    dense = q.dequantize(torch.float32)
    assert (_tinygemm_weight(nibbles, sz, group) - dense).abs().max() <= 2**-7 * dense.abs().max()


@pytest.mark.parametrize("rows,cols,inner", [(96, 256, 8), (64, 96, 2), (32, 192, 4)])
def test_tinygemm_calls_pass_torchs_own_shape_checks(rows, cols, inner, monkeypatch) -> None:
    """Under FakeTensorMode the aten int4 ops run their meta functions (torch's shape and dtype checks for
    the CUDA kernels): the packed weight, scales and activations fit, and the output is (tokens, rows)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmctl.quant import cuda_kernels

    monkeypatch.setattr(cuda_kernels, "tinygemm_device", lambda device: True)
    q = _weight("int4-asym", 32, rows, cols)
    assert cuda_kernels.inner_k_tiles(cols) == inner
    with FakeTensorMode(allow_non_fake_inputs=True):
        name, args, kept = cuda_kernels.prepare(q, torch.device("cpu"))
        assert name == "int4-tinygemm" and not kept.parts  # the packed copy replaces the codes
        assert args[0].shape == (rows // 8, cols // (16 * inner), 32, inner // 2)
        y = cuda_kernels.linear(name, args, torch.empty(2, 3, cols, dtype=torch.float16))
        assert y.shape == (2, 3, rows) and y.dtype == torch.float16
        assert cuda_kernels.dequantize(name, args, kept, torch.float32).shape == (rows, cols)
    assert not cuda_kernels.tinygemm_takes(_weight("int4", 32, rows=12))  # rows not a multiple of 8


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """fmt -> (folder, config.json) of the tiny Llama quantized by llmctl."""
    import json

    from llmctl.quantize.convert import run_plan
    from llmctl.quantize.plan import make_plan

    out = {}
    for fmt in ("int8", "fp8", "nf4", "int4"):
        folder = tmp_path_factory.mktemp(fmt) / "out"
        run_plan(
            make_plan(str(tiny_models["llama"][0]), fmt, group_size=32 if fmt == "int4" else None), folder
        )
        out[fmt] = (folder, json.loads((folder / "config.json").read_text()))
    return out


def _quant_weights(model):
    from llmctl.quant.qlinear import QuantWeight

    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, QuantWeight)]


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4"])
def test_quantized_model_moves_with_its_weights(fmt, quantized, tokens) -> None:
    """model.to(float64) and model.to("meta") reach the QuantWeights (plain attributes nn.Module skips):
    their dtype/device follow, kernels are prepared again off the CPU, nothing is dequantized."""
    from llmctl.quant import cuda_kernels
    from llmctl.runtime.loader import load_quantized

    folder, cfg = quantized[fmt]
    model = load_quantized(folder, cfg, _layout(folder), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ref = model(tokens)
        wide = model.to(torch.float64)
        assert all(w.cdtype == torch.float64 and w.dtype == torch.float64 for w in _quant_weights(wide))
        got = wide(tokens)
    tol = 1e-2 if fmt == "int8" else 1e-4  # torch's CPU int8 kernel computes in bf16 whatever the dtype
    assert got.dtype == torch.float64 and (got - ref.double()).abs().max() <= tol * ref.abs().max()
    meta = model.to("meta")
    weights = _quant_weights(meta)
    assert len(weights) == 14 and all(w.device.type == "meta" for w in weights)
    assert all(w.kernel in (*cuda_kernels.KERNELS, "dequantize") for w in weights)
    assert {w.kernel for w in weights} == {{"int8": "int8-rows", "fp8": "fp8-rows"}.get(fmt, "dequantize")}
    with torch.no_grad():
        assert meta(tokens.to("meta")).shape == (2, SEQ, 96)


def _layout(folder):
    from llmctl.runtime.loader import quantized_layout

    return quantized_layout(folder)[0]


def test_weights_packed_for_one_device_refuse_to_move(quantized) -> None:
    """int4 on the CPU keeps only a packed copy for its kernel: moving the model is refused in one line,
    before any parameter moved."""
    from llmctl.errors import UsageError
    from llmctl.runtime.loader import load_quantized

    folder, cfg = quantized["int4"]
    model = load_quantized(folder, cfg, _layout(folder), dtype=torch.float32, device="cpu")
    with pytest.raises(
        UsageError, match=r"cannot move to meta; load the model with device='meta' \(--device\)"
    ):
        model.to("meta")
    assert model.device.type == "cpu" and all(w.device.type == "cpu" for w in _quant_weights(model))
    assert all(
        w.cdtype == torch.bfloat16 for w in _quant_weights(model.to(torch.bfloat16))
    )  # dtype only: fine


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4", "int4"])
def test_quantized_folders_load_off_the_cpu(fmt, quantized, tokens, monkeypatch) -> None:
    """--device auto picking an accelerator no longer refuses quantized folders: with pick_device giving
    the meta device (what CUDA would be, without memory), every part is moved before its kernel is
    chosen, so no CPU kernel is prepared, and a forward pass runs."""
    from llmctl.quant import native
    from llmctl.runtime import device as device_mod
    from llmctl.runtime.loader import load_quantized

    monkeypatch.setattr(device_mod, "pick_device", lambda name=None: torch.device("meta"))
    monkeypatch.setattr(native, "get", lambda: pytest.fail("a CPU kernel was asked for"))
    folder, cfg = quantized[fmt]
    model = load_quantized(folder, cfg, _layout(folder), device="auto")
    assert model.device.type == "meta" and getattr(model, "head", None) is None
    assert all(w.device.type == "meta" for w in _quant_weights(model))
    with torch.no_grad():
        assert model(tokens.to("meta")).shape == (2, SEQ, 96)


# ---- b. the C++ decode kernels refuse tensors that are not on the CPU --------------------------------
@pytest.mark.slow
def test_native_decode_kernels_refuse_non_cpu_tensors() -> None:
    """fp8_linear / nf4_linear read raw pointers on the host: a tensor elsewhere (meta here, CUDA on a GPU
    machine) is refused by a TORCH_CHECK before any pointer is read."""
    from llmctl.quant import native

    kernels = native.build()
    x = torch.empty(1, 64, device="meta")
    cpu = torch.zeros(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="fp8_linear runs on CPU tensors"):
        kernels.fp8_linear(x, torch.zeros(4, 64, dtype=torch.uint8), torch.zeros(256), cpu.reshape(4, 1), 0)
    with pytest.raises(RuntimeError, match="nf4_linear runs on CPU tensors"):
        kernels.nf4_linear(x, torch.zeros(128, dtype=torch.uint8), torch.zeros(16), cpu, 4, 64, 0)
