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
  ``**``, ``%``, ``format``, ``replace``, ``join`` and width arguments, their *announced* result) would
  exceed the same bound, so no single step allocates without limit.

Messages and extra variables are copied to plain JSON types before the template sees them.

When a model has no template we use ``CHATML_TEMPLATE`` (``<|im_start|>role\\ncontent<|im_end|>\\n``
per message, then ``<|im_start|>assistant\\n`` if ``add_generation_prompt``), the format of SmolLM2,
Qwen and many fine-tunes; ``ChatTemplate.is_fallback`` tells callers it is in use.
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmctl.errors import TemplateError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_TEMPLATE_CHARS = 1 << 20
DEFAULT_MAX_OUTPUT_CHARS = 1 << 20  # plus 4x the size of the inputs, see ChatTemplate.render
DEFAULT_MAX_OPERATIONS = 1_000_000
DEFAULT_TIMEOUT_S = 10.0
MAX_INT_BITS = 1 << 16  # integers a template computes stay below 2**65536


@dataclass
class _Budget:
    max_chars: int
    max_ops: int
    deadline: float
    timeout_s: float
    ops: int = 0

    def tick(self, n: int = 1) -> None:
        self.ops += n
        if self.ops > self.max_ops:
            raise TemplateError(
                f"chat template ran more than {self.max_ops:,} loop iterations/operations; it loops "
                "without bound — fix the template"
            )
        if self.ops & 255 == 0 and time.monotonic() > self.deadline:
            raise TemplateError(
                f"chat template did not finish within {self.timeout_s:g} s; it loops without bound — "
                "fix the template"
            )

    def check_size(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.max_chars:
            raise self.too_big(what, len(value))
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"chat template computed an integer of {value.bit_length()} bits with {what}")
        return value

    def check_announced(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise self.too_big(what, n)

    def too_big(self, what: str, n: int) -> TemplateError:
        return TemplateError(
            f"chat template exceeds its size bound: {what} would make {n:,} characters or items, more "
            f"than {self.max_chars:,}; the template repeats without bound — fix the template"
        )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "llmctl_template_budget", default=None
)


def _budget() -> _Budget:
    b = _BUDGET.get()
    if b is None:  # a compiled template used outside ChatTemplate.render
        raise TemplateError("chat templates must be rendered through ChatTemplate.render")
    return b


# ---- checks for operations that can allocate a lot in one step ----------------------------------
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")


def _check_percent_format(fmt: str, b: _Budget) -> None:
    for m in _PERCENT_SPEC.finditer(fmt):
        for num in m.groups():
            if num and int(num) > b.max_chars:
                raise b.too_big(f"the format width {num}", int(num))


def _check_brace_format(fmt: str, b: _Budget) -> None:
    import string

    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same error itself
    for _, _, spec, _ in parsed:
        for num in re.findall(r"\d+", spec or ""):
            if int(num) > b.max_chars:
                raise b.too_big(f"the format spec {spec!r}", int(num))


def _check_int_args(args: Sequence[Any], kwargs: Mapping[str, Any], b: _Budget, what: str) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > b.max_chars:
            raise b.too_big(f"{what} with argument {v}", abs(v))


def _check_replace(s: Any, old: Any, new: Any, count: Any, b: _Budget) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        hits = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        b.check_announced(len(s) + hits * (len(new) - len(old)), "replace")


def _check_join(sep: Any, seq: Any, b: _Budget) -> None:
    if isinstance(sep, str) and hasattr(seq, "__len__"):
        b.check_announced(len(sep) * max(len(seq) - 1, 0), "join")


def _check_binop(op: str, left: Any, right: Any, b: _Budget) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                b.check_announced(len(seq) * max(n, 0), "'*'")
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateError("chat template multiplies integers that are too large")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * left.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"chat template raises an integer to the power {right}; too large")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        b.check_announced(len(left) + len(right), "'+'")
    elif op == "%" and isinstance(left, str):
        _check_percent_format(left, b)


