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
  containers as often as they occur (``_Budget.size``), when ``*`` and ``+`` are about to make them and
  when a literal, call or filter makes one; a call's arguments count together, and a generator is listed,
  measured, before a loop, ``f(*gen)`` or a call lists it. Containers and namespaces may hold only data
  (strings, numbers, lists, dicts), so nothing they hold can grow after they were measured;
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
import itertools
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
# The process may grow by at most this much (or 16x the output bound, when larger) while one render runs:
# each value is bounded alone, this bounds how many stay alive at once (variables, macro frames).
MIN_RENDER_GROWTH_BYTES = 256 << 20
_MEMORY_CHECK_BYTES = 4 << 20  # characters announced between two looks at the process's memory


@dataclass
class _Budget:
    max_chars: int
    max_ops: int
    deadline: float
    timeout_s: float
    ops: int = 0
    known: dict[int, int] = field(default_factory=dict)  # id -> size of each list and dict of the inputs
    mem0: int | None = None  # the process's resident bytes when the render began (None: not measurable)
    max_growth: int = 0
    pending: int = 0  # characters announced since memory was last looked at

    def __post_init__(self) -> None:
        self.mem0 = _resident_bytes()
        self.max_growth = max(MIN_RENDER_GROWTH_BYTES, 16 * self.max_chars)

    def tick(self, n: int = 1) -> None:
        self.ops += n
        if self.ops > self.max_ops:
            raise TemplateError(
                f"chat template ran more than {self.max_ops:,} loop iterations/operations; it loops "
                "without bound — fix the template"
            )
        if self.ops & 255 == 0:
            self.check_deadline()
            if self.ops & 4095 == 0:  # what steps announce is looked at every 4 MB (``made``); this is the rest
                self.check_memory()

    def made(self, n: int) -> None:
        """``n`` characters were (or are about to be) made: look at the process's memory every few MB."""
        self.pending += n
        if self.pending > _MEMORY_CHECK_BYTES:
            self.check_memory()

    def check_memory(self) -> None:
        """Refuse a render that grows the process too much: each value is within the bound, but a template
        can keep thousands of them alive (one variable each, or a frame each of a recursive macro). The
        resident size is what is bounded: memory the process freed earlier is reused first, unseen."""
        self.pending = 0
        if self.mem0 is None:
            return
        grown = (_resident_bytes() or 0) - self.mem0
        if grown > self.max_growth:
            raise TemplateError(
                f"chat template grew the process by more than {self.max_growth >> 20:,} MiB (many values alive "
                "at once, each within the size bound); the template repeats without bound — fix the template"
            )

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(
                f"chat template did not finish within {self.timeout_s:g} s; it loops without bound — "
                "fix the template"
            )

    def size(self, value: Any, stop: int | None = None) -> int:
        """About the characters ``str(value)`` makes: a string's length, an integer's digits, and for a list,
        tuple or dict the text of everything it holds as its repr writes it (quotes, brackets, separators),
        each nested container counted as often as it occurs however often it is shared. Counted until it
        passes ``stop`` (default: the bound)."""
        if type(value) is str or isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, int):
            return value.bit_length() // 3 + 1
        known = self.known.get(id(value))
        if known is not None:  # an input (checked first: inputs are often passed around whole)
            return known
        if _contents(value) is None:
            return 4
        n, visits, _ = _held_size(value, self.max_chars if stop is None else stop, self.known)
        if visits > 4096:  # a big container: measuring it took time the operation count does not see
            self.check_deadline()
        return n

    def check_size(self, value: Any, what: str) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                raise TemplateError(
                    f"chat template computed an integer of {value.bit_length()} bits with {what}"
                )
            return value
        n = self.size(value)
        if n > self.max_chars:
            raise self.too_big(what, n)
        self.made(n)
        return value

    def check_announced(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise self.too_big(what, n)
        self.made(n)

    def too_big(self, what: str, n: int) -> TemplateError:
        return TemplateError(
            f"chat template exceeds its size bound: {what} would make {n:,} characters or items, more "
            f"than {self.max_chars:,}; the template repeats without bound — fix the template"
        )


def _resident_bytes() -> int | None:
    """The process's resident memory (Linux's /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---- the size of what a value holds --------------------------------------------------------------
# A list holds references: `['x' * 1000000] * 1000` is 8 KB, and its text (what `{{ }}`, `~`, `|string`,
# `|tojson` make of it) 1 GB. So containers are measured in the text they hold, as soon as they are made:
# by `*` and `+` before they allocate, literals, calls and filters when they return. That text can only
# change if a container holds something mutable, so lists, tuples, dicts and namespaces may hold only data.
_VIEWS = (type({}.keys()), type({}.values()))
_ITEMS_VIEW = type({}.items())
_STR, _INT, _CONSTANT = frozenset({str}), frozenset({int, bool}), frozenset({float, type(None)})
_DATA = (str, bytes, int, float, type(None), list, tuple, dict, range, *_VIEWS, _ITEMS_VIEW)


def _contents(value: Any) -> Any:
    """The values a list, tuple or dict (or a view of one) shows in its text, or None for anything else."""
    if isinstance(value, dict):
        return itertools.chain.from_iterable(value.items())
    if isinstance(value, (list, tuple, *_VIEWS)):
        return value
    if isinstance(value, _ITEMS_VIEW):
        return itertools.chain.from_iterable(value)
    return None


def _nesting(value: Any) -> int:
    """How deep lists, tuples and dicts nest in ``value`` (0 for anything else)."""
    depth: dict[int, int] = {}

    def nest(v: Any) -> int:
        items = _contents(v)
        if items is None:
            return 0
        if id(v) not in depth:
            depth[id(v)] = 1 + max(map(nest, items), default=0)
        return depth[id(v)]

    return nest(value)


def _check_data(value: Any, where: str) -> None:
    """Refuse a value a container or namespace may not hold: namespaces change after the container holding
    them is measured, and loops, macros, generators and methods keep alive whatever they were made from."""
    if isinstance(value, _DATA):
        return
    from jinja2 import Undefined

    if not isinstance(value, Undefined):
        raise TemplateError(
            f"chat templates may keep only data (strings, numbers, lists, dicts) in {where}, not a "
            f"{type(value).__name__!r}; keep it in a variable of its own (a generator: add |list)"
        )


def _held_size(value: Any, stop: int, known: Mapping[int, int]) -> tuple[int, int, dict[int, int]]:
    """(``value``'s size as ``_Budget.size`` counts it, the items visited, the size of each container met by
    id). Each distinct container is visited once; ``known`` gives the sizes of containers already measured
    (the inputs), which stay alive for the whole render."""
    memo: dict[int, int] = {}
    visits = 0

    def held(v: Any) -> int:  # v as an item: repr quotes strings
        nonlocal visits
        if isinstance(v, (str, bytes)):
            return len(v) + 2
        if isinstance(v, int):
            return v.bit_length() // 3 + 1
        if v is None or type(v) is float:
            return 4
        key = id(v)
        n = known.get(key)
        if n is None:
            n = memo.get(key)
        if n is not None:
            return n
        items = _contents(v)
        if items is None:
            _check_data(v, "lists, tuples and dicts")
            return len(repr(v)) if type(v) is range else 4  # `range(0, 100000)`; floats, Undefined: ~4
        visits += len(v) * (2 if isinstance(v, (dict, _ITEMS_VIEW)) else 1)
        types = set(map(type, v)) if type(v) in (list, tuple) else None
        if types is not None and types <= _STR:  # flat lists: counted at C speed
            total = sum(map(len, v)) + 4 * len(v) + 2
        elif types is not None and types <= _INT:
            total = sum(map(int.bit_length, v)) // 3 + 3 * len(v) + 2
        elif types is not None and types <= _CONSTANT:
            total = 6 * len(v) + 2
        else:
            total = 2
            for x in items:
                total += (len(x) + 4) if type(x) is str else held(x) + 2
                if total > stop:
                    break
        memo[key] = total
        return total

    return held(value), visits, memo


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


def _percent_sizes(fmt: str | bytes, args: Any, b: _Budget) -> tuple[int, int]:
    """(the sum of the widths and precisions in printf-style ``fmt``, the size of the arguments its
    conversions format), read from ``args`` as ``%`` reads them (a tuple is the arguments, ``%(key)s`` looks
    ``key`` up in a mapping, anything else is the one argument; ``*`` takes a width from the arguments),
    counted until together they pass the bound: what ``fmt % args`` can add to ``fmt``."""
    is_bytes = isinstance(fmt, bytes)
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    positional = args if isinstance(args, tuple) else (args,)
    widths = values = arg = 0
    i, n = 0, len(text)
    while widths + values <= b.max_chars:
        i = text.find("%", i) + 1
        if i == 0 or i >= n:
            break
        key = None
        if text[i] == "(":  # a mapping key: parentheses nest, as CPython parses them
            depth, start = 0, i
            while i < n:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            key = text[start + 1 : i - 1]
        while i < n and text[i] in "-+ #0":
            i += 1
        for part in ("width", "precision"):
            if part == "precision":
                if i >= n or text[i] != ".":
                    break
                i += 1
            if i < n and text[i] == "*":
                v = positional[arg] if arg < len(positional) else 0
                arg, i = arg + 1, i + 1
                widths += abs(v) if isinstance(v, int) else 0
            else:
                start = i
                while i < n and text[i] in "0123456789":
                    i += 1
                widths += _number(text[start:i]) if i > start else 0
        while i < n and text[i] in "hlL":
            i += 1
        if i < n and text[i] != "%":  # a conversion takes an argument; '%%' takes none
            if key is None:
                value = positional[arg] if arg < len(positional) else None
                arg += 1
            else:
                lookup = key.encode("latin-1") if is_bytes else key
                value = args.get(lookup) if isinstance(args, Mapping) else None
            values += b.size(value)
        i += 1
    return widths, values


def _check_percent_format(fmt: Any, args: Any, b: _Budget) -> None:
    if isinstance(fmt, (str, bytes)):
        widths, values = _percent_sizes(fmt, args, b)
        if widths > b.max_chars:
            raise b.too_big(f"the format width {widths}", widths)
        b.check_announced(len(fmt) + widths + values, "formatting with '%'")


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


def _materialized(seq: Any, b: _Budget, what: str, item_overhead: int = 0) -> Any:
    """``seq`` itself if it has a length (a container is already bounded), else its items in a list, each
    counted as an operation and its size (plus ``item_overhead``) added up until it passes the bound: a
    generator, e.g. from ``map``, says nothing of its size before it is listed."""
    if hasattr(seq, "__len__"):
        return seq
    out, total = [], 0
    for x in seq:
        b.tick()
        total += b.size(x) + item_overhead
        if total > b.max_chars:
            raise b.too_big(what, total)
        out.append(x)
    return out


def _listed(value: Any, b: _Budget, what: str) -> Any:
    """``value`` for a filter that lists its items (``list``, ``sort``, ``batch``, ...), refused before the
    list is made when it would pass the bound: a string becomes one item per character (``'a', `` in the
    list's text), an iterator is listed here."""
    if isinstance(value, (str, bytes)):
        b.check_announced(5 * len(value), what)
        return value
    return _materialized(value, b, what, item_overhead=4)


def _check_join(sep: Any, seq: Any, b: _Budget, items: bool = True) -> None:
    """The separators and (``items``) the text of the items ``sep.join(seq)`` would make."""
    if isinstance(sep, (str, bytes)) and hasattr(seq, "__len__"):
        size = len(sep) * max(len(seq) - 1, 0)
        if items and not isinstance(seq, (str, bytes)):
            size += sum(map(b.size, seq))  # seq is bounded: a container, or listed by _materialized
        b.check_announced(size, "join")


# What one call of a string method can make from a string within the bound.
_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B))
)
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_SLOW_CODECS = frozenset({"punycode", "idna"})  # CPython's are quadratic: 300,000 characters took 5 s


