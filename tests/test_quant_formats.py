"""The weight-format registry's quantize/dequantize: exact bytes, error bounds, edge cases, and NF4
bit-identical to bitsandbytes (the reference implementation, run here on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.errors import QuantError
from llmctl.quant.formats import REGISTRY
from llmctl.quant.recipes import get_format
from llmctl.quant.registry import PER_TENSOR

QUANTIZABLE = [n for n, f in REGISTRY.items() if f.can_quantize]
SHAPES = [(64, 256), (96, 384), (48, 640), (3, 1, 128)]


def test_quantizable_formats_are_stated_explicitly():
    assert sorted(QUANTIZABLE) == sorted(["fp32", "fp16", "bf16", "fp8", "int8", "int4", "int4-asym", "nf4", "nf4-dq"])
    with pytest.raises(QuantError, match=r"cannot write weights in q4_k.*quantize --out NAME\.gguf"):
        get_format("q4_k").quantize(torch.zeros(4, 32))


def _weights(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_are_exact(name, shape):
    """What quantize stores is exactly what the registry's nbytes (used by estimate-memory) counts, and
    what part_specs (used to write file headers before any work) announces."""
    fmt = REGISTRY[name]
    q = fmt.quantize(_weights(shape))
    specs = fmt.part_specs(shape)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in q.parts.items()} == {
        k: (dt, tuple(s)) for k, (dt, s) in specs.items()
    }
    assert q.nbytes == fmt.nbytes(shape)
    assert fmt.bits_per_weight(shape) == 8 * q.nbytes / math.prod(shape)


@pytest.mark.parametrize(
    "name,group,bpw",
    [("int4", 128, 4.125), ("int4", 32, 4.5), ("int8", 128, 8.125), ("int4-asym", 128, 4.15625), ("fp8", None, 8 + 32 / 256)],
)
def test_bits_per_weight(name, group, bpw):
    assert REGISTRY[name].bits_per_weight((64, 256), group) == bpw


@pytest.mark.parametrize("name", ["int8", "int4", "int4-asym"])
@pytest.mark.parametrize("group", [32, 64, 128, 256, 96])
def test_int_error_is_at_most_half_a_step(name, group):
    """Every value is within half a quantization step (its group's stored scale / 2) of the original."""
    shape = (32, 768)
    w = _weights(shape, seed=group)
    fmt = REGISTRY[name]
    q = fmt.quantize(w, group)
    err = (q.dequantize() - w).abs().reshape(32, -1, group)
    step = q.parts["scale"].float().unsqueeze(-1)
    # symmetric: half a step; asymmetric: the zero-point's rounding can shift the grid by half a step more
    bound = step / 2 if name != "int4-asym" else step
    assert bool((err <= bound * (1 + 1e-5) + 1e-9).all())
    assert q.group_size == group


def test_asymmetric_beats_symmetric_on_shifted_weights():
    w = _weights((64, 256)) + 0.03  # all-positive-ish groups: asymmetric uses the whole range
    sym = (REGISTRY["int4"].quantize(w).dequantize() - w).norm()
    asym = (REGISTRY["int4-asym"].quantize(w).dequantize() - w).norm()
    assert asym < 0.7 * sym


@pytest.mark.parametrize("variant,rel", [("e4m3", 2**-4), ("e5m2", 2**-3)])
@pytest.mark.parametrize("group", [None, PER_TENSOR, 64])
def test_fp8_error_and_saturation(variant, rel, group):
    """Relative error within half an ulp of the variant (values above the subnormal range); outliers
    saturate to ±max instead of NaN/inf."""
    w = _weights((32, 256))
    w[3, 7] = 50.0  # an outlier sets the scale of its row / tensor / group
    q = REGISTRY["fp8"].quantize(w, group, fp8=variant)
    d = q.dequantize()
    assert bool(torch.isfinite(d).all())
    assert q.parts["weight"].dtype == (torch.float8_e4m3fn if variant == "e4m3" else torch.float8_e5m2)
    scale = q.parts["scale"].max()
    big = w.abs() > scale * 2**-6 * 16  # clear of fp8's subnormals in scaled units
    assert bool(((d - w).abs()[big] <= rel * w.abs()[big] * 1.001).all())
    assert d[3, 7] == pytest.approx(50.0, rel=rel)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_all_zero_group_stays_zero(name):
    w = _weights((16, 256))
    w[2, :128] = 0  # one full group (128) / two NF4 blocks / half a row
    w[5] = 0  # a whole row (per-channel scales)
    q = REGISTRY[name].quantize(w)
    d = q.dequantize()
    assert bool(torch.isfinite(d).all())
    assert bool((d[2, :128] == 0).all()) and bool((d[5] == 0).all())
    assert REGISTRY[name].quantize(torch.zeros(8, 128)).dequantize().abs().max() == 0


@pytest.mark.parametrize("name", ["int8", "int4", "int4-asym"])
def test_group_that_does_not_divide_the_row_is_refused(name):
    with pytest.raises(QuantError, match="group size 128 does not divide the row length 100; choose a divisor of 100"):
        REGISTRY[name].quantize(torch.zeros(4, 100), 128)
    with pytest.raises(QuantError, match="does not divide the row length 100"):
        REGISTRY[name].nbytes((4, 100), 128)
    # any divisor works, odd ones included
    q = REGISTRY[name].quantize(_weights((4, 100)), 25)
    assert q.nbytes == REGISTRY[name].nbytes((4, 100), 25)


def test_fp8_group_that_does_not_divide_the_row_is_refused():
    with pytest.raises(QuantError, match="group size 48 does not divide the row length 100"):
        REGISTRY["fp8"].quantize(torch.zeros(4, 100), 48)


def test_odd_shapes_round_trip():
    """Odd row lengths pack with a padding nibble per row; odd element counts pad NF4's last byte."""
    for name in ("int4", "int4-asym"):
        w = _weights((7, 99))
        q = REGISTRY[name].quantize(w, 33)
        assert q.nbytes == REGISTRY[name].nbytes((7, 99), 33)
        assert (q.dequantize() - w).abs().max() < 0.02
    for name in ("nf4", "nf4-dq"):
        w = _weights((7, 99))
        q = REGISTRY[name].quantize(w)
        assert q.nbytes == REGISTRY[name].nbytes((7, 99))
        assert q.dequantize().shape == (7, 99)


def _sqnr(w, d):
    return 10 * math.log10(float((w.float() ** 2).sum() / ((w.float() - d.float()) ** 2).sum()))


@pytest.fixture(scope="module")
def real_weights():
    """A few real linear weights of SmolLM2-135M (dequantized from its bundled GGUF)."""
    from conftest import smollm2_path

    from llmctl.gguf.reader import read_gguf
    from llmctl.runtime.gguf_loader import dequantize_tensor

    info = read_gguf(smollm2_path())
    return {n: dequantize_tensor(info, n) for n in ("blk.0.attn_q.weight", "blk.5.ffn_down.weight", "blk.20.ffn_up.weight")}


@pytest.mark.parametrize(
    "name,min_db", [("fp16", 60), ("bf16", 45), ("int8", 38), ("fp8", 28), ("int4", 15), ("int4-asym", 16), ("nf4", 16), ("nf4-dq", 16)]
)
def test_sqnr_on_real_weights(real_weights, name, min_db):
    for tensor, w in real_weights.items():
        d = REGISTRY[name].quantize(w, 64).dequantize()  # SmolLM2's rows of 576 take groups of 64
        assert _sqnr(w, d) >= min_db, tensor


# ---- NF4 against bitsandbytes ---------------------------------------------------------------------------
NF4_CASES = [((64, 256), 64, torch.float32), ((33, 77), 64, torch.float32), ((1000,), 64, torch.float32),
             ((96, 384), 128, torch.bfloat16), ((48, 64), 64, torch.float16), ((300, 1000), 256, torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("shape,block,dtype", NF4_CASES)
def test_nf4_bytes_and_scales_identical_to_bitsandbytes(shape, block, dtype):
    import bitsandbytes.functional as F

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4")
    q = REGISTRY["nf4"].quantize(w, block)
    assert torch.equal(q.parts["weight"], packed)  # (ceil(n/2), 1) uint8, high nibble first
    assert torch.equal(q.parts["absmax"], state.absmax)
    assert torch.equal(q.parts["quant_map"], state.code)
    theirs = F.dequantize_4bit(packed, state).float().reshape(-1)
    assert torch.equal(q.dequantize(dtype).float().reshape(-1), theirs)


@pytest.mark.parametrize("shape,block,dtype", NF4_CASES)
def test_nf4_double_quant_matches_bitsandbytes(shape, block, dtype):
    """4-bit codes, nested absmax, offset and both code tables are identical. The 8-bit absmax codes are
    the nearest code entries; bitsandbytes' CPU kernel (a fast approximate binary search) picks the
    next entry for a rare value near a midpoint, so those may differ by one step (a few blocks in a
    thousand), and ours is then the closer one."""
    import bitsandbytes.functional as F

    w = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=True)
    q = REGISTRY["nf4-dq"].quantize(w, block)
    assert torch.equal(q.parts["weight"], packed)
    assert torch.equal(q.parts["nested_absmax"], state.state2.absmax)
    assert torch.equal(q.parts["nested_quant_map"], state.state2.code)
    assert torch.equal(q.parts["quant_map"], state.code)
    assert float(q.parts["offset"]) == float(state.offset)
    diff = (q.parts["absmax"].int() - state.absmax.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, 0.02 * diff.numel())
    code = state.state2.code
    fp32_absmax = REGISTRY["nf4"].quantize(w, block).parts["absmax"]
    target = (fp32_absmax - q.parts["offset"]) / q.parts["nested_absmax"].repeat_interleave(256)[: diff.numel()]
    ours, theirs_ = (code[q.parts["absmax"].long()] - target).abs(), (code[state.absmax.long()] - target).abs()
    assert bool((ours <= theirs_).all())
    # where the codes agree, the dequantized weights agree exactly
    same = (diff == 0).repeat_interleave(block)[: w.numel()]
    theirs = F.dequantize_4bit(packed, state).reshape(-1)
    assert torch.equal(q.dequantize(dtype).reshape(-1)[same], theirs[same])


def test_nf4_block_sizes_bitsandbytes_cannot_read_are_refused():
    with pytest.raises(QuantError, match="NF4 block size 100 is not one bitsandbytes reads"):
        REGISTRY["nf4"].quantize(torch.zeros(4, 100), 100)


@pytest.mark.parametrize("name", ["fp8", "int8", "int4", "int4-asym", "nf4", "nf4-dq"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_weights_are_refused(name, bad):
    w = torch.zeros(4, 128)
    w[1, 1] = bad
    with pytest.raises(QuantError, match="the tensor holds NaN or infinite values"):
        REGISTRY[name].quantize(w)
    if name == "fp8":
        with pytest.raises(QuantError, match="the tensor holds NaN or infinite values"):
            REGISTRY[name].quantize(w, PER_TENSOR)


# ---- the optional native kernels compute the same bytes ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "int4", "int4-asym", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_kernels_are_byte_identical_to_eager(name, dtype, monkeypatch):
    """llmctl.quant.native (compiled once, ~1 min) is an accelerator: every part byte-identical to the
    eager torch code, zero groups, odd shapes and NaN refusal included."""
    from llmctl.quant import native

    kernels = native.build()
    nf4 = name.startswith("nf4")
    # int: groups of 64 (4-bit codes packed inside the kernel's group loop), of 3 (odd: packed after) and
    # rows of odd length
    cases = [(s, None) for s in [(96, 384), (7, 192), (33, 77)]] if nf4 else [
        ((96, 384), 64), ((7, 192), 64), ((7, 192), 3), ((5, 27), 3), ((3, 27), 27)]  # fmt: skip
    for shape, group in cases:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype) * 0.05
        w[0, : min(64, shape[1])] = 0
        w[1] = -w[1].abs()  # all-negative groups (asymmetric: the range still includes 0)
        w[2, ::2] = -0.0
        monkeypatch.setattr(native, "get", lambda: None)
        eager = REGISTRY[name].quantize(w, group)
        monkeypatch.setattr(native, "get", lambda: kernels)
        fast = REGISTRY[name].quantize(w, group)
        assert eager.parts.keys() == fast.parts.keys()
        for k in eager.parts:
            assert eager.parts[k].dtype == fast.parts[k].dtype and torch.equal(eager.parts[k], fast.parts[k]), (shape, group, k)
    w[1, 3] = float("nan")
    with pytest.raises(QuantError, match="NaN or infinite"):
        REGISTRY[name].quantize(w, group)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["get", "build"])
def test_a_killed_build_never_blocks_later_loads(entry):
    """A build killed mid-compile leaves torch's lock file (``FileBaton``) behind, and torch's
    ``load_inline`` waits on it forever: a whole CI run once hung there. Loading the cached build and
    rebuilding both go through an flock instead, which dies with its holder."""
    import subprocess
    import sys

    from llmctl.quant import native

    native.build()
    (native._build_dir() / "lock").write_text("")  # what a SIGKILLed build leaves
    code = f"from llmctl.quant import native; assert native.{entry}() is not None; print('loaded')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "loaded", p.stderr
    assert not (native._build_dir() / "lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,group,opts",
    [("fp8", None, {}), ("fp8", 0, {}), ("fp8", 64, {}), ("fp8", 3, {}), ("fp8", None, {"fp8": "e5m2"}),
     ("nf4", None, {}), ("nf4-dq", None, {}), ("nf4", 128, {})],
)  # fmt: skip
def test_decode_kernels_on_codes_equal_the_dequantized_product(name, group, opts):
    """fp8 / NF4 decode steps multiply the stored codes (llmctl.quant.native.fp8_linear / nf4_linear) and
    give the product of the dequantized weight, to fp32 rounding (NF4 on AVX2: within int8 activations'
    tolerance); prefill-sized inputs dequantize."""
    import torch.nn.functional as F

    from llmctl.quant import native
    from llmctl.quant.qlinear import CODE_KERNEL_ROWS, QuantWeight

    native.build()
    w = torch.randn(96, 384, generator=torch.Generator().manual_seed(3)) * 0.05
    w[5] = 0  # an all-zero row
    q = REGISTRY[name].quantize(w, group, **opts)
    qw = QuantWeight(q, torch.float32)
    assert qw.kernel == ("fp8-codes" if name == "fp8" else "nf4-codes")
    dense = REGISTRY[name].dequantize(q, torch.float32)
    for shape in [(1, 384), (2, 3, 384), (CODE_KERNEL_ROWS, 384), (CODE_KERNEL_ROWS + 1, 384)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
        got, want = qw.linear(x), F.linear(x, dense)
        assert got.shape == want.shape
        # NF4 decode steps take the integer path (int8 activations and code values: test_int_kernels)
        integer = name.startswith("nf4") and x.numel() <= CODE_KERNEL_ROWS * 384 and native.get().int4_paths()[0] != "scalar"
        assert (got - want).abs().max() <= (2e-2 if integer else 1e-5) * want.abs().max(), shape
    # the stored parts plus the small tables (fp8: 256 values; nf4-dq: its absmax undone, 0.5 bit/weight)
    assert qw.quantized_nbytes <= q.nbytes + 1024 + 4 * (dense.numel() // 64)


@pytest.mark.parametrize("name", ["int4", "int4-asym", "int8"])
@pytest.mark.parametrize("native_kernels", [False, True])
def test_scale_search_never_loses_by_its_measure(name, native_kernels, monkeypatch):
    """--method search: per group, the weighted squared error (llama.cpp's rms + |x| weights) is never above
    round-to-nearest's; on weights with outliers it lowers int4's plain error too. The native kernel and the
    eager code pick the same scales for nearly every group (float sums in another order may break a near tie)."""
    from llmctl.quant import native

    if native_kernels:
        kernels = native.build()
        monkeypatch.setattr(native, "get", lambda: kernels)
    else:
        monkeypatch.setattr(native, "get", lambda: None)
    g = 64
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)) * 0.05
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(8)) < 0.01] *= 6  # outliers
    w[0, :g] = 0  # an all-zero group
    fmt = REGISTRY[name]
    rtn, search = fmt.quantize(w, g), fmt.quantize(w, g, method="search")
    assert torch.equal(rtn.parts["weight"], fmt.quantize(w, g, method="rtn").parts["weight"])
    x = w.reshape(64, -1, g).double()
    weight = x.square().mean(-1, keepdim=True).sqrt() + x.abs()

    def err(q):
        return ((fmt.dequantize(q).reshape(x.shape).double() - x).square() * weight).sum(-1)

    assert bool((err(search) <= err(rtn) * (1 + 1e-5) + 1e-12).all())
    plain = {m: (fmt.dequantize(q) - w).square().sum().item() for m, q in (("rtn", rtn), ("search", search))}
    if name == "int4":
        assert plain["search"] < 0.95 * plain["rtn"], plain
    monkeypatch.setattr(native, "get", lambda: None)
    eager = fmt.quantize(w, g, method="search")
    assert (eager.parts["scale"] == search.parts["scale"]).float().mean() >= 0.99


