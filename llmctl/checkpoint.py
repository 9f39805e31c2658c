"""Tensor tables of checkpoints, read from headers only: safetensors headers and GGUF tensor infos.

Nothing here loads tensor data. Readers validate what they read (sizes, offsets, counts) against the
file and raise ``FormatError`` with the file name and what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
