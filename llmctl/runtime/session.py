"""The chat engine, backend-neutral: a conversation, its chat template, context trimming, KV reuse across
turns, stop strings and timings. Nothing here prints: ``Session.reply`` is a generator of events.

A *backend* holds a model and its KV cache and does one thing, ``generate(prompt_ids, options, seed)``:
bring the cache to ``prompt_ids`` — keep the longest common prefix with the tokens it already holds,
prefill only the rest — then yield sampled token ids until the caller stops. Two implement it:
``TorchBackend`` (``llmctl.runtime.torch_backend``: llmctl's own runtime, every format ``load_model`` reads) and
``LlamaCppBackend`` (``llmctl.runtime.llamacpp``: GGUF files through llama-cpp-python). Both use the
sampler semantics of ``llmctl.runtime.sampler`` (llama.cpp's chain).

Each turn renders the *whole* conversation with the template; since the conversation only grows, its
tokens start with what the cache holds and only the new turn is prefilled. When the rendered
conversation plus room for the reply no longer fits the context, the oldest turns are dropped (the
system prompt stays) until half of the room is free, and the next reply says so.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl import atomic
from llmctl.errors import UsageError
from llmctl.runtime.backend import (
    BACKENDS,
    MAX_TOP_LOGPROBS,
    Backend,
    choose_backend,
    logprobs_of,
)
from llmctl.runtime.sampler import MAX_SEED, SamplingOptions

if TYPE_CHECKING:
    from llmctl.runtime.chat_template import ChatTemplate

DEFAULT_CONTEXT = 4096  # cap of the default --context (the model's limit is often 32k-128k)
MIN_CONTEXT = 64
TRANSCRIPT_FORMAT = "llmctl-chat-transcript"
FALLBACK_STOPS = ("<|im_end|>", "<|im_start|>")  # the ChatML fallback's markers, as text


# ---- events ----------------------------------------------------------------------------------------
@dataclass
class Notice:
    """Something the user should know about this turn (e.g. turns dropped from the context)."""

    text: str


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model: the log-softmax of the logits it was drawn
    from, before penalties, filters and temperature (what OpenAI's API and vLLM report), with the ``top``
    likeliest tokens there as ``(id, text, logprob)``, likeliest first. ``text`` is what the token added to
    the reply (empty for a token that ends inside a character; the next one completes it)."""

    token: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """New reply text, ready to print; with the tokens it came from when log-probabilities were asked for."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Reply:
    """The end of a reply: its text, why it ended and its counts and timings.

    ``finish_reason``: ``stop`` (end-of-turn token or a stop string), ``length`` (``max_tokens``),
    ``context`` (the context window is full), ``interrupted`` (Ctrl-C).
    """

    text: str
    finish_reason: str
    prompt_tokens: int  # tokens of the rendered conversation this reply continues
    prefilled_tokens: int  # of those, computed for this reply (the rest came from the KV cache)
    completion_tokens: int  # tokens generated (an end-of-turn token not counted)
    ttft_s: float  # from the request to the first generated token (render, prefill, first sample)
    total_s: float
    seed: int
    context_used: int  # tokens in the KV cache afterwards
    context_size: int
    dropped_turns: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token of ``text``, when asked for

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first (None with fewer than two tokens)."""
        n, dt = self.completion_tokens - 1, self.total_s - self.ttft_s
        return n / dt if n > 0 and dt > 0 else None

    @property
    def prefill_tok_s(self) -> float | None:
        return self.prefilled_tokens / self.ttft_s if self.prefilled_tokens and self.ttft_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reply": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 6),
            "total_s": round(self.total_s, 6),
            "tokens_per_s": None if self.decode_tok_s is None else round(self.decode_tok_s, 3),
            "seed": self.seed,
            "context_used": self.context_used,
            "context_size": self.context_size,
            "dropped_turns": self.dropped_turns,
        }