def _count_any(s: str | bytes, chars: str) -> int:
    return sum(s.count(c if isinstance(s, str) else c.encode("latin-1")) for c in chars)


def _check_str_method(
    owner: str | bytes, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], b: _Budget
) -> None:
    """Refuse, before the call, a string method whose result would pass the bound or whose cost grows faster
    than its result (``join``, ``replace`` and ``expandtabs`` are checked by the caller)."""
    if name in ("split", "rsplit", "splitlines"):  # each piece is a new string: ``'a', `` in the list's text
        sep = args[0] if args and name != "splitlines" else kwargs.get("sep")
        if name == "splitlines":
            pieces = _count_any(owner, _LINE_BREAKS if isinstance(owner, str) else "\n\r") + 1
        elif isinstance(sep, (str, bytes)) and sep:
            pieces = owner.count(sep) + 1
        else:
            blanks = _count_any(owner, _WHITESPACE if isinstance(owner, str) else " \t\n\x0b\x0c\r")
            pieces = min(blanks, len(owner) // 2) + 1
        b.check_announced(len(owner) + 4 * pieces, f"{name}()")
    elif (
        name == "translate"
        and isinstance(owner, str)
        and args
        and isinstance(args[0], (Mapping, list, tuple))
    ):
        table = args[0].values() if isinstance(args[0], Mapping) else args[0]
        longest = max((len(v) for v in table if isinstance(v, str)), default=1)
        b.check_announced(len(owner) * max(longest, 1), "translate()")
    elif name in ("encode", "decode"):
        import codecs

        encoding = args[0] if args else kwargs.get("encoding", "utf-8")
        try:
            codec = codecs.lookup(encoding).name if isinstance(encoding, str) else ""
        except LookupError:
            return  # the call itself says so
        if codec in _SLOW_CODECS:
            raise TemplateError(
                f"chat template calls {name}({encoding!r}): that codec takes time growing with the square of "
                "the text, and templates may not use it — fix the template"
            )


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
            if isinstance(n, int) and isinstance(seq, (str, bytes)):
                b.check_announced(len(seq) * max(n, 0), "'*'")
            elif isinstance(n, int) and isinstance(seq, (list, tuple)) and n > 0:
                each = b.size(seq, b.max_chars // n + 2) - 2  # the items' text, without the brackets
                b.check_announced(each * n + 2, "'*'")
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateError("chat template multiplies integers that are too large")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        if right * left.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"chat template raises an integer to the power {right}; too large")
    elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        b.check_announced(b.size(left) + b.size(right), "'+'")
    elif op == "%":
        _check_percent_format(left, right, b)


# ---- the environment ----------------------------------------------------------------------------
@functools.cache
def _environment():
    import json
    import textwrap
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError
    from jinja2.filters import make_attrgetter
    from jinja2.runtime import Macro
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

        # List, tuple and dict literals are measured when they are made: `[s, s, s, s]` nested five deep holds
        # 1,024 copies of `s` in its text. (Constant literals are folded before this and never reach it.)
        def visit_List(self, node, frame):  # type: ignore[override]
            self.write("environment.llmctl_held(")
            super().visit_List(node, frame)
            self.write(")")

        def visit_Dict(self, node, frame):  # type: ignore[override]
            self.write("environment.llmctl_held(")
            super().visit_Dict(node, frame)
            self.write(")")

        def visit_Tuple(self, node, frame):  # type: ignore[override]
            if node.ctx != "load":  # `{% for a, b in ... %}`, `{% set a, b = ... %}`: names, not a tuple
                return super().visit_Tuple(node, frame)
            self.write("environment.llmctl_held(")
            super().visit_Tuple(node, frame)
            self.write(")")

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
        fields such as ``{:{w}}`` already resolved) and the size of their values (``'{0}{0}{0}'`` formats its
        argument three times), refusing before the field that would pass the bound."""

        def __init__(self, env, **kwargs):
            super().__init__(env, **kwargs)
            self.announced = self.values = 0

        def format_field(self, value, format_spec):
            b = _budget()
            self.announced += _spec_size(format_spec)
            b.check_announced(self.announced, f"the format spec {format_spec!r:.40}")
            self.values += b.size(value)
            b.check_announced(self.announced + self.values, "the fields of a format")
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
            # `f(*EXPR)` lists EXPR before the call sees it: `f(*environment.llmctl_listed(EXPR))` lists it
            # with the items counted and measured.
            for call in list(tree.find_all((nodes.Call, nodes.Filter, nodes.Test))):
                if call.dyn_args is not None:
                    call.dyn_args = nodes.Call(
                        nodes.EnvironmentAttribute("llmctl_listed"), [call.dyn_args], [], None, None
                    ).set_lineno(call.dyn_args.lineno)
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
            label = name or getattr(obj, "name", None)  # a macro has a name, not a __name__
            what = f"the arguments of {label if isinstance(label, str) and label else 'a call'}"
            if not getattr(obj, "llmctl_bounded", False):
                _check_int_args(args, kwargs, b, f"calling {name or 'a function'}")
            if not getattr(obj, "llmctl_bounded", False) and not isinstance(obj, Macro):
                # `dict(gen)`, `{}.fromkeys(gen)`, a recursive `loop(gen)` list a generator inside the call:
                # list it here, measured (a macro keeps it as it is: its loops list it, measured)
                args = tuple(_materialized(v, b, what) if isinstance(v, Iterator) else v for v in args)
                kwargs = {
                    k: _materialized(v, b, what) if isinstance(v, Iterator) else v for k, v in kwargs.items()
                }
            if len(args) + len(kwargs) > 1:  # `m(s, s, s, ...)` packs its arguments: varargs, cycler items
                total = 0
                for value in (*args, *kwargs.values()):
                    total += b.size(value)
                    b.check_announced(total, what)
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, (str, bytes)):
                if name == "replace" and len(args) >= 2:
                    _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1, b)
                elif name == "join" and args:
                    args = (_materialized(args[0], b, "join"), *args[1:])
                    _check_join(owner, args[0], b)
                elif name == "expandtabs":
                    _check_expandtabs(owner, args[0] if args else kwargs.get("tabsize", 8), b)
                else:
                    _check_str_method(owner, name, args, kwargs, b)
            return b.check_size(super().call(context, obj, *args, **kwargs), "a call")

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.tick()
            _check_binop(operator, left, right, b)
            result = super().call_binop(context, operator, left, right)
            if operator in ("+", "*") and isinstance(result, (list, tuple)):
                return result  # measured by _check_binop before it was made
            return b.check_size(result, f"'{operator}'")

        def concat(self, parts):  # joins the buffers of macros, call and filter blocks
            b = _budget()
            parts = list(parts)
            b.check_announced(sum(map(len, parts)), "a macro or block")
            return "".join(parts)

        def llmctl_concat(self, parts):
            b = _budget()
            b.tick()
            total = 0
            for p in parts:  # before str(): a list's text is made only if it fits
                total += b.size(p)
                b.check_announced(total, "'~'")
            parts = [str(p) for p in parts]
            b.check_announced(sum(map(len, parts)), "'~'")  # escapes in a repr, e.g. '\\x00'
            return "".join(parts)

        def llmctl_held(self, value):  # a list, tuple or dict literal
            b = _budget()
            b.tick()
            return b.check_size(value, "a list, tuple or dict")

        def llmctl_iter(self, iterable):
            b = _budget()
            # A generator is listed first, its items measured: `loop.length` would list it unmeasured.
            for item in _materialized(iterable, b, "a for loop"):
                b.tick()
                yield item

        def llmctl_listed(self, iterable):
            return _materialized(iterable, _budget(), "'*' arguments", item_overhead=2)

        # They list their argument themselves: `call` neither checks nor lists it.
        llmctl_iter.llmctl_bounded = llmctl_listed.llmctl_bounded = True

    class SafeNamespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore names, so templates cannot shadow internals."""

        def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace: `self` may be a key
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for key, value in attrs.items():
                SafeNamespace._check(key, value)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name, value)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        def __repr__(self):  # its attributes' text, measured first: each may be as big as the bound
            b = _budget()
            b.check_announced(
                b.size(object.__getattribute__(self, "_Namespace__attrs")) + 13, "a namespace's text"
            )
            return jinja2.utils.Namespace.__repr__(self)

        @staticmethod
        def _check(name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates may not set underscore attributes ({name!r})")
            _check_data(value, "namespaces")

    def raise_exception(message):
        raise _TemplateRaised(str(message))

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes <, >, & and '; transformers' does not. The text is made piece by
        # piece (the same as json.dumps makes) and refused once it passes the bound: an indent or separator
        # of a million characters repeats on every line.
        encoder = json.JSONEncoder(
            ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        return _bounded_text(encoder.iterencode(x), "the tojson filter")

    def pprint_filter(value):
        # jinja2's pprint (pprint.pformat), written through a stream that counts. pprint keeps the repr of
        # every enclosing level alive while it formats the next (memory: depth x size), so that is announced.
        import pprint

        b = _budget()
        b.check_announced(b.size(value) * _nesting(value), "the pprint filter")
        out = _BoundedStream("the pprint filter")
        pprint.PrettyPrinter(stream=out).pprint(value)
        return out.getvalue()[:-1]  # pprint() ends with a newline, pformat() does not

    class DeadlineWrapper(textwrap.TextWrapper):
        """Breaking a long word copies the rest of it once per line, so a wrap can take seconds; check the
        deadline at each line."""

        def _handle_long_word(self, reversed_chunks, cur_line, cur_len, width):
            _budget().check_deadline()
            super()._handle_long_word(reversed_chunks, cur_line, cur_len, width)

    @jinja2.pass_environment
    def wordwrap(environment, s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True):
        # jinja2's wordwrap (each line wrapped on its own, as textwrap.wrap does) with DeadlineWrapper
        wrapper = DeadlineWrapper(
            width=width,
            expand_tabs=False,
            replace_whitespace=False,
            break_long_words=break_long_words,
            break_on_hyphens=break_on_hyphens,
        )
        if wrapstring is None:
            wrapstring = environment.newline_sequence
        return wrapstring.join([wrapstring.join(wrapper.wrap(line)) for line in s.splitlines()])

    @jinja2.pass_environment
    def sum_filter(environment, iterable, attribute=None, start=0):
        # jinja2's sum is Python's: with lists (start=[]) it copies the total at every item, n^2/2 copies
        if attribute is not None:
            iterable = map(make_attrgetter(environment, attribute), iterable)
        if not isinstance(start, (list, tuple)):
            return sum(iterable, start)
        b, kind = _budget(), tuple if isinstance(start, tuple) else list
        out, total = list(start), b.size(start)
        for x in iterable:
            b.tick()
            if not isinstance(x, kind):  # what `start + x` says
                raise TypeError(
                    f'can only concatenate {kind.__name__} (not "{type(x).__name__}") to {kind.__name__}'
                )
            total += b.size(x)
            b.check_announced(total, "the sum filter")
            out.extend(x)
        return kind(out)

    def make_dict(*args, **kwargs):
        return dict(*args, **kwargs)

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters.update(tojson=tojson, pprint=pprint_filter, wordwrap=wordwrap, sum=sum_filter)
    for name, f in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, f)
    env.globals.pop("lipsum", None)
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=make_dict, namespace=SafeNamespace
    )
    return env


