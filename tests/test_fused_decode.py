"""The fused decode step (``llmctl.runtime.fused``: every layer of a one-token step in one C++ call) against
the Python layers it replaces.

* Tiny random models of every family (conftest): each decode step's logits equal the Python layers' to
  fp32 summation order (``TOL`` of the largest logit), greedy tokens identical, past the sliding windows
  (ring buffers wrapped) and across a rollback (``truncate``), on 1 and 2 threads.
* Quantized (int4 / int4-asym / int8, per channel and groups of 32; fp8 per channel; NF4 in blocks of 64):
  the fused step runs the same code kernels, so it equals the Python layers on them (``TOL``), and it stays within test_int_kernels' stated
  model tolerance of the dequantized reference.
* bf16 models: within twice the Python layers' error against fp32 (weights and cache bf16, the hidden
  state fp32).
* ``LLMCTL_FUSED_DECODE=0`` and anything the fused step does not cover (fp16, batches, grad) run the
  Python layers.
* Real: the bundled SmolLM2 GGUF in fp32 decodes the same greedy tokens fused as in Python (slow); the
  Gemma 3 and SmolLM2 GGUFs against transformers (test_runtime_model) run fused too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, WINDOW

from llmctl.quant import native
from llmctl.runtime import fused
from llmctl.runtime.loader import load_model

TOL = 1e-4  # of the largest logit: fp32 summation order (RMSNorm, RoPE, attention) differs, nothing else
# On int8 activations that summation order can move a value across a rounding boundary of its block's int8
# code, one step of the block's scale: measured up to 0.3 % of the largest logit on the tiny models.
QTOL = 1e-2
STEPS = 3 * WINDOW  # decode steps after the prompt: past every sliding window


@pytest.fixture(scope="module", autouse=True)
def kernels():
    return native.build()


def decode(
    model,
    prompt: list[int],
    steps: int,
    *,
    use_fused: bool,
    monkeypatch,
    forced: list[int] | None = None,
    threads: int | None = None,
):
    """(greedy tokens, logits of each step) decoding ``steps`` tokens after ``prompt`` (``forced``: feed
    these tokens instead of the greedy ones); halfway through, the cache is rolled back by 2 tokens and the
    same tokens are decoded again (chat rollback). ``threads``: the steps' thread count, the prompt's
    prefill on one thread (torch's matmuls sum in an order that depends on the thread count: on an AMD
    EPYC, 1 and 2 threads differ by ~3e-6)."""
    monkeypatch.setenv(fused.ENV, "1" if use_fused else "0")
    cache = model.make_cache(len(prompt) + steps + 4, rollback=3)
    tokens, logits = [], []
    with torch.no_grad():
        if threads is not None:
            torch.set_num_threads(1)
        out = model(torch.tensor([prompt]), cache, last_only=True)[0, -1]
        if threads is not None:
            torch.set_num_threads(threads)
        for i in range(steps):
            tokens.append(int(out.argmax()) if forced is None else forced[i])
            logits.append(out)
            if i == steps // 2:  # roll back two tokens and decode them again
                cache.truncate(cache.length - 2)
                for t in tokens[-3:-1]:
                    model(torch.tensor([[t]]), cache)
            out = model(torch.tensor([[tokens[-1]]]), cache)[0, -1]
    return tokens, torch.stack(logits)


def assert_same(a, b, tol=TOL):
    (ta, la), (tb, lb) = a, b
    assert ta == tb
    assert (la - lb).abs().max() <= tol * lb.abs().max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_step_equals_the_python_layers(family, tiny_models, threads, monkeypatch):
    folder, _ = tiny_models[family]
    model = load_model(folder)
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(2)).tolist()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = decode(model, prompt, STEPS, use_fused=False, monkeypatch=monkeypatch)
        assert model._fused is None  # never built: the Python layers ran
        got = decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch)
    finally:
        torch.set_num_threads(old)
    assert isinstance(model._fused, fused.Plan) and model._fused.whole  # the fused step ran, head included
    assert_same(got, ref)


def test_a_whole_step_equals_the_layers_step_and_the_python_head(tiny_models, monkeypatch):
    """``Plan.token`` (embedding to logits in C++) computes what ``Plan.step`` with the Python embedding, final
    norm and output matrix computes, on Gemma 3's scaled embeddings and (1 + weight) norms: the same embedding
    and products; the final RMSNorm's sum of squares in double where torch's is fp32 (an ulp of its factor)."""
    folder, _ = tiny_models["gemma3"]
    model = load_model(folder)
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(5)).tolist()
    whole = decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch)
    assert model._fused.whole
    monkeypatch.setattr(model._fused, "whole", False)  # the layers in C++, the rest in Python
    parts = decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch)
    assert whole[0] == parts[0]
    assert (whole[1] - parts[1]).abs().max() <= 1e-6 * parts[1].abs().max()


def test_a_whole_step_on_an_int8_head(tiny_models, monkeypatch):
    """An output matrix on the q8_0 grid decodes through ``native.int8_linear`` (``model.head``, as for a GGUF's
    q8_0 embeddings): the whole step takes it, and equals the Python layers on the same kernel."""
    from llmctl.quant.qlinear import lossless_int8

    folder, _ = tiny_models["smollm2"]
    model = load_model(folder)
    w = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    with torch.no_grad():  # the output matrix snapped to the q8_0 grid: a copy, the loaded weights untouched
        blocks = w.reshape(w.shape[0], -1, 32)
        s = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        snapped = (torch.round(blocks / s).clamp(-127, 127) * s).reshape(w.shape)
    model.head = lossless_int8(snapped, torch.float32)  # what both paths multiply at a decode step
    assert model.head is not None
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = decode(model, prompt, STEPS, use_fused=False, monkeypatch=monkeypatch)
    got = decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch)
    assert model._fused.whole
    assert_same(got, ref, QTOL)


def test_a_whole_step_refuses_a_token_outside_the_vocabulary(tiny_models):
    model = load_model(tiny_models["smollm2"][0])
    with torch.no_grad():
        model(torch.tensor([[5]]), cache := model.make_cache(8))
        assert model._fused.whole
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            model(torch.tensor([[96]]), cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_parallel_region_computes_what_one_thread_does(family, tiny_models, dtype, monkeypatch):
    """A dense model's step on 2 threads runs as one OpenMP region (rows, heads and norms shared out between
    the threads); every value is computed as on 1 thread, so the two agree bit for bit (the prompt's
    prefill, torch's, runs on one thread in both)."""
    folder, _ = tiny_models[family]
    model = load_model(folder, dtype=dtype)
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            runs.append(decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch, threads=threads))
    finally:
        torch.set_num_threads(old)
    assert isinstance(model._fused, fused.Plan)
    (t1, l1), (t2, l2) = runs
    assert t1 == t2 and torch.equal(l1, l2)


