"""llmctl's decode kernels on the stored codes (``native.int4_linear`` / ``int8_linear`` / ``nf4_linear``,
llama.cpp's q4 x q8, q8 x q8 and iq4_nl x q8 schemes; ``fp8_linear`` in floats): what they compute, exactly,
and how far that is from the product with the dequantized weight.

* Exact: each block of 32 activations is scaled to int8 (d = max|x| / 127, round half to even); the kernel
  equals, to fp32 summation order, the float64 product of those rounded activations with the dequantized
  weight — on every CPU path the build has (``int4_paths``: AVX-512 VNNI and AVX2 where the CPU has them, and
  the scalar fallback), every group size, 1–8 input rows and 1 or 2 threads.
* Stated tolerance against the unrounded activations: the largest error at most 2 % of the largest output
  (int8 activations: llama.cpp's own error, measured ~0.5–0.8 % on random weights).
* In the model: q/k/v and gate/up join into one call each (same bytes); a q8_0-exact head streams int8; the
  SmolLM2 int4-asym g32 folder, on the dequantized weights' greedy tokens, gives logits within the stated
  model tolerance with the kernels and the same likeliest token except at near-ties.
* Quantizing: the scale search weighed by calibration statistics (``int_group`` with ``importance``, what
  GPTQ and ``--calibration`` run) gives the eager code's bytes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.quant import native
from llmctl.quant.formats import REGISTRY
from llmctl.quant.qlinear import CODE_KERNEL_ROWS, QuantWeight, int4_kernel_args, lossless_int8

TOLERANCE = 2e-2  # of the largest output, against the product with unrounded activations
# A whole model, per decode step, against the dequantized weights: SmolLM2's activation outliers make int8
# blocks coarse (measured up to 8 % of the largest logit, KL 0.03; llama.cpp's own batched and one-token
# kernels differ by 4.5 % and KL 0.016 on its GGUF).
MODEL_TOLERANCE, MODEL_KL = 0.15, 0.05


@pytest.fixture(scope="module")
def kernels():
    return native.build()


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x with each block of 32 rounded as the kernels round it (float64)."""
    b = x.double().reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True).float()
    d = (amax / 127).double()
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)).double()
    q = torch.round((b.float() * inv.float()).double())  # the kernel multiplies in fp32, then rounds
    return (q * d).reshape(x.shape)


def weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3] = 0  # an all-zero row
    w[5, :64] *= 20  # outliers
    return w


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "int8"])
# 480 columns are 15 blocks: an odd block out of the AVX-512 pairs, per row (groups of 32 or 160) or per group (96)
@pytest.mark.parametrize(("cols", "group"), [(384, 32), (384, 64), (384, 128), (384, None), (480, 32), (480, 96), (480, 160), (480, 480)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_compute_the_product_with_rounded_activations(kernels, fmt, cols, group, threads):
    w = weight(96, cols, 1)
    q = REGISTRY[fmt].quantize(w, group)
    dense = REGISTRY[fmt].dequantize(q, torch.float32).double()
    if fmt == "int8":
        args = (q.parts["weight"], q.parts["scale"].reshape(96, -1))
        run = kernels.int8_linear
    else:
        codes, zp = REGISTRY[fmt].codes(q)
        args = int4_kernel_args(codes, q.parts["scale"], zp)
        run = kernels.int4_linear
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 3, CODE_KERNEL_ROWS):
            x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n))
            x[0, 7] = 40.0  # an activation outlier
            exact = rounded_activations(x) @ dense.t()
            plain = x.double() @ dense.t()
            for path, name in enumerate(kernels.int4_paths()):  # each path this build has, scalar last
                got = run(x, *args, path).double()
                assert (got - exact).abs().max() <= 1e-5 * exact.abs().max(), (name, n)
                assert (got - plain).abs().max() <= TOLERANCE * plain.abs().max(), (name, n)
    finally:
        torch.set_num_threads(before)


