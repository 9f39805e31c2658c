"""GGUF reading: metadata and tensor table against gguf-py, and one-line FormatErrors for broken files."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import gemma3_path, smollm2_path

from llmctl.errors import FormatError
from llmctl.gguf.reader import read_gguf

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


# ---- a byte-level GGUF builder, so tests control every field -------------------------------------
def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _tensor_info(name: str, ne: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return (
        _str(name)
        + struct.pack("<I", len(ne))
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<I", ggml_type)
        + struct.pack("<Q", offset)
    )


def gguf_bytes(
    kvs: list[bytes] | None = None,
    infos: list[bytes] | None = None,
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    magic: bytes = b"GGUF",
) -> bytes:
    kvs = kvs if kvs is not None else [_kv("general.architecture", V.STRING, _str("llama"))]
    infos = infos or []
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % 32)
    return body + data


def one_f32_tensor(n: int = 8, *, ggml_type: int = Q.F32, offset: int = 0) -> tuple[list[bytes], bytes]:
    data = np.arange(n, dtype=np.float32).tobytes()
    return [_tensor_info("t.weight", (n,), ggml_type, offset)], data


def write(tmp_path: Path, blob: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


# ---- good files ----------------------------------------------------------------------------------
def make_writer_file(path: Path) -> dict[str, np.ndarray]:
    """A small GGUF written by gguf-py's own writer: every value type, float and quantized tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 1e-5)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 😀")
    w.add_array("t.strs", ["a", "bé", "", "<|im_end|>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.nested", [[1, 2], [3]])
    tensors = {
        "a.f32": rng.standard_normal((3, 64), dtype=np.float32),
        "b.f16": rng.standard_normal((2, 4, 32)).astype(np.float16),
        "c.q8": rng.standard_normal((4, 64), dtype=np.float32),
    }
    w.add_tensor("a.f32", tensors["a.f32"])
    w.add_tensor("b.f16", tensors["b.f16"])
    q8 = gguf.quants.quantize(tensors["c.q8"], Q.Q8_0)
    w.add_tensor("c.q8", q8, raw_shape=q8.shape, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {**tensors, "c.q8": q8}


def test_reads_gguf_py_writer_output_like_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    arrays = make_writer_file(path)
    info = read_gguf(path)
    m = info.metadata
    assert m["general.architecture"] == "llama"
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -5, 60000, -30000)
    assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (
        4_000_000_000,
        -2_000_000_000,
        2**63,
        -(2**62),
    )
    assert m["t.f32"] == 1e-5  # shortest float32 decimal, not 9.99999974e-06
    assert m["t.f64"] == 0.1 and m["t.bool"] is True and m["t.str"] == "héllo 😀"
    assert m["t.strs"] == ["a", "bé", "", "<|im_end|>"]
    assert m["t.ints"] == [1, -2, 3] and m["t.floats"] == [0.5, 1.5] and m["t.nested"] == [[1, 2], [3]]

    # The tensor table: PyTorch dim order, lower-case GGML type names, exact byte counts.
    table = {t.name: t for t in info.tensors}
    assert table["a.f32"].shape == (3, 64) and table["a.f32"].dtype == "f32" and table["a.f32"].nbytes == 768
    assert (
        table["b.f16"].shape == (2, 4, 32) and table["b.f16"].dtype == "f16" and table["b.f16"].nbytes == 512
    )
    assert (
        table["c.q8"].shape == (4, 64)
        and table["c.q8"].dtype == "q8_0"
        and table["c.q8"].nbytes == 4 * 2 * 34
    )

    # Same answers as gguf-py's reader, field by field and tensor by tensor.
    reader = info.reader
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "t.nested":  # gguf-py flattens nested arrays
            continue
        assert m[key] == pytest.approx(field.contents()), key
    for rt in reader.tensors:
        assert table[rt.name].shape == tuple(reversed(rt.shape.tolist()))
        assert table[rt.name].nbytes == rt.n_bytes and table[rt.name].dtype == rt.tensor_type.name.lower()
        np.testing.assert_array_equal(info.tensor_data(rt.name), rt.data)
    np.testing.assert_array_equal(info.tensor_data("a.f32"), arrays["a.f32"])
    np.testing.assert_array_equal(info.tensor_data("b.f16"), arrays["b.f16"])
    np.testing.assert_array_equal(info.tensor_data("c.q8"), arrays["c.q8"])


def test_reader_errors_become_format_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    infos, data = one_f32_tensor()
    info = read_gguf(write(tmp_path, gguf_bytes(infos=infos, data=data)))

    def broken(*_a, **_k):
        raise IndexError("index 0 is out of bounds for axis 0 with size 0")

    monkeypatch.setattr(gguf, "GGUFReader", broken)
    with pytest.raises(
        FormatError, match=r"gguf-py cannot parse the file \(IndexError: .*truncated or corrupt"
    ):
        info.reader  # noqa: B018


def test_alignment_and_empty_tensor_table(tmp_path: Path) -> None:
    kvs = [_kv("general.alignment", V.UINT32, struct.pack("<I", 64))]
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kvs[0] + _tensor_info("t", (4,), Q.F32, 0)
    blob = head + b"\0" * (-len(head) % 64) + np.ones(4, np.float32).tobytes()
    info = read_gguf(write(tmp_path, blob))
    assert info.alignment == 64 and info.data_offset % 64 == 0
    assert info.tensor_data("t").tolist() == [1.0] * 4
    assert read_gguf(write(tmp_path, gguf_bytes(), "none.gguf")).tensors == []


# ---- broken files: one FormatError line each, fast ----------------------------------------------
def test_wrong_magic(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"not a GGUF file \(magic b'PK\\x03\\x04'"):
        read_gguf(write(tmp_path, gguf_bytes(magic=b"PK\x03\x04")))


def test_too_small_and_missing(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="10 bytes is too small for a GGUF header"):
        read_gguf(write(tmp_path, b"GGUF\x03\x00\x00\x00\x00\x00"))
    with pytest.raises(FormatError, match="cannot read"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (99, r"unsupported GGUF version 99 \(llmctl reads versions 2 and 3\)"),
        (1, "version 1 is obsolete; re-convert"),
        (3 << 24, "big-endian GGUF files are not supported"),
    ],
)
def test_unsupported_versions(tmp_path: Path, version: int, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_gguf(write(tmp_path, gguf_bytes(version=version)))


def test_version_2_is_read(tmp_path: Path) -> None:
    infos, data = one_f32_tensor()
    assert read_gguf(write(tmp_path, gguf_bytes(infos=infos, data=data, version=2))).version == 2


def test_truncated_tensor_data(tmp_path: Path) -> None:
    infos, data = one_f32_tensor(64)
    path = write(tmp_path, gguf_bytes(infos=infos, data=data[:100]))
    with pytest.raises(
        FormatError,
        match=r"tensor 't.weight' ends at byte \d+ but the file has \d+ bytes; the tensor data is truncated",
    ):
        read_gguf(path)


def test_string_length_claiming_gigabytes(tmp_path: Path) -> None:
    key = struct.pack("<Q", 5 << 30) + b"general.architecture"  # a key claiming 5 GiB
    with pytest.raises(
        FormatError, match=r"metadata key 0 at byte 24 claims 5368709120 bytes but only \d+ remain"
    ):
        read_gguf(write(tmp_path, gguf_bytes(kvs=[key + struct.pack("<I", V.STRING) + _str("llama")])))
    value = _str("general.name") + struct.pack("<I", V.STRING) + struct.pack("<Q", 1 << 40) + b"x"
    with pytest.raises(
        FormatError, match=r"string value of 'general.name' at byte \d+ claims 1099511627776 bytes"
    ):
        read_gguf(write(tmp_path, gguf_bytes(kvs=[value]), "v.gguf"))


def test_tensor_and_kv_counts_beyond_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        FormatError,
        match=r"header claims 1099511627776 tensors and 1 metadata entries, more than a \d+-byte file can hold",
    ):
        read_gguf(write(tmp_path, gguf_bytes(n_tensors=2**40)))
    with pytest.raises(FormatError, match=r"header claims 0 tensors and 1099511627776 metadata entries"):
        read_gguf(write(tmp_path, gguf_bytes(n_kv=2**40), "kv.gguf"))