# ---- the environment ----------------------------------------------------------------------------
@functools.cache
def _environment():
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        # `a ~ b` compiles to a plain str join; route it through the environment so its size is checked.
        def visit_Concat(self, node, frame):  # type: ignore[override]
            self.write("environment.llmctl_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class GenerationTag(jinja2.ext.Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (marks assistant text); renders its body."""

        tags = {"generation"}  # noqa: RUF012

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            # Count every loop iteration: `for x in EXPR` becomes `for x in environment.llmctl_iter(EXPR)`.
            for loop in list(tree.find_all(nodes.For)):
                loop.iter = nodes.Call(
                    nodes.EnvironmentAttribute("llmctl_iter"), [loop.iter], [], None, None
                ).set_lineno(loop.iter.lineno)
            tree.set_environment(self)
            return tree

        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
            )

        def getattr(self, obj, attribute):
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _budget().tick()
            return super().getitem(obj, argument)

        def wrap_str_format(self, value):
            fmt = super().wrap_str_format(value)
            if fmt is not None:
                _check_brace_format(value.__self__, _budget())
            return fmt

        def call(self, context, obj, /, *args, **kwargs):
            b = _budget()
            b.tick()
            _check_int_args(args, kwargs, b, f"calling {getattr(obj, '__name__', 'a function')}")
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, str) and getattr(obj, "__name__", "") == "replace" and len(args) >= 2:
                _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1, b)
            if isinstance(owner, str) and getattr(obj, "__name__", "") == "join" and args:
                _check_join(owner, args[0], b)
            return b.check_size(super().call(context, obj, *args, **kwargs), "a call")

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.tick()
            _check_binop(operator, left, right, b)
            return b.check_size(super().call_binop(context, operator, left, right), f"'{operator}'")

        def concat(self, parts):  # joins the buffers of macros, call and filter blocks
            b = _budget()
            parts = list(parts)
            b.check_announced(sum(map(len, parts)), "a macro or block")
            return "".join(parts)

        def llmctl_concat(self, parts):
            b = _budget()
            b.tick()
            parts = [str(p) for p in parts]
            b.check_announced(sum(map(len, parts)), "'~'")
            return "".join(parts)

        def llmctl_iter(self, iterable):
            b = _budget()
            for item in iterable:
                b.tick()
                yield item

    class SafeNamespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore names, so templates cannot shadow internals."""

        def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace: `self` may be a key
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for key in attrs:
                SafeNamespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates may not set underscore attributes ({name!r})")

    def raise_exception(message):
        raise _TemplateRaised(str(message))

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes <, >, & and '; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def make_dict(*args, **kwargs):
        return dict(*args, **kwargs)

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, f)
    env.globals.pop("lipsum", None)
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=make_dict, namespace=SafeNamespace
    )
    return env


class _TemplateRaised(Exception):
    """raise_exception() called by a template."""


def _bounded_filter(name: str, f: Any) -> Any:
    # Filters taking a context/eval context/environment get it first, then the value, then arguments.
    skip = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        b = _budget()
        b.tick()
        _check_int_args(args[skip:], kwargs, b, f"the {name} filter")
        value, rest = (args[skip - 1], args[skip:]) if len(args) >= skip else (None, ())
        if name == "replace" and len(rest) >= 2:
            _check_replace(value, rest[0], rest[1], rest[2] if len(rest) > 2 else kwargs.get("count", -1), b)
        elif name == "join":
            _check_join(rest[0] if rest else kwargs.get("d", ""), value, b)
        elif name == "format" and isinstance(value, str):
            _check_percent_format(value, b)
        return b.check_size(f(*args, **kwargs), f"the {name} filter")

    return bounded


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2

    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"chat template is {len(source):,} characters, more than the {MAX_TEMPLATE_CHARS:,} allowed"
        )
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:  # constant folding can hit the sandbox at compile time
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from None


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
            raise TemplateError(f"the chat template refused the conversation: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(
                f"chat template tried an unsafe operation ({e}); templates may not reach Python internals"
            ) from None
        except RecursionError:
            raise TemplateError("chat template recursed too deeply; fix the template") from None
        except MemoryError:
            raise TemplateError("chat template ran out of memory; fix the template") from None
        except Exception as e:  # jinja2 errors, TypeError/ValueError from template expressions
            raise TemplateError(f"chat template failed: {e.__class__.__name__}: {e}") from None
        finally:
            gen.close()


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
