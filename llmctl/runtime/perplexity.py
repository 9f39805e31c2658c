"""Perplexity and KL divergence: ``evaluate``, what ``llmctl eval`` runs, from MODEL and --data to a result.

It checks the options, tokenizes the text into a protocol's windows (``eval.windows``), opens a scorer
(``eval.scorers``) for the model and one for a baseline (or reads a baseline's saved log-probabilities,
``eval.logits_file``), scores every window (``eval.logprobs.score_windows``) and summarizes the per-token
results (``eval.stats``). The names callers use are re-exported here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.runtime.backend import EVAL_BACKENDS
from llmctl.runtime.eval.logits_file import (
    LOGITS_FORMAT,
    LOGITS_VERSION,
    SavedLogits,
    load_logits,
    save_logits,
)
from llmctl.runtime.eval.logprobs import (
    ScoredRows,
    TokenResults,
    TopK,
    kl_rows,
    kl_rows_topk,
    kl_rows_topk_both,
    score_windows,
    top_k_of,
)
from llmctl.runtime.eval.scorers import LlamaCppScorer, TorchScorer, VllmScorer, open_scorer
from llmctl.runtime.eval.stats import KLStats, kl_stats, percentile, perplexity_stats, word_count
from llmctl.runtime.eval.windows import (
    PROTOCOLS,
    Window,
    build_windows,
    check_positive,
    document_windows,
    llama_cpp_windows,
    sliding_windows,
    windows_digest,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CONTEXT",
    "DEFAULT_TOP_K",
    "LOGITS_FORMAT",
    "LOGITS_VERSION",
    "PROTOCOLS",
    "EvalProgress",
    "EvalResult",
    "KLStats",
    "LlamaCppScorer",
    "SavedLogits",
    "ScoredRows",
    "TokenResults",
    "TopK",
    "TorchScorer",
    "VllmScorer",
    "Window",
    "build_windows",
    "check_context",
    "check_options",
    "check_same_tokenizer",
    "document_windows",
    "evaluate",
    "kl_rows",
    "kl_rows_topk",
    "kl_rows_topk_both",
    "kl_stats",
    "llama_cpp_windows",
    "load_logits",
    "open_scorer",
    "percentile",
    "perplexity_stats",
    "save_logits",
    "score_windows",
    "sliding_windows",
    "top_k_of",
    "windows_digest",
]

BACKENDS = EVAL_BACKENDS
DEFAULT_CONTEXT = 512
DEFAULT_TOP_K = 128  # log-probabilities per token that --save-logits keeps


@dataclass(frozen=True)
class EvalProgress:
    """What ``evaluate`` is doing, for a progress display: ``phase`` is "tokenize", "load", "score" or
    "save"; ``what`` says it in words; while scoring, ``done`` of ``total`` tokens have been fed (a new
    ``what`` starts a new step)."""

    phase: str
    what: str
    done: int = 0
    total: int = 0


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        d["scored_tokens_per_second"] = self.scored_per_second
        return d


def check_options(
    protocol: str, backend: str, context: int, stride: int | None, max_tokens: int | None,
    chunks: int | None, top_k: int | None, *, save_logits: bool = False, batch_size: int | None = None,
) -> None:  # fmt: skip
    """Refuse bad option values, and options that would do nothing, before anything is loaded."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown --protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if backend not in BACKENDS:  # before anything is loaded; the backend is chosen in open_scorer
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_positive("--context", context, 4)
    for name, value in (
        ("--stride", stride), ("--max-tokens", max_tokens), ("--chunks", chunks), ("--top-k", top_k),
        ("--batch-size", batch_size),
    ):  # fmt: skip
        if value is not None:
            check_positive(name, value)
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
