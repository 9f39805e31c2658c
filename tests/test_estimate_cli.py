"""`llmctl estimate-memory` end to end: JSON contract, rendering, and every bad input's one-line error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, run

LLAMA_70B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
}  # fmt: skip
GIB = 1024**3


@pytest.fixture
def cfg70(tmp_path: Path) -> Path:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(LLAMA_70B))
    return p


def test_json_contract(cfg70: Path) -> None:
    p = run(
        "estimate-memory", str(cfg70), "-w", "bf16", "-w", "int4", "-w", "q4_0", "--context", "8192", "--json"
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["model"] == str(cfg70)
    assert doc["parameters"] == 70_553_706_496  # transformers' count for Llama-3-70B's shapes
    formats = [e["weights_format"] for e in doc["estimates"]]
    assert formats == ["bf16", "int4", "q4_0"]
    keys = ("weights_format", "context", "batch", "kv_dtype", "weights_bytes", "kv_cache_bytes",
            "activation_bytes", "overhead_bytes", "total_bytes")  # fmt: skip
    for e in doc["estimates"]:
        assert all(k in e for k in keys)
        assert (
            e["total_bytes"]
            == e["weights_bytes"] + e["kv_cache_bytes"] + e["activation_bytes"] + e["overhead_bytes"]
        )
        # GQA: 2 (K,V) × 80 layers × 8 KV heads × 128 head_dim × 8192 tokens × 2 bytes = 2.5 GiB
        assert e["kv_cache_bytes"] == 2 * 80 * 8 * 128 * 8192 * 2
    bf16, int4, q4_0 = doc["estimates"]
    assert bf16["weights_bytes"] == doc["parameters"] * 2
    assert (
        q4_0["weights_bytes"] < int4["weights_bytes"] * 1.1
        and int4["weights_bytes"] < bf16["weights_bytes"] / 3
    )


def test_context_takes_k_suffixes(cfg70: Path) -> None:
    """Model cards say 128k; so may --context (k = 1024 tokens)."""
    counts = {}
    for text in ("131072", "128k", "128K"):
        p = run("estimate-memory", str(cfg70), "-w", "int4", "--context", text, "--json")
        assert p.returncode == 0, p.stderr
        counts[text] = json.loads(p.stdout)["estimates"][0]["context"]
    assert set(counts.values()) == {131072}


def test_tensor_parallel_table_rows_add_up_per_gpu(cfg70: Path) -> None:
    """With --tp 2 the table mixed per-GPU and whole-model columns (a row summed to 30.72 against a total
    of 27.44); now weights + KV cache + activations + overhead = total, all per GPU."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "llmctl", "estimate-memory", str(cfg70), "-w", "int4", "-w", "bf16",
                        "--tp", "2"], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    rows = [line.split("│")[1:-1] for line in lines[start + 1 :] if line.startswith("│")][:2]
    assert "kept (all GPUs)" in p.stdout and len(rows) == 2
    for cells in rows:
        weights, _, kv, act, overhead, total = (float(c) for c in cells[2:])
        assert abs(weights + kv + act + overhead - total) <= 0.02, cells


def test_group_size_hints_are_whole_blocks_of_32() -> None:
    from llmctl.quant.formats import _divisor_hint

    assert _divisor_hint(576, 128) % 32 == 0 and 576 % _divisor_hint(576, 128) == 0
    assert _divisor_hint(100, 128) == 100  # no multiple of 32 divides 100: the nearest divisor


def test_table_fit_and_chart(cfg70: Path) -> None:
    p = run("estimate-memory", str(cfg70), "-w", "int4", "--gpu", "H100")
    assert p.returncode == 0, p.stderr
    assert "Fit on H100 80GB" in p.stdout and "fits" in p.stdout
    assert "Total memory against context length" in p.stdout and "131,072" in p.stdout
    p = run("estimate-memory", str(cfg70), "-w", "bf16", "--vram", "24")
    assert "does not fit" in p.stdout


def test_gpu_table_without_gpu(cfg70: Path) -> None:
    p = run("estimate-memory", str(cfg70), "-w", "int4")
    assert p.returncode == 0
    assert "RTX 3060" in p.stdout and "H200" in p.stdout


@pytest.mark.slow
def test_bundled_gguf_uses_stored_types() -> None:
    p = run("estimate-memory", "gemma3-270m", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["stored_format"] == "q4_k_m"
    by_format = doc["estimates"][0]["weights_breakdown"]["by_format"]
    assert {"q4_k", "q6_k", "q8_0", "q5_0"} <= set(by_format)  # the file's real mix, as stored


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/model"], "MODEL '/no/such/model' not found"),
        (["CFG", "--context", "0"], "--context must be a positive number of tokens, got 0"),
        (["CFG", "--context", "-4"], "--context must be a positive number of tokens, got -4"),
        (["CFG", "--batch", "0"], "--batch must be a positive integer"),
        (["CFG", "-w", "q3_xl"], "unknown weight format 'q3_xl'; known formats:"),
        (["CFG", "--gpu", "rtx9999"], "unknown GPU 'rtx9999'; known GPUs: RTX 3060"),
        (["CFG", "-w", "int4", "-g", "100"], "group size 100 does not divide the row length 8192"),
        (["CFG", "--kv-dtype", "int2"], "unknown --kv-dtype 'int2'; choose one of"),
        (["CFG", "--kv-layout", "paged"], "unknown --kv-layout 'paged'"),
        (["CFG", "--vram", "-1"], "--vram must be a positive number of GiB"),
        (["CFG", "--vram", "8", "--gpu", "T4"], "give either --gpu or --vram, not both"),
        (["CFG", "--context", "lots"], "--context 'lots': expected a token count such as 8192, 32k or 128k"),
        (["CFG", "--gpu", "RTX 4090", "--gpu", "H100"], "--gpu given 2 times ('RTX 4090', 'H100'); check one GPU"),
    ],
)
def test_bad_options(cfg70: Path, args: list[str], message: str) -> None:
    assert_one_line_error(run("estimate-memory", *[str(cfg70) if a == "CFG" else a for a in args]), message)


def test_bad_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{"model_type": "llama", ')
    assert_one_line_error(run("estimate-memory", str(bad_json)), "malformed JSON at line 1")
    unsupported = tmp_path / "u.json"
    unsupported.write_text(json.dumps({**LLAMA_70B, "model_type": "mamba"}))
    assert_one_line_error(run("estimate-memory", str(unsupported)), "model_type 'mamba' is not supported")
    magic = tmp_path / "m.gguf"
    magic.write_bytes(b"XXXX" + b"\0" * 60)
    assert_one_line_error(run("estimate-memory", str(magic)), "not a GGUF file (magic b'XXXX'")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 5, 3))
    assert_one_line_error(run("estimate-memory", str(truncated)), "t.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("estimate-memory", str(empty)), "folder has no config.json")
