"""Checks for template operations that can allocate a lot in one step, made before they run.

``%`` and ``format`` widths, ``*`` and ``**``, ``replace``, ``join``, ``expandtabs``, ``indent``,
``wordwrap``, string methods and generators listed before use: each announces the size of its result to the
render's budget (``template_budget.py``), which refuses it past the bound. Called by the sandbox
(``template_sandbox.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmctl.errors import TemplateError
from llmctl.runtime.template_budget import MAX_INT_BITS, _Budget

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
