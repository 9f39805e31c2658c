"""Sampling: validated options and a chain of small filters over one step's logits.

The chain is llama.cpp's default order (``common/sampling.cpp``, samplers in ``src/llama-sampling.cpp``):

    penalties → top-k → top-p → min-p → temperature → draw

* **penalties** (the last ``repeat_last_n`` tokens the model has seen: prompt and reply so far). For each
  token id ``t`` occurring ``c > 0`` times there: the logit is divided by ``repeat_penalty`` when positive,
  multiplied by it when negative or zero (CTRL's penalty with llama.cpp's sign fix), then
  ``c * frequency_penalty + presence_penalty`` is subtracted.
* **top-k** keeps the ``top_k`` highest logits (0 = off).
* **top-p** keeps the smallest set of most probable tokens whose probability (softmax of what is left)
  reaches ``top_p``, the token crossing the threshold included (1 = off).
* **min-p** keeps tokens whose probability is at least ``min_p`` × that of the most probable one
  (0 = off).
* **temperature** divides the logits; ``0`` means greedy: the argmax after penalties (every filter keeps
  the most probable token, so the other filters cannot change it).
* **draw** samples from the softmax with a ``torch.Generator`` seeded by ``seed``.

Filters take a 1-D float tensor of logits and return it with removed tokens set to ``-inf``; none of them
ever removes the most probable token. Every option is validated once, in ``SamplingOptions``: a bad value
raises ``UsageError`` naming the valid range. Logits with a NaN (NaN weights, or overflow in the compute
dtype) raise ``FormatError``, found from one value per token: argmax and softmax both carry a NaN through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from llmctl.errors import FormatError, UsageError

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**32 - 2  # llama.cpp's seeds are uint32; 2**32 - 1 means "random" there

# name -> (kind, valid range as shown to the user, check)
_RULES: dict[str, tuple[type, str, Any]] = {
    "temperature": (float, ">= 0 (0 = greedy)", lambda v: v >= 0),
    "top_k": (int, "an integer >= 0 (0 = off)", lambda v: v >= 0),
    "top_p": (float, "between 0 and 1 (1 = off)", lambda v: 0 <= v <= 1),
    "min_p": (float, "between 0 and 1 (0 = off)", lambda v: 0 <= v <= 1),
    "repeat_penalty": (float, "> 0 (1 = off)", lambda v: v > 0),
    "repeat_last_n": (int, "an integer >= -1 (0 = off, -1 = the whole context)", lambda v: v >= -1),
    "presence_penalty": (float, "between -2 and 2 (0 = off)", lambda v: -2 <= v <= 2),
    "frequency_penalty": (float, "between -2 and 2 (0 = off)", lambda v: -2 <= v <= 2),
    "seed": (int, f"an integer between 0 and {MAX_SEED}", lambda v: 0 <= v <= MAX_SEED),
    "max_tokens": (int, "an integer >= 1", lambda v: v >= 1),
}
NAN_LOGITS = (
    "the model produced NaN logits: its weights hold NaN or infinite values, or its activations overflow "
    "the compute dtype; check or re-download the model files, or try --dtype fp32"
)


@dataclass(frozen=True)
class SamplingOptions:
    """What to sample with. Defaults are llama.cpp's, except ``max_tokens`` (llama.cpp: unbounded)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random seed, chosen once per session and reported
    max_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name, (kind, valid, ok) in _RULES.items():
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            object.__setattr__(self, name, _checked(name, value, kind, valid, ok))
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, Sequence):
            raise UsageError(f"stop must be a list of strings, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise UsageError(f"stop strings must be non-empty text, got {s!r}")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes: Any) -> SamplingOptions:
        """A validated copy with ``changes``."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise UsageError(f"unknown sampling option {sorted(unknown)[0]!r}; options: {', '.join(names())}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def _checked(name: str, value: Any, kind: type, valid: str, ok: Any) -> Any:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{flag} must be {valid}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise UsageError(f"{flag} must be {valid}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be {valid}, got {value!r}")
    if not ok(value):
        raise UsageError(f"{flag} must be {valid}, got {value!r}")
    return value


def names() -> list[str]:
    """Options ``/set`` accepts."""
    return [*_RULES, "stop"]


def parse_option(name: str, text: str) -> tuple[str, Any]:
    """``(field, value)`` from ``/set NAME VALUE`` text (``top-p`` and ``top_p`` alike); not yet validated
    against its range (``SamplingOptions.with_`` does that). ``stop`` takes a comma-free string, or
    ``none``/empty to clear."""
    key = name.strip().lower().replace("-", "_").removeprefix("__")
    aliases = {"temp": "temperature", "max_new_tokens": "max_tokens", "n_predict": "max_tokens"}
    key = aliases.get(key, key)
    text = text.strip()
    if key == "stop":
        return key, () if text.lower() in ("", "none") else (text,)
    if key not in _RULES:
        raise UsageError(f"unknown sampling option {name!r}; options: {', '.join(names())}")
    kind, valid, _ = _RULES[key]
    if key == "seed" and text.lower() in ("random", "none"):
        return key, None
    try:
        value: Any = int(text) if kind is int else float(text)
    except ValueError:
        raise UsageError(f"{name} must be {valid}, got {text!r}") from None
    return key, value


# ---- filters: 1-D float logits in, same shape out, removed tokens at -inf ---------------------------
def apply_penalties(
    logits: torch.Tensor,
    recent: Sequence[int],
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> torch.Tensor:
    """Penalise the token ids in ``recent`` (the caller passes the last ``repeat_last_n`` tokens)."""
    if not recent or not _penalties_on(repeat_penalty, frequency_penalty, presence_penalty):
        return logits
    counts = token_counts(recent, logits.shape[-1], logits.device)
    return penalise(logits, counts, repeat_penalty, frequency_penalty, presence_penalty)


def _penalties_on(repeat_penalty: float, frequency_penalty: float, presence_penalty: float) -> bool:
    return repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0


def token_counts(ids: Sequence[int], vocab: int, device: Any = None) -> torch.Tensor:
    """(vocab,) float32: how often each id occurs in ``ids`` (ids outside the vocabulary are not counted).
    One copy to the device and ``index_add_``: ``bincount`` on CUDA reads its input's min and max back to
    the host, two waits for the GPU per call."""
    import torch

    kept = [int(t) for t in ids if 0 <= t < vocab]
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    if kept:
        index = torch.tensor(kept, dtype=torch.long).to(device)
        counts.index_add_(0, index, torch.ones(len(kept), dtype=torch.float32, device=device))
    return counts


def penalise(
    logits: torch.Tensor,
    counts: torch.Tensor,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> torch.Tensor:
    """The penalties of the module docstring given each token's count ``counts`` (vocab,): tensor
    operations only, nothing read back to the host."""
    import torch

    counts = counts.to(logits.dtype)
    seen = counts > 0
    out = logits
    if repeat_penalty != 1.0:
        penalised = torch.where(out <= 0, out * repeat_penalty, out / repeat_penalty)
        out = torch.where(seen, penalised, out)
    return out - counts * frequency_penalty - seen.to(logits.dtype) * presence_penalty


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest logits (``k`` <= 0 or >= vocab: all)."""
    import torch

    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most probable tokens until their probability reaches ``p`` (the crossing one included)."""
    import torch

    if p >= 1.0:
        return logits
    values, order = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the tokens ranked above
    drop_sorted = before >= p
    drop_sorted[0] = False  # at least one token stays
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens with probability >= ``p`` × the top token's, i.e. logit >= max + ln(p)."""
    if p <= 0.0:
        return logits
    threshold = logits.max() + math.log(p)
    return logits.masked_fill(logits < threshold, -math.inf)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by ``temperature`` (> 0); at 0 only the argmax is left."""
    if temperature <= 0:
        top = logits.argmax()
        return logits.new_full(logits.shape, -math.inf).index_fill(0, top.view(1), float(logits[top]))
    return logits / temperature


class Sampler:
    """The chain for one reply: ``sampler(logits, recent)`` returns the next token id.

    ``recent`` is the token sequence the model has seen so far (prompt + reply); the penalties look at
    its last ``repeat_last_n`` ids (-1: all of it). Logits are cast to float32 first. After top-k the
    remaining filters run on the k survivors only, so a 262k vocabulary costs one ``topk`` per token.
    """

    def __init__(self, options: SamplingOptions, seed: int | None = None, device: Any = "cpu") -> None:
        import torch

        self.options = options
        seed = options.seed if seed is None else seed
        self.generator = torch.Generator(device=device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self._counts: torch.Tensor | None = None  # token counts of ``_counted``, on the logits' device
        self._counted: list[int] = []

    def window(self, recent: Sequence[int]) -> Sequence[int]:
        n = self.options.repeat_last_n
        if n == 0:
            return ()
        return recent if n < 0 else recent[-n:]

    def _window_counts(self, window: list[int], vocab: int, device: torch.device) -> torch.Tensor:
        """Token counts of ``window``, kept between calls: when the window is the previous one plus a new
        token (and minus the one leaving it), two in-place one-element updates, no copy to the device and
        nothing read back; otherwise counted afresh."""
        counts, prev = self._counts, self._counted
        if counts is None or counts.shape[0] != vocab or counts.device != device:
            counts = None
        elif window != prev:
            drop = len(prev) + 1 - len(window)  # tokens leaving the window when one token is added
            if 0 <= drop <= len(prev) and window[:-1] == prev[drop:]:
                for t in prev[:drop]:
                    if 0 <= t < vocab:
                        counts.narrow(0, t, 1).sub_(1)
                if 0 <= window[-1] < vocab:
                    counts.narrow(0, window[-1], 1).add_(1)
            else:
                counts = None
        if counts is None:
            counts = token_counts(window, vocab, device)
        self._counts, self._counted = counts, window
        return counts

    def _penalised(self, logits: torch.Tensor, recent: Sequence[int]) -> torch.Tensor:
        o = self.options
        logits = logits.float()
        window = [int(t) for t in self.window(recent)]
        if not window or not _penalties_on(o.repeat_penalty, o.frequency_penalty, o.presence_penalty):
            return logits
        counts = self._window_counts(window, logits.shape[-1], logits.device)
        return penalise(logits, counts, o.repeat_penalty, o.frequency_penalty, o.presence_penalty)

    def _survivors(self, logits: torch.Tensor, recent: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """(probabilities, their token ids or None for the whole vocabulary) after the chain."""
        import torch

        o = self.options
        x = self._penalised(logits, recent)
        if o.greedy:
            return torch.softmax(apply_temperature(x, 0.0), dim=-1), None
        ids = None
        if 0 < o.top_k < x.shape[-1]:
            x, ids = torch.topk(x, o.top_k)  # the survivors, in decreasing order
        x = apply_temperature(min_p_filter(top_p_filter(x, o.top_p), o.min_p), o.temperature)
        return torch.softmax(x, dim=-1), ids

    def distribution(self, logits: torch.Tensor, recent: Sequence[int] = ()) -> torch.Tensor:
        """The probabilities the next token is drawn from (full vocabulary, zeros where filtered)."""
        import torch

        probs, ids = self._survivors(logits, recent)
        if ids is None:
            return probs
        return torch.zeros(logits.shape[-1], dtype=probs.dtype, device=probs.device).scatter(0, ids, probs)

    def __call__(self, logits: torch.Tensor, recent: Sequence[int] = ()) -> int:
        import torch

        if self.options.greedy:
            x = self._penalised(logits, recent)
            i = int(x.argmax())
            _refuse_nan(x[i])  # argmax lands on a NaN when there is one
            return i
        probs, ids = self._survivors(logits, recent)
        _refuse_nan(probs[0])  # one NaN survivor makes every probability NaN
        i = torch.multinomial(probs, 1, generator=self.generator)
        return int(i if ids is None else ids[i])


def _refuse_nan(value: torch.Tensor) -> None:
    if bool(value.isnan()):
        raise FormatError(NAN_LOGITS)
