"""llmctl's own runtime as a chat backend (``llmctl.runtime.backend.Backend``): ``load_model``'s model, a
``KVCache`` kept across turns (only what differs from its tokens is prefilled) and llama.cpp's sampler chain
(``llmctl.runtime.sampler``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llmctl.errors import UsageError
from llmctl.runtime.backend import Backend, common_prefix
from llmctl.runtime.sampler import Sampler, SamplingOptions

if TYPE_CHECKING:
    from llmctl.runtime.tokenizer import Tokenizer

ROLLBACK = 64  # extra ring slots of sliding-window layers, so a new turn can roll back a few tokens


class TorchBackend(Backend):
    """llmctl's torch runtime: ``load_model`` + ``KVCache`` + ``Sampler``."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Tokenizer, n_ctx: int, *, chunk_size: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.chunk_size = chunk_size
        self.cache = model.make_cache(n_ctx, rollback=ROLLBACK)
        self._tokens: list[int] = []
        self._logits: Any = None

    @property
    def tokens(self) -> list[int]:
        return self._tokens

    def describe(self) -> str:
        from llmctl.runtime.device import describe

        return f"torch, {describe(self.model.device, self.model.dtype)}"

    def kv_bytes(self) -> int | None:
        return self.cache.nbytes

    def last_logits(self) -> Any:
        return self._logits.float().cpu().numpy()

    def reset(self) -> None:
        self.cache.reset()
        self._tokens = []

    def _keep(self, prompt: Sequence[int]) -> int:
        """Truncate the cache to its common prefix with ``prompt`` (one token short of all of it, so that
        there is something to compute logits from); returns the kept length."""
        n = common_prefix(self._tokens, prompt)
        n = min(n, len(prompt) - 1)
        try:
            self.cache.truncate(n)  # the cache may hold more than _tokens after an interrupted step
        except UsageError:  # sliding-window layers cannot roll back that far: start over
            self.cache.reset()
            n = 0
        self._tokens = list(prompt[:n])
        return n

    def generate(self, prompt: Sequence[int], options: SamplingOptions, seed: int) -> Iterator[int]:
        import torch

        from llmctl.runtime.generate import decode_one_token, prefill

        self.check_prompt(prompt)
        device = self.model.device
        n = self._keep(prompt)
        self.prefilled = len(prompt) - n
        new = torch.tensor([list(prompt[n:])], dtype=torch.long, device=device)  # (1, T)
        logits = prefill(self.model, new, self.cache, self.chunk_size)  # (1, vocab)
        self._tokens = list(prompt)
        sampler = Sampler(options, seed=seed, device=device)
        seen = list(prompt)
        with torch.no_grad():
            while True:
                self._logits = logits[0]
                token = sampler(logits[0], seen)
                seen.append(token)
                yield token
                if len(self._tokens) + 1 > self.n_ctx:
                    return
                step = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
                logits = decode_one_token(self.model, step, self.cache)
                self._tokens.append(token)
