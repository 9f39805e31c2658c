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
  ``**``, ``%``, ``format``, ``replace``, ``join``, ``expandtabs``, ``indent``, ``wordwrap`` and width
  arguments, their *announced* result) would exceed the same bound, so no single step allocates without
  limit. A format announces the sum of all its widths and precisions, ``*`` and nested ``{:{w}}`` fields
  included;
* **bounded compilation**: templates up to ``MAX_TEMPLATE_CHARS`` characters and ``MAX_TEMPLATE_TOKENS``
  tokens (counted by the lexer before anything is parsed); nesting too deep to compile is a
  ``TemplateError``.

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
MAX_TEMPLATE_TOKENS = 20_000  # tags, names, operators, literals; Gemma 4's 15 KB template has 2,352
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
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.max_chars:
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
# Widths and precisions are summed over all the fields of a format: each may pass the bound alone and
# thousands of them together still make gigabytes ('%1000000s' * 2000).
_TOO_MANY_DIGITS = 1 << 62  # a width of 19 digits or more: CPython refuses it, we count it as too big
_DIGITS = re.compile(r"[0-9]+")


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 19 else _TOO_MANY_DIGITS


def _percent_widths(fmt: str | bytes, args: Any, limit: int) -> int:
    """The sum of the widths and precisions in printf-style ``fmt``, ``*`` read from ``args`` as ``%`` reads
    them (a tuple is the arguments, anything else the one argument), counted until it passes ``limit``: a
    bound on the padding ``fmt % args`` can add."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    positional = args if isinstance(args, tuple) else (args,)
    total = arg = 0
    i, n = 0, len(fmt)
    while total <= limit:
        i = fmt.find("%", i) + 1
        if i == 0 or i >= n:
            break
        if fmt[i] == "(":  # a mapping key: parentheses nest, as CPython parses them
            depth = 0
            while i < n:
                depth += {"(": 1, ")": -1}.get(fmt[i], 0)
                i += 1
                if depth == 0:
                    break
        while i < n and fmt[i] in "-+ #0":
            i += 1
        for part in ("width", "precision"):
            if part == "precision":
                if i >= n or fmt[i] != ".":
                    break
                i += 1
            if i < n and fmt[i] == "*":
                v = positional[arg] if arg < len(positional) else 0
                arg, i = arg + 1, i + 1
                total += abs(v) if isinstance(v, int) else 0
            else:
                start = i
                while i < n and fmt[i] in "0123456789":
                    i += 1
                total += _number(fmt[start:i]) if i > start else 0
        while i < n and fmt[i] in "hlL":
            i += 1
        if i < n and fmt[i] != "%":  # a conversion takes an argument; '%%' takes none
            arg += 1
        i += 1
    return total


def _check_percent_format(fmt: Any, args: Any, b: _Budget) -> None:
    if isinstance(fmt, (str, bytes)):
        total = _percent_widths(fmt, args, b.max_chars)
        if total > b.max_chars:
            raise b.too_big(f"the format width {total}", total)


def _spec_size(spec: str) -> int:
    """A bound on the width and precision in a ``str.format`` field spec: all its numbers added up."""
    return sum(_number(d) for d in _DIGITS.findall(spec))


def _check_expandtabs(s: Any, tabsize: Any, b: _Budget) -> None:
    if isinstance(s, (str, bytes)) and isinstance(tabsize, int):
        tabs = s.count("\t" if isinstance(s, str) else b"\t")
        b.check_announced(len(s) + tabs * max(tabsize, 0), f"expandtabs({tabsize})")


def _check_int_args(args: Sequence[Any], kwargs: Mapping[str, Any], b: _Budget, what: str) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > b.max_chars:
            raise b.too_big(f"{what} with argument {v}", abs(v))


def _check_replace(s: Any, old: Any, new: Any, count: Any, b: _Budget) -> None:
    kind = str if isinstance(s, str) else bytes
    if isinstance(s, kind) and isinstance(old, kind) and isinstance(new, kind) and len(new) > len(old):
        hits = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        b.check_announced(len(s) + hits * (len(new) - len(old)), "replace")


def _materialized(seq: Any, b: _Budget) -> Any:
    """``seq`` itself if it has a length, else its items in a list, each counted as an operation (a
    generator, e.g. from ``map``, says nothing of its size before it is joined)."""
    if hasattr(seq, "__len__"):
        return seq
    out = []
    for x in seq:
        b.tick()
        out.append(x)
    return out


def _check_join(sep: Any, seq: Any, b: _Budget, items: bool = True) -> None:
    """The separators and (``items``) the text of the items ``sep.join(seq)`` would make."""
    if isinstance(sep, (str, bytes)) and hasattr(seq, "__len__"):
        size = len(sep) * max(len(seq) - 1, 0)
        if items and not isinstance(seq, (str, bytes)):
            size += sum(len(x) for x in seq if isinstance(x, (str, bytes)))
        b.check_announced(size, "join")


def _check_indent(s: Any, width: Any, b: _Budget) -> None:
    if isinstance(s, str) and isinstance(width, (int, str)):
        step = len(width) if isinstance(width, str) else max(width, 0)
        b.check_announced(len(s) + (s.count("\n") + 1) * step, "the indent filter")


def _check_wordwrap(s: Any, width: Any, wrapstring: Any, b: _Budget) -> None:
    if isinstance(s, str) and isinstance(width, int) and width > 0:
        lines = len(s) // width + s.count("\n") + 1
        b.check_announced(len(s) + lines * len(wrapstring or "\n"), "the wordwrap filter")


def _check_binop(op: str, left: Any, right: Any, b: _Budget) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                b.check_announced(len(seq) * max(n, 0), "'*'")
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateError("chat template multiplies integers that are too large")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * left.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"chat template raises an integer to the power {right}; too large")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        b.check_announced(len(left) + len(right), "'+'")
    elif op == "%":
        _check_percent_format(left, right, b)


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
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
    from markupsafe import EscapeFormatter, Markup

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

    class BoundedFormatter(SandboxedFormatter):
        """The sandbox's ``str.format``, adding up the widths and precisions of the fields it formats (nested
        fields such as ``{:{w}}`` already resolved) and refusing before the field that would pass the bound."""

        def __init__(self, env, **kwargs):
            super().__init__(env, **kwargs)
            self.announced = 0

        def format_field(self, value, format_spec):
            self.announced += _spec_size(format_spec)
            _budget().check_announced(self.announced, f"the format spec {format_spec!r:.40}")
            return super().format_field(value, format_spec)

    class BoundedEscapeFormatter(BoundedFormatter, EscapeFormatter):  # str.format of a Markup string
        pass

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
            # jinja's own wrapper for str.format / format_map, formatting through a BoundedFormatter
            if super().wrap_str_format(value) is None:
                return None
            template, is_map = value.__self__, value.__name__ == "format_map"

            def bounded_format(*args, **kwargs):
                if is_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument")
                    args, kwargs = (), args[0]
                if isinstance(template, Markup):
                    formatter = BoundedEscapeFormatter(self, escape=template.escape)
                else:
                    formatter = BoundedFormatter(self)
                return type(template)(formatter.vformat(template, args, kwargs))

            bounded_format.llmctl_bounded = True  # its arguments are values, its widths bounded above
            return functools.update_wrapper(bounded_format, value)

        def call(self, context, obj, /, *args, **kwargs):
            b = _budget()
            b.tick()
            name = getattr(obj, "__name__", "")
            if not getattr(obj, "llmctl_bounded", False):
                _check_int_args(args, kwargs, b, f"calling {name or 'a function'}")
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, (str, bytes)):
                if name == "replace" and len(args) >= 2:
                    _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1, b)
                elif name == "join" and args:
                    args = (_materialized(args[0], b), *args[1:])
                    _check_join(owner, args[0], b)
                elif name == "expandtabs":
                    _check_expandtabs(owner, args[0] if args else kwargs.get("tabsize", 8), b)
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
        if name != "format":  # its arguments are values; its widths are checked below
            _check_int_args(args[skip:], kwargs, b, f"the {name} filter")
        value, rest = (args[skip - 1], args[skip:]) if len(args) >= skip else (None, ())
        if name == "replace" and len(rest) >= 2:
            _check_replace(value, rest[0], rest[1], rest[2] if len(rest) > 2 else kwargs.get("count", -1), b)
        elif name == "join":  # (with an attribute to join, only the separators are known)
            value = _materialized(value, b)
            args = (*args[: skip - 1], value, *rest)
            by_attribute = len(rest) > 1 or "attribute" in kwargs
            _check_join(rest[0] if rest else kwargs.get("d", ""), value, b, items=not by_attribute)
        elif name == "indent":
            _check_indent(value, rest[0] if rest else kwargs.get("width", 4), b)
        elif name == "wordwrap":
            width = rest[0] if rest else kwargs.get("width", 79)
            _check_wordwrap(value, width, rest[2] if len(rest) > 2 else kwargs.get("wrapstring"), b)
        elif name == "format":  # `fmt|format(*args)` is `fmt % args` (or `% kwargs`)
            _check_percent_format(value, kwargs or tuple(rest), b)
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
        _check_tokens(source)
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:  # constant folding can hit the sandbox at compile time
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from None
    except RecursionError:  # jinja2's parser recurses once per nested parenthesis, block or operator
        raise TemplateError("chat template nests too deeply to compile; fix the template") from None
    except SyntaxError as e:  # Python's limits on the code jinja2 generates (e.g. 20 nested loops)
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
