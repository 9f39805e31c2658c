"""The log-probabilities file: ``llmctl eval --save-logits`` writes a model's top-k log-probs per scored
token as safetensors (no pickle), ``--baseline-logits`` reads them back as a baseline."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.errors import FormatError, SourceError, UsageError
from llmctl.runtime.eval.logprobs import TopK

if TYPE_CHECKING:
    import torch

    from llmctl.runtime.eval.windows import Window

LOGITS_FORMAT = "llmctl-logits"
LOGITS_VERSION = "1"


def save_logits(path: str | Path, parts: Sequence[TopK], meta: dict[str, str]) -> None:
    """Write top-k log-probs as safetensors (no pickle), through a temporary file then rename."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        "topk_ids": torch.cat([p.ids for p in parts]).contiguous(),
        "topk_logp": torch.cat([p.logp for p in parts]).contiguous(),
        "target_logp": torch.cat([p.target_logp for p in parts]).contiguous(),
    }
    meta = {"format": LOGITS_FORMAT, "version": LOGITS_VERSION, **meta}
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--save-logits {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class SavedLogits:
    path: Path
    meta: dict[str, str]
    ids: torch.Tensor
    logp: torch.Tensor
    target_logp: torch.Tensor

    def rows(self, windows: Sequence[Window]) -> Iterator[TopK]:
        at = 0
        for w in windows:
            n = len(w.targets)
            yield TopK(self.ids[at : at + n], self.logp[at : at + n], self.target_logp[at : at + n])
            at += n


def load_logits(path: str | Path) -> SavedLogits:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"--baseline-logits {path}: no such file; create one with --save-logits")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != LOGITS_FORMAT:
                raise FormatError(
                    f"{path}: not a log-probabilities file written by `llmctl eval --save-logits`"
                )
            if meta.get("version") != LOGITS_VERSION:
                raise FormatError(
                    f"{path}: log-probabilities format version {meta.get('version')!r}, this llmctl reads "
                    f"{LOGITS_VERSION}; save the baseline again"
                )
            ids, logp, tgt = f.get_tensor("topk_ids"), f.get_tensor("topk_logp"), f.get_tensor("target_logp")
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise FormatError(
            f"{path}: not a log-probabilities file written by `llmctl eval --save-logits`, or damaged ({e})"
        ) from None
    if not (ids.ndim == 2 and ids.shape == logp.shape and tgt.shape == ids.shape[:1]):
        raise FormatError(f"{path}: inconsistent tensor shapes; the file is damaged, save the baseline again")
    vocab = meta.get("vocab_size", "")
    n = int(vocab) if vocab.isdecimal() else 0
    if (
        not n
        or ids.is_floating_point()
        or ids.is_complex()
        or (ids.numel() and not 0 <= ids.min() <= ids.max() < n)
    ):
        raise FormatError(
            f"{path}: token ids outside the vocabulary (vocab_size {vocab!r} in its metadata); the file is "
            "damaged, save the baseline again"
        )
    return SavedLogits(path, meta, ids, logp, tgt)