QUANT = ["int4:32", "int4-asym:32", "int8", "int8:32", "fp8", "nf4:64"]


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """(family, format) -> the tiny model quantized to it, loaded (int4/int8 kernels)."""
    from llmctl.quantize.convert import run_plan
    from llmctl.quantize.plan import make_plan

    out = {}
    for family in ("smollm2", "qwen2", "gemma3_untied"):
        for item in QUANT:
            fmt, _, group = item.partition(":")
            folder = tmp_path_factory.mktemp(f"{family}-{fmt}") / "out"
            # NF4's blocks of 64 would cross down_proj's rows of 96, which its kernel does not take: that
            # weight stays float (the dense kind, beside the NF4 ones)
            plan = make_plan(str(tiny_models[family][0]), fmt, group_size=int(group) if group else None,
                             keep=["down_proj"] if fmt == "nf4" else [])  # fmt: skip
            run_plan(plan, folder, measure_error=False)
            out[family, item] = folder
    return out


@pytest.mark.parametrize(
    ("item", "threads", "path"),
    [(item, 1, "best") for item in QUANT]
    + [("int4-asym:32", 2, "best"), ("int8", 2, "best"), ("fp8", 2, "best"), ("nf4:64", 2, "best")]
    + [(item, 1, p) for item in ("int4:32", "int8:32") for p in ("avx2", "scalar")]
    + [("nf4:64", 1, "avx2")],  # NF4's scalar path multiplies floats, not int8 activations: other tokens
)
@pytest.mark.parametrize("family", ["smollm2", "qwen2", "gemma3_untied"])
def test_fused_step_on_quantized_weights(family, item, threads, path, quantized, monkeypatch):
    """path "avx2" / "scalar": the fused step calls that path of the kernels (the Python layers keep the
    best), where the build has it."""
    from test_int_kernels import MODEL_KL, MODEL_TOLERANCE

    import llmctl.quant.qlinear as ql

    paths = native.build().int4_paths()
    if path != "best" and path not in paths:
        pytest.skip(f"this build has no {path} path ({', '.join(paths)})")
    path = 0 if path == "best" else paths.index(path)
    if path:
        step, token = fused.Plan.step, fused.Plan.token
        monkeypatch.setattr(fused.Plan, "step", lambda self, *a: step(self, *a, path=path))
        monkeypatch.setattr(fused.Plan, "token", lambda self, *a: token(self, *a, path=path))
    model = load_model(quantized[family, item], device="cpu")
    kinds = {getattr(model.model.layers[0].mlp.up_proj.weight, "kernel", None)}
    assert kinds <= {"int4-codes", "int8-codes", "fp8-codes", "nf4-codes"}
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        python = decode(model, prompt, STEPS, use_fused=False, monkeypatch=monkeypatch)
        got = decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch)
        assert isinstance(model._fused, fused.Plan) and model._fused.whole
        monkeypatch.setattr(ql, "CODE_KERNEL_ROWS", 0)  # the reference: dequantized weights, Python layers
        monkeypatch.setattr(model, "head", None)
        ref = decode(model, prompt, STEPS, use_fused=False, monkeypatch=monkeypatch, forced=got[0])
    finally:
        torch.set_num_threads(old)
    assert_same(got, python, QTOL)  # the same kernels, one call instead of a Python layer
    for a, b in zip(got[1], ref[1], strict=True):  # against the dequantized weights on the same tokens
        kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum")
        assert kl <= MODEL_KL and (a - b).abs().max() <= MODEL_TOLERANCE * b.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_bf16_step_is_as_close_to_fp32_as_the_python_layers(family, tiny_models, monkeypatch):
    """A bf16 model: weights and cache bf16, the hidden state fp32 between the linears (the Python layers
    round it to bf16 after every operation), so the fused step is within twice the Python layers' error
    against fp32 (measured: smaller than theirs), on the same tokens."""
    folder, _ = tiny_models[family]
    prompt = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = decode(load_model(folder), prompt, STEPS, use_fused=True, monkeypatch=monkeypatch)
    model = load_model(folder, dtype="bf16")
    python = decode(model, prompt, STEPS, use_fused=False, monkeypatch=monkeypatch, forced=ref[0])
    assert model._fused is None
    got = decode(model, prompt, STEPS, use_fused=True, monkeypatch=monkeypatch, forced=ref[0])
    assert isinstance(model._fused, fused.Plan) and model._fused.whole
    assert got[1].dtype == torch.float32  # a whole step's logits are fp32, the head's accumulation not rounded
    scale = ref[1].abs().max()
    err_python = (python[1].float() - ref[1]).abs().max() / scale
    err_fused = (got[1].float() - ref[1]).abs().max() / scale
    assert err_fused <= 2 * err_python + 1e-3, (float(err_fused), float(err_python))


