"""Perplexity and KL divergence: evaluation protocols, scoring backends and their statistics.

An evaluation is a list of ``Window``s (the token ids fed to the model, and which of its predictions are
scored), a backend that turns each window into log-probabilities of the scored rows, and pure statistics
over the per-token results. Three protocols build the windows (docs/eval.md has worked examples):

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

Statistics follow perplexity.cpp: PPL ± ``ppl * sqrt((<nll²> - <nll>²) / (N - 1))``; with a baseline, mean
KLD ± its standard error, median and percentiles (linear interpolation), ln(PPL/PPL_base) and PPL - PPL_base
with the covariance of the two nll series, "same top" and Δp = p(correct) - p_base(correct).

Memory: only the scored rows of each window get a vocabulary projection (a hook on the final norm keeps
those rows), and log-softmax is taken per window; nothing holds the logits of the whole text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import FormatError, SourceError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

PROTOCOLS = ("llama.cpp", "sliding", "documents")
BACKENDS = ("torch", "llama.cpp", "vllm")
DEFAULT_CONTEXT = 512
DEFAULT_TOP_K = 128  # log-probabilities per token that --save-logits keeps
LOGITS_FORMAT = "llmctl-logits"
LOGITS_VERSION = "1"


@dataclass(frozen=True)
class Window:
    """Rows ``first, first + 1, …`` of the model's output on ``ids`` predict ``targets``."""

    ids: tuple[int, ...]
    first: int
    targets: tuple[int, ...]
    doc: int = 0


# ---- protocols -------------------------------------------------------------------------------------
def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def llama_cpp_windows(tokens: Sequence[int], context: int, bos_id: int | None) -> list[Window]:
    """perplexity.cpp's chunks: ``len(tokens) // context`` disjoint windows, the first id of each replaced
    by ``bos_id`` (None: the model adds no BOS, keep it), rows ``context/2 ..`` scored."""
    _check_positive("--context", context, 4)
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
    _check_positive("--context", context, 2)
    _check_positive("--stride", stride)
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
    _check_positive("--context", context, 2)
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


# ---- statistics (pure, numpy) ---------------------------------------------------------------------
def perplexity_stats(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its standard error) as perplexity.cpp prints them."""
    import numpy as np

    n = len(nll)
    if n == 0:
        raise UsageError("nothing was scored; pass more text")
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    var = float(np.mean(np.square(nll))) - mean * mean
    return ppl, (ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error; perplexity.cpp's rule: no error below 11 values."""
    import numpy as np

    n = len(values)
    if n < 1:
        return 0.0, 0.0
    f = float(np.mean(values))
    df = float(np.mean(np.square(values))) - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(np.mean(a)) * float(np.mean(b))) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's percentile: linear interpolation between neighbours of a sorted array."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


@dataclass
class KLStats:
    """A model against a baseline on the same tokens (perplexity.cpp's --kl-divergence statistics)."""

    mean: float
    mean_stderr: float
    median: float
    p90: float
    p99: float
    maximum: float
    ppl: float
    ppl_base: float
    ppl_stderr: float
    ppl_base_stderr: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    delta_ppl: float
    delta_ppl_stderr: float
    same_top: float  # fraction of tokens where both models' most likely token is the same
    same_top_stderr: float
    delta_p_mean: float  # mean of p(correct) - p_base(correct)
    delta_p_stderr: float
    delta_p_median: float
    delta_p_rms: float
    tokens: int
    approximate: bool = False  # KL from a saved top-k baseline: the tail summed into one bucket


def kl_stats(
    kld: np.ndarray, nll: np.ndarray, nll_base: np.ndarray, same_top: np.ndarray, *, approximate: bool = False
) -> KLStats:
    import numpy as np

    n = len(kld)
    ks = np.sort(kld)
    log_ppl, log_ppl_unc = mean_and_uncertainty(nll)
    log_base, log_base_unc = mean_and_uncertainty(nll_base)
    cov = covariance_of_means(nll, nll_base)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
    ratio_unc2 = log_ppl_unc**2 + log_base_unc**2 - 2 * cov
    diff_unc2 = ppl_unc**2 + ppl_base_unc**2 - 2 * ppl * ppl_base * cov
    kl_mean, kl_unc = mean_and_uncertainty(kld)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    dp_mean, dp_unc = mean_and_uncertainty(p_diff)
    top = float(np.mean(same_top))
    return KLStats(
        mean=kl_mean,
        mean_stderr=kl_unc,
        median=percentile(ks, 0.5),
        p90=percentile(ks, 0.90),
        p99=percentile(ks, 0.99),
        maximum=float(ks[-1]),
        ppl=ppl,
        ppl_base=ppl_base,
        ppl_stderr=ppl_unc,
        ppl_base_stderr=ppl_base_unc,
        ln_ppl_ratio=log_ppl - log_base,
        ln_ppl_ratio_stderr=math.sqrt(max(ratio_unc2, 0.0)),
        delta_ppl=ppl - ppl_base,
        delta_ppl_stderr=math.sqrt(max(diff_unc2, 0.0)),
        same_top=top,
        same_top_stderr=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        delta_p_mean=dp_mean,
        delta_p_stderr=dp_unc,
        delta_p_median=percentile(np.sort(p_diff), 0.5),
        delta_p_rms=float(np.sqrt(np.mean(np.square(p_diff)))),
        tokens=n,
        approximate=approximate,
    )


