"""Chat templates: Jinja2 rendered the way transformers renders them, in a sandbox with hard bounds.

Chat templates ship inside model files, so they are untrusted code. We render with jinja2's
``ImmutableSandboxedEnvironment`` configured like transformers' ``apply_chat_template`` (``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, a ``{% generation %}`` tag, ``raise_exception``, ``strftime_now`` and a
``tojson`` that does not HTML-escape), and add what the sandbox alone does not give:

* **no silent internals**: touching an unsafe attribute (``''.__class__``, ``cycler.__init__.__globals__``)
  raises ``TemplateError`` instead of rendering an empty string;
* **bounded work**: every ``{% for %}`` iteration, call, filter and operator counts against an operation
  budget (``max_operations``) and a wall-clock deadline (``timeout_s``);
* **bounded memory**: the output is streamed and stopped past ``max_output_chars``; operators, ``~``
  concatenation, macro/block buffers, calls and filters are refused when their result (or, for ``*``,
  ``**``, ``%``, ``format``, ``replace``, ``join``, ``expandtabs``, ``indent``, ``wordwrap``, ``split``,
  ``translate``, the listing filters and width arguments, their *announced* result) would exceed the same
  bound, so no single step allocates without limit. A format announces the sum of all its widths and
  precisions, ``*`` and nested ``{:{w}}`` fields included, and the size of each value it formats;
  ``tojson`` and ``pprint`` stop as their text passes the bound. The process may grow by at most
  ``MIN_RENDER_GROWTH_BYTES`` (or 16x that bound) during one render, which bounds how many such values a
  template keeps alive at once (one variable each, a frame each of a recursive macro);
* **containers measured by what they hold**: a list holds references, so ``['x' * 1000000] * 1000`` is
  8 KB whose text is 1 GB. Lists, tuples and dicts count the text of everything they hold, nested
  containers as often as they occur (``_Budget.size`` in ``template_budget.py``), when ``*`` and ``+``
  are about to make them and when a literal, call or filter makes one; a call's arguments count together, and a generator is listed,
  measured, before a loop, ``f(*gen)`` or a call lists it. Containers and namespaces may hold only data
  (strings, numbers, lists, dicts), so nothing they hold can grow after they were measured;
* **bounded compilation**: templates up to ``MAX_TEMPLATE_CHARS`` characters and ``MAX_TEMPLATE_TOKENS``
  tokens (counted by the lexer before anything is parsed); nesting too deep to compile is a
  ``TemplateError``.

This module compiles templates and renders conversations; the sandbox is ``template_sandbox.py``, the
per-render budget ``template_budget.py`` and the checks made before an allocating step ``template_checks.py``.

Messages and extra variables are copied to plain JSON types before the template sees them.

When a model has no template we use ``CHATML_TEMPLATE`` (``<|im_start|>role\\ncontent<|im_end|>\\n``
per message, then ``<|im_start|>assistant\\n`` if ``add_generation_prompt``), the format of SmolLM2,
Qwen and many fine-tunes; ``ChatTemplate.is_fallback`` tells callers it is in use.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from llmctl.errors import TemplateError
from llmctl.runtime.template_budget import (  # noqa: F401  (MAX_INT_BITS, MIN_RENDER_GROWTH_BYTES: public)
    _BUDGET,
    MAX_INT_BITS,
    MIN_RENDER_GROWTH_BYTES,
    _Budget,
    _held_size,
)
from llmctl.runtime.template_sandbox import _environment, _TemplateRaised

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_TEMPLATE_CHARS = 1 << 20
MAX_TEMPLATE_TOKENS = 20_000  # tags, names, operators, literals; Gemma 4's 15 KB template has 2,352
DEFAULT_MAX_OUTPUT_CHARS = 1 << 20  # plus 4x the size of the inputs, see ChatTemplate.render
DEFAULT_MAX_OPERATIONS = 1_000_000
DEFAULT_TIMEOUT_S = 10.0


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2

    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"chat template is {len(source):,} characters, more than the {MAX_TEMPLATE_CHARS:,} allowed"
        )
    try:
        _check_tokens(source)
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template has a syntax error at line {e.lineno}: {_one_line(e.message)}"
        ) from None
    except jinja2.exceptions.SecurityError as e:  # constant folding can hit the sandbox at compile time
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from None
    except RecursionError:  # jinja2's parser recurses once per nested parenthesis, block or operator
        raise TemplateError("chat template nests too deeply to compile; fix the template") from None
    except SyntaxError as e:  # Python's limits on the code jinja2 generates (e.g. 20 nested loops)
        if "nested" not in e.msg:  # `{% break %}` outside a loop compiles to a Python `break` outside one
            raise TemplateError(f"chat template does not compile: {e.msg}; fix the template") from None
        raise TemplateError(
            f"chat template nests too deeply to compile ({e.msg}); fix the template"
        ) from None


def _check_tokens(source: str) -> None:
    """Refuse a template of more than ``MAX_TEMPLATE_TOKENS`` tokens before it is parsed: compiling costs
    about 3 KB a token, mostly in Python's ``compile()`` (a 1 MiB template of ``{{ a }}`` took 1.3 GB and 30 s).
    Text between tags is one token however long; comments and whitespace do not count."""
    from jinja2.lexer import TOKEN_DATA, ignored_tokens

    n = 0
    for _, kind, _ in _environment().lexer.tokeniter(source, None):
        if kind != TOKEN_DATA and kind not in ignored_tokens:
            n += 1
            if n > MAX_TEMPLATE_TOKENS:
                raise TemplateError(
                    f"chat template has more than {MAX_TEMPLATE_TOKENS:,} tokens (tags, names, operators, "
                    "literals), more than any real template; compiling it would take hundreds of megabytes — "
                    "fix the template"
                )


# ---- public API ----------------------------------------------------------------------------------
class ChatTemplate:
    """A compiled chat template. ``source=None`` selects the ChatML fallback (``is_fallback``)."""

    def __init__(
        self,
        source: str | None = None,
        *,
        max_output_chars: int | None = None,
        max_operations: int = DEFAULT_MAX_OPERATIONS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if source is not None and not isinstance(source, str):
            raise TemplateError(f"a chat template must be a string, got {type(source).__name__}")
        self.is_fallback = source is None or not source.strip()
        self.source = CHATML_TEMPLATE if self.is_fallback else source
        self.max_output_chars = max_output_chars
        self.max_operations = max_operations
        self.timeout_s = timeout_s
        self._template = _compile(self.source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        bos_token: str = "",
        eos_token: str = "",
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation, like transformers' ``apply_chat_template(..., tokenize=False)``.

        ``extra`` variables (e.g. ``enable_thinking``) are passed to the template. The output is bounded
        by ``max_output_chars`` (default 1 MiB + 4 x the characters of all inputs).
        """
        messages = _plain_messages(messages)
        context = {
            "messages": messages,
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": bool(add_generation_prompt),
            "bos_token": bos_token,
            "eos_token": eos_token,
            **{k: _plain(v) for k, v in extra.items()},
        }
        limit = self.max_output_chars
        if limit is None:
            limit = DEFAULT_MAX_OUTPUT_CHARS + 4 * _text_size(context)
        budget = _Budget(limit, self.max_operations, time.monotonic() + self.timeout_s, self.timeout_s)
        budget.known = _held_size(context, sys.maxsize, {})[2]  # the inputs, measured once
        token = _BUDGET.set(budget)
        try:
            return "".join(self._stream(context, budget))
        finally:
            _BUDGET.reset(token)

    def _stream(self, context: dict[str, Any], budget: _Budget) -> Iterator[str]:
        import jinja2

        total = 0
        gen = self._template.generate(**context)
        try:
            for chunk in gen:
                total += len(chunk)
                if total > budget.max_chars:
                    raise TemplateError(
                        f"chat template output exceeds {budget.max_chars:,} characters; the template "
                        "repeats without bound — fix the template"
                    )
                budget.tick()
                yield chunk
        except TemplateError:
            raise
        except _TemplateRaised as e:
            raise TemplateError(f"the chat template refused the conversation: {_one_line(e)}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(
                f"chat template tried an unsafe operation ({e}); templates may not reach Python internals"
            ) from None
        except RecursionError:
            raise TemplateError("chat template recursed too deeply; fix the template") from None
        except MemoryError:
            raise TemplateError("chat template ran out of memory; fix the template") from None
        except Exception as e:  # jinja2 errors, TypeError/ValueError from template expressions
            raise TemplateError(f"chat template failed: {e.__class__.__name__}: {_one_line(e)}") from None
        finally:
            gen.close()


def _one_line(text: Any) -> str:
    """A message from the template (``raise_exception``'s text, an error quoting it) on one line."""
    return " ".join(str(text).split())


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> str:
    """One-shot ``ChatTemplate(template).render(messages, **kwargs)``; ``None`` uses the ChatML fallback."""
    return ChatTemplate(template).render(messages, **kwargs)


def _plain_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(
            f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} must be an object with a string 'role', got {m!r:.80}")
        m = _plain(m)
        # Like transformers: reasoning given under any of its names is visible under the names templates read.
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any, depth: int = 0) -> Any:
    """A copy made of JSON types only (str, int, float, bool, None, list, dict): nothing else reaches the
    template, so it cannot call methods of arbitrary objects."""
    if depth > 32:
        raise TemplateError("chat template inputs are nested more than 32 levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _text_size(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 0