def _nf4_table_dense(q, table: torch.Tensor) -> torch.Tensor:
    """The NF4 weight as the integer path multiplies it: each code's int16 table value / 16383 times absmax."""
    rows, cols = q.shape
    packed = q.parts["weight"].reshape(-1)
    idx = torch.stack([packed >> 4, packed & 15], -1).reshape(rows, cols).long()
    absmax = REGISTRY[q.format].absmax(q).float().reshape(rows, -1).repeat_interleave(q.group_size, dim=1)
    return table.double()[idx] / 16383 * absmax.double()


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_nf4_kernel_is_exact_on_its_code_table_and_rounded_activations(kernels, group, threads):
    """NF4's integer path (llama.cpp's iq4_nl x q8_0 scheme, with a 16-bit table): the code values as int16
    (``nf4_code_table``: 16383 · value), activations in int8 blocks of 32; the float path multiplies the
    codes as stored."""
    cols = 384
    w = weight(96, cols, 2)
    q = REGISTRY["nf4"].quantize(w, group)
    code = q.parts["quant_map"].float()
    absmax = REGISTRY["nf4"].absmax(q).float()
    table = kernels.nf4_code_table(code)
    assert table.tolist() == torch.round(code * 16383).to(torch.int16).tolist()
    dense = REGISTRY["nf4"].dequantize(q, torch.float32).double()
    as_table = _nf4_table_dense(q, table)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in (1, 3, CODE_KERNEL_ROWS):
            x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n))
            x[0, 7] = 40.0
            plain = x.double() @ dense.t()
            for path, name in enumerate(kernels.int4_paths()):
                got = kernels.nf4_linear(x, q.parts["weight"].reshape(-1), code, absmax, 96, group, path).double()
                want = rounded_activations(x) @ as_table.t() if name != "scalar" else plain
                assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (name, n)
                assert (got - plain).abs().max() <= TOLERANCE * plain.abs().max(), (name, n)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
@pytest.mark.parametrize("group", [None, 64, 48, 24])
def test_fp8_kernel_converts_the_bytes_exactly(kernels, variant, group):
    """fp8 in registers (AVX2/AVX-512: the bytes widened to fp16, then fp32) and through the table give the
    product with the dequantized weight, to fp32 summation order, for both variants (groups of 48 and 24 end
    in a 16- and an 8-byte remainder)."""
    cols = 384
    w = weight(96, cols, 3)
    q = REGISTRY["fp8"].quantize(w, group, fp8=variant)
    qw = QuantWeight(q, torch.float32)
    lut, scale = qw._kernel_args
    dense = REGISTRY["fp8"].dequantize(q, torch.float32).double()
    for n in (1, 5):
        x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n))
        plain = x.double() @ dense.t()
        for path, name in enumerate(kernels.int4_paths()):
            got = kernels.fp8_linear(x, q.parts["weight"].view(torch.uint8), lut, scale, path)
            assert (got.double() - plain).abs().max() <= 1e-5 * plain.abs().max(), (name, n)


