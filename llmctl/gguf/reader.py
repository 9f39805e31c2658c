"""Read GGUF files safely: metadata, tensor table and memory-mapped tensor data.

A GGUF file is a 24-byte header (magic ``b"GGUF"``, version, tensor count, key/value count), the key/value
metadata, one info record per tensor (name, dims, GGML type, offset) and the aligned tensor data
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

``read_gguf`` walks the header itself, bounds-checking every length and count against the file size
before it reads, so a corrupt or hostile file fails fast with a one-line ``FormatError`` instead of
hanging or allocating without bound (gguf-py's ``GGUFReader`` trusts the counts: an array claiming 2**40
elements makes it loop for ever). The walk is also fast: gguf-py builds two numpy views per vocabulary
string, which takes seconds for Gemma's 262k tokens. gguf-py's reader is still available as
``GGUFInfo.reader`` (built on first use, after validation); tensor data is read from a memory map, never
loaded whole, and ``GGUFInfo.dequantize`` gives one tensor as float32 numpy (no torch here).
"""

from __future__ import annotations

import itertools
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.checkpoint import TensorInfo
from llmctl.errors import FormatError, NotAvailableError

if TYPE_CHECKING:
    import numpy as np

    from llmctl.config import ModelConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), kv count (u64)
MIN_KV_BYTES = 12  # key length (u64) + value type (u32); the key and value add more
MIN_TENSOR_INFO_BYTES = 24  # name length (u64) + n_dims (u32) + type (u32) + offset (u64)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> (name, struct format, numpy dtype). STRING (8) and ARRAY (9) are handled apart.
_SCALARS: dict[int, tuple[str, str, str]] = {
    0: ("uint8", "<B", "<u1"),
    1: ("int8", "<b", "<i1"),
    2: ("uint16", "<H", "<u2"),
    3: ("int16", "<h", "<i2"),
    4: ("uint32", "<I", "<u4"),
    5: ("int32", "<i", "<i4"),
    6: ("float32", "<f", "<f4"),
    7: ("bool", "<B", "<u1"),
    10: ("uint64", "<Q", "<u8"),
    11: ("int64", "<q", "<i8"),
    12: ("float64", "<d", "<f8"),
}
_STRING, _ARRAY = 8, 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class _TensorEntry:
    info: TensorInfo
    ggml_type: int
    offset: int  # absolute, in the file


