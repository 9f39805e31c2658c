"""`llmctl estimate-memory` end to end: JSON contract, rendering, and every bad input's one-line error."""

from __future__ import annotations

import itertools
import json
import re
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
    from llmctl.quant.registry import _divisor_hint

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
        (
            ["CFG", "--gpu", "RTX 4090", "--gpu", "H100"],
            "--gpu given 2 times ('RTX 4090', 'H100'); check one GPU",
        ),
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


# ---- --flash-attention -------------------------------------------------------------------------------
def test_flash_attention_drops_the_score_matrix(cfg70: Path) -> None:
    """Without --flash-attention the activations hold the chunk's fp32 scores; with it, they do not, and
    the peak layer term becomes the larger of the q/k/v projections and the MLP (docs/memory.md)."""
    docs = {}
    for flag in ([], ["--flash-attention"]):
        p = run(
            "estimate-memory", str(cfg70), "-w", "int4", "--context", "8192", "--gpu", "H100", "--json", *flag
        )
        assert p.returncode == 0, p.stderr
        docs[bool(flag)] = json.loads(p.stdout)
    eager, flash = docs[False]["estimates"][0], docs[True]["estimates"][0]
    assert (eager["flash_attention"], flash["flash_attention"]) == (False, True)
    u = 512  # the prefill chunk
    hidden = 2 * u * 8192 * 2
    qkv = u * (64 + 2 * 8) * 128 * 2
    scores = 64 * u * 8192 * 4  # heads × chunk × keys × fp32: 1 GiB
    mlp = 3 * u * 28672 * 2
    logits = u * 128256 * 4
    assert eager["activation_bytes"] == hidden + qkv + scores + logits
    assert flash["activation_bytes"] == hidden + max(qkv, mlp) + logits
    assert flash["total_bytes"] < eager["total_bytes"]
    # the fit and the curve use the same assumption
    assert docs[True]["fits"][0]["max_context"] > docs[False]["fits"][0]["max_context"]
    fused, unfused = (docs[k]["curve"]["total_bytes"]["int4"] for k in (True, False))
    # at 512 tokens the scores (64 × 512 × 512 × 4 B + q/k/v = 74 MiB) are below the MLP's 84 MiB: equal
    assert fused[0] == unfused[0] and all(f < e for f, e in zip(fused[1:], unfused[1:], strict=True))
    # and the table says which it is
    shown = {
        flag: run("estimate-memory", str(cfg70), "-w", "int4", *flag).stdout
        for flag in ((), ("--flash-attention",))
    }
    assert "attention unfused: fp32 score matrix counted (see --flash-attention)" in shown[()]
    assert "attention fused (--flash-attention): no score matrix counted" in shown[("--flash-attention",)]


