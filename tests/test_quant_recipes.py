"""``--recipe``: which tensors a named recipe moves one format up, checked against llama.cpp's Q4_K_M on the
bundled models; the recipe's bytes as the dry-run, the written files and estimate-memory count them; the
mixed files read by compressed-tensors and transformers; the layouts that cannot hold a mix refuse it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmctl.errors import QuantError, UsageError
from llmctl.quant.recipes import MORE_BITS, assign_formats
from llmctl.quantize.convert import run_plan
from llmctl.quantize.plan import make_plan

TOKENS = torch.tensor([[1, 5, 9, 20, 33, 40, 2, 7, 63, 11, 90, 4, 77, 18]])
ATTENTION = ("q_proj", "k_proj", "v_proj")

# llama.cpp's use_more_bits(i, n), written out by hand for the bundled models: the first eighth of the
# layers (i < n // 8), the last eighth (i >= 7n // 8) and every third layer between ((i - n // 8) % 3 == 2).
# SmolLM2-135M, 30 layers: n // 8 = 3, 7n // 8 = 26. Gemma-3-270M, 18 layers: n // 8 = 2, 7n // 8 = 15.
MORE_BITS_LAYERS = {
    30: {0, 1, 2} | {5, 8, 11, 14, 17, 20, 23} | {26, 27, 28, 29},
    18: {0, 1} | {4, 7, 10, 13} | {15, 16, 17},
}


def _bundled(name: str) -> Path:
    from conftest import gemma3_path, smollm2_path

    return {"smollm2": smollm2_path, "gemma3": gemma3_path}[name]()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny bf16 Llama, untied (so the recipe's lm_head rule applies), 3 layers, rows of 128."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    T.LlamaForCausalLM(cfg).eval().to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("model,layers", [("smollm2", 30), ("gemma3", 18)])
def test_k_m_gives_more_bits_where_llama_cpp_q4_k_m_does(model, layers):
    """k-m moves attention q/k/v and down_proj to int8 in exactly the layers use_more_bits picks, which
    are the layers where llama.cpp's Q4_K_M gives attn_v and ffn_down q6_k (q8_0 where a row is not a
    multiple of q6_k's 256-value block, as Gemma's attn_v); everything else keeps the uniform plan."""
    from llmctl.sources import resolve
    from llmctl.tensors import tensor_layer

    gguf = _bundled(model)
    plan = make_plan(str(gguf), "int4", group_size=64, recipe="k-m")
    uniform = {t.name: t.format for t in make_plan(str(gguf), "int4", group_size=64).tensors}
    expected = MORE_BITS_LAYERS[layers]
    assert len(expected) in (9, 14)
    seen = {"attention": set(), "down": set()}
    for t in plan.tensors:
        leaf = t.name.split(".")[-2]
        i = tensor_layer(t.name)
        if leaf in (*ATTENTION, "down_proj") and i in expected:
            assert t.format == "int8" and t.reason.startswith("recipe k-m: "), (t.name, t.reason)
            seen["down" if leaf == "down_proj" else "attention"].add(i)
        else:
            assert t.format == uniform[t.name], t.name  # o_proj, gate/up, other layers, embeddings, norms
    assert seen == {"attention": expected, "down": expected}
    fmts = {t.name: t.format for t in plan.tensors}
    assert fmts["model.embed_tokens.weight"] == "bf16" and "lm_head.weight" not in fmts  # tied: stays 16-bit

    # llama.cpp's own Q4_K_M on the same tensors (recipes.py follows llama_tensor_get_type)
    source = resolve(str(gguf))
    q4km = assign_formats(source.tensors(), "q4_k_m", config=source.config)
    for kind in ("attn_v", "ffn_down"):
        types = {tensor_layer(t.name): f for t, f in q4km if t.name.endswith(f".{kind}.weight")}
        assert len(types) == layers
        assert {i for i, f in types.items() if f in ("q6_k", "q8_0")} == expected, kind
        assert {f for i, f in types.items() if i not in expected} <= {"q4_k", "q5_0"}, kind


def test_recipe_bytes_plan_files_and_estimate_agree(llama, tmp_path):
    """The dry-run's per-tensor bytes are what estimate-memory counts for the same recipe and what the
    run writes; the files' size is the plan's; the untied lm_head is int8; the config records the recipe."""
    from llmctl.memory.report import memory_report_for

    for recipe in ("uniform", "k-m", "k-l"):
        plan = make_plan(str(llama), "int4", group_size=64, recipe=recipe)
        planned = sum(t.nbytes for t in plan.tensors)
        report = memory_report_for(str(llama), weights_formats=["int4"], group_size=64, recipe=recipe)
        (est,) = report.estimates
        assert est.weights_bytes == planned and est.recipe == recipe, recipe
        result = run_plan(plan, tmp_path / recipe)
        assert sum(t.out_bytes for t in result.tensors) == planned
        assert (tmp_path / recipe / "model.safetensors").stat().st_size == plan.out_bytes
        cfg = json.loads((tmp_path / recipe / "config.json").read_text())
        assert cfg["llmctl"] == {"format": "int4", "recipe": recipe, "method": "search"}
        fmts = {t.name: t.format for t in plan.tensors}
        assert fmts["lm_head.weight"] == ("bf16" if recipe == "uniform" else "int8")
        moved = {n for n, f in fmts.items() if f == "int8" and n != "lm_head.weight"}
        # 3 layers: use_more_bits picks layer 2 only (n // 8 = 0, 7n // 8 = 2); k-l every layer
        layers = {"uniform": [], "k-m": [2], "k-l": [0, 1, 2]}[recipe]
        assert moved == {f"model.layers.{i}.{m}.weight" for i in layers
                         for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}  # fmt: skip
    assert report.estimates[0].weights_breakdown.by_format["int8"] > 0


def test_overrides_and_keep_win_over_the_recipe(llama):
    plan = make_plan(str(llama), "int4", group_size=64, recipe="k-m",
                     overrides=[r"layers\.2\.self_attn\.[qkv]_proj=int4"], keep=[r"layers\.2\.mlp\.down"])  # fmt: skip
    t = {t.name: t for t in plan.tensors}
    assert t["model.layers.2.self_attn.v_proj.weight"].format == "int4"
    assert t["model.layers.2.self_attn.v_proj.weight"].reason.startswith("--override")
    assert t["model.layers.2.mlp.down_proj.weight"].format == "bf16"
    assert t["model.layers.2.mlp.down_proj.weight"].reason.startswith("--keep")
    assert t["lm_head.weight"].format == "int8" and t["lm_head.weight"].reason == "recipe k-m: lm_head one format up"
    assert t["model.layers.0.self_attn.q_proj.weight"].reason == "linear (recipe k-m)"
    assert plan.layout.name == "compressed-tensors"


@pytest.mark.parametrize("base", sorted(MORE_BITS))
def test_each_base_format_moves_to_its_more_bits_format(llama, base):
    plan = make_plan(str(llama), base, recipe="k-m")
    v = next(t for t in plan.tensors if t.name == "model.layers.2.self_attn.v_proj.weight")
    o = next(t for t in plan.tensors if t.name == "model.layers.2.self_attn.o_proj.weight")
    assert (v.format, o.format) == (MORE_BITS[base], base)
    # nf4 + int8 is a mix bitsandbytes' serialization cannot hold: llmctl's layout
    assert plan.layout.name == ("llmctl" if base.startswith("nf4") else "compressed-tensors")


def test_each_format_gets_its_method(llama):
    """The scale search is the default for int4/int8, round to nearest for nf4/fp8 (bitsandbytes' and
    compressed-tensors' own bytes); --method applies to every format; the plan and config.json say which."""
    plan = make_plan(str(llama), "nf4", recipe="k-m")
    methods = {t.format: t.opts.get("method") for t in plan.tensors}
    assert methods == {"nf4": "rtn", "int8": "search", "bf16": None}
    assert plan.method == "search (int8), rtn (nf4)" == plan.config["llmctl"]["method"]
    for fmt in ("nf4", "fp8", "int4"):
        searched = make_plan(str(llama), fmt, method="search")
        assert {t.opts.get("method") for t in searched.tensors if t.quantized} == {"search"}
        assert searched.method == "search"
        assert make_plan(str(llama), fmt, method="rtn").method == "rtn"
    assert make_plan(str(llama), "fp8").method == "rtn" and make_plan(str(llama), "int4").method == "search"
    assert make_plan(str(llama), "bf16").method is None and "method" not in make_plan(str(llama), "bf16").config.get("llmctl", {})


def test_compressed_tensors_and_transformers_read_the_mixed_file(llama, tmp_path):
    """The k-m int4 file has one config group per scheme (int4 g128, int4 per channel where a row is 128
    long, int8 per channel), each targeting
    its modules; compressed-tensors' compressor decompresses every tensor with its group's scheme to
    exactly our weights; transformers and llmctl's runtime compute the same logits from it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from llmctl.quant.layouts import read_quantized
    from llmctl.runtime.loader import load_model

    out = tmp_path / "km"
    run_plan(make_plan(str(llama), "int4", recipe="k-m"), out)
    f = safe_open(str(out / "model.safetensors"), "pt")
    state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == []
    groups = {(g["weights"]["num_bits"], g["weights"]["strategy"]): g for g in qc["config_groups"].values()}
    assert set(groups) == {(4, "group"), (4, "channel"), (8, "channel")}
    assert "lm_head" in groups[8, "channel"]["targets"] and "model.layers.2.self_attn.v_proj" in groups[8, "channel"]["targets"]
    ours = read_quantized("compressed-tensors", cfg, set(state), state.__getitem__)
    assert len(ours) == 3 * 7 + 1 and {q.format for q in ours.values()} == {"int4", "int8"}
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        for module in group["targets"]:
            local = {k.removeprefix(module + "."): v for k, v in state.items() if k.startswith(module + ".")}
            theirs = compressor.decompress(local, scheme)["weight"]
            assert torch.equal(ours[f"{module}.weight"].dequantize(theirs.dtype), theirs), module

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mine = load_model(out, dtype=torch.float32)
    with torch.no_grad():
        a, b = hf(TOKENS).logits, mine(TOKENS)
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()


def test_layouts_that_cannot_hold_the_mix_refuse_it(llama):
    with pytest.raises(QuantError, match=r"layout bnb cannot hold int8 \(model\.layers\.0\.mlp\.down_proj\.weight, "
                       r"recipe k-l: down_proj, layer 0 of 3\); use --layout llmctl \(or auto\)"):  # fmt: skip
        make_plan(str(llama), "nf4", recipe="k-l", layout="bnb", keep=["lm_head"])
    # vLLM runs q/k/v_proj as one layer: a file that splits them is refused in compressed-tensors ...
    with pytest.raises(QuantError, match=r"layout compressed-tensors cannot hold this mix: vLLM fuses "
                       r"q_proj/k_proj/v_proj into one layer .* model\.layers\.0\.self_attn\.k_proj is int4 g64 and "
                       r"model\.layers\.0\.self_attn\.v_proj is int8 g64; give the whole group one format"):  # fmt: skip
        make_plan(str(llama), "int4", group_size=64, overrides=["v_proj=int8"], layout="compressed-tensors")
    with pytest.raises(QuantError, match=r"gate_proj/up_proj .* model\.layers\.0\.mlp\.up_proj is kept bf16; give the whole group one format"):
        make_plan(str(llama), "int4", group_size=64, keep=["up_proj"], layout="compressed-tensors")
    # ... and auto writes llmctl's layout, saying why
    plan = make_plan(str(llama), "int4", group_size=64, overrides=["v_proj=int8"])
    assert plan.layout.name == "llmctl"
    assert plan.notes == [
        "written in llmctl's layout, not compressed-tensors: vLLM fuses q_proj/k_proj/v_proj into one layer "
        "and needs one scheme for it, but model.layers.0.self_attn.k_proj is int4 g64 and "
        "model.layers.0.self_attn.v_proj is int8 g64"
    ]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"fmt": "int4", "recipe": "q4_k_m"}, "unknown --recipe 'q4_k_m'; choose one of uniform, k-m, k-l"),
        ({"fmt": "bf16", "recipe": "k-m"}, "--recipe k-m applies to int8, int4, int4-asym, nf4, nf4-dq, fp8, not bf16"),
    ],
)
def test_bad_recipes_say_what_to_do(llama, kwargs, message):
    fmt = kwargs.pop("fmt")
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        make_plan(str(llama), fmt, **kwargs)
    with pytest.raises(UsageError, match="--recipe k-m applies to .* not q4_k_m; GGUF mixes such as q4_k_m carry"):
        assign_formats([], "q4_k_m", recipe="k-m")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_cli_dry_run_estimate_and_errors(llama, tmp_path):
    p = _cli("quantize", str(llama), "-f", "int4", "-g", "64", "--recipe", "k-m", "--dry-run", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["recipe"] == "k-m" and plan["layout"] == "compressed-tensors"
    reasons = {t["name"]: t["reason"] for t in plan["tensors"]}
    assert reasons["model.layers.2.mlp.down_proj.weight"] == "recipe k-m: down_proj, layer 2 of 3"
    p = _cli("estimate-memory", str(llama), "-w", "int4", "-g", "64", "--recipe", "k-m", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (est,) = json.loads(p.stdout)["estimates"]
    assert est["weights_bytes"] == sum(t["bytes"] for t in plan["tensors"]) and est["recipe"] == "k-m"
    p = _cli("quantize", str(llama), "-f", "int4", "-g", "64", "--recipe", "k-m", "-o", "q", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["recipe"] == "k-m" and res["output_bytes"] == plan["output_bytes"]
    assert res["by_format"]["int8"]["tensors"] == 5  # layer 2's q/k/v/down_proj and lm_head
    p = _cli("quantize", str(llama), "-f", "int4", "--recipe", "k-m", "--dry-run", cwd=tmp_path)  # the table
    assert p.returncode == 0 and "recipe k-m" in p.stdout

    for args, line in [
        (["quantize", str(llama), "-f", "nf4", "--recipe", "k-m", "--layout", "bnb", "-o", "x"],
         "error: layout bnb cannot hold int8 (lm_head.weight, recipe k-m: lm_head one format up); use --layout "
         "llmctl (or auto)"),
        (["quantize", str(llama), "-f", "q4_k", "--recipe", "k-m", "-o", "x.gguf"],
         "error: --recipe applies to llmctl's formats; for GGUF output choose a llama.cpp mix such as q4_k_m, "
         "which carries its own per-tensor rules"),
        (["quantize", str(llama), "-f", "int4", "--recipe", "k-s", "-o", "x"],
         "error: unknown --recipe 'k-s'; choose one of uniform, k-m, k-l"),
        (["estimate-memory", str(llama), "--recipe", "k-m"],
         "error: --recipe k-m needs --weights: the format the recipe starts from (e.g. -w int4)"),
        (["estimate-memory", str(llama), "-w", "q4_k_m", "--recipe", "k-m"],
         "error: --recipe k-m applies to int8, int4, int4-asym, nf4, nf4-dq, fp8, not q4_k_m; GGUF mixes such as "
         "q4_k_m carry llama.cpp's own per-tensor rules"),
    ]:  # fmt: skip
        p = _cli(*args, cwd=tmp_path)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [line], p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["q"]  # nothing written by the refused runs


@pytest.mark.slow
def test_smollm2_recipe_bytes_as_planned_and_estimated(tmp_path):
    """On the real SmolLM2 GGUF: dry-run bytes == written bytes == estimate-memory bytes for k-m, and the
    output answers a one-shot chat."""
    from llmctl.memory.report import memory_report_for

    gguf = str(_bundled("smollm2"))
    plan = make_plan(gguf, "int4", group_size=64, recipe="k-m")
    (est,) = memory_report_for(gguf, weights_formats=["int4"], group_size=64, recipe="k-m").estimates
    planned = sum(t.nbytes for t in plan.tensors)
    assert est.weights_bytes == planned
    result = run_plan(plan, tmp_path / "km")
    assert sum(t.out_bytes for t in result.tensors) == planned
    assert sum(f.stat().st_size for f in (tmp_path / "km").glob("*.safetensors")) == plan.out_bytes
    p = _cli("chat", str(tmp_path / "km"), "--prompt", "What is the capital of France?", "--temperature", "0",
             "--max-tokens", "8", "--json", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    chat = json.loads(p.stdout)
    assert chat["backend"] == "torch" and chat["reply"].strip()