@pytest.mark.parametrize("native_kernels", [False, True])
def test_scale_search_sends_the_largest_value_to_the_long_end(native_kernels, monkeypatch):
    """int4's codes run -8..7: round to nearest (compressed-tensors' min-max rule) clips a group's largest
    positive value to 7, while the search may flip the scale's sign, as llama.cpp's q4_0 does, so that value
    lands on -8 exactly; a group led by a negative value keeps a positive scale."""
    from llmctl.quant import native

    monkeypatch.setattr(native, "get", (lambda: native.build()) if native_kernels else (lambda: None))
    ramp = torch.linspace(-0.7, 0.7, 31)
    w = torch.stack([torch.cat([ramp, torch.tensor([1.0])]), -torch.cat([ramp, torch.tensor([1.0])])])
    rtn, search = (REGISTRY["int4"].quantize(w, 32, method=m) for m in ("rtn", "search"))
    assert (rtn.parts["scale"] > 0).all()
    scale = search.parts["scale"].float().flatten()
    assert scale[0] < 0 < scale[1]
    codes, _ = REGISTRY["int4"].codes(search)
    assert codes[0, -1] == -8 and codes[1, -1] == -8
    back, clipped = REGISTRY["int4"].dequantize(search), REGISTRY["int4"].dequantize(rtn)
    assert (back[:, -1] - w[:, -1]).abs().max() < 0.5 * (clipped[:, -1] - w[:, -1]).abs().min()
    assert (back - w).square().sum() < (clipped - w).square().sum()