def test_array_claiming_2_40_elements_does_not_hang(tmp_path: Path) -> None:
    # gguf-py's GGUFReader would loop 2**40 times over empty views here.
    kv = _kv("tokenizer.ggml.scores", V.ARRAY, struct.pack("<IQ", V.FLOAT32, 2**40) + b"\0" * 16)
    t0 = time.perf_counter()
    with pytest.raises(
        FormatError, match=r"metadata array 'tokenizer.ggml.scores' claims 1099511627776 elements"
    ):
        read_gguf(write(tmp_path, gguf_bytes(kvs=[kv])))
    strings = _kv(
        "tokenizer.ggml.tokens", V.ARRAY, struct.pack("<IQ", V.STRING, 1000) + _str("a") + _str("b")
    )
    with pytest.raises(FormatError, match=r"metadata array 'tokenizer.ggml.tokens' claims 1000 elements"):
        read_gguf(write(tmp_path, gguf_bytes(kvs=[strings]), "s.gguf"))
    assert time.perf_counter() - t0 < 1.0


def test_unknown_tensor_type(tmp_path: Path) -> None:
    infos, data = one_f32_tensor(ggml_type=99)
    with pytest.raises(FormatError, match="tensor 't.weight' has unknown GGML type 99"):
        read_gguf(write(tmp_path, gguf_bytes(infos=infos, data=data)))
    infos, data = one_f32_tensor(ggml_type=4)  # Q4_2: removed from GGML long ago
    with pytest.raises(FormatError, match="tensor 't.weight' has unknown GGML type 4"):
        read_gguf(write(tmp_path, gguf_bytes(infos=infos, data=data), "q42.gguf"))


