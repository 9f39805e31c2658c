"""The jinja2 sandbox chat templates run in: transformers' environment with every step bounded.

``_environment()`` builds an ``ImmutableSandboxedEnvironment`` configured like transformers'
``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``{% generation %}``,
``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape) whose loops, calls,
operators, concatenations, literals and filters count against the render's budget (``template_budget.py``)
and are refused by the allocation checks (``template_checks.py``) before they would pass its bound.
``chat_template.py`` compiles and renders templates with it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from llmctl.runtime.template_budget import _budget, _check_data, _nesting
from llmctl.runtime.template_checks import (
    _check_binop,
    _check_expandtabs,
    _check_indent,
    _check_int_args,
    _check_join,
    _check_percent_format,
    _check_replace,
    _check_str_method,
    _check_wordwrap,
    _listed,
    _materialized,
    _spec_size,
)

ARG_SLOT_BYTES = 8  # what one item of `f(*seq)` is counted as, per item, against the size bound


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
            b = _budget()
            if hasattr(iterable, "__len__"):
                # a container spreads into the call's argument tuples, copied along the call: each item
                # costs a pointer (8 bytes) a copy, not its own size (`f(*('x' * 1000000))` made 85 MiB)
                b.check_announced(ARG_SLOT_BYTES * len(iterable), "'*' arguments")
                return iterable
            return _materialized(iterable, b, "'*' arguments", item_overhead=2)

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
