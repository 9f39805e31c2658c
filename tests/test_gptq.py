"""`llmctl quantize --method gptq --calibration TEXT`: GPTQ's error compensation on a tiny random Llama with
a character-level tokenizer, calibrated on a text file.

* Per layer, on the calibration inputs themselves: ‖XWᵀ − XŴᵀ‖² = tr(D H Dᵀ) (D = Ŵ − W, H = XᵀX as
  llmctl.quantize.calibrate collects it) is below round to nearest's, the scale search's and the calibrated
  search's, for int4 sym/asym in groups and int8 per channel, with and without activation order.
* The Hessian is XᵀX of the inputs transformers' own linears see.
* The written folder: the same bytes twice (no randomness), loaded by transformers and llmctl's runtime
  with the same logits (tests/test_interop.py's check), its config naming the method.
* The native column sweep and calibrated scale search (llmctl.quant.native) give the eager code's bits.
* Bad combinations: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import build_hf_model, char_tokenizer, one_error_line

from llmctl.quant.recipes import get_format
from llmctl.quantize import gptq
from llmctl.quantize.calibrate import collect
from llmctl.quantize.convert import run_plan
from llmctl.quantize.plan import make_plan

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
) * 4
LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
          "model.layers.1.self_attn.o_proj.weight"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, object]:
    """(the tiny Llama's folder with its tokenizer, the calibration text file, the transformers model)."""
    root = tmp_path_factory.mktemp("gptq")
    model = build_hf_model("llama", seed=3)
    model.save_pretrained(root / "model", safe_serialization=True)
    char_tokenizer(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root / "model", root / "text.txt", model


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=300)


def layer_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """‖XWᵀ − XŴᵀ‖² over the calibration rows, from H = XᵀX."""
    d = (q - w).double()
    return float(((d @ h.double()) * d).sum())


@pytest.fixture(scope="module")
def statistics(tiny):
    folder, text, _ = tiny
    return collect(folder, str(text), tokens=640, context=64, hessians=LAYERS)


def test_hessian_is_the_gram_matrix_of_transformers_inputs(tiny, statistics):
    from llmctl.quantize.calibrate import calibration_windows
    from llmctl.runtime.tokenizer import load_tokenizer

    folder, _, model = tiny
    tok = load_tokenizer(folder)
    windows = calibration_windows(tok.encode(TEXT), tok.bos_id, 640, 64)
    assert (statistics.tokens, statistics.windows) == (640, len(windows)) and len(windows) == 10
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for name in LAYERS:
        mod = model.get_submodule(name.removesuffix(".weight"))

        def hook(_m, inp, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in hooks:
        h.remove()
    for name in LAYERS:
        ref, got = grams[name], statistics.hessians[name].double()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max())), name
    assert statistics.hessians[LAYERS[0]] is statistics.hessians["model.layers.0.self_attn.q_proj.weight"]
    assert set(statistics.hessians) == set(LAYERS)  # only what was asked for