# ---- --json without a GPU ----------------------------------------------------------------------------
def test_json_without_gpu_has_no_max_context(cfg70: Path) -> None:
    """Without --gpu/--vram there is no budget: max_context/max_batch are null, never a misleading 0."""
    p = run("estimate-memory", str(cfg70), "-w", "int4", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["fits"] and all(f["max_context"] is None and f["max_batch"] is None for f in doc["fits"])
    assert doc["curve"]["gpu"] is None and doc["curve"]["gpu_bytes"] is None
    # with a budget the weights do not fit in, 0 is the answer (and says so)
    p = run("estimate-memory", str(cfg70), "-w", "bf16", "--vram", "24", "--json")
    (fit,) = json.loads(p.stdout)["fits"]
    assert (fit["max_context"], fit["max_batch"], fit["fits"]) == (0, 0, False)


# ---- --plot ------------------------------------------------------------------------------------------
def test_plot_csv_matches_the_json(cfg70: Path, tmp_path: Path) -> None:
    import csv

    out = tmp_path / "curve.csv"
    p = run("estimate-memory", str(cfg70), "-w", "bf16", "-w", "int4", "--context", "8k", "--gpu", "H100",
            "--plot", str(out), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout is still only the JSON; the notice went to stderr
    assert f"wrote the memory-vs-context chart to {out}" in " ".join(p.stderr.split())  # rich wraps
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0]) == ["context", "bf16", "int4", "gpu_bytes"]
    assert [int(r["context"]) for r in rows] == doc["curve"]["contexts"] == [512 << i for i in range(9)]
    for fmt in ("bf16", "int4"):
        assert [int(r[fmt]) for r in rows] == doc["curve"]["total_bytes"][fmt]
    assert {int(r["gpu_bytes"]) for r in rows} == {80 * GIB} == {f["vram_bytes"] for f in doc["fits"]}
    at_8k = next(r for r in rows if r["context"] == "8192")
    assert [int(at_8k[e["weights_format"]]) for e in doc["estimates"]] == [
        e["per_gpu_total_bytes"] for e in doc["estimates"]
    ]
    # without a GPU there is no memory line
    p = run("estimate-memory", str(cfg70), "-w", "int4", "--plot", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_text().splitlines()[0] == "context,int4"


def test_plot_svg_is_well_formed_with_one_line_per_format(cfg70: Path, tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    out = tmp_path / "curve.svg"
    p = run("estimate-memory", str(cfg70), "-w", "bf16", "-w", "int4", "--vram", "48", "--plot", str(out))
    assert p.returncode == 0, p.stderr
    root = ET.parse(out).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    lines = {e.get("data-format"): e for e in root.iter(f"{ns}polyline") if e.get("class") == "series"}
    assert list(lines) == ["bf16", "int4"]
    ys = {}
    for fmt, line in lines.items():
        points = [tuple(map(float, xy.split(","))) for xy in line.get("points").split()]
        assert len(points) == 9  # 512 … 131072 tokens
        assert all(a[0] < b[0] and a[1] >= b[1] for a, b in itertools.pairwise(points))  # right and up
        ys[fmt] = points[0][1]
    assert ys["bf16"] < ys["int4"]  # bf16 needs more memory: higher on the chart (smaller y)
    (gpu,) = [e for e in root.iter(f"{ns}line") if e.get("class") == "gpu"]
    assert gpu.get("data-bytes") == str(48 * GIB)
    assert "48 GiB (48.00 GiB)" in "".join(root.itertext())


def test_plot_png(cfg70: Path, tmp_path: Path) -> None:
    """With matplotlib: a PNG. Without: one line naming the install, and nothing written."""
    import importlib.util

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "curve.png"
    p = run("estimate-memory", str(cfg70), "-w", "int4", "--gpu", "4090", "--plot", str(out))
    if importlib.util.find_spec("matplotlib") is None:
        assert_one_line_error(p, f"--plot {out}: PNG needs matplotlib (pip install matplotlib)")
        assert list(out_dir.iterdir()) == []
        return
    assert p.returncode == 0, p.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [f.name for f in out_dir.iterdir()] == ["curve.png"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("curve.jpg", [], "unknown file type '.jpg'; name it .csv, .svg or .png"),
        ("curve", [], "unknown file type '(no suffix)'; name it .csv, .svg or .png"),
        ("no/such/dir/curve.csv", [], "does not exist; create it first"),
        ("curve.csv", ["-w", "q3_xl"], "unknown weight format 'q3_xl'"),  # a later error: still no file
    ],
)
def test_plot_bad_file_writes_nothing(
    cfg70: Path, tmp_path: Path, name: str, extra: list[str], message: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_one_line_error(run("estimate-memory", str(cfg70), *extra, "--plot", str(out_dir / name)), message)
    assert list(out_dir.iterdir()) == []


# ---- docs/memory.md shows what the program prints ---------------------------------------------------
def _doc_examples() -> list[tuple[str, str]]:
    """(command, expected output) for every `$ llmctl ...` line in docs/memory.md's code blocks."""
    text = (Path(__file__).parent.parent / "docs" / "memory.md").read_text()
    examples: list[tuple[str, str]] = []
    for block in re.findall(r"^```\n(\$ .*?)^```", text, flags=re.S | re.M):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            examples.append((command, output))
    return examples


def test_docs_memory_examples_are_real_output(tmp_path: Path) -> None:
    """Each example in docs/memory.md is run as written (llmctl = this checkout; a 120-column terminal) and
    must print exactly what the page shows, trailing spaces aside."""
    import os
    import shutil
    import subprocess
    import sys

    examples = _doc_examples()
    assert len(examples) >= 5 and all("llama-3-70b" in c or c.startswith("cat ") for c, _ in examples)
    (tmp_path / "llama-3-70b").mkdir()
    (tmp_path / "llama-3-70b" / "config.json").write_text(json.dumps(LLAMA_70B))
    env = {**os.environ, "COLUMNS": "120", "HF_HUB_OFFLINE": "1"}
    prelude = f'llmctl() {{ "{sys.executable}" -m llmctl "$@"; }}\n'
    for command, expected in examples:
        if "| jq" in command and shutil.which("jq") is None:
            continue
        p = subprocess.run(["bash", "-c", prelude + "{ " + command + "; } 2>&1"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert p.returncode == 0, (command, p.stdout, p.stderr)

        def lines(s: str) -> list[str]:
            return [line.rstrip() for line in s.rstrip("\n").splitlines()]

        assert lines(p.stdout) == lines(expected), command