class _TemplateRaised(Exception):
    """raise_exception() called by a template."""


def _bounded_text(pieces: Iterator[str], what: str) -> str:
    """``pieces`` joined, refused as soon as they pass the bound."""
    b, out, total = _budget(), [], 0
    for piece in pieces:
        total += len(piece)
        b.check_announced(total, what)
        out.append(piece)
    return "".join(out)


class _BoundedStream:
    """A text stream that refuses, as it is written, more than the bound."""

    def __init__(self, what: str) -> None:
        self.what, self.parts, self.total = what, [], 0

    def write(self, text: str) -> int:
        b = _budget()
        self.total += len(text)
        b.check_announced(self.total, self.what)
        b.check_deadline()  # pprint recomputes the repr of each nested level: time grows with depth x size
        self.parts.append(text)
        return len(text)

    def getvalue(self) -> str:
        return "".join(self.parts)


_LISTING_FILTERS = frozenset({"list", "sort", "unique", "reverse", "slice", "batch", "groupby"})


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
            value = _materialized(value, b, "join")
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
        elif name == "batch" and rest and (len(rest) > 1 or "fill_with" in kwargs):  # pads the last batch
            fill = rest[1] if len(rest) > 1 else kwargs["fill_with"]
            b.check_announced(
                rest[0] * (b.size(fill) + 2) if isinstance(rest[0], int) else 0, "the batch filter"
            )
        elif name in ("urlize", "urlencode") and isinstance(value, str):  # a link is its text twice, %XX 3x
            b.check_announced(len(value) * (2 if name == "urlize" else 3), f"the {name} filter")
        if (
            name in _LISTING_FILTERS
            and len(args) >= skip
            and not (name == "reverse" and isinstance(value, str))
        ):
            listed = _listed(value, b, f"the {name} filter")
            # an iterator stays one (`reverse` returns a list for an iterator, a reversed view of a list)
            args = (*args[: skip - 1], listed if listed is value else iter(listed), *rest)
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