@dataclass
class GGUFInfo:
    """A validated GGUF file: decoded metadata, tensor table, and memory-mapped access to tensor data."""

    path: Path
    version: int
    alignment: int
    data_offset: int  # where the tensor data section starts
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    # each key's GGUF value type and, for an array, its element type (else None): what a copy keeps
    metadata_types: dict[str, tuple[int, int | None]] = field(default_factory=dict, repr=False)
    _entries: dict[str, _TensorEntry] = field(default_factory=dict, repr=False)

    @cached_property
    def config(self) -> ModelConfig:
        """The model config from metadata, completed from the tensor table: ``tie_word_embeddings`` when
        there is no output.weight, ``attention_bias``/``mlp_bias`` when the file holds those biases."""
        from llmctl.config import ModelConfig

        names = self._entries.keys()
        cfg = ModelConfig.from_gguf_metadata(self.metadata, source=str(self.path), tensor_names=names)
        if any(n.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias")) for n in names):
            cfg.attention_bias = True
        if any(n.endswith((".ffn_gate.bias", ".ffn_up.bias", ".ffn_down.bias")) for n in names):
            cfg.mlp_bias = True
        return cfg

    @cached_property
    def reader(self):  # -> gguf.GGUFReader
        """gguf-py's reader over the same file, built on first use (slow for large vocabularies)."""
        import gguf

        try:
            return gguf.GGUFReader(self.path)
        except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError, numpy errors
            raise FormatError(
                f"{self.path}: gguf-py cannot parse the file ({e.__class__.__name__}: {e}); "
                "the file is truncated or corrupt — re-download it"
            ) from None

    @cached_property
    def _memmap(self) -> np.ndarray:
        import numpy as np

        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def tensor_info(self, name: str) -> TensorInfo:
        return self._entries[name].info

    def ggml_type(self, name: str):  # -> gguf.GGMLQuantizationType
        import gguf

        return gguf.GGMLQuantizationType(self._entries[name].ggml_type)

    def tensor_data(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor, laid out as gguf-py's ``ReaderTensor.data``:
        a typed array in PyTorch dim order for float/int types, else uint8 rows of quant blocks, ready
        for ``gguf.quants.dequantize``."""
        import gguf
        import numpy as np

        entry = self._entries[name]
        info = entry.info
        raw = self._memmap[entry.offset : entry.offset + info.nbytes]
        qtype = gguf.GGMLQuantizationType(entry.ggml_type)
        plain = {
            gguf.GGMLQuantizationType.F32: np.float32,
            gguf.GGMLQuantizationType.F16: np.float16,
            gguf.GGMLQuantizationType.F64: np.float64,
            gguf.GGMLQuantizationType.I8: np.int8,
            gguf.GGMLQuantizationType.I16: np.int16,
            gguf.GGMLQuantizationType.I32: np.int32,
            gguf.GGMLQuantizationType.I64: np.int64,
        }
        if qtype in plain:
            return raw.view(np.dtype(plain[qtype]).newbyteorder("<")).reshape(info.shape)
        return raw.reshape(gguf.quant_shape_to_byte_shape(info.shape or (1,), qtype))

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy in its PyTorch-order shape: plain int/float types cast, quantized
        ones through ``gguf.quants.dequantize``. An F32 tensor may come back as a read-only view of the map."""
        import numpy as np
        from gguf.quants import dequantize

        _, dequantizable, plain = gguf_types()
        qtype = self.ggml_type(name)
        data = self.tensor_data(name)
        if qtype in plain:
            arr = data.astype(np.float32)
        elif qtype in dequantizable:
            arr = dequantize(data, qtype).astype(np.float32, copy=False)
        else:
            raise NotAvailableError(
                f"{self.path}: tensor {name!r} is stored as {qtype.name}, which gguf-py {_gguf_version()} "
                "cannot dequantize; re-quantize the model to another type (e.g. Q8_0, Q4_K_M)"
            )
        return arr.reshape(self._entries[name].info.shape)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        for t in self.tensors:
            yield t, self.tensor_data(t.name)


def read_gguf(path: str | Path) -> GGUFInfo:
    """Validate and read a GGUF file's header: metadata, tensor table, data extents.

    Raises ``FormatError`` naming the file and the problem for anything that is not a well-formed
    little-endian GGUF v2/v3 file whose tensors all lie inside it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < HEADER_BYTES:
            raise FormatError(
                f"{path}: {size} bytes is too small for a GGUF header ({HEADER_BYTES} bytes); "
                "the file is truncated or not a GGUF file"
            )
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _Parser(path, mm, len(mm)).parse()
    except OSError as e:
        raise FormatError(
            f"{path}: cannot read ({e.strerror or e}); check the path and permissions"
        ) from None


class _Parser:
    def __init__(self, path: Path, buf: mmap.mmap, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}")

    # ---- primitives, all bounds-checked ---------------------------------------------------------
    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} at byte {self.pos} needs {n} bytes but only {self.size - self.pos} remain; "
                "the file is truncated or corrupt — re-download it"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} at byte {self.pos - 8} claims {n} bytes but only {self.size - self.pos} remain; "
                "the file is truncated or corrupt — re-download it"
            )
        s = self.buf[self.pos : self.pos + n]
        self.pos += n
        return s

    def name(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} {raw[:40]!r} is not valid UTF-8; the file is corrupt") from None

    # ---- values ---------------------------------------------------------------------------------
    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            _, fmt, _ = _SCALARS[vtype]
            n = struct.calcsize(fmt)
            self.need(n, f"value of {key!r}")
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += n
            if vtype == 7:
                return bool(v)
            if vtype == 6:  # shortest decimal that round-trips through float32: 1e-05, not 9.99999974e-06
                return _short_f32(v) if math.isfinite(v) else v
            return v
        if vtype == _STRING:
            return self.raw_string(f"string value of {key!r}").decode("utf-8", errors="replace")
        if vtype == _ARRAY:
            return self.array(key, depth)
        raise self.fail(
            f"metadata key {key!r} has unknown value type {vtype}; the file is corrupt or from a newer "
            "GGUF version"
        )

    def array(self, key: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(
                f"metadata key {key!r} nests arrays deeper than {MAX_ARRAY_NESTING}; the file is corrupt"
            )
        itype = self.u32(f"array type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        if itype in _SCALARS:
            min_size = struct.calcsize(_SCALARS[itype][1])
        elif itype == _STRING:
            min_size = 8
        elif itype == _ARRAY:
            min_size = 12
        else:
            raise self.fail(f"metadata array {key!r} has unknown element type {itype}; the file is corrupt")
        if count > (self.size - self.pos) // min_size:
            raise self.fail(
                f"metadata array {key!r} claims {count} elements of at least {min_size} bytes but only "
                f"{self.size - self.pos} bytes remain; the file is truncated or corrupt — re-download it"
            )
        if itype in _SCALARS:
            import numpy as np

            arr = np.frombuffer(self.buf, dtype=_SCALARS[itype][2], count=count, offset=self.pos)
            self.pos += count * min_size
            return arr.astype(bool).tolist() if itype == 7 else arr.tolist()
        if itype == _STRING:
            return self.string_array(key, count)
        return [self.array(key, depth + 1) for _ in range(count)]

    def string_array(self, key: str, count: int) -> list[str]:
        # The hot loop for vocabularies (262k strings for Gemma): local names, no per-item helpers.
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                raise self.fail(
                    f"metadata array {key!r} ends at element {i} of {count}; the file is truncated or corrupt"
                )
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                raise self.fail(
                    f"string {i} of {key!r} at byte {pos - 8} claims {n} bytes but only {size - pos} remain; "
                    "the file is truncated or corrupt — re-download it"
                )
            append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out

    # ---- the file -------------------------------------------------------------------------------
    def parse(self) -> GGUFInfo:
        try:
            return self._parse()
        except FormatError:
            raise
        except (ValueError, IndexError, KeyError, OverflowError, struct.error, MemoryError) as e:
            raise self.fail(
                f"cannot parse GGUF header ({e.__class__.__name__}: {e}); the file is truncated or corrupt"
            ) from None

    def _parse(self) -> GGUFInfo:
        magic = bytes(self.buf[0:4])
        if magic != GGUF_MAGIC:
            raise self.fail(
                f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}); pass a .gguf model file"
            )
        self.pos = 4
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if version & 0xFFFF == 0 and swapped in SUPPORTED_VERSIONS:
                raise self.fail(
                    "big-endian GGUF files are not supported; convert the model on a little-endian machine"
                )
            hint = (
                "version 1 is obsolete; re-convert the model with a current llama.cpp"
                if version == 1
                else "the file is corrupt or from a newer GGUF version"
            )
            raise self.fail(f"unsupported GGUF version {version} (llmctl reads versions 2 and 3); {hint}")
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata count")
        room = self.size - HEADER_BYTES
        if (
            n_tensors > room // MIN_TENSOR_INFO_BYTES
            or n_kv > room // MIN_KV_BYTES
            or (n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > room)
        ):
            raise self.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than a {self.size}-byte "
                "file can hold; the file is truncated or corrupt — re-download it"
            )

        metadata: dict[str, Any] = {}
        types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            key = self.name(f"metadata key {i}")
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice; the file is corrupt")
            vtype = self.u32(f"value type of {key!r}")
            sub = None
            if vtype == _ARRAY and self.size - self.pos >= 4:  # the element type, read again by array()
                (sub,) = _U32.unpack_from(self.buf, self.pos)
            metadata[key] = self.value(vtype, key)
            types[key] = (vtype, sub)

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise self.fail(f"general.alignment is {alignment!r}, not a power of two; the file is corrupt")

        import gguf

        raw_infos: list[tuple[str, tuple[int, ...], int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            name = self.name(f"name of tensor {i}")
            if name in seen:
                raise self.fail(f"tensor {name!r} appears twice; the file is corrupt")
            seen.add(name)
            n_dims = self.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise self.fail(
                    f"tensor {name!r} has {n_dims} dimensions (GGML allows {MAX_DIMS}); the file is corrupt"
                )
            ne = tuple(self.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
            ggml_type = self.u32(f"type of tensor {name!r}")
            offset = self.u64(f"data offset of tensor {name!r}")
            raw_infos.append((name, ne, ggml_type, offset))
        pad = -self.pos % alignment
        data_offset = self.pos + pad
        data_size = self.size - data_offset

        tensors: list[TensorInfo] = []
        entries: dict[str, _TensorEntry] = {}
        for name, ne, ggml_type, offset in raw_infos:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self.fail(
                    f"tensor {name!r} has unknown GGML type {ggml_type}; the file is corrupt or needs a newer "
                    "gguf package (pip install -U gguf)"
                ) from None
            numel = math.prod(ne)
            claimed = math.prod(max(d, 1) for d in ne)  # bounds every dimension, also one beside a 0
            if claimed >= 1 << 62:
                raise self.fail(
                    f"tensor {name!r} has dimensions {list(ne)}: it claims {claimed} elements; the file is corrupt"
                )
            if ne and ne[0] % block:
                raise self.fail(
                    f"tensor {name!r} ({qtype.name}) has rows of {ne[0]} values, not a multiple of the "
                    f"block size {block}; the file is corrupt"
                )
            nbytes = numel // block * type_size
            if offset % alignment:
                raise self.fail(
                    f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}; "
                    "the file is corrupt"
                )
            if offset > data_size or nbytes > data_size - offset:
                raise self.fail(
                    f"tensor {name!r} ends at byte {data_offset + offset + nbytes} but the file has "
                    f"{self.size} bytes; the tensor data is truncated — re-download the file"
                )
            info = TensorInfo(name, tuple(reversed(ne)), qtype.name.lower(), nbytes)
            tensors.append(info)
            entries[name] = _TensorEntry(info, ggml_type, data_offset + offset)

        spans = sorted((e.offset, e.offset + e.info.nbytes, n) for n, e in entries.items() if e.info.nbytes)
        for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
            if begin < end:
                raise self.fail(f"tensors {a!r} and {b!r} overlap in the data section; the file is corrupt")

        return GGUFInfo(
            path=self.path,
            version=version,
            alignment=alignment,
            data_offset=data_offset,
            metadata=metadata,
            tensors=tensors,
            metadata_types=types,
            _entries=entries,
        )


def _short_f32(v: float) -> float:
    """The shortest decimal that rounds to the same float32 (what numpy prints), as a Python float."""
    for digits in range(6, 10):
        s = float(f"{v:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", s))[0] == v:
            return s
    return v


def gguf_types():  # -> (GGMLQuantizationType, the types gguf-py dequantizes, plain types cast directly)
    import gguf

    Q = gguf.GGMLQuantizationType
    # Types gguf.quants.dequantize handles (gguf-py 0.19); tests/test_gguf_loader.py checks this list against it.
    dequantizable = {
        Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
        Q.Q6_K, Q.TQ1_0, Q.TQ2_0, Q.MXFP4, Q.NVFP4, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
        Q.IQ1_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS,
    }  # fmt: skip
    plain = {Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}  # cast directly
    return Q, dequantizable, plain


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
