"""The scoring backends: each turns windows into the log-probabilities of their scored rows, in order (torch
and llama.cpp: full rows; vLLM: ``TopK`` rows); ``open_scorer`` picks one for a resolved model source.

Memory: only the scored rows of each window get a vocabulary projection (a hook on the final norm keeps
those rows), and log-softmax is taken per window; nothing holds the logits of the whole text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import FormatError, UsageError
from llmctl.runtime.eval.logprobs import TopK
from llmctl.runtime.eval.windows import Window, check_positive

if TYPE_CHECKING:
    import numpy as np
    import torch


class TorchScorer:
    """Windows through llmctl's ``Transformer``; windows of equal shape are batched."""

    name = "torch"

    def __init__(self, model: Any, batch_size: int | None = None, logits_budget: int = 512 * 2**20) -> None:
        if batch_size is not None:
            check_positive("--batch-size", batch_size)
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
        from llmctl.runtime.llama_lib import captured_native_output, load, load_guard, log_detail
        from llmctl.runtime.llamacpp import gpu_layers as _gpu_layers

        llama_cpp = load()

        self.n_gpu_layers = _gpu_layers(device, gpu_layers)
        self.path = Path(path)
        if self.path.suffix.lower() != ".gguf":
            raise UsageError(
                f"{self.path}: the llama.cpp backend runs .gguf files; pass one or use --backend torch"
            )
        self.n_batch = min(context, 2048)
        with captured_native_output() as log, load_guard():
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
            raise FormatError(f"{self.path}: llama.cpp cannot load it ({log_detail(log.text) or err})")
        self._lib = llama_cpp
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.vocab_size = int(self.llm.n_vocab())
        self._capture = captured_native_output

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
        from llmctl.runtime.llama_lib import close_quietly

        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "llm", None) is not None:
            close_quietly(self.llm)
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
    from llmctl.runtime.backend import EVAL_BACKENDS, choose_backend
    from llmctl.runtime.device import choose_threads, set_threads
    from llmctl.runtime.llamacpp import offload_text

    backend, _ = choose_backend(source, backend, dtype=dtype, device=device, gpu_layers=gpu_layers, allowed=EVAL_BACKENDS)
    if backend == "vllm":
        from llmctl.runtime.vllm_engine import check_placement

        check_placement(device=device, threads=threads, gpu_layers=gpu_layers)
        scorer = VllmScorer(source, windows, top_k=top_k, tensor_parallel=tensor_parallel, dtype=dtype)
        return scorer, f"vLLM, tensor parallel {tensor_parallel}, top-{scorer.top_k} log-probabilities"
    if backend == "llama.cpp":
        threads, why = choose_threads(threads)
        scorer = LlamaCppScorer(source.path, context, threads, device=device, gpu_layers=gpu_layers)
        return scorer, f"{offload_text(scorer.n_gpu_layers)} ({threads} threads: {why})"
    from llmctl.runtime.device import describe
    from llmctl.runtime.loader import load_model

    threads, why = choose_threads(threads)
    set_threads(threads)
    model = load_model(source, dtype=dtype, device=device)
    label = describe(model.device, model.dtype)
    return TorchScorer(model, batch_size), label + (f", threads: {why}" if model.device.type == "cpu" else "")
