"""Streaming safetensors I/O for quantization: positioned reads of row ranges, and a writer whose header
is written first (every size is known from the plan) and whose tensors are filled in chunks.

Reads use ``os.pread`` into fresh buffers rather than a memory map, so pages of a 16 GB input never pile up
in the process's resident set: peak memory is the chunk being worked on, whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import FormatError, QuantError

ST_DTYPES = {  # safetensors dtype → torch dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def st_dtype(dtype: Any) -> str:
    """The safetensors name of a torch dtype (torch.bfloat16 → 'BF16')."""
    return TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def torch_dtype(st: str) -> Any:
    import torch

    return getattr(torch, ST_DTYPES[st])


def itemsize(st: str) -> int:
    from llmctl.checkpoint import SAFETENSORS_DTYPE_BYTES

    return SAFETENSORS_DTYPE_BYTES[st]


@dataclass(frozen=True)
class Entry:
    """A tensor of a safetensors file: where its bytes are."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    nbytes: int


def index_file(path: Path) -> dict[str, Entry]:
    """name → Entry for one .safetensors file (header already validated by llmctl.checkpoint)."""
    from llmctl.checkpoint import read_safetensors_header

    read_safetensors_header(path)  # validates sizes, offsets, overlaps
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {
        name: Entry(
            path,
            info["dtype"],
            tuple(info["shape"]),
            8 + n + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in header.items()
    }


def read_rows(entry: Entry, start: int = 0, stop: int | None = None) -> Any:
    """Rows [start, stop) of a tensor seen as (numel / cols, cols), in its stored dtype (a 1-D tensor is
    one row)."""
    import torch

    cols = entry.shape[-1] if entry.shape else 1
    rows = math.prod(entry.shape) // cols if cols else 0
    stop = rows if stop is None else stop
    row_bytes = cols * itemsize(entry.dtype)
    n = (stop - start) * row_bytes
    dtype = torch_dtype(entry.dtype)
    if n == 0:
        return torch.empty((stop - start, cols), dtype=dtype)
    buf = bytearray(n)
    view = memoryview(buf)
    fd = os.open(entry.file, os.O_RDONLY)
    try:
        done = 0
        while done < n:
            k = os.preadv(fd, [view[done:]], entry.begin + start * row_bytes + done)
            if k <= 0:
                raise FormatError(
                    f"{entry.file}: unexpected end of file; the file is truncated — re-download it"
                )
            done += k
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=dtype).reshape(stop - start, cols)


class Writer:
    """One .safetensors file: ``Writer(path, [(name, dtype, shape)], metadata)`` writes the header at once;
    ``append(name, tensor)`` adds the next bytes of that tensor; ``close()`` checks every tensor is full.

    The bytes are written by a thread of the writer's own (``pwrite`` releases the GIL), so quantizing the
    next tensor overlaps writing the last; at most ``BACKLOG`` bytes wait (``append`` blocks beyond that).
    A tensor handed to ``append`` must not change afterwards (every caller passes fresh tensors or views of
    tensors it no longer writes to). A write's error is raised by the next ``append`` or by ``close``."""

    BACKLOG = 256 << 20

    def __init__(
        self, path: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
    ):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.spans: dict[str, tuple[int, int]] = {}
        for name, dtype, shape in entries:
            n = itemsize(dtype)
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.spans[name] = (offset, n)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)  # data starts 8-aligned, as safetensors writes it
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.path = path
        self.done = dict.fromkeys(self.spans, 0)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.size)
        self._jobs: deque[tuple[memoryview, int, Any] | None] = deque()
        self._waiting = 0  # bytes queued, not yet written
        self._error: BaseException | None = None
        self._skip = False  # abort(): drop what is queued
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name=f"write {path.name}", daemon=True)
        self._thread.start()

    @staticmethod
    def file_size(entries: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> int:
        """The exact size of the file these entries make (header included)."""
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in entries:
            n = itemsize(dtype)
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = len(json.dumps(header, separators=(",", ":")).encode())
        return 8 + raw + (-raw) % 8 + offset

    def append(self, name: str, tensor: Any) -> None:
        begin, n = self.spans[name]
        data = tensor.contiguous().reshape(-1).view(-1)
        raw = memoryview(data.view(__import__("torch").uint8).numpy()) if data.numel() else memoryview(b"")
        at = self.done[name]
        if at + len(raw) > n:
            raise QuantError(f"internal error: {name} got {at + len(raw)} bytes, its header says {n}")
        self.done[name] = at + len(raw)
        with self._cv:
            while self._waiting > self.BACKLOG and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise self._error
            self._waiting += len(raw)
            self._jobs.append((raw, self.data_start + begin + at, data))
            self._cv.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                job = self._jobs.popleft()
            if job is None:
                return
            view, off, _ = job
            n = len(view)
            try:
                while len(view) and not self._skip and self._error is None:
                    k = os.pwrite(self.fd, view, off)
                    view, off = view[k:], off + k
            except BaseException as e:  # raised in the caller's thread
                self._error = e
            with self._cv:
                self._waiting -= n
                self._cv.notify_all()

    def _stop(self) -> None:
        with self._cv:
            self._jobs.append(None)
            self._cv.notify_all()
        self._thread.join()

    def abort(self) -> None:
        self._skip = True
        self._stop()
        os.close(self.fd)

    def close(self) -> None:
        self._stop()
        short = [k for k, (_, n) in self.spans.items() if self.done[k] != n]
        os.close(self.fd)
        if self._error is not None:
            raise self._error
        if short:
            raise QuantError(
                f"internal error: {self.path.name}: tensors not fully written: {', '.join(short[:5])}"
            )
