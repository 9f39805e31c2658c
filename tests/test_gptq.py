"""`llmctl quantize --method gptq --calibration TEXT`: GPTQ's error compensation on a tiny random Llama with
a character-level tokenizer, calibrated on a text file.

* Per layer, on the calibration inputs themselves: ‖XWᵀ − XŴᵀ‖² = tr(D H Dᵀ) (D = Ŵ − W, H = XᵀX as
  llmctl.quantize.calibrate collects it) is below round to nearest's, the scale search's and the calibrated
  search's, for int4 sym/asym in groups and int8 per channel, with and without activation order.
* The Hessian is XᵀX of the inputs transformers' own linears see.
* The written folder: the same bytes twice (no randomness), loaded by transformers and llmctl's runtime
  with the same logits (tests/test_interop.py's check), its config naming the method.
* Bad combinations: one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