@pytest.mark.parametrize("name, g", [("nf4", 64), ("nf4-dq", 64), ("fp8", None), ("fp8", 128)])
def test_nf4_and_fp8_search_never_loses_by_its_measure(name, g):
    """--method search for nf4 (the absmax per block) and fp8 (the scale per channel or group), eager torch:
    per group the weighted squared error (rms + |x| weights) is never above round to nearest's, and plain
    round to nearest stays the default (bitsandbytes' bytes for nf4)."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(7)) * 0.05
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(8)) < 0.01] *= 6  # outliers
    w[0, :64] = 0  # an all-zero group
    fmt = REGISTRY[name]
    rtn, search = fmt.quantize(w, g), fmt.quantize(w, g, method="search")
    assert all(torch.equal(rtn.parts[k], fmt.quantize(w, g, method="rtn").parts[k]) for k in rtn.parts)
    size = 64 if name.startswith("nf4") else g or 512
    x = w.reshape(-1, size).double()
    weight = x.square().mean(-1, keepdim=True).sqrt() + x.abs()

    def err(q):
        return ((fmt.dequantize(q).reshape(x.shape).double() - x).square() * weight).sum(-1)

    if name != "nf4-dq":  # nf4-dq stores the absmax (searched or not) in 8 bits afterwards: in total only
        assert bool((err(search) <= err(rtn) * (1 + 1e-5) + 1e-12).all())
    assert err(search).sum() < (0.99 if name.startswith("nf4") else 1.0) * err(rtn).sum()  # fp8: < 1% to gain


def test_unknown_method_is_refused():
    with pytest.raises(QuantError, match="unknown --method 'best'; choose rtn"):
        REGISTRY["int4"].quantize(torch.zeros(4, 64), 32, method="best")


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_registry_facts_name_each_format_once(name):
    """What readers and kernels ask instead of a format name (family, bits, zero-point, double
    quantization) picks out exactly this quantized format, and the facts other modules read are consistent."""
    from llmctl.quant.formats import find_format

    f = REGISTRY[name]
    assert f.is_float == (f.torch_dtype is not None)  # llmctl's own floats: stored as a torch dtype
    if not f.is_float:
        facts = {"family": f.family, "bits": f.bits, "zero_bits": f.zero_bits, "double_quant": f.double_quant}
        assert find_format(**facts) == name
    assert (f.default_method is not None) == f.searchable
    assert f.more_bits is None or REGISTRY[f.more_bits].can_quantize
