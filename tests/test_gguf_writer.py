"""llmctl.gguf.writer: a GGUFSource written tensor by tensor with the encoding passed in, read back by
llmctl's reader; a GGUF file as a source written again unchanged; the error measurement."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import _COMMON
from gguf.quants import dequantize, quantize

from llmctl.config import ModelConfig
from llmctl.gguf import metadata
from llmctl.gguf.reader import read_gguf
from llmctl.gguf.writer import GGUFSource, file_source, sqnr_db, write_file

TENSORS = [  # (GGUF name, numpy shape, type)
    ("token_embd.weight", (96, 64), "q8_0"),
    ("output_norm.weight", (64,), "f32"),
    ("blk.0.attn_q.weight", (64, 64), "f16"),
    ("output.weight", (96, 64), "q4_0"),
]


def _source() -> tuple[GGUFSource, dict[str, np.ndarray]]:
    cfg = ModelConfig.from_dict({**_COMMON, "model_type": "llama"})
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in TENSORS}
    values["blk.0.attn_q.weight"] = values["blk.0.attn_q.weight"].astype(np.float16).astype(np.float32)
    tensors = [(name, shape, 4 * math.prod(shape), "f32") for name, shape, _ in TENSORS]

    def add(writer) -> None:
        metadata.add_arch_metadata(writer, cfg, cfg.vocab_size)

    return GGUFSource("llama", add, tensors, lambda: iter(values.values()), cfg), values


def _write(src: GGUFSource, dst: Path, types: list[str], steps: list | None = None, **kw):
    def encode(x, kind, qtype):
        return quantize(x, qtype)

    step = None if steps is None else lambda *a: steps.append(a)
    return write_file(src, dst, 7, types, encode, step, **kw)


def test_each_tensor_in_its_type_with_the_metadata_and_the_error(tmp_path: Path) -> None:
    src, values = _source()
    steps: list = []
    types = [t for _, _, t in TENSORS]
    result = _write(src, tmp_path / "x.gguf", types, steps, extra={"quantize.imatrix.dataset": "t", "n": 3})
    info = read_gguf(tmp_path / "x.gguf")
    assert info.metadata["general.architecture"] == "llama"
    assert info.metadata["general.file_type"] == 7
    assert info.metadata["general.quantized_by"].startswith("llmctl ")
    assert info.metadata["quantize.imatrix.dataset"] == "t" and info.metadata["n"] == 3
    assert info.metadata["llama.embedding_length"] == 64
    assert [t.name for t in info.tensors] == [n for n, _, _ in TENSORS]
    for (name, shape, kind), r in zip(TENSORS, result, strict=True):
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        assert info.ggml_type(name) == qtype
        want = dequantize(quantize(values[name], qtype), qtype).reshape(shape)
        np.testing.assert_array_equal(info.dequantize(name), want)
        assert (r.name, r.format, r.params, r.src_bytes) == (name, kind, math.prod(shape), 4 * math.prod(shape))
        assert r.out_bytes == info.tensor_info(name).nbytes
    by_name = {r.name: r.sqnr_db for r in result}
    assert by_name["output_norm.weight"] is None  # f32: not quantized
    assert by_name["blk.0.attn_q.weight"] is None  # f16 values written as f16: exact
    assert by_name["token_embd.weight"] > by_name["output.weight"] > 10  # q8_0 adds less error than q4_0
    total = sum(math.prod(s) for _, s, _ in TENSORS)
    done = [0, 96 * 64, 96 * 64 + 64, 96 * 64 + 64 + 64 * 64]
    assert steps == [(i, 4, n, done[i], total) for i, (n, _, _) in enumerate(TENSORS)] + [(4, 4, "", total, total)]


def test_a_gguf_file_as_a_source_is_written_again_byte_for_byte(tmp_path: Path) -> None:
    src, _ = _source()
    types = ["f32", "f32", "f16", "f32"]
    _write(src, tmp_path / "a.gguf", types)
    again = file_source(read_gguf(tmp_path / "a.gguf"))
    assert again.arch == "llama" and again.config.hidden_size == 64
    assert [(n, s) for n, s, _, _ in again.tensors] == [(n, s) for n, s, _ in TENSORS]
    _write(again, tmp_path / "b.gguf", types)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_types_must_match_the_tensors(tmp_path: Path) -> None:
    src, _ = _source()
    with pytest.raises(ValueError, match="zip"):
        _write(src, tmp_path / "x.gguf", ["f32"])


def test_sqnr_db() -> None:
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(0.0, 1.0) == 0.0