@pytest.mark.parametrize("fmt, g", [("int4", 32), ("int4-asym", 32), ("int4", None), ("int8", None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_layer_output_error_on_the_calibration_inputs(statistics, tiny, fmt, g, act_order):
    from safetensors.torch import load_file

    folder, _, _ = tiny
    weights = load_file(str(folder / "model.safetensors"))
    f = get_format(fmt)
    for name in LAYERS:
        w, h = weights[name].float(), statistics.hessians[name]
        gs = g or w.shape[1]  # None: one group per row
        errors = {
            "rtn": layer_error(w, f.dequantize(f.quantize(w, gs, method="rtn")), h),
            "search": layer_error(w, f.dequantize(f.quantize(w, gs, method="search")), h),
            "calibrated": layer_error(w, f.dequantize(f.quantize(w, gs, importance=statistics.importance[name])), h),
        }
        q = gptq.quantize(f, w, gs, gptq.prepare(h, act_order=act_order))
        assert q.format == fmt and q.parts.keys() == f.quantize(w, gs).parts.keys()
        errors["gptq"] = layer_error(w, q.dequantize(), h)
        assert errors["gptq"] < 0.8 * min(errors["rtn"], errors["search"], errors["calibrated"]), (name, errors)
        again = gptq.quantize(f, w, gs, gptq.prepare(h, act_order=act_order))
        assert all(torch.equal(again.parts[k], q.parts[k]) for k in q.parts)


def _hessian(cols: int, seed: int) -> torch.Tensor:
    """XᵀX of inputs whose channels span three decades of energy, one of them dead."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=gen) * torch.logspace(-1.5, 1.5, cols)[torch.randperm(cols, generator=gen)]
    x[:, 7] = 0
    return x.T @ x


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3, :48] *= 20  # outliers
    w[4] = 0  # an all-zero row
    return w


def _both(monkeypatch, run, sweep_only: bool = False) -> tuple:
    """``run()`` with the native kernels, then in eager torch (LLMCTL_NATIVE=0); ``sweep_only``: the scale
    search native in both, so only the column sweeps differ."""
    from llmctl.quant import native

    kernels = native.build()
    if sweep_only:
        search = gptq._group_params

        def native_search(*args):
            with monkeypatch.context() as m:
                m.setattr(native, "get", lambda: kernels)
                return search(*args)

        monkeypatch.setattr(gptq, "_group_params", native_search)
    monkeypatch.setattr(native, "get", lambda: kernels)
    fast = run()
    monkeypatch.setattr(native, "get", lambda: None)
    return fast, run()


def _same(a, b) -> None:
    assert a.parts.keys() == b.parts.keys()
    for k in a.parts:
        assert torch.equal(a.parts[k], b.parts[k]), (k, float((a.parts[k] != b.parts[k]).float().mean()))


@pytest.mark.parametrize("bits, g", [(4, 32), (4, 64), (4, 128), (8, 64), (4, 256)])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_sweep_leaves_the_eager_sweeps_weights_to_the_bit(bits, g, dynamic, threads):
    """The sweeps alone, with the same scales: equal codes, and every weight as it was quantized equal to the
    bit (a fused multiply-add in the rank-1 update would show here, where the codes may hide it)."""
    from llmctl.quant import native

    kernels = native.build()
    rows, cols = 83, 512  # a last tile of 3 rows (the kernel takes 8 at a time)
    qmax = (1 << (bits - 1)) - 1
    u = gptq.prepare(_hessian(cols, 2)).u.contiguous()
    gen = torch.Generator().manual_seed(4)
    order = torch.arange(cols) if dynamic else torch.randperm(cols, generator=gen)
    w0 = _weight(rows, cols, 1)[:, order]

    def run(sweep) -> tuple[torch.Tensor, torch.Tensor]:
        w = w0.clone()
        s_all, z_all = torch.empty(cols // g, rows), torch.empty(cols // g, rows)

        def params(k: int, values: torch.Tensor) -> None:  # a sign per group, zero-points -1, 0, 1
            s_all[k] = values.abs().amax(1).clamp_min(1e-6) / qmax * (-1) ** k
            z_all[k] = k % 3 - 1

        if not dynamic:
            for k in range(cols // g):
                params(k, w0[:, order.argsort()][:, k * g : (k + 1) * g])
        return sweep(w, u, g, gptq._block(g), order // g, dynamic, params, s_all, z_all, bits), w

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (fast, w_fast), (eager, w_eager) = run(partial(gptq._native_sweep, kernels)), run(gptq._sweep)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(fast, eager) and torch.equal(w_fast, w_eager), float((w_fast != w_eager).float().mean())
    assert int((fast == -(qmax + 1)).sum()) > 0 and int((fast == qmax).sum()) > 0  # both ends reached


@pytest.mark.parametrize("fmt, g", [("int4", 32), ("int4", 64), ("int4", 128), ("int4-asym", 32), ("int4-asym", 128),
                                    ("int8", 64), ("int8", None), ("int4", 256)])  # fmt: skip
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_gptq_is_the_eager_gptq(fmt, g, act_order, threads, monkeypatch):
    """The native column sweep (llmctl.quant.kernels.gptq) and scale search with calibration weights compute
    the eager code's bits: every code, scale and zero-point equal; with the same search (the sweeps alone)
    too. Groups inside a block (32, 64), a block's own (128), spanning two blocks (256), one per row (int8);
    1 or 2 threads."""
    rows, cols = 83, 512  # a last tile of 3 rows (the kernel takes 8 at a time)
    w, prep, f = _weight(rows, cols, 1), gptq.prepare(_hessian(cols, 2), act_order=act_order), get_format(fmt)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _same(*_both(monkeypatch, lambda: gptq.quantize(f, w, g or cols, prep)))
        monkeypatch.undo()
        _same(*_both(monkeypatch, lambda: gptq.quantize(f, w, g or cols, prep), sweep_only=True))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "int8"])
def test_native_gptq_is_the_eager_gptq_on_the_calibration_hessians(statistics, tiny, fmt, monkeypatch):
    from safetensors.torch import load_file

    folder, _, _ = tiny
    weights = load_file(str(folder / "model.safetensors"))
    for name in LAYERS:
        w, h = weights[name].float(), statistics.hessians[name]
        for act_order in (False, True):
            prep = gptq.prepare(h, act_order=act_order)
            _same(*_both(monkeypatch, lambda: gptq.quantize(get_format(fmt), w, 32, prep)))  # noqa: B023


def test_a_dead_input_and_a_singular_hessian_still_factor():
    torch.manual_seed(0)
    x = torch.randn(16, 64)  # 16 rows, 64 columns: XᵀX has rank 16
    x[:, 5] = 0  # an input that never fires
    w = torch.randn(8, 64)
    prep = gptq.prepare(x.T @ x, damp=0.01)
    q = gptq.quantize(get_format("int4"), w, 32, prep)
    out = q.dequantize()
    assert torch.isfinite(out).all() and bool((out[:, 5] == 0).all())
    with pytest.raises(Exception, match="--gptq-damp must be in"):
        gptq.check_damp(0.0)


@pytest.mark.parametrize("n", [200, 512, 1100])
def test_blocked_cholesky_and_triangular_inverse_match_float64(n):
    """The factorisation by blocks (``_cholesky_``, its upper triangle never read) and the inverse by halves
    (``_lower_inverse``) against float64 LAPACK, for sizes below, at and not a multiple of the block; a
    matrix that is not positive definite is reported, not factored."""
    torch.manual_seed(n)
    x = torch.randn(2 * n, n) * torch.rand(n) * 3
    h = x.T @ x
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    ref = torch.linalg.cholesky(h.double())
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    a = h.masked_fill(above, float("nan"))  # only the lower triangle may be read
    assert gptq._cholesky_(a)
    got = a.tril()
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    inv_ref = torch.linalg.inv(ref)
    inv = gptq._lower_inverse(a.masked_fill(above, float("nan")))
    assert torch.equal(inv, inv.tril())
    assert float((inv.double() - inv_ref).abs().max() / inv_ref.abs().max()) < 1e-4
    h[n // 2, n // 2] = -1.0  # not positive definite
    assert not gptq._cholesky_(h.clone())


@pytest.mark.parametrize("act_order", [False, True])
def test_prepare_is_the_upper_cholesky_factor_of_the_damped_inverse(act_order):
    """U with UᵀU = (H + λI)⁻¹ in processing order (a dead input's diagonal 1), as the paper's reference
    code computes it (Cholesky, cholesky_inverse, upper Cholesky), here in float64."""
    torch.manual_seed(1)
    x = torch.randn(600, 300) * torch.rand(300) * 2
    x[:, 7] = 0
    h = x.T @ x
    prep = gptq.prepare(h, damp=0.01, act_order=act_order)
    ref = h.double().clone()
    ref[7, 7] = 1.0
    if act_order:
        perm = torch.argsort(torch.diagonal(ref), descending=True, stable=True)
        assert torch.equal(prep.perm, perm)
        ref = ref[perm][:, perm]
    ref.diagonal().add_(0.01 * float(ref.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
    assert torch.equal(prep.u, prep.u.triu())
    assert float((prep.u.double() - u).abs().max() / u.abs().max()) < 1e-4
    assert prep.dead.tolist() == [i == 7 for i in range(300)]
    assert torch.equal(prep.diag, torch.diagonal(h).clamp_min(0))


def test_folder_is_deterministic_and_loads_in_transformers_and_llmctl(tiny, tmp_path):
    """Twice the same bytes. The calibration text goes through the model once, one decoder layer at a time
    as the layers are written, so at most one layer's Hessians are held: memory bounded whatever the depth."""
    from test_interop import _check

    from llmctl.config import ModelConfig

    folder, text, _ = tiny
    outs, events, peaks = [], [], []
    for i in range(2):
        plan = make_plan(str(folder), "int4", group_size=32, method="gptq", calibration=str(text),
                         calibration_tokens=640, act_order=True)  # fmt: skip
        layers = [int(t.name.split(".")[2]) for t in plan.tensors if t.opts.get("method") == "gptq"]
        assert layers == sorted(layers) and len(layers) == 14  # written layer by layer
        outs.append(run_plan(plan, tmp_path / f"o{i}", progress=events.append if i == 0 else None).out)
        assert plan.stream.next == 2 and not plan.calibration.hessians  # each dropped once written
        peaks.append(plan.stream.peak_hessian_bytes)
    c = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    one_layer = 4 * (2 * c.hidden_size**2 + (c.num_attention_heads * c.head_dim) ** 2 + c.intermediate_size**2)
    assert 0 < peaks[0] <= one_layer, (peaks, one_layer)  # q/k/v share one input, gate/up another
    calibrating = [e for e in events if e.phase.startswith("calibrating on ")]
    assert calibrating and all(e.unit == "layers" or e.total is None for e in calibrating)
    layers = [(e.done, e.total) for e in events if e.phase == "quantizing (gptq)"]
    assert all(e.unit == "layers" for e in events if e.phase == "quantizing (gptq)")
    assert layers[0] == (0, 2) and layers[-1] == (2, 2) and layers == sorted(layers), layers
    assert events[-1].work_done == events[-1].work_total  # the bar's ETA follows the values done
    a, b = ((o / "model.safetensors").read_bytes() for o in outs)
    assert a == b
    cfg = json.loads((outs[0] / "config.json").read_text())
    assert cfg["llmctl"]["method"] == "gptq" and cfg["llmctl"]["gptq"] == {"damp": 0.01, "act_order": True}
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    g = torch.Generator().manual_seed(1)
    _check(outs[0], torch.randint(1, 96, (2, 24), generator=g), "int4", 2e-3)


def test_cli_writes_asymmetric_int4(tiny, tmp_path):
    folder, text, _ = tiny
    out = tmp_path / "asym"
    p = run("quantize", str(folder), "-f", "int4", "--asymmetric", "-g", "32", "--method", "gptq",
            "--calibration", str(text), "--calibration-tokens", "256", "--gptq-damp", "0.05", "-o", str(out), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["method"] == "gptq" and d["format"] == "int4-asym" and d["layout"] == "compressed-tensors"
    assert json.loads((out / "config.json").read_text())["llmctl"]["gptq"] == {"damp": 0.05, "act_order": False}


@pytest.mark.parametrize(
    "args, message",
    [
        (["-f", "int4", "--method", "gptq"], "--method gptq needs calibration inputs: add --calibration TEXT"),
        (["-f", "nf4", "--method", "gptq", "--calibration", "T"], "--method gptq quantizes to int8, int4, int4-asym; nf4"),
        (["-f", "fp8", "--method", "gptq", "--calibration", "T"], "--method gptq quantizes to int8, int4, int4-asym; fp8"),
        (["-f", "bf16", "--method", "gptq", "--calibration", "T"], "--method gptq quantizes to int8, int4, int4-asym; bf16"),
        (["-f", "q4_k_m", "--method", "gptq", "--calibration", "T", "-o", "X.gguf"], "--method does not apply to GGUF output"),
        (["-f", "int4", "--gptq-damp", "0.1"], "--gptq-damp apply to --method gptq only"),
        (["-f", "int4", "--act-order", "--calibration", "T"], "--act-order/--no-act-order apply to --method gptq only"),
        (["-f", "int4", "--method", "gptq", "--calibration", "T", "--gptq-damp", "-1"], "--gptq-damp must be in (0, 1]"),
    ],
)
def test_bad_combinations_are_refused_in_one_line(tiny, tmp_path, args, message):
    folder, text, _ = tiny
    args = [str(text) if a == "T" else str(tmp_path / a) if a == "X.gguf" else a for a in args]
    p = run("quantize", str(folder), *args)
    one_error_line(p, message)
    assert not any(tmp_path.iterdir())
