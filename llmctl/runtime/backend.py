"""The backend interface: a model with its KV cache that generates from a prompt, reusing the cached prefix.

``llmctl.runtime.session`` drives one: ``llmctl.runtime.torch_backend`` (llmctl's own runtime),
``llmctl.runtime.llamacpp`` (GGUF files through llama-cpp-python) and ``llmctl.runtime.vllm_backend``.
``session.load_backend`` (chat, serve) and ``eval.scorers.open_scorer`` (eval) load them, both choosing
through ``choose_backend``, with the
same refusals (``check_backend``)."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llmctl.errors import UsageError

if TYPE_CHECKING:
    from llmctl.runtime.sampler import SamplingOptions
    from llmctl.runtime.tokenizer import Tokenizer


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Backend(abc.ABC):
    """A model with its KV cache. ``tokens``: the ids whose keys/values the cache holds."""

    name: str = ""
    tokenizer: Tokenizer
    n_ctx: int = 0
    prefilled: int = 0  # tokens the last ``generate`` computed before sampling
    gives_logprobs = True  # whether ``last_logits`` works
    source: Any = None  # the resolved MODEL (llmctl.sources.ModelSource), set by session.load_backend

    @property
    @abc.abstractmethod
    def tokens(self) -> list[int]: ...

    @abc.abstractmethod
    def generate(self, prompt: Sequence[int], options: SamplingOptions, seed: int) -> Iterator[int]:
        """Reuse the cached prefix of ``prompt``, prefill the rest, then yield sampled ids. Stops by itself
        only when the context is full. The last yielded id is not yet in the cache."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the cached tokens."""

    def describe(self) -> str:
        return self.name

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """What every ``generate`` checks first: a prompt that is not empty and leaves room in the context."""
        if not prompt:
            raise UsageError("nothing to generate from: the prompt has no tokens")
        if len(prompt) >= self.n_ctx:
            raise UsageError(f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx}")

    def kv_bytes(self) -> int | None:
        return None

    def last_logits(self) -> Any:
        """The logits (vocab,) the token ``generate`` yielded last was drawn from, valid until it is
        resumed. Backends that cannot give them raise UsageError."""
        raise UsageError(f"the {self.name} backend gives no log-probabilities")

    def close(self) -> None:
        self.tokenizer.close()


BACKENDS = ("auto", "torch", "llama.cpp", "vllm")  # chat, serve
EVAL_BACKENDS = ("torch", "llama.cpp", "vllm")  # eval names its backend (torch by default)


def choose_backend(
    source: Any,
    backend: str,
    *,
    dtype: str | None = None,
    device: str | None = None,
    gpu_layers: int | None = None,
    allowed: tuple[str, ...] = BACKENDS,
) -> tuple[str, str]:
    """(backend, why) for a resolved model, the one place chat, serve and eval choose it: ``auto`` is
    llama.cpp for a GGUF file (torch when --dtype/--device ask for the torch runtime) and torch otherwise; a
    named backend is kept. Then what every command refuses for that backend (``check_backend``; vLLM's own
    refusals are ``vllm_engine.check_source`` / ``check_placement``). ``allowed``: the command's values (eval
    takes no ``auto``: it names its backend, torch by default)."""
    if backend not in allowed:
        raise UsageError(f"--backend must be one of {', '.join(allowed)}, got {backend!r}")
    if backend == "auto":
        chosen = "llama.cpp" if source.is_gguf else "torch"
        why = "auto: the model is a GGUF file" if source.is_gguf else "auto: the model is not a GGUF file"
        if source.is_gguf and ((dtype not in (None, "auto")) or (device not in (None, "auto", "cpu"))):
            chosen, why = "torch", "auto: GGUF file, but --dtype/--device ask for the torch runtime"
    else:
        chosen, why = backend, "--backend"
    if chosen != "vllm":
        check_backend(source, chosen, dtype=dtype, gpu_layers=gpu_layers)
    return chosen, why


def check_backend(source: Any, backend: str, *, dtype: str | None, gpu_layers: int | None) -> None:
    """What chat, serve and eval refuse alike once a backend is chosen for a resolved model (vLLM's own
    refusals are ``vllm_engine.check_source`` / ``check_placement``)."""
    if backend == "llama.cpp":
        if not source.is_gguf:
            raise UsageError(
                f"the llama.cpp backend runs .gguf files only and {source.display} is a {source.kind}; "
                "use --backend torch"
            )
        if dtype not in (None, "auto"):
            raise UsageError(
                "--dtype is a torch-backend option: llama.cpp computes with the GGUF's own types; "
                "drop --dtype or use --backend torch"
            )
    elif backend == "torch" and gpu_layers is not None:
        raise UsageError(
            "--gpu-layers is a llama.cpp-backend option (a GGUF file); the torch runtime puts the whole model on "
            "--device"
        )


MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


def logprobs_of(logits: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax of ``logits`` (vocab,) at ``token``, and the ``top`` likeliest ``(id, logprob)``, likeliest
    first (ties by id), computed in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    top = min(top, lp.size)
    best = np.argpartition(-lp, top - 1)[:top] if top else np.empty(0, dtype=np.int64)
    best = best[np.lexsort((best, -lp[best]))]
    return float(lp[token]), [(int(i), float(lp[i])) for i in best]