# ---- backends ----------------------------------------------------------------------------------------
def load_backend(
    spec: str | None,
    backend: str = "auto",
    *,
    context: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
    gpu_layers: int | None = None,
    tensor_parallel: int | None = None,
) -> tuple[Backend, str]:
    """Resolve MODEL, pick and load the backend; returns it and a line saying which and why.
    ``gpu_layers`` (llama.cpp's ``-ngl``) applies to the llama.cpp backend only, ``tensor_parallel`` to vLLM."""
    from llmctl.runtime.device import choose_threads, set_threads
    from llmctl.runtime.vllm_engine import check_placement, check_source, check_tensor_parallel, import_vllm
    from llmctl.sources import resolve

    if backend not in BACKENDS:  # before resolving MODEL
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    tensor_parallel = check_tensor_parallel(tensor_parallel, backend)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
        raise UsageError(f"--threads must be a positive integer, got {threads!r}")
    source = resolve(spec)
    limit = source.config.max_position_embeddings
    if context is None:
        context = min(limit, DEFAULT_CONTEXT)
    elif isinstance(context, bool) or not isinstance(context, int) or not MIN_CONTEXT <= context <= limit:
        raise UsageError(
            f"--context must be between {MIN_CONTEXT} and the model's limit of {limit} tokens, got {context!r}"
        )
    chosen, why = choose_backend(source, backend, dtype=dtype, device=device, gpu_layers=gpu_layers)
    if chosen == "vllm":
        check_source(source)
        check_placement(device=device, threads=threads, gpu_layers=gpu_layers)
        import_vllm()
        from llmctl.runtime.tokenizer import load_tokenizer
        from llmctl.runtime.vllm_backend import VllmBackend

        tokenizer = load_tokenizer(source.path)
        try:
            b: Backend = VllmBackend(source, tokenizer, context, tensor_parallel=tensor_parallel, dtype=dtype)
        except BaseException:
            tokenizer.close()
            raise
        b.source = source
        return b, f"backend: {b.describe()} ({why}); context {context} tokens"
    if chosen == "llama.cpp":
        from llmctl.runtime.llamacpp import LlamaCppBackend

        threads, why_threads = choose_threads(threads)
        b = LlamaCppBackend(source.path, context, threads=threads, device=device, gpu_layers_=gpu_layers)
    else:
        from llmctl.runtime.loader import load_model
        from llmctl.runtime.tokenizer import load_tokenizer
        from llmctl.runtime.torch_backend import TorchBackend

        threads, why_threads = choose_threads(threads)
        set_threads(threads)
        tokenizer = load_tokenizer(source.path)
        model = load_model(source, dtype=dtype, device=device)
        b = TorchBackend(model, tokenizer, context)
    b.source = source
    return b, f"backend: {b.describe()} ({why}); context {context} tokens; threads: {why_threads}"


# ---- stop strings ----------------------------------------------------------------------------------
class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one: text that could still
    become a stop string is held back until the next piece decides."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found: then the text ends before it)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---- the session -----------------------------------------------------------------------------------
