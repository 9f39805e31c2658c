"""The chat backend on vLLM (``--backend vllm`` for chat and serve): token ids in, sampled ids out, one step
of vLLM's engine per token.

llmctl keeps the conversation, its chat template, stop strings, end-of-turn tokens and ``max_tokens``
(``Session``); vLLM keeps the KV cache (its prefix cache reuses the conversation's earlier turns, reported as
``prefilled``) and samples with its own sampler from the same options: temperature (0 = greedy), top-k, top-p,
min-p, seed, and the penalties, which vLLM applies to the whole sequence (no ``repeat_last_n`` window).
A request the caller stops early (a stop string, a client that went away) is aborted in vLLM.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from llmctl.errors import FormatError
from llmctl.runtime.backend import Backend
from llmctl.runtime.sampler import SamplingOptions

_ids = itertools.count()


class VllmBackend(Backend):
    name = "vllm"
    gives_logprobs = False  # vLLM samples: no logits to read back (serve refuses logprobs with a 400)

    def __init__(
        self, source: Any, tokenizer: Any, n_ctx: int, *, tensor_parallel: int = 1, dtype: str | None = None
    ) -> None:
        from llmctl.runtime.vllm_engine import open_engine

        self.display = source.display
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.tensor_parallel = tensor_parallel
        self.llm = open_engine(
            source, tensor_parallel=tensor_parallel, dtype=dtype, max_model_len=n_ctx, prefix_caching=True
        )
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return self._tokens

    def describe(self) -> str:
        dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        return f"vLLM, {dtype}, tensor parallel {self.tensor_parallel}"

    def reset(self) -> None:
        self._tokens = []  # vLLM's prefix cache holds blocks by content: nothing of ours to forget

    def _params(self, options: SamplingOptions, seed: int, room: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        o = options
        return SamplingParams(
            temperature=o.temperature,
            top_k=o.top_k,  # 0: off, as llmctl's
            top_p=o.top_p,
            min_p=o.min_p,
            repetition_penalty=o.repeat_penalty,
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            seed=seed,
            max_tokens=room,
            ignore_eos=True,  # the session stops at the model's end-of-turn tokens (and stop strings)
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def generate(self, prompt: Sequence[int], options: SamplingOptions, seed: int) -> Iterator[int]:
        from vllm.inputs import TokensPrompt

        from llmctl.runtime.vllm_engine import vllm_error_line

        self.check_prompt(prompt)
        engine = self.llm.llm_engine
        params = self._params(options, seed, self.n_ctx - len(prompt))
        ours = f"llmctl-{next(_ids)}"
        internal = engine.add_request(ours, TokensPrompt(prompt_token_ids=list(prompt)), params)
        ids = {ours, internal}  # outputs carry the id we gave; vLLM may add a suffix to its own
        self._tokens = list(prompt)
        self.prefilled = len(prompt)
        finished, first = False, True
        try:
            while not finished:
                try:
                    outs = engine.step()
                except Exception as e:  # e.g. a kernel this machine's vLLM build lacks
                    raise FormatError(f"{self.display}: vLLM failed to run it ({vllm_error_line(e)})") from None
                if not outs and not engine.has_unfinished_requests():
                    raise FormatError(f"{self.display}: vLLM dropped the request without finishing it")
                for out in outs:
                    if out.request_id not in ids:
                        continue
                    if first:
                        self.prefilled = len(prompt) - (out.num_cached_tokens or 0)
                        first = False
                    finished = out.finished
                    for token in out.outputs[0].token_ids:
                        yield token
                        self._tokens.append(token)
        finally:
            if not finished:
                engine.abort_request(sorted(ids))
                while engine.has_unfinished_requests():  # let the abort go through before the next request
                    engine.step()

    def close(self) -> None:
        from llmctl.runtime.vllm_engine import close_engine

        if getattr(self, "llm", None) is not None:
            llm, self.llm = self.llm, None
            close_engine(llm)
        super().close()