def word_count(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))


# ---- per-row computations on log-probabilities (torch) ------------------------------------------------
def kl_rows(logp: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per row, both (n, vocab) log-probabilities: Σ p_base (log p_base - log p)."""
    import torch

    p = base_logp.exp()
    return torch.where(p > 0, p * (base_logp - logp), 0.0).sum(-1, dtype=torch.float64)


def kl_rows_topk(logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) when only the baseline's top-k log-probs are known: the tokens outside its top k
    form one bucket in both distributions. This is a lower bound of the full KL (merging outcomes never
    increases it), exact when the baseline's tail holds no mass."""
    import torch

    q_top = logp.gather(-1, top_ids.long()).double()  # (n, k)
    p_top = top_logp.double()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    p_tail = (1 - p_top.exp().sum(-1)).clamp_min(0)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-30)
    # a tail below 1e-6 is float rounding of a top-k that holds the whole distribution
    tail = torch.where(p_tail > 1e-6, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    return kl + tail


def kl_rows_topk_both(rows: TopK, base: TopK, targets: torch.Tensor) -> torch.Tensor:
    """KL(base || model) when only the top-k log-probs of both (and of the correct token) are known, as vLLM
    gives them: the tokens known in both distributions keep their own terms, every other token goes into
    one bucket in both. A lower bound of the full KL (merging outcomes never increases it), as
    ``kl_rows_topk``'s, and the same figure when the model's list holds the baseline's."""
    import torch

    def with_target(t: TopK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = t.ids.long()  # (n, k)
        listed = (ids == targets[:, None]).any(-1, keepdim=True)  # (n, 1): the correct token is in the list
        valid = torch.cat([torch.ones_like(ids, dtype=torch.bool), ~listed], dim=1)  # (n, k + 1)
        return torch.cat([ids, targets[:, None]], 1), torch.cat([t.logp, t.target_logp[:, None]], 1).double(), valid

    p_ids, p_lp, p_ok = with_target(base)
    q_ids, q_lp, q_ok = with_target(rows)
    match = (p_ids[:, :, None] == q_ids[:, None, :]) & p_ok[:, :, None] & q_ok[:, None, :]  # (n, kp+1, kq+1)
    known = match.any(-1)  # (n, kp + 1): the baseline's token is in the model's list too
    q_at = torch.where(match, q_lp[:, None, :], 0.0).sum(-1)  # (n, kp + 1) log q at the baseline's tokens
    pk = torch.where(known, p_lp.exp(), 0.0)
    qk = torch.where(known, q_at.exp(), 0.0)
    kl = torch.where(pk > 0, pk * (p_lp - q_at), 0.0).sum(-1)
    p_tail = (1 - pk.sum(-1)).clamp_min(0)
    q_tail = (1 - qk.sum(-1)).clamp_min(1e-30)
    tail = torch.where(p_tail > 1e-6, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    return kl + tail


# ---- backends ----------------------------------------------------------------------------------------
class TorchScorer:
    """Windows through llmctl's ``Transformer``; windows of equal shape are batched."""

    name = "torch"

    def __init__(self, model: Any, batch_size: int | None = None, logits_budget: int = 512 * 2**20) -> None:
        if batch_size is not None:
            _check_positive("--batch-size", batch_size)
        self.model = model
        self.batch_size = batch_size
        self.logits_budget = logits_budget
        self.vocab_size = int(model.config.vocab_size)

    def _batch_size(self, rows: int) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return max(1, min(8, self.logits_budget // max(1, rows * self.vocab_size * 4)))

    def log_probs(self, windows: Sequence[Window]) -> Iterator[torch.Tensor]:
        """For each window in order: (len(targets), vocab) float32 log-probabilities of its scored rows."""
        import torch

        i = 0
        while i < len(windows):
            w = windows[i]
            shape = (len(w.ids), w.first)
            limit = self._batch_size(len(w.ids) - w.first)
            j = i + 1
            while j < len(windows) and j - i < limit and (len(windows[j].ids), windows[j].first) == shape:
                j += 1
            batch = windows[i:j]
            ids = torch.tensor([b.ids for b in batch], dtype=torch.long, device=self.model.device)  # (B, T)
            logits = self._scored_logits(ids, w.first)  # (B, T - first, vocab)
            for k, b in enumerate(batch):
                yield torch.log_softmax(logits[k, : len(b.targets)].float(), dim=-1)
            del logits
            i = j

    def _scored_logits(self, ids: torch.Tensor, first: int) -> torch.Tensor:
        import torch

        # Keep rows first.. after the final norm: the vocabulary projection runs on scored rows only. They
        # go on as one 2-D matrix: torch's CPU F.linear on a 3-D bf16 input against Gemma's 262k x 640
        # embedding takes 9.4 s where the same rows in 2-D take 0.5 s (torch 2.13).
        B, T = ids.shape
        hook = self.model.model.norm.register_forward_hook(
            lambda _m, _i, out: out[:, first:].reshape(B * (T - first), out.shape[-1])  # (B * rows, hidden)
        )
        try:
            with torch.no_grad():
                return self.model(ids).view(B, T - first, -1)  # (B, rows, vocab)
        finally:
            hook.remove()

    def close(self) -> None:
        self.model = None


class LlamaCppScorer:
    """Windows through llama.cpp (llama-cpp-python) on a GGUF file, as llama-perplexity runs them: the KV
    cache cleared per window, logits requested only for the scored rows (``batch.logits[i] = pos >= first``
    in perplexity.cpp), so the vocabulary projection and the copies cover those rows alone."""

    name = "llama.cpp"

    def __init__(
        self,
        path: str | Path,
        context: int,
        threads: int | None = None,
        *,
        device: str | None = None,
        gpu_layers: int | None = None,
    ) -> None:
        import llama_cpp

        from llmctl.runtime.llamacpp import gpu_layers as _gpu_layers
        from llmctl.runtime.tokenizer import _captured_native_output, _log_detail, llama_load_guard

        self.n_gpu_layers = _gpu_layers(device, gpu_layers)
        self.path = Path(path)
        if self.path.suffix.lower() != ".gguf":
            raise UsageError(
                f"{self.path}: the llama.cpp backend runs .gguf files; pass one or use --backend torch"
            )
        self.n_batch = min(context, 2048)
        with _captured_native_output() as log, llama_load_guard():
            try:
                self.llm = llama_cpp.Llama(
                    str(self.path),
                    n_ctx=context,
                    n_batch=self.n_batch,
                    n_ubatch=self.n_batch,
                    n_threads=threads,
                    n_threads_batch=threads,
                    n_gpu_layers=self.n_gpu_layers,
                    verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as e:
                err: Exception | None = e
            else:
                err = None
        if err is not None:
            raise FormatError(f"{self.path}: llama.cpp cannot load it ({_log_detail(log.text) or err})")
        self._lib = llama_cpp
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab_size = int(self.llm.n_vocab())
        self._capture = _captured_native_output

    def _scored_logits(self, w: Window) -> np.ndarray:
        """(len(w.targets), vocab) float32 logits of rows ``w.first ..``."""
        import numpy as np

        lib, ctx, b = self._lib, self.llm.ctx, self._batch
        lo, hi = w.first, w.first + len(w.targets)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        rows = []
        for start in range(0, len(w.ids), self.n_batch):
            chunk = w.ids[start : start + self.n_batch]
            n_out = 0
            for k, token in enumerate(chunk):
                pos = start + k
                b.token[k], b.pos[k], b.n_seq_id[k] = token, pos, 1
                b.seq_id[k][0] = 0
                b.logits[k] = lo <= pos < hi
                n_out += lo <= pos < hi
            b.n_tokens = len(chunk)
            rc = lib.llama_decode(ctx, b)
            if rc != 0:
                raise FormatError(f"{self.path}: llama.cpp failed to evaluate a window (llama_decode returned {rc})")
            if n_out:
                logits = lib.llama_get_logits(ctx)
                rows.append(np.ctypeslib.as_array(logits, shape=(n_out, self.vocab_size)).copy())
        return np.concatenate(rows)

    def log_probs(self, windows: Sequence[Window]) -> Iterator[torch.Tensor]:
        import torch

        for w in windows:
            with self._capture():
                rows = self._scored_logits(w)
            yield torch.log_softmax(torch.from_numpy(rows), dim=-1)

    def close(self) -> None:
        from llmctl.runtime.tokenizer import _close_quietly

        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "llm", None) is not None:
            _close_quietly(self.llm)
            self.llm = None


class VllmScorer:
    """Windows through vLLM: its prompt log-probabilities (``SamplingParams(prompt_logprobs=k,
    max_tokens=1)``) of each window's tokens. vLLM returns the top ``k`` and the prompt token's own, not the
    whole vocabulary, so this scorer yields ``TopK`` rows (as a saved baseline holds), not full rows."""

    name = "vllm"
    windows_per_call = 16  # prompts handed to vLLM at once (it batches them); progress is reported per call

    def __init__(
        self, source: Any, windows: Sequence[Window], *, top_k: int, tensor_parallel: int = 1,
        dtype: str | None = None,
    ) -> None:  # fmt: skip
        from llmctl.runtime.vllm_engine import open_engine

        self.display = source.display
        self.vocab_size = int(source.config.vocab_size)
        self.top_k = min(max(top_k, 1), self.vocab_size)
        longest = max(len(self.prompt(w)) for w in windows)
        self.llm = open_engine(
            source, tensor_parallel=tensor_parallel, dtype=dtype, max_model_len=longest + 1,
            max_logprobs=self.top_k,
        )  # fmt: skip

    @staticmethod
    def prompt(w: Window) -> tuple[int, ...]:
        """The tokens whose prompt log-probabilities hold the window's scored rows: ``ids`` up to the first
        scored row, then the targets (the documents protocol's last target is past ``ids``)."""
        fed = w.ids[w.first + 1 :]
        if tuple(w.targets[: len(fed)]) != tuple(fed):
            raise ValueError("a window whose targets are not the tokens after its scored rows")
        return (*w.ids[: w.first + 1], *w.targets)

    def log_probs(self, windows: Sequence[Window]) -> Iterator[TopK]:
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from llmctl.runtime.vllm_engine import vllm_error_line

        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, detokenize=False, temperature=0.0)
        for at in range(0, len(windows), self.windows_per_call):
            batch = windows[at : at + self.windows_per_call]
            prompts = [TokensPrompt(prompt_token_ids=list(self.prompt(w))) for w in batch]
            try:
                outs = self.llm.generate(prompts, params, use_tqdm=False)
            except Exception as e:  # a kernel vLLM lacks on this machine shows up at the first forward pass
                raise FormatError(f"{self.display}: vLLM failed to run it ({vllm_error_line(e)})") from None
            for w, out in zip(batch, outs, strict=True):
                # prompt_logprobs[i]: {token id: Logprob(logprob, rank)} for position i given the tokens before
                rows = out.prompt_logprobs[w.first + 1 : w.first + 1 + len(w.targets)]
                ids, logp, target = [], [], []
                for t, pos in zip(w.targets, rows, strict=True):
                    top = sorted((lp.rank, tok, lp.logprob) for tok, lp in pos.items() if lp.rank <= self.top_k)
                    ids.append([tok for _, tok, _ in top[: self.top_k]])
                    logp.append([v for _, _, v in top[: self.top_k]])
                    target.append(pos[t].logprob)
                yield TopK(
                    torch.tensor(ids, dtype=torch.int32),
                    torch.tensor(logp, dtype=torch.float32),
                    torch.tensor(target, dtype=torch.float32),
                )

    def close(self) -> None:
        from llmctl.runtime.vllm_engine import close_engine

        if getattr(self, "llm", None) is not None:
            llm, self.llm = self.llm, None
            close_engine(llm)


# ---- baselines ------------------------------------------------------------------------------------
@dataclass
class TopK:
    """A baseline's compact log-probabilities per scored token: top-k ids and log-probs (descending)
    and the log-prob of the correct token."""

    ids: torch.Tensor  # (n, k) int32
    logp: torch.Tensor  # (n, k) float32
    target_logp: torch.Tensor  # (n,) float32


def top_k_of(logp: torch.Tensor, targets: torch.Tensor, k: int) -> TopK:
    import torch

    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(idx.to(torch.int32), vals.float(), logp.gather(-1, targets[:, None])[:, 0].float())


def _to_cpu(t: TopK) -> TopK:
    return TopK(t.ids.cpu(), t.logp.cpu(), t.target_logp.cpu())


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


@dataclass
class ScoredRows:
    """A baseline scored before the model (vLLM runs one engine at a time): its rows per window, in order."""

    parts: list[Any]
    vocab_size: int

    def rows(self, windows: Sequence[Window]) -> Iterator[Any]:
        return iter(self.parts)


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


# ---- the evaluation loop -------------------------------------------------------------------------
@dataclass
class TokenResults:
    """Per scored token, in order."""

    nll: np.ndarray  # float64
    top1: np.ndarray  # int64
    doc: np.ndarray  # int64
    kld: np.ndarray | None = None
    nll_base: np.ndarray | None = None
    top1_base: np.ndarray | None = None


Progress = Callable[[int, int], None]  # (tokens fed so far, total tokens to feed)


@dataclass(frozen=True)
class EvalProgress:
    """What ``evaluate`` is doing, for a progress display: ``phase`` is "tokenize", "load", "score" or
    "save"; ``what`` says it in words; while scoring, ``done`` of ``total`` tokens have been fed (a new
    ``what`` starts a new step)."""

    phase: str
    what: str
    done: int = 0
    total: int = 0


def score_windows(
    scorer: Any,
    windows: Sequence[Window],
    *,
    baseline: Any = None,
    save_top_k: int = 0,
    on_progress: Progress | None = None,
) -> tuple[TokenResults, list[TopK]]:
    """Score every window; ``baseline`` is another scorer (exact KL), ``SavedLogits`` (top-k KL) or
    ``ScoredRows``. The scorer yields full rows of log-probabilities, or ``TopK`` rows (vLLM; KL from both
    top-k lists). Returns per-token results and, when ``save_top_k``, this model's top-k log-probs per window."""
    import numpy as np
    import torch

    total = sum(len(w.ids) for w in windows)
    base_iter: Iterator[Any] | None = None
    if baseline is not None:
        base_iter = baseline.rows(windows) if hasattr(baseline, "rows") else baseline.log_probs(windows)
    nll, top1, docs, kld, nll_b, top1_b, saved = [], [], [], [], [], [], []
    fed = 0
    for w, logp in zip(windows, scorer.log_probs(windows), strict=True):
        targets = torch.tensor(w.targets, dtype=torch.long)
        docs.append(np.full(len(w.targets), w.doc))
        if isinstance(logp, TopK):  # vLLM: top-k rows and the correct token's log-prob
            nll.append(-logp.target_logp.double().numpy())
            top1.append(logp.ids[:, 0].long().numpy())
            if save_top_k:
                saved.append(TopK(logp.ids[:, :save_top_k], logp.logp[:, :save_top_k], logp.target_logp))
            if base_iter is not None:
                b = next(base_iter)
                if not isinstance(b, TopK):  # (both are scored by one backend; for completeness)
                    b = _to_cpu(top_k_of(b, targets.to(b.device), logp.ids.shape[1]))
                kld.append(kl_rows_topk_both(logp, b, targets).numpy())
                nll_b.append(-b.target_logp.double().numpy())
                top1_b.append(b.ids[:, 0].long().numpy())
            fed += len(w.ids)
            if on_progress is not None:
                on_progress(fed, total)
            continue
        targets = targets.to(logp.device)
        nll.append(-logp.gather(-1, targets[:, None])[:, 0].double().cpu().numpy())
        top1.append(logp.argmax(-1).cpu().numpy())
        if save_top_k:
            saved.append(_to_cpu(top_k_of(logp, targets, save_top_k)))
        if base_iter is not None:
            b = next(base_iter)
            if isinstance(b, TopK):
                ids = b.ids.to(logp.device)
                kld.append(kl_rows_topk(logp, ids, b.logp.to(logp.device)).cpu().numpy())
                nll_b.append(-b.target_logp.double().numpy())
                top1_b.append(b.ids[:, 0].long().numpy())
            else:
                b = b.to(logp.device)
                kld.append(kl_rows(logp, b).cpu().numpy())
                nll_b.append(-b.gather(-1, targets[:, None])[:, 0].double().cpu().numpy())
                top1_b.append(b.argmax(-1).cpu().numpy())
        del logp
        fed += len(w.ids)
        if on_progress is not None:
            on_progress(fed, total)
    results = TokenResults(np.concatenate(nll), np.concatenate(top1), np.concatenate(docs))
    if base_iter is not None:
        results.kld = np.maximum(np.concatenate(kld), 0.0)  # rounding can give -1e-9
        results.nll_base = np.concatenate(nll_b)
        results.top1_base = np.concatenate(top1_b)
    return results, saved


# ---- from MODEL and SOURCE to a result ---------------------------------------------------------------
@dataclass
class EvalResult:
    model: str
    data: str
    backend: str
    protocol: str
    context: int
    stride: int | None
    windows: int
    tokens: int  # scored
    tokens_fed: int
    perplexity: float
    stderr: float
    nll: float  # mean negative log-likelihood (nats per token)
    elapsed_s: float
    load_s: float
    device: str
    documents: int = 1  # whose text was read (the documents protocol: scored)
    documents_in_data: int = 1  # in --data
    words: int | None = None
    bytes: int | None = None
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    bits_per_byte: float | None = None
    baseline: str | None = None
    kl: KLStats | None = None
    saved_logits: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Tokens through the model per second (what llama.cpp's timings report)."""
        return self.tokens_fed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def scored_per_second(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        d["scored_tokens_per_second"] = self.scored_per_second
        return d


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
        _check_positive("--max-tokens", max_tokens)
    if chunks is not None:
        _check_positive("--chunks", chunks)
    if protocol == "documents":
        if stride is not None:
            raise UsageError("--stride is for --protocol sliding; documents are scored in disjoint windows")
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else min(tokenizer.eos_ids, default=None)
        if prefix is None:
            raise UsageError("the documents protocol needs a BOS or EOS token to start each document")
        _check_positive("--context", context, 2)
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
            _check_positive("--context", context, 2)
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


def check_options(
    protocol: str, backend: str, context: int, stride: int | None, max_tokens: int | None,
    chunks: int | None, top_k: int | None, *, save_logits: bool = False, batch_size: int | None = None,
) -> None:  # fmt: skip
    """Refuse bad option values, and options that would do nothing, before anything is loaded."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown --protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend {backend!r}; use one of {', '.join(BACKENDS)}")
    _check_positive("--context", context, 4)
    for name, value in (
        ("--stride", stride), ("--max-tokens", max_tokens), ("--chunks", chunks), ("--top-k", top_k),
        ("--batch-size", batch_size),
    ):  # fmt: skip
        if value is not None:
            _check_positive(name, value)
    if stride is not None and protocol != "sliding":
        raise UsageError(f"--stride is for --protocol sliding; {protocol} windows do not overlap")
    if top_k is not None and not save_logits:
        raise UsageError(
            "--top-k sets how many log-probabilities --save-logits keeps per token; pass --save-logits FILE "
            "too, or drop --top-k"
        )
    if batch_size is not None and backend == "llama.cpp":
        raise UsageError(
            "--batch-size applies to the torch backend; the llama.cpp backend decodes one window per call, "
            "so it would change nothing: drop --batch-size"
        )
    if batch_size is not None and backend == "vllm":
        raise UsageError("--batch-size applies to the torch backend; vLLM batches windows itself: drop it")


def check_context(source: Any, context: int, role: str = "the model") -> None:
    """Refuse a window longer than the model was trained for (its ``max_position_embeddings``)."""
    limit = int(source.config.max_position_embeddings)
    if context > limit:
        raise UsageError(
            f"--context {context} is longer than {role} {source.display} was trained for ({limit} tokens); "
            f"pass --context {limit} or less"
        )


def open_scorer(
    source: Any,
    backend: str,
    *,
    context: int,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    gpu_layers: int | None = None,
    tensor_parallel: int = 1,
    windows: Sequence[Window] = (),
    top_k: int = 1,
) -> tuple[Any, str]:
    """(scorer, device label) for a resolved model source. ``gpu_layers``: llama.cpp's ``-ngl``;
    ``tensor_parallel``, ``windows`` (for the engine's length) and ``top_k`` (log-probs per row): vLLM's."""
    from llmctl.runtime.backend import check_backend
    from llmctl.runtime.device import choose_threads, set_threads
    from llmctl.runtime.llamacpp import offload_text

    if backend == "vllm":
        from llmctl.runtime.vllm_engine import check_placement

        check_placement(device=device, threads=threads, gpu_layers=gpu_layers)
        scorer = VllmScorer(source, windows, top_k=top_k, tensor_parallel=tensor_parallel, dtype=dtype)
        return scorer, f"vLLM, tensor parallel {tensor_parallel}, top-{scorer.top_k} log-probabilities"
    check_backend(source, backend, dtype=dtype, gpu_layers=gpu_layers)
    if backend == "llama.cpp":
        threads, why = choose_threads(threads)
        scorer = LlamaCppScorer(source.path, context, threads, device=device, gpu_layers=gpu_layers)
        return scorer, f"{offload_text(scorer.n_gpu_layers)} ({threads} threads: {why})"
    from llmctl.runtime.device import describe
    from llmctl.runtime.loader import load_model

    threads, why = choose_threads(threads)
    set_threads(threads)
    model = load_model(source.path, dtype=dtype, device=device)
    label = describe(model.device, model.dtype)
    return TorchScorer(model, batch_size), label + (f", threads: {why}" if model.device.type == "cpu" else "")


def check_same_tokenizer(tok: Any, base_tok: Any, windows: Sequence[Window], build: Callable) -> None:
    """Refuse a baseline whose tokenizer does not cut the text into the same windows."""
    if tok.vocab_size != base_tok.vocab_size or build(base_tok) != windows:
        raise UsageError(
            f"the model and the baseline tokenize the text differently (vocabularies of {tok.vocab_size} and "
            f"{base_tok.vocab_size} tokens); KL divergence compares two models with the same tokenizer, such "
            "as a model and a quantized copy of it"
        )


def evaluate(
    model: str | None,
    data: str,
    *,
    protocol: str = "llama.cpp",
    context: int = DEFAULT_CONTEXT,
    stride: int | None = None,
    max_tokens: int | None = None,
    chunks: int | None = None,
    backend: str = "torch",
    baseline: str | None = None,
    baseline_logits: str | None = None,
    save_logits_path: str | None = None,
    top_k: int | None = None,
    errors: str = "strict",
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    gpu_layers: int | None = None,
    tensor_parallel: int | None = None,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> EvalResult:
    """``llmctl eval``: perplexity of MODEL on ``data`` under ``protocol``, and KL against a baseline.
    ``top_k`` (default 128) is for ``save_logits_path`` only; ``on_progress`` is told each step."""
    import numpy as np

    from llmctl.runtime.corpus import load_corpus, nonblank
    from llmctl.runtime.tokenizer import load_tokenizer
    from llmctl.runtime.vllm_engine import check_source, check_tensor_parallel, import_vllm
    from llmctl.sources import resolve

    def step(phase: str, what: str, done: int = 0, total: int = 0) -> None:
        if on_progress is not None:
            on_progress(EvalProgress(phase, what, done, total))

    if baseline and baseline_logits:
        raise UsageError("pass --baseline MODEL2 or --baseline-logits FILE, not both")
    check_options(
        protocol, backend, context, stride, max_tokens, chunks, top_k,
        save_logits=bool(save_logits_path), batch_size=batch_size,
    )  # fmt: skip
    tensor_parallel = check_tensor_parallel(tensor_parallel, backend)
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    if save_logits_path and not Path(save_logits_path).expanduser().parent.is_dir():
        raise UsageError(f"--save-logits {save_logits_path}: its folder does not exist; create it first")
    docs = load_corpus(data, errors=errors)
    saved = load_logits(baseline_logits) if baseline_logits else None  # fail early on a bad file
    t0 = time.perf_counter()
    source = resolve(model)
    check_context(source, context)
    base_source = resolve(baseline) if baseline else None
    if base_source is not None:
        check_context(base_source, context, "the baseline")
    if backend == "vllm":
        for src in (source, base_source):
            if src is not None:
                check_source(src)
        import_vllm()  # one line saying how to install it, before any work
    step("tokenize", f"reading and tokenizing {data}")
    tok = load_tokenizer(source.path)

    def build(t: Any) -> list[Window]:
        return build_windows(
            protocol, t, docs, context=context, stride=stride, max_tokens=max_tokens, chunks=chunks
        )

    windows = build(tok)
    digest = windows_digest(windows)
    notes: list[str] = []
    if base_source is not None:
        step("tokenize", f"tokenizing {data} with the baseline's tokenizer")
        check_same_tokenizer(tok, load_tokenizer(base_source.path), windows, build)
    if saved is not None:
        if saved.meta.get("windows_sha256") != digest:
            raise UsageError(
                f"{saved.path} holds log-probabilities of other tokens (saved with --protocol "
                f"{saved.meta.get('protocol')} --context {saved.meta.get('context')} on "
                f"{saved.meta.get('data')}); pass the same --data and protocol options and a model with the "
                "same tokenizer, or save the baseline again"
            )
        scored = sum(len(w.targets) for w in windows)
        if saved.ids.shape[0] != scored:  # the digest names the windows; the rows must be there too
            raise UsageError(
                f"{saved.path} holds {saved.ids.shape[0]} rows of log-probabilities for {scored} scored tokens; "
                "the file is truncated or edited — save the baseline again with --save-logits"
            )
        notes.append(
            f"KL from the baseline's saved top-{saved.ids.shape[1]} log-probabilities (the rest as one "
            "bucket: a slight underestimate)"
        )
    opts: dict[str, Any] = dict(context=context, device=device, dtype=dtype, threads=threads,
                                batch_size=batch_size, gpu_layers=gpu_layers)  # fmt: skip
    base_rows: ScoredRows | None = None
    if backend == "vllm":
        # vLLM gives top-k rows: as many as --save-logits keeps, as a saved baseline holds, or 128 for a baseline
        need = [top_k if save_logits_path else 1, saved.ids.shape[1] if saved is not None else 1]
        need.append(DEFAULT_TOP_K if base_source is not None else 1)
        opts.update(tensor_parallel=tensor_parallel, windows=windows, top_k=max(need))
        if base_source is not None or saved is not None:
            notes[:] = [
                "KL from vLLM's top-k log-probabilities and the baseline's (the tokens not in both lists as one "
                "bucket): a lower bound, slightly under the full KL"
            ]
        if base_source is not None:  # one engine at a time: the baseline's rows first, then the model's
            step("load", f"loading the baseline {base_source.display} ({backend} backend)")
            first, _ = open_scorer(base_source, backend, **opts)
            try:
                step("score", f"scoring {len(windows):,} window{'s' * (len(windows) != 1)} (the baseline)")
                base_rows = ScoredRows(list(first.log_probs(windows)), first.vocab_size)
            finally:
                first.close()
    step("load", f"loading {source.display} ({backend} backend)")
    scorer, label = open_scorer(source, backend, **opts)
    base_scorer = None
    try:
        if saved is not None and int(saved.meta.get("vocab_size", -1)) != scorer.vocab_size:
            raise UsageError(
                f"{saved.path} was saved from a model with a vocabulary of {saved.meta.get('vocab_size')} "
                f"tokens, this one has {scorer.vocab_size}; compare models with the same tokenizer"
            )
        if base_source is not None and base_rows is None:
            step("load", f"loading the baseline {base_source.display} ({backend} backend)")
            base_scorer, _ = open_scorer(base_source, backend, **opts)
        base_vocab = base_rows.vocab_size if base_rows is not None else getattr(base_scorer, "vocab_size", None)
        if base_vocab is not None and base_vocab != scorer.vocab_size:
            raise UsageError(
                f"the model's output has {scorer.vocab_size} logits and the baseline's {base_vocab}; KL "
                "divergence needs the same vocabulary"
            )
        load_s = time.perf_counter() - t0
        what = f"scoring {len(windows):,} window{'s' * (len(windows) != 1)}" + (
            " (model and baseline)" if base_scorer is not None else ""
        )
        step("score", what, 0, sum(len(w.ids) for w in windows))
        t1 = time.perf_counter()
        results, parts = score_windows(
            scorer,
            windows,
            baseline=base_scorer or base_rows or saved,
            save_top_k=top_k if save_logits_path else 0,
            on_progress=(lambda done, total: step("score", what, done, total)) if on_progress else None,
        )
        elapsed = time.perf_counter() - t1
    finally:
        scorer.close()
        if base_scorer is not None:
            base_scorer.close()
    ppl, err = perplexity_stats(results.nll)
    read = [d for d in docs if d.bytes_read]  # the documents whose text was read: what the windows come from
    result = EvalResult(
        model=str(source.spec),
        data=data,
        backend=backend,
        protocol=protocol,
        context=context,
        stride=(stride if stride is not None else context // 2) if protocol == "sliding" else None,
        windows=len(windows),
        tokens=len(results.nll),
        tokens_fed=sum(len(w.ids) for w in windows),
        perplexity=ppl,
        stderr=err,
        nll=float(np.mean(results.nll)),
        elapsed_s=elapsed,
        load_s=load_s,
        device=label,
        documents=len([d for d in read if not d.blank]),
        documents_in_data=len(docs),
        notes=notes,
    )
    if protocol == "documents":
        used = sorted({w.doc for w in windows})
        total_nll = float(np.sum(results.nll))
        if max_tokens is None and chunks is None:
            texts = [d.text for d in nonblank(docs)]  # every document was scored whole
            result.words = sum(word_count(t) for t in texts)
            result.bytes = sum(len(t.encode("utf-8")) for t in texts)
            result.word_perplexity = math.exp(total_nll / result.words)
            result.byte_perplexity = math.exp(total_nll / result.bytes)
            result.bits_per_byte = total_nll / result.bytes / math.log(2)
        else:
            result.notes.append(
                "word and byte perplexity need whole documents: not reported with --max-tokens or --chunks"
            )
        result.documents = len(used)
    if results.kld is not None and results.nll_base is not None and results.top1_base is not None:
        result.baseline = baseline if saved is None else f"{saved.meta.get('model')} ({saved.path})"
        result.kl = kl_stats(
            results.kld,
            results.nll,
            results.nll_base,
            results.top1 == results.top1_base,
            approximate=saved is not None or backend == "vllm",
        )
    if save_logits_path:
        step("save", f"saving the top-{top_k} log-probabilities to {save_logits_path}")
        meta = {
            "model": str(source.spec),
            "data": str(data),
            "protocol": protocol,
            "context": str(context),
            "stride": str(result.stride),
            "windows_sha256": digest,
            "vocab_size": str(scorer.vocab_size),
            "top_k": str(top_k),
        }
        save_logits(save_logits_path, parts, meta)
        result.saved_logits = str(save_logits_path)
    return result