@dataclass
class _Turn:
    prompt_tokens: int = 0
    prefilled: int = 0
    completion: int = 0
    text: str = ""
    reason: str = "interrupted"
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    seed: int = 0
    dropped: int = 0
    recorded: bool = False
    top_logprobs: int | None = None  # None: no log-probabilities asked for
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Session:
    """A conversation with one backend. ``reply(text)`` yields ``Notice``/``Piece`` events, then a
    ``Reply``. Reply ``i`` since the start (or ``reset`` or a new seed) is sampled with ``seed + i``, so
    the same seed, options, backend and conversation give the same text."""

    def __init__(
        self,
        backend: Backend,
        options: SamplingOptions | None = None,
        *,
        system: str | None = None,
        template: str | None = None,
        completion: bool = False,
    ) -> None:
        """``completion``: no chat template — the prompt (the system text, then each message and reply in
        turn, as written) is continued as plain text, as a base model is meant to be used."""
        from llmctl.runtime.chat_template import ChatTemplate

        if completion and template is not None:
            raise UsageError("a chat template and completion mode exclude each other; drop --template or --raw")
        self.completion = completion

        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.options = options or SamplingOptions()
        self.seed = self.options.seed if self.options.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.system = system or None
        source = template if template is not None else self.tokenizer.chat_template
        self.template: ChatTemplate = ChatTemplate(source)
        self.messages: list[dict[str, str]] = []
        self.replies = 0
        self.last: Reply | None = None
        self.totals = {"replies": 0, "generated_tokens": 0, "prefilled_tokens": 0}  # running, not a log

    # ---- settings ------------------------------------------------------------------------------
    @property
    def uses_fallback_template(self) -> bool:
        return self.template.is_fallback and not self.completion

    @property
    def template_name(self) -> str:
        if self.completion:
            return "none (completion)"
        return "ChatML fallback" if self.uses_fallback_template else "the model's"

    def set_option(self, name: str, value: Any) -> None:
        self.options = self.options.with_(**{name: value})
        if name == "seed":
            self.seed = value if value is not None else secrets.randbelow(MAX_SEED + 1)
            self.replies = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def reset(self) -> None:
        """Forget the conversation (the system prompt and options stay); the KV cache is cleared."""
        self.messages = []
        self.replies = 0
        self.backend.reset()

    # ---- rendering -----------------------------------------------------------------------------
    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The conversation's token ids with the generation prompt (BOS as ``Tokenizer.encode_chat``)."""
        tok = self.tokenizer
        if self.completion:  # the text itself: the system text as its first paragraph, then each turn as written
            head = [m["content"] + "\n\n" if m["role"] == "system" else m["content"] for m in messages]
            return tok.encode("".join(head), add_bos=tok.add_bos_default)
        text = self.template.render(
            messages, add_generation_prompt=True, bos_token=tok.bos_token or "", eos_token=tok.eos_token or ""
        )
        has_bos = bool(tok.bos_token) and text.startswith(tok.bos_token or "")
        return tok.encode(text, add_bos=tok.add_bos_default and not has_bos)

    def _fit(self) -> tuple[list[int], int]:
        """Token ids of the conversation, with room for the reply. When it does not fit, the oldest turns
        are dropped until it takes at most half of what is left for the prompt (as llama.cpp's context
        shift discards half), so the next turns reuse the KV cache again instead of each dropping one turn
        and prefilling everything anew."""
        n_ctx = self.backend.n_ctx
        reserve = min(self.options.max_tokens, n_ctx // 4)
        limit = n_ctx - reserve
        ids = self.encode(self.conversation())
        dropped = 0
        while len(ids) > (limit if not dropped else limit // 2):
            if len(self.messages) <= 1:
                if dropped and len(ids) <= limit:
                    break
                raise UsageError(
                    f"the message needs {len(ids)} tokens with the template and system prompt, but the "
                    f"context holds {n_ctx} with {reserve} kept for the reply; shorten it or raise --context"
                )
            self.messages.pop(0)  # the oldest user message, and the reply to it
            while self.messages[:-1] and self.messages[0]["role"] != "user":
                self.messages.pop(0)
            dropped += 1
            ids = self.encode(self.conversation())
        return ids, dropped

    # ---- one turn ------------------------------------------------------------------------------
    def reply(
        self,
        text: str,
        stop_requested: Callable[[], bool] | None = None,
        *,
        logprobs: int | None = None,
    ) -> Iterator[Notice | Piece | Reply]:
        """Add a user message and generate the reply. ``stop_requested`` is polled once per token (the
        REPL's Ctrl-C sets it); when it returns True, or when the caller closes the generator early, what
        was generated so far is kept as the reply, marked ``interrupted``. ``logprobs``: give each
        token's log-probability and that many likeliest alternatives (0 to ``MAX_TOP_LOGPROBS``) with the
        pieces and the reply."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError("the message is empty; type something to send")
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS
        ):
            raise UsageError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS} alternatives, got {logprobs!r}")
        saved = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        turn = _Turn()
        try:
            ids, turn.dropped = self._fit()
        except BaseException:
            self.messages = saved
            raise
        if turn.dropped:
            yield Notice(
                f"context full: dropped the {turn.dropped} oldest turn(s) "
                f"({'system prompt kept, ' if self.system else ''}{len(self.messages) - 1} message(s) left)"
            )
        turn.prompt_tokens = len(ids)
        turn.top_logprobs = logprobs
        turn.seed = (self.seed + self.replies) % (MAX_SEED + 1)
        self.replies += 1
        try:
            yield from self._generate(ids, turn, stop_requested)
        except KeyboardInterrupt:
            turn.reason = "interrupted"
        except GeneratorExit:
            turn.reason = "interrupted"
            self._record(turn)
            raise
        except BaseException:
            turn.reason = "error"
            self._record(turn)
            raise
        yield self._record(turn)

    def _generate(
        self, ids: list[int], turn: _Turn, stop_requested: Callable[[], bool] | None
    ) -> Iterator[Piece]:
        o = self.options
        eos = self.tokenizer.eos_ids
        stops = list(o.stop) + (list(FALLBACK_STOPS) if self.uses_fallback_template else [])
        matcher = StopMatcher(stops)
        decoder = self.tokenizer.stream_decoder(skip_special=True)
        tokens = self.backend.generate(ids, o, turn.seed)
        pending: list[TokenLogprob] = []  # tokens whose text is held back, given with the piece that shows it

        def piece(out: str) -> Piece:
            turn.text += out
            turn.logprobs += pending
            p = Piece(out, list(pending))
            pending.clear()
            return p

        try:
            reason, hit = "context", False
            for token in tokens:
                if turn.t_first is None:
                    turn.t_first = time.perf_counter()
                    turn.prefilled = self.backend.prefilled
                if token in eos:
                    reason = "stop"
                    break
                if stop_requested is not None and stop_requested():
                    reason = "interrupted"
                    break
                turn.completion += 1
                delta = decoder.push(token)
                if turn.top_logprobs is not None:
                    pending.append(self._logprob(token, delta, turn.top_logprobs))
                out, hit = matcher.push(delta)
                if out:
                    yield piece(out)
                if hit:
                    reason = "stop"
                    break
                if turn.completion >= o.max_tokens:
                    reason = "length"
                    break
            if not hit:  # text held back (a partial character, a possible stop string) is reply text
                out, hit = matcher.push(decoder.flush())
                out += "" if hit else matcher.flush()
                if out:
                    yield piece(out)
            turn.reason = reason
        finally:
            tokens.close()
            turn.prefilled = self.backend.prefilled

    def _logprob(self, token: int, text: str, top: int) -> TokenLogprob:
        lp, best = logprobs_of(self.backend.last_logits(), token, top)
        decode = self.tokenizer.decode
        return TokenLogprob(token, text, lp, [(i, decode([i]), v) for i, v in best])

    def _record(self, turn: _Turn) -> Reply:
        if not turn.recorded:
            turn.recorded = True
            if turn.text or turn.reason not in ("interrupted", "error"):
                self.messages.append({"role": "assistant", "content": turn.text})
            else:  # nothing came out: forget the question too, so roles keep alternating
                self.messages.pop()
        now = time.perf_counter()
        first = turn.t_first if turn.t_first is not None else now
        self.last = Reply(
            text=turn.text,
            finish_reason=turn.reason,
            prompt_tokens=turn.prompt_tokens,
            prefilled_tokens=turn.prefilled,
            completion_tokens=turn.completion,
            ttft_s=first - turn.t0,
            total_s=now - turn.t0,
            seed=turn.seed,
            context_used=len(self.backend.tokens),
            context_size=self.backend.n_ctx,
            dropped_turns=turn.dropped,
            logprobs=None if turn.top_logprobs is None else turn.logprobs,
        )
        self.totals["replies"] += 1
        self.totals["generated_tokens"] += self.last.completion_tokens
        self.totals["prefilled_tokens"] += self.last.prefilled_tokens
        return self.last

    def complete(self, text: str) -> Reply:
        """``reply`` run to its end (no streaming)."""
        last = None
        for event in self.reply(text):
            if isinstance(event, Reply):
                last = event
        assert last is not None
        return last

    # ---- /stats, /save, /load ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.backend.describe(),
            "turns": sum(m["role"] == "user" for m in self.messages),
            "context_used": len(self.backend.tokens),
            # a loaded (or reset-and-refilled) conversation not yet in the KV cache: its tokens, prefilled
            # with the next message
            "context_pending": len(self.encode(self.conversation())) if self.messages and not self.backend.tokens else 0,
            "context_size": self.backend.n_ctx,
            "kv_cache_bytes": self.backend.kv_bytes(),
            **self.totals,
            "seed": self.seed,
            "template": self.template_name,
            "options": self.options.to_dict(),
            "last": self.last.to_dict() if self.last else None,
        }

    def transcript(self) -> dict[str, Any]:
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": 1,
            "system": self.system,
            "messages": [dict(m) for m in self.messages],
            "options": self.options.to_dict(),
            "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """Write the transcript as JSON (a temporary file, then renamed: never half-written)."""
        path = Path(path).expanduser()
        if not str(path).strip() or path.is_dir():
            raise UsageError(f"/save needs a file name, got {str(path)!r}")
        try:  # a temporary file made with O_EXCL: a link planted beside the target is never written through
            atomic.write_text(path, json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}; pick a writable path") from None
        return path

    def load(self, path: str | Path) -> int:
        """Replace the conversation (and system prompt) with a saved transcript; returns its message
        count. Options are kept. Also reads ``{"messages": [...]}`` with an optional leading system
        message (OpenAI style)."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file; /load takes a file written by /save") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: not a JSON transcript ({e}); /load takes a file written by /save") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list):
            raise UsageError(f"{path}: no \"messages\" list; /load takes a file written by /save")
        system = data.get("system")
        out: list[dict[str, str]] = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise UsageError(
                    f"{path}: message {i} must be {{\"role\": \"user\"|\"assistant\", \"content\": text}}"
                )
            if role == "system":
                if i:
                    raise UsageError(f"{path}: a system message may only come first (message {i})")
                system = content
                continue
            out.append({"role": role, "content": content})
        if system is not None and not isinstance(system, str):
            raise UsageError(f"{path}: \"system\" must be text or null")
        self.messages, self.system = out, system or None
        self.replies = 0
        return len(out)
