"""`llmctl show`, `llmctl models` listing what quantize wrote, and llama.cpp's --gpu-layers rule: on the
bundled real models, with gguf-py's reader as the oracle for what the files hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import gemma3_path, one_error_line, smollm2_path, tiny_models  # noqa: F401

from llmctl.errors import UsageError


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key: str):
    f = reader.fields[key]
    return f.contents()


# ---- show ------------------------------------------------------------------------------------------
def test_show_json_is_what_the_gguf_holds() -> None:
    p = run("show", "smollm2-135m", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    r = _reader(smollm2_path())
    a = info["architecture"]
    assert a["family"] == "llama"
    assert a["layers"] == _field(r, "llama.block_count") == 30
    assert a["kv_heads"] == _field(r, "llama.attention.head_count_kv") == 3
    assert a["attention_heads"] == _field(r, "llama.attention.head_count")
    assert a["context_length"] == _field(r, "llama.context_length")
    assert a["hidden_size"] == _field(r, "llama.embedding_length")
    assert a["vocab_size"] == len(r.fields["tokenizer.ggml.tokens"].data)
    assert a["tied_embeddings"] is ("output.weight" not in {t.name for t in r.tensors})
    # every tensor counted once, under its stored type, with its exact size
    by = info["weights"]["by_type"]
    assert sum(d["tensors"] for d in by.values()) == len(r.tensors)
    assert sum(d["bytes"] for d in by.values()) == sum(int(t.n_bytes) for t in r.tensors)
    assert by["q4_1"]["tensors"] == sum(t.tensor_type.name == "Q4_1" for t in r.tensors)
    assert info["weights"]["stored"] == "q4_1" and info["quantization"]["file_type"] == "q4_1"
    assert info["license"] == _field(r, "general.license")
    assert info["model"]["size_bytes"] == smollm2_path().stat().st_size
    assert info["tokenizer"]["chat_template"] is True
    assert info["tokenizer"]["chat_template_chars"] == len(_field(r, "tokenizer.chat_template"))


def test_show_text_names_the_facts_and_template_prints_it_verbatim() -> None:
    p = run("show", "smollm2-135m")
    assert p.returncode == 0, p.stderr
    for text in ("parameters", "134.52 M", "9 (3 KV heads, head dim 64)", "8,192", "q4_1", "apache-2.0", "--template"):
        assert text in p.stdout, (text, p.stdout)
    t = run("show", "smollm2-135m", "--template")
    assert t.returncode == 0, t.stderr
    assert t.stdout.rstrip("\n") == _field(_reader(smollm2_path()), "tokenizer.chat_template").rstrip("\n")


def test_show_a_base_model() -> None:
    p = run("show", "gemma3-270m", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["tokenizer"]["chat_template"] is False and info["tokenizer"]["mode"].startswith("completion")
    assert info["architecture"]["sliding_window"] == 512 and info["architecture"]["kv_heads"] == 1
    assert info["weights"]["stored"] == "q4_k_m"
    one_error_line(run("show", "gemma3-270m", "--template"), "has no chat template")
    one_error_line(run("show", "smollm2-135m", "--template", "--json"), "--template prints the template as text")
    one_error_line(run("show", "smolm2-135m"), "did you mean smollm2-135m")


def test_show_a_quantized_folder(tiny_models, tmp_path) -> None:  # noqa: F811
    folder, _ = tiny_models["qwen2"]
    out = tmp_path / "q"
    q = run("quantize", str(folder), "-f", "int4", "-g", "32", "--out", str(out), "--json")
    assert q.returncode == 0, q.stderr
    info = json.loads(run("show", str(out), "--json").stdout)
    cfg = json.loads((out / "config.json").read_text())
    assert info["quantization"]["method"] == cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    weights = next(iter(cfg["quantization_config"]["config_groups"].values()))["weights"]
    assert info["quantization"]["num_bits"] == weights["num_bits"] == 4
    assert info["quantization"]["group_size"] == weights["group_size"] == 32
    assert info["architecture"]["family"] == "qwen2"
    assert info["model"]["size_bytes"] == sum(f.stat().st_size for f in out.iterdir() if f.is_file())


# ---- models: what quantize wrote -------------------------------------------------------------------
def test_models_lists_what_quantize_wrote_while_it_exists(tiny_models, tmp_path) -> None:  # noqa: F811
    import shutil

    env = {"LLMCTL_CACHE": str(tmp_path / "cache")}
    folder, _ = tiny_models["llama"]
    outs = {fmt: tmp_path / f"out-{fmt}" for fmt in ("int8", "int4")}
    q = run("quantize", "smollm2-135m", "-f", "int8", "-g", "64", "--out", str(outs["int8"]), "--json", env=env)
    assert q.returncode == 0, q.stderr
    q = run("quantize", str(folder), "-f", "int4", "-g", "32", "--out", str(outs["int4"]), "--json", env=env)
    assert q.returncode == 0, q.stderr
    # a GGUF's chat template lands in chat_template.jinja (docs/formats.md, Tokenizers), as stored
    template = _field(_reader(smollm2_path()), "tokenizer.chat_template")
    assert (outs["int8"] / "chat_template.jinja").read_text() == template
    assert "chat_template" not in json.loads((outs["int8"] / "tokenizer_config.json").read_text())
    assert run("show", str(outs["int8"]), "--template").stdout.rstrip("\n") == template.rstrip("\n")
    g = run("quantize", "smollm2-135m", "-f", "q8_0", "--out", str(tmp_path / "s.gguf"), "--json", env=env)
    assert g.returncode == 0, g.stderr
    listed = {m["path"]: m for m in json.loads(run("models", "--json", env=env).stdout)["models"] if m["kind"] == "quantized"}
    assert set(listed) == {str(outs["int8"].resolve()), str(outs["int4"].resolve()), str((tmp_path / "s.gguf").resolve())}
    assert listed[str(outs["int8"].resolve())]["status"].startswith("int8 of ")
    assert listed[str((tmp_path / "s.gguf").resolve())]["size_bytes"] == (tmp_path / "s.gguf").stat().st_size
    shutil.rmtree(outs["int8"])
    text = run("models", env=env)
    assert text.returncode == 0 and "out-int4" in text.stdout and "out-int8" not in text.stdout


def test_the_record_trusts_nothing_it_reads(tmp_path, monkeypatch) -> None:
    from llmctl import outputs

    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    real = tmp_path / "real.gguf"
    real.write_bytes(b"x")
    for junk in ("{not json", '{"a": 1}', '[1, "x", {"path": 3}]', "\xff\xfe"):
        outputs.record_file().write_text(junk, encoding="latin-1")
        assert outputs.recorded() == []
    assert outputs.remember(real, "q8_0", "m")  # a corrupt record is replaced, not a failure
    assert [o.path for o in outputs.recorded()] == [str(real.resolve())]
    # concurrent writers: every one lands (the lock), the file stays valid JSON
    files = [tmp_path / f"o{i}" for i in range(16)]
    for f in files:
        f.mkdir()
    threads = [threading.Thread(target=outputs.remember, args=(f, "int4", "m")) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {o.path for o in outputs.recorded()} == {str(real.resolve()), *(str(f.resolve()) for f in files)}


def test_an_unwritable_cache_never_fails_quantize(tmp_path, monkeypatch) -> None:
    from llmctl import outputs

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LLMCTL_CACHE", str(blocker / "cache"))  # a file where the folder would be
    assert outputs.remember(tmp_path, "int4", "m") is False


# ---- --gpu-layers (llama.cpp's -ngl) -----------------------------------------------------------------
@pytest.mark.parametrize(
    "device, layers, offload, expected",
    [
        (None, None, True, -1), (None, None, False, 0), ("cuda", None, True, -1), (None, 12, True, 12),
        (None, 0, True, 0), (None, 0, False, 0), ("cpu", None, True, 0), ("cpu", 0, True, 0), (None, -1, True, -1),
    ],
)  # fmt: skip
def test_gpu_layers_rule(device, layers, offload, expected) -> None:
    from llmctl.runtime.llamacpp import gpu_layers

    assert gpu_layers(device, layers, offload=offload) == expected


@pytest.mark.parametrize(
    "device, layers, offload, message",
    [
        (None, 12, False, "built without GPU offload"), (None, -1, False, "built without GPU offload"),
        ("cuda", None, False, "built without GPU offload"), ("cpu", 3, True, "--device cpu keeps every layer"),
        (None, -2, True, "--gpu-layers must be"), ("xpu", None, True, "takes auto, cpu or"),
    ],
)  # fmt: skip
def test_gpu_layers_refusals(device, layers, offload, message) -> None:
    from llmctl.runtime.llamacpp import gpu_layers

    with pytest.raises(UsageError, match=message):
        gpu_layers(device, layers, offload=offload)


def test_gpu_layers_on_the_command_line() -> None:
    import llama_cpp

    ok = run("chat", "smollm2-135m", "--gpu-layers", "0", "-p", "hi", "-n", "3", "--temperature", "0", "--json")
    assert ok.returncode == 0, ok.stderr
    assert "llama.cpp, cpu" in ok.stderr
    one_error_line(run("chat", "smollm2-135m", "-ngl", "4", "--backend", "torch", "-p", "hi"),
                   "--gpu-layers is a llama.cpp-backend option", notices=True)  # fmt: skip
    if not llama_cpp.llama_supports_gpu_offload():  # this machine's build: asking for offload is refused
        one_error_line(run("chat", "smollm2-135m", "-ngl", "8", "-p", "hi"), "built without GPU offload", notices=True)
        one_error_line(run("eval", "--data", "sotu", "-b", "llama.cpp", "-ngl", "8"), "built without GPU offload", notices=True)
    one_error_line(run("eval", "--data", "sotu", "-ngl", "4"), "--gpu-layers is a llama.cpp-backend option", notices=True)
    ok = run("eval", "--data", "sotu", "--chunks", "1", "--context", "128", "-b", "llama.cpp", "-ngl", "0", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["windows"] == 1, ok.stderr
