"""Evaluation windows: which token ids are fed to the model and which of its predictions are scored.

An evaluation is a list of ``Window``s. Three protocols build them (docs/eval.md has worked examples):

* ``llama.cpp`` (``llama_cpp_windows``): what ``llama-perplexity`` does (tools/perplexity/perplexity.cpp).
  The whole text is tokenized once (BOS prepended when the model adds one), cut into ``len // context``
  non-overlapping chunks; the first token of each chunk becomes BOS (when the model adds one); the
  predictions of positions ``context/2 .. context-2`` are scored (``context - 1 - context/2`` tokens per
  chunk). It needs at least two chunks of text, as llama-perplexity does.
* ``sliding`` (``sliding_windows``): Hugging Face's strided perplexity: windows of ``context`` tokens
  every ``stride`` tokens; each window scores the tokens past the previous window's end, so with
  ``stride < context`` every token but the text's first is scored once, with at least ``context - stride``
  tokens of context (``stride == context``: disjoint windows, whose first tokens are not scored).
* ``documents`` (``document_windows``): lm-evaluation-harness's rolling loglikelihood: each document
  alone, BOS (else EOS) first, its tokens predicted in disjoint windows of ``context`` tokens; reported with
  word and byte perplexity and bits per byte, which do not depend on the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmctl.errors import UsageError

PROTOCOLS = ("llama.cpp", "sliding", "documents")


@dataclass(frozen=True)
class Window:
    """Rows ``first, first + 1, …`` of the model's output on ``ids`` predict ``targets``."""

    ids: tuple[int, ...]
    first: int
    targets: tuple[int, ...]
    doc: int = 0


# ---- protocols -------------------------------------------------------------------------------------
def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def llama_cpp_windows(tokens: Sequence[int], context: int, bos_id: int | None) -> list[Window]:
    """perplexity.cpp's chunks: ``len(tokens) // context`` disjoint windows, the first id of each replaced
    by ``bos_id`` (None: the model adds no BOS, keep it), rows ``context/2 ..`` scored."""
    check_positive("--context", context, 4)
    if len(tokens) < 2 * context:
        raise UsageError(
            f"the text is {len(tokens)} tokens; the llama.cpp protocol needs at least 2 × --context = "
            f"{2 * context} tokens (two windows of {context}); pass more text or a smaller --context"
        )
    first = context // 2
    windows = []
    for i in range(len(tokens) // context):
        chunk = tuple(tokens[i * context : (i + 1) * context])
        ids = chunk if bos_id is None else (bos_id, *chunk[1:])
        windows.append(Window(ids, first, chunk[first + 1 :]))
    return windows


def sliding_windows(tokens: Sequence[int], context: int, stride: int) -> list[Window]:
    """Hugging Face's strided windows: starts every ``stride`` tokens, each scoring only the tokens past
    the previous window's end (and never a window's first token, which has nothing to be predicted from)."""
    check_positive("--context", context, 2)
    check_positive("--stride", stride)
    if stride > context:
        raise UsageError(f"--stride ({stride}) must not exceed --context ({context}): tokens would be skipped")
    if len(tokens) < 2:
        raise UsageError(f"the text is {len(tokens)} token(s); perplexity needs at least 2")
    windows, prev_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + context, len(tokens))
        ids = tuple(tokens[begin:end])
        start = max(len(ids) - (end - prev_end), 1)  # index in ids of the first new (scored) token
        windows.append(Window(ids, start - 1, ids[start:]))
        prev_end = end
        if end == len(tokens):
            break
    return windows


def document_windows(docs: Sequence[Sequence[int]], context: int, prefix_id: int) -> list[Window]:
    """lm-evaluation-harness's rolling windows (``get_rolling_token_windows`` with context_len 1), per
    document: ``[prefix] + doc[:context-1]`` predicts ``doc[:context]``; later windows predict the next
    ``context`` tokens (the last one fewer) from the ``context`` tokens before each."""
    check_positive("--context", context, 2)
    windows = []
    for d, toks in enumerate(docs):
        toks = tuple(toks)
        if not toks:
            continue
        n0 = min(context, len(toks))
        windows.append(Window((prefix_id, *toks[: n0 - 1]), 0, toks[:n0], d))
        predicted = n0
        while predicted < len(toks):
            pred = min(len(toks) - predicted, context)
            end = predicted + pred
            ids = toks[end - context - 1 : end - 1]
            windows.append(Window(ids, len(ids) - pred, toks[end - pred : end], d))
            predicted = end
    if not windows:
        raise UsageError("the text has no tokens; evaluation needs some text")
    return windows


def windows_digest(windows: Sequence[Window]) -> str:
    """sha256 of what is scored (fed ids, scored rows, targets): equal digests, comparable log-probs."""
    h = hashlib.sha256()
    for w in windows:
        h.update(json.dumps([w.ids, w.first, w.targets]).encode())
    return h.hexdigest()


def build_windows(
    protocol: str,
    tokenizer: Any,
    docs: Sequence[Any],
    *,
    context: int,
    stride: int | None,
    max_tokens: int | None,
    chunks: int | None,
) -> list[Window]:
    """Tokenize ``docs`` (corpus.Document) and cut them into the protocol's windows. With ``chunks`` or
    ``max_tokens`` only the text those windows use is tokenized (``corpus.encode_prefix``): the windows are
    those of the whole text's tokens, cut short."""
    from llmctl.runtime.corpus import encode_prefix, nonblank

    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown --protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if max_tokens is not None:
        check_positive("--max-tokens", max_tokens)
    if chunks is not None:
        check_positive("--chunks", chunks)
    if protocol == "documents":
        if stride is not None:
            raise UsageError("--stride is for --protocol sliding; documents are scored in disjoint windows")
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else min(tokenizer.eos_ids, default=None)
        if prefix is None:
            raise UsageError("the documents protocol needs a BOS or EOS token to start each document")
        check_positive("--context", context, 2)
        toks, left, n_windows = [], max_tokens, 0
        for d in nonblank(docs):
            if left == 0 or (chunks is not None and n_windows >= chunks):
                break  # the documents past what is scored are never read
            cap = left if chunks is None else min(left or 2**62, (chunks - n_windows) * context)
            ids = encode_prefix(lambda t: tokenizer.encode(t, add_bos=False), d, cap)
            if left is not None:
                left -= len(ids)
            toks.append(ids)
            n_windows += math.ceil(len(ids) / context)  # document_windows' count for the document
        windows = document_windows(toks, context, prefix)
    else:
        need = max_tokens
        if chunks is not None:  # the tokens the first ``chunks`` windows cover
            check_positive("--context", context, 2)
            if protocol == "llama.cpp":  # (which needs two windows of text, however many are scored)
                span = max(chunks, 2) * context
            else:
                span = context + (chunks - 1) * (stride or context // 2)
            need = span if need is None else min(need, span)
        tokens = encode_prefix(tokenizer.encode, list(docs), need)  # BOS once when the model adds one
        if protocol == "llama.cpp":
            if stride is not None:
                raise UsageError("--stride is for --protocol sliding; llama.cpp windows do not overlap")
            bos = tokenizer.bos_id if tokenizer.add_bos_default else None
            windows = llama_cpp_windows(tokens, context, bos)
        else:
            windows = sliding_windows(tokens, context, stride if stride is not None else context // 2)
    return windows[:chunks] if chunks is not None else windows
