"""The resource budget of one chat-template render: operations, deadline, output size, process growth.

``_Budget`` counts the work a template does (``tick``), the characters a step announces it will make
(``check_announced``) and measures values by the text they hold (``size``: a list holds references, so
``['x' * 1000000] * 1000`` is 8 KB whose text is 1 GB). ``ChatTemplate.render`` (``chat_template.py``) sets one
per render in a context variable; the sandbox (``template_sandbox.py``) and the allocation checks
(``template_checks.py``) find it with ``_budget()``.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import TemplateError

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