def test_what_the_fused_step_does_not_cover_runs_the_python_layers(tiny_models, monkeypatch):
    folder, _ = tiny_models["gemma3"]
    prompt = [3, 7, 11]
    monkeypatch.setenv(fused.ENV, "1")
    fp16 = load_model(folder, dtype="fp16")
    with torch.no_grad():
        fp16(torch.tensor([prompt]), cache := fp16.make_cache(8))
        fp16(torch.tensor([[5]]), cache)
    assert not isinstance(fp16._fused, fused.Plan)  # not covered: the Python layers ran
    model = load_model(folder)
    cache = model.make_cache(8, batch_size=2)
    with torch.no_grad():
        model(torch.tensor([prompt, prompt]), cache)
        model(torch.tensor([[5], [5]]), cache)  # a batch of two
    model(torch.tensor([[5]]), model.make_cache(8))  # autograd on
    assert model._fused is None
    with torch.no_grad():  # moved: the plan is dropped, and rebuilt at the next step
        model(torch.tensor([[5]]), model.make_cache(8))
        assert isinstance(model._fused, fused.Plan)
        model.float()
        assert model._fused is None


def test_without_the_kernels_the_python_layers_run(tiny_models, monkeypatch):
    monkeypatch.setenv("LLMCTL_NATIVE", "0")
    monkeypatch.setattr(native, "_module", None)
    model = load_model(tiny_models["smollm2"][0])
    with torch.no_grad():
        model(torch.tensor([[5]]), model.make_cache(8))
    assert model._fused is False


@pytest.mark.slow
def test_smollm2_gguf_fp32_decodes_the_same_tokens_fused(monkeypatch):
    from conftest import smollm2_path

    model = load_model(smollm2_path())
    prompt = [1, 504, 3458, 288, 3575, 30, 57, 8, 99, 100, 1200, 5]
    ref = decode(model, prompt, 24, use_fused=False, monkeypatch=monkeypatch)
    got = decode(model, prompt, 24, use_fused=True, monkeypatch=monkeypatch)
    assert isinstance(model._fused, fused.Plan)
    assert_same(got, ref)