def test_int4_dequant_is_the_registrys(kernels):
    for fmt in ("int4", "int4-asym"):
        q = REGISTRY[fmt].quantize(weight(64, 256, 2), 64)
        codes, zp = REGISTRY[fmt].codes(q)
        got = kernels.int4_dequant(*int4_kernel_args(codes, q.parts["scale"], zp))
        assert torch.equal(got, REGISTRY[fmt].dequantize(q, torch.float32))


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "int8"])
def test_quant_weight_runs_the_kernels_for_decode_and_dequantizes_for_prefill(kernels, fmt):
    w = weight(96, 384, 3)
    q = REGISTRY[fmt].quantize(w, 64)
    qw = QuantWeight(q, torch.float32)
    assert qw.kernel == ("int8-codes" if fmt == "int8" else "int4-codes")
    dense = REGISTRY[fmt].dequantize(q, torch.float32)
    for shape in [(1, 384), (2, 3, 384), (CODE_KERNEL_ROWS, 384)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
        want = F.linear(x, dense)
        got = qw.linear(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOLERANCE * want.abs().max()
    x = torch.randn(CODE_KERNEL_ROWS + 1, 384, generator=torch.Generator().manual_seed(5))  # prefill
    assert (qw.linear(x) - F.linear(x, dense)).abs().max() <= 1e-5 * F.linear(x, dense).abs().max()
    assert torch.equal(qw.dequantize(), dense)
    # the repacked codes replace the stored ones; zero-points take a byte each instead of half of one
    assert qw.quantized_nbytes <= q.nbytes + 96 * 384 // 64 // 2


def test_joined_weights_share_bytes_and_give_the_same_outputs(kernels):
    qs = [REGISTRY["int4-asym"].quantize(weight(r, 384, r), 32) for r in (96, 32, 32)]
    ws = [QuantWeight(q, torch.float32) for q in qs]
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(6))
    separate = torch.cat([w.linear(x) for w in ws], dim=-1)
    joined = QuantWeight.concat(ws)
    assert joined.shape == (160, 384) and joined.members == tuple(ws)
    assert torch.equal(joined.linear(x), separate)
    assert torch.equal(torch.cat([w.linear(x) for w in ws], dim=-1), separate)  # members are views now
    assert ws[1]._kernel_args[0].untyped_storage().data_ptr() == joined._kernel_args[0].untyped_storage().data_ptr()
    other = QuantWeight(REGISTRY["int4"].quantize(weight(32, 384, 9), 32), torch.float32)
    assert QuantWeight.concat([ws[0], other]) is None  # sym and asym do not join


def test_a_q8_0_exact_head_is_held_as_int8_and_a_dense_one_is_not(kernels):
    rows, cols = 256, 128
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-127, 128, (rows, cols // 32, 32), generator=g).float()
    codes[..., 0] = 127  # q8_0: the block's largest magnitude is code ±127
    d = (torch.rand(rows, cols // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    q8 = (codes * d).reshape(rows, cols).bfloat16()  # what a converted q8_0 GGUF's bf16 embeddings hold
    head = lossless_int8(q8, torch.float32)
    assert head is not None and head.kernel == "int8-codes"
    assert ((head.dequantize() - q8.float()).abs() <= q8.float().abs() * 2**-7).all()
    x = torch.randn(1, cols, generator=g)
    want = F.linear(x, q8.float())
    assert (head.linear(x) - want).abs().max() <= TOLERANCE * want.abs().max()
    dense = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    assert lossless_int8(dense, torch.float32) is None
    assert lossless_int8(q8[:, :100], torch.float32) is None  # rows not whole blocks


@pytest.mark.slow
def test_smollm2_int4_asym_decodes_the_same_tokens_with_the_kernels(kernels, tmp_path, monkeypatch):
    """SmolLM2 re-quantized to int4-asym g32 (the GGUF's own grid), 24 steps on the reference's greedy tokens:
    with the integer kernels (and the int8 head, steps fused: llmctl.runtime.fused) every step's logits are
    within the stated tolerance of the dequantized weights' (Python layers), and the same token is the
    likeliest except at a near-tie, where the reference's top two are closer than the two runs differ. (int8
    activations move each step by up to ~1 of SmolLM2's ~25-logit scale, and which activations round which
    way depends on the last bits of the prefill, which differ with the thread count: a greedy run of 24
    tokens can take another path at a near-tie.)"""
    import llmctl.quant.qlinear as ql
    from llmctl.quantize.convert import run_plan
    from llmctl.quantize.plan import make_plan
    from llmctl.runtime import fused
    from llmctl.runtime.loader import load_model

    out = tmp_path / "smol"
    run_plan(make_plan("smollm2-135m", "int4-asym", group_size=32), out, measure_error=False)
    model = load_model(out, device="cpu")
    assert model.head is not None and model.model.layers[0].self_attn.qkv is not None
    prompt = torch.tensor([[1, 504, 3458, 288, 3575, 30, 57, 8, 99, 100, 1200, 5]])

    def run(use_kernels: bool, forced: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
        head, rows = model.head, ql.CODE_KERNEL_ROWS
        monkeypatch.setenv(fused.ENV, "1" if use_kernels else "0")
        if not use_kernels:
            model.head, ql.CODE_KERNEL_ROWS = None, 0
        try:
            cache = model.make_cache(64)
            with torch.no_grad():
                logits = model(prompt, cache, last_only=True)[0, -1]
                tokens, steps = [], []
                for i in range(24):
                    tokens.append(int(logits.argmax()) if forced is None else forced[i])
                    steps.append(logits)
                    logits = model(torch.tensor([[tokens[-1]]]), cache)[0, -1]
            return tokens, steps
        finally:
            model.head, ql.CODE_KERNEL_ROWS = head, rows

    ref, ref_logits = run(False)
    _, fast_logits = run(True, forced=ref)
    assert isinstance(model._fused, fused.Plan)
    ties = 0
    for a, b in zip(fast_logits, ref_logits, strict=True):
        kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum")
        gap = (a - b).abs().max()
        assert kl <= MODEL_KL and gap <= MODEL_TOLERANCE * b.abs().max()
        if int(a.argmax()) != int(b.argmax()):
            top2 = b.topk(2).values
            assert top2[0] - top2[1] <= 2 * gap, "another token where the reference's choice is clear"
            ties += 1
    assert ties <= 3, f"{ties} of 24 steps chose another token"


def test_int8_code_minus_128_is_exact(kernels):
    """The scale search may store -128 (a negative scale sends the positive extreme there): the AVX2 path
    takes |w| as unsigned, where -128 reads as 128."""
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(-128, 128, (64, 256), generator=g, dtype=torch.int8)
    codes[:, ::7] = -128
    scale = (torch.rand(64, 8, generator=g) * 0.01 + 1e-3).half()
    x = torch.randn(2, 256, generator=g)
    dense = (codes.double().reshape(64, 8, 32) * scale.double().unsqueeze(-1)).reshape(64, 256)
    exact = rounded_activations(x) @ dense.t()
    for path, name in enumerate(kernels.int4_paths()):
        got = kernels.int8_linear(x, codes, scale, path).double()
        assert (got - exact).abs().max() <= 1e-5 * exact.abs().max(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [4, 1])
def test_dense_kernel_is_the_float_product_on_every_path(kernels, dtype, threads, rows):
    """``dense_linear`` (the fused step's dense fp32 and bf16 weights, four rows at a time with prefetch, or
    one row front to back: ``dense_rows_mode``, chosen by the CPU's vendor): each bf16 widened exactly, fp32
    sums, the activations not rounded — on every path, with rows that leave a remainder of the four and
    columns that end in a partial vector (203 rows, 200 columns; 520 columns for the one-row reader's
    four-vector steps). Where the build has AVX512-BF16, the avx512 path multiplies bf16 weights by the
    activations rounded to bf16 (vdpbf16ps): exactly that product, to fp32 summation order."""
    from llmctl.quant import native

    dp = dtype == torch.bfloat16 and "-mavx512bf16" in native._FLAGS
    g = torch.Generator().manual_seed(5)
    cols = 200 if rows == 4 else 520
    w = torch.randn(203, cols, generator=g).to(dtype)
    before = torch.get_num_threads()
    mode = kernels.dense_rows_mode(rows)
    torch.set_num_threads(threads)
    try:
        for n in (1, 3):
            x = torch.randn(n, cols, generator=g)
            want = x.double() @ w.double().t()
            for path, name in enumerate(kernels.int4_paths()):
                got = kernels.dense_linear(x, w, path).double()
                exact = x.bfloat16().double() @ w.double().t() if dp and name == "avx512" else want
                assert (got - exact).abs().max() <= 1e-5 * exact.abs().max(), (name, n)
    finally:
        torch.set_num_threads(before)
        kernels.dense_rows_mode(mode)


def test_dense_row_mode_follows_the_cpu_vendor(kernels):
    """AMD CPUs read dense rows one at a time, others four at a time (see dense.cpp); the setter only
    accepts 1 or 4."""
    vendor = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("vendor_id")), "")
    mode = kernels.dense_rows_mode(0)
    assert mode == (1 if vendor == "AuthenticAMD" else 4)
    assert kernels.dense_rows_mode(7) == mode and kernels.dense_rows_mode(0) == mode


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "int8"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_calibrated_scale_search_is_the_eager_search(kernels, fmt, group, threads, monkeypatch):
    """Per-column error weights spanning six decades (E[x²] of real inputs spans three to six), on bf16
    weights (their quotients by a scale often land within an fp32 rounding of a half): every scale,
    zero-point and code equal. Both rank candidates by float64 errors and refit in float64 (exact products,
    only the order of the sums differs), and the kernel rounds every fp32 operation on its own: with fp32
    errors ~1 group in 20,000 went the other way on these weights, with fused multiply-adds ~1 % of real
    Gemma-3 groups."""
    gen = torch.Generator().manual_seed(group)
    w = weight(1024, 1024, group).bfloat16()
    importance = torch.randn(1024, generator=gen).square() * torch.logspace(-3, 3, 1024)[torch.randperm(1024, generator=gen)]
    importance[9] = 0  # an input that never fired
    f = REGISTRY[fmt]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        monkeypatch.setattr(native, "get", lambda: kernels)
        fast = f.quantize(w, group, method="search", importance=importance)
        monkeypatch.setattr(native, "get", lambda: None)
        eager = f.quantize(w, group, method="search", importance=importance)
    finally:
        torch.set_num_threads(before)
    assert fast.parts.keys() == eager.parts.keys()
    for k in fast.parts:
        assert torch.equal(fast.parts[k], eager.parts[k]), (k, float((fast.parts[k] != eager.parts[k]).float().mean()))


def test_dense_row_mode_env_override(kernels, monkeypatch):
    """``LLMCTL_DENSE_ROWS=1|4`` sets the mode when the kernels load (for comparisons); anything else is
    refused in one line."""
    from llmctl.errors import UsageError
    from llmctl.quant import native

    mode = kernels.dense_rows_mode(0)
    try:
        for value in ("1", "4"):
            monkeypatch.setenv(native.DENSE_ROWS_ENV, value)
            native._configure(kernels)
            assert kernels.dense_rows_mode(0) == int(value)
        monkeypatch.setenv(native.DENSE_ROWS_ENV, "2")
        with pytest.raises(UsageError, match="LLMCTL_DENSE_ROWS must be 1 or 4"):
            native._configure(kernels)
    finally:
        kernels.dense_rows_mode(mode)


@pytest.mark.parametrize("threads", [1, 2])
def test_gram_kernel_sums_exact_bf16_products_on_and_above_the_diagonal(kernels, threads):
    """``gram_bf16`` (Σ xxᵀ of bf16 rows with vdpbf16ps, GPTQ's Hessian on CPUs without AMX): added to what
    the matrix holds, on and above the diagonal equal to float64's sums of the exact products to fp32
    accumulation, for an odd row count (the last pair padded) and columns that fill neither a block of 16
    nor a tile of 64."""
    if not kernels.gram_bf16_available():
        pytest.skip("this build has no AVX512-BF16")
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, cols in ((1, 5), (37, 70), (301, 200)):
            x = (torch.randn(n, cols, generator=g) * torch.rand(cols, generator=g) * 4).bfloat16()
            start = torch.randn(cols, cols, generator=g)
            gram = start.clone()
            kernels.gram_bf16(x, gram)
            want = start.double() + x.double().T @ x.double()
            upper = torch.ones(cols, cols, dtype=torch.bool).triu()
            err = ((gram.double() - want).abs() * upper).max() / want.abs().max()
            assert float(err) < 2e-6, (n, cols, float(err))
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.gram_bf16(torch.randn(4, 8), torch.zeros(8, 8))