@pytest.mark.parametrize(
    ("kvs", "infos", "message"),
    [
        ([_kv("a", 77, b"\0" * 8)], [], "metadata key 'a' has unknown value type 77"),
        ([_kv("a", V.UINT8, b"\1"), _kv("a", V.UINT8, b"\2")], [], "metadata key 'a' appears twice"),
        (
            [_kv("general.alignment", V.UINT32, struct.pack("<I", 24))],
            [],
            "general.alignment is 24, not a power of two",
        ),
        (None, [_tensor_info("t", (8,), Q.F32, 0)] * 2, "tensor 't' appears twice"),
        (None, [_tensor_info("t", (8,), Q.F32, 4)], "data offset 4 is not a multiple of the alignment 32"),
        (None, [_tensor_info("t", (1, 1, 1, 1, 1), Q.F32, 0)], "tensor 't' has 5 dimensions"),
        (
            None,
            [_tensor_info("t", (48,), Q.Q8_0, 0)],
            r"rows of 48 values, not a multiple of the block size 32",
        ),
        (None, [_tensor_info("t", (2**40, 2**40), Q.F32, 0)], r"claims 1208925819614629174706176 elements"),
        (
            None,
            [_tensor_info("t", (8,), Q.F32, 0), _tensor_info("u", (8,), Q.F32, 0)],
            "tensors 't' and 'u' overlap",
        ),
        ([_kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 6)], [], "nests arrays deeper than 4"),
        (
            [_str(b"\xff\xfe") + struct.pack("<I", V.UINT8) + b"\1"],
            [],
            "metadata key 0 b'\\\\xff\\\\xfe' is not valid UTF-8",
        ),
    ],
)
def test_corrupt_headers(tmp_path: Path, kvs, infos, message: str) -> None:
    blob = gguf_bytes(kvs=kvs, infos=infos, data=b"\0" * 64)
    with pytest.raises(FormatError, match=message):
        read_gguf(write(tmp_path, blob))


def test_truncated_inside_the_header(tmp_path: Path) -> None:
    full = gguf_bytes(kvs=[_kv("general.architecture", V.STRING, _str("llama"))], infos=one_f32_tensor()[0])
    for cut in (30, 40, 60, 75):  # inside the key, the value, the tensor name, the dims
        with pytest.raises(FormatError, match="the file is truncated or corrupt"):
            read_gguf(write(tmp_path, full[:cut], f"cut{cut}.gguf"))


# ---- the bundled models --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_matches_gguf_reader() -> None:
    path = smollm2_path()
    info = read_gguf(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert info.metadata[key] == pytest.approx(field.contents()), key
    assert len(info.tensors) == len(reader.tensors) == 272
    for t, rt in zip(info.tensors, reader.tensors, strict=True):
        assert (t.name, t.shape, t.dtype, t.nbytes) == (
            rt.name, tuple(reversed(rt.shape.tolist())), rt.tensor_type.name.lower(), rt.n_bytes
        )  # fmt: skip
    assert info.data_offset == reader.data_offset
    cfg = info.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (
        "llama", 30, 3, True
    )  # fmt: skip
    assert cfg.rms_norm_eps == 1e-5


@pytest.mark.slow
def test_gemma3_header_is_fast_and_complete() -> None:
    path = gemma3_path()
    t0 = time.perf_counter()
    info = read_gguf(path)
    elapsed = time.perf_counter() - t0
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 262144 and tokens[2] == "<bos>" and tokens[106] == "<end_of_turn>"
    assert len(info.metadata["tokenizer.ggml.scores"]) == 262144
    assert len(info.tensors) == 236
    assert {t.dtype for t in info.tensors} == {"f32", "q5_0", "q4_k", "q8_0", "q6_k"}
    assert info.data_offset + sum(t.nbytes for t in info.tensors) <= path.stat().st_size
    cfg = info.config
    assert (cfg.model_type, cfg.vocab_size, cfg.num_key_value_heads, cfg.sliding_window) == (
        "gemma3_text", 262144, 1, 512
    )  # fmt: skip
    assert cfg.tie_word_embeddings and cfg.head_dim == 256
    assert elapsed < 3.0, f"read_gguf took {elapsed:.2f} s on the 262k-token vocabulary"  # ~0.15 s idle
