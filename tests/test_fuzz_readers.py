"""Property tests: random and mutated bytes fed to the safetensors and GGUF header readers and the config
parser may only raise llmctl's own errors — never crash, hang, or allocate unbounded memory.

Examples are derandomized (the same on every CI run) and each must finish within its deadline; the
memory each example allocates in Python is capped with tracemalloc.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.checkpoint import read_safetensors_header
from llmctl.config import ModelConfig
from llmctl.errors import LlmctlError
from llmctl.gguf.reader import read_gguf

SETTINGS = settings(
    max_examples=300,
    deadline=2000,  # ms per example: a parser that loops or reads gigabytes fails here
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_PY_ALLOC = 64 * 1024**2  # bytes of Python allocations one example may peak at


def run_bounded(fn, *args):
    """Call ``fn``; only LlmctlError may escape; Python allocations stay under MAX_PY_ALLOC."""
    tracemalloc.start()
    try:
        try:
            result = fn(*args)
        except LlmctlError as e:
            assert str(e) and "\n" not in str(e).strip(), "errors are one line"
            result = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PY_ALLOC, f"{fn.__name__} allocated {peak} bytes"
    return result


def mutations(seed_bytes: bytes):
    """Strategy: ``seed_bytes`` with bytes overwritten, a slice cut out or appended, or truncated."""
    n = len(seed_bytes)

    def flip(data):
        b = bytearray(seed_bytes)
        for pos, val in data:
            b[pos % n] = val
        return bytes(b)

    edits = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)
    # Overwrite with "interesting" integers at 8-byte aligned places (lengths, counts, offsets).
    big = st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**40, n, n + 1])
    ints = st.lists(st.tuples(st.integers(0, max(0, n // 8 - 1)), big), min_size=1, max_size=3)

    def put_ints(data):
        b = bytearray(seed_bytes)
        for slot, value in data:
            b[slot * 8 : slot * 8 + 8] = struct.pack("<Q", value)
        return bytes(b[:n])

    return st.one_of(
        edits.map(flip),
        ints.map(put_ints),
        st.integers(0, n - 1).map(lambda k: seed_bytes[:k]),
        st.tuples(st.integers(0, n - 1), st.integers(1, 64)).map(lambda t: seed_bytes[: t[0]] + seed_bytes[t[0] + t[1] :]),
        st.binary(min_size=1, max_size=64).map(lambda extra: seed_bytes + extra),
    )


# ---- safetensors ------------------------------------------------------------------------------------
def _safetensors_seed(tmp: Path) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = tmp / "seed.safetensors"
    save_file(
        {"a.weight": torch.ones(4, 3), "b.bias": torch.zeros(5, dtype=torch.bfloat16)},
        str(path),
        metadata={"format": "pt"},
    )
    return path.read_bytes()


@pytest.fixture(scope="module")
def st_seed(tmp_path_factory) -> bytes:
    return _safetensors_seed(tmp_path_factory.mktemp("st"))


def test_safetensors_seed_is_valid(st_seed, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_seed)
    tensors, meta = read_safetensors_header(path)
    assert {t.name for t in tensors} == {"a.weight", "b.bias"} and meta == {"format": "pt"}


@SETTINGS
@given(data=st.data())
def test_safetensors_mutated(st_seed, tmp_path, data):
    blob = data.draw(mutations(st_seed))
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    result = run_bounded(read_safetensors_header, path)
    if result is not None:  # accepted: then the safetensors library reads every tensor as we described it
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for t in result[0]:
                assert tuple(f.get_slice(t.name).get_shape()) == t.shape
                assert f.get_tensor(t.name).numel() * f.get_tensor(t.name).element_size() == t.nbytes


@SETTINGS
@given(blob=st.binary(max_size=256))
def test_safetensors_random_bytes(tmp_path, blob):
    path = tmp_path / "r.safetensors"
    path.write_bytes(blob)
    run_bounded(read_safetensors_header, path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=5), pad=st.integers(0, 64))
def test_safetensors_random_json_header(tmp_path, header, pad):
    text = json.dumps(header).encode()
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * pad)
    run_bounded(read_safetensors_header, path)


# ---- GGUF -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_seed(tmp_path_factory) -> bytes:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "seed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_string("general.name", "fuzz")
    w.add_tensor("token_embd.weight", np.ones((3, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_gguf_seed_is_valid(gguf_seed, tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(gguf_seed)
    info = read_gguf(path)
    assert {t.name for t in info.tensors} == {"token_embd.weight", "blk.0.attn_norm.weight"}


def _read_and_use(path: Path):
    """What llmctl does with a GGUF it accepts: the header, the config, and each tensor's bytes."""
    info = read_gguf(path)
    for t in info.tensors:
        info.tensor_data(t.name)
    _ = info.config
    return info


@SETTINGS
@given(data=st.data())
def test_gguf_mutated(gguf_seed, tmp_path, data):
    blob = data.draw(mutations(gguf_seed))
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    run_bounded(_read_and_use, path)


@SETTINGS
@given(blob=st.binary(max_size=256), magic=st.booleans())
def test_gguf_random_bytes(tmp_path, blob, magic):
    path = tmp_path / "r.gguf"
    path.write_bytes((b"GGUF" + struct.pack("<I", 3) + blob) if magic else blob)
    run_bounded(_read_and_use, path)


# ---- config.json ------------------------------------------------------------------------------------
VALID = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
}


def _parse_and_use(d):
    """Parse, then what estimate-memory does with a config: its layer kinds and parameter count."""
    from llmctl.tensors import count_parameters

    config = ModelConfig.from_dict(d, "config.json")
    config.layer_kinds()
    count_parameters(config)
    return config


@SETTINGS
@given(d=st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_config_random_objects(d):
    run_bounded(_parse_and_use, d)


@SETTINGS
@given(
    key=st.sampled_from([*VALID, "sliding_window", "layer_types", "rope_scaling", "rope_parameters",
                         "head_dim", "tie_word_embeddings", "text_config", "torch_dtype"]),
    value=json_values,
    drop=st.booleans(),
)  # fmt: skip
def test_config_one_field_mutated(key, value, drop):
    d = dict(VALID)
    if drop:
        d.pop(key, None)
    else:
        d[key] = value
    run_bounded(_parse_and_use, d)


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_config_file_random_text(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    run_bounded(ModelConfig.from_json_file, path)
