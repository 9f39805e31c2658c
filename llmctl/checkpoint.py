"""Tensor tables of checkpoints, read from headers only: safetensors headers and GGUF tensor infos.

Nothing here loads tensor data. Readers validate what they read (sizes, offsets, counts) against the
file and raise ``FormatError`` with the file name and what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import FormatError


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint. ``dtype`` is a safetensors dtype ("BF16", "F32", ...) or a GGUF type
    name in lower case ("q4_k", "f16", ...). ``nbytes`` is its exact stored size."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---- safetensors ---------------------------------------------------------------------------------
# https://github.com/huggingface/safetensors: 8-byte little-endian header length, a JSON header
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
    "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}  # fmt: skip
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_safetensors_header(path: str | Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensor table and ``__metadata__`` of one .safetensors file, validated against the file size."""
    import json
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{path}: truncated safetensors file ({size} bytes, no header); re-download it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise FormatError(
                    f"{path}: safetensors header claims {n} bytes but the file has {size}; "
                    "the file is truncated or not safetensors — re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise FormatError(
            f"{path}: cannot read ({e.strerror or e}); check the path and permissions"
        ) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(
            f"{path}: safetensors header is not valid JSON; the file is corrupt — re-download it"
        ) from None
    except RecursionError:  # brackets nested thousands deep
        raise FormatError(f"{path}: safetensors header nests JSON too deeply; the file is corrupt") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(
            f"{path}: safetensors __metadata__ is not an object of strings; the file is corrupt"
        )
    data_len = size - 8 - n
    tensors: list[TensorInfo] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            if not isinstance(dtype, str):
                raise TypeError(dtype)
            shape = tuple(_json_int(s) for s in info["shape"])
            begin, end = (_json_int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise FormatError(
                f"{path}: tensor {name!r} has a malformed header entry (dtype, shape and data_offsets must be "
                "a string and lists of integers); the file is corrupt"
            ) from None
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise FormatError(f"{path}: tensor {name!r} has a negative shape or offsets; the file is corrupt")
        if end > data_len:
            raise FormatError(
                f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds {data_len}; "
                "the file is truncated — re-download it"
            )
        expected = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if end - begin != expected:
            raise FormatError(
                f"{path}: tensor {name!r} is {dtype}{list(shape)} ({expected} bytes) but its offsets span "
                f"{end - begin} bytes; the header is corrupt"
            )
        tensors.append(TensorInfo(name, shape, dtype, expected))
        spans.append((begin, end, name))
    # As the safetensors library requires: tensors tile the data section exactly, no overlap, no gap.
    spans.sort()
    reach, owner = 0, ""
    for begin, end, name in spans:
        if begin < reach and end > begin:
            raise FormatError(
                f"{path}: tensors {owner!r} and {name!r} overlap in the data section; the file is corrupt"
            )
        if begin > reach:
            raise FormatError(
                f"{path}: {begin - reach} unused bytes before tensor {name!r} in the data section; "
                "the file is corrupt — re-download it"
            )
        if end > reach:
            reach, owner = end, name
    if reach != data_len:
        raise FormatError(
            f"{path}: {data_len - reach} bytes after the last tensor's data; the file is corrupt or was "
            "written incompletely — re-download it"
        )
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _json_int(v: object) -> int:
    """A JSON integer as the safetensors library requires one: not ``"64"``, ``64.5`` or ``true``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(v)
    return v


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: those named by model.safetensors.index.json, else *.safetensors."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):  # ValueError: JSON
            raise FormatError(f"{index}: malformed index (no weight_map object); re-download it") from None
        files = [folder / n for n in names]
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise FormatError(f"{index} names shard(s) that are missing: {', '.join(missing)}; download them")
        return files
    return sorted(folder.glob("*.safetensors"))


def read_folder_tensors(folder: Path) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    for f in safetensors_files(folder):
        tensors.extend(read_safetensors_header(f)[0])
    return tensors
