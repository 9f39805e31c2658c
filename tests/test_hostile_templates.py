"""Chat templates that allocated before the sandbox refused them, and templates too big or too deeply nested
to compile (issue 17, item 3 and item 11's template part).

Before: ``'%*d' % (300000000, 1)``, ``'{:{w}}'.format(1, w='300000000')`` and
``('\\t' * 300).expandtabs(1000000)`` each reached ~306 MB before the refusal, and
``('%1000000s' * 2000) % (('a',) * 2000)`` as a GGUF's template 9.8 GB and 118 s: only widths written as
digits were checked, one at a time. Now the widths and precisions of all the fields of one format (``*``
arguments and nested ``{...}`` fields resolved) and ``expandtabs``' tab size are added up before the
string is allocated; so are the items a ``join`` joins (a generator is listed first), and the lines
``indent`` and ``wordwrap`` would pad. Each case here must be refused with Python allocations under
``MAX_PY_ALLOC`` (tracemalloc) — measured: under 5 MB.

Thousands of nested parentheses or ``if`` blocks in a ``--template`` file gave a RecursionError traceback
(exit 1); now one ``error:`` line and exit 2. A template of more than ``MAX_TEMPLATE_TOKENS`` tokens is
refused before it is parsed: compiling a 1 MiB one took 1.3 GB and 30 s.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from test_hostile_llamacpp import CHAT, one_error_line, run, tiny_gguf

from llmctl.errors import TemplateError
from llmctl.runtime.chat_template import MAX_TEMPLATE_TOKENS, ChatTemplate, render_chat

MAX_PY_ALLOC = 50 * 1024**2
CONVERSATION = [{"role": "user", "content": "hi"}]
BOUND = "exceeds its size bound"


# ---- item 3: allocations refused before they happen ----------------------------------------------------
ALLOCATIONS = {  # name: (template, the error's words)
    "percent-star-width": ("{{ '%*d' % (300000000, 1) }}", "the format width 300000000"),
    "percent-star-precision": ("{{ '%.*f' % (300000000, 1.0) }}", "the format width 300000000"),
    "percent-precision": ("{{ '%.300000000f' % 1.0 }}", "the format width 300000000"),
    "percent-many-fields": ("{{ ('%1000000s' * 2000) % (('a',) * 2000) }}", "the format width"),
    "percent-nested-key": ("{{ ('%((k))1000000s' * 2000) % {'(k)': 'x'} }}", "the format width"),
    "percent-bytes": ("{{ ('%*d'.encode()) % (300000000, 1) }}", "the format width 300000000"),
    "format-filter-many-fields": ("{{ ('%1000000s' * 2000)|format(*(['a'] * 2000)) }}", "the format width"),
    "brace-nested-named": ("{{ '{:{w}}'.format(1, w='300000000') }}", "the format spec '300000000'"),
    "brace-nested-auto": ("{{ '{:{}}'.format(1, '300000000') }}", "the format spec '300000000'"),
    "brace-format-map": ("{{ '{a:{w}}'.format_map({'a': 1, 'w': '300000000'}) }}", "the format spec"),
    "brace-many-fields": ("{{ ('{:1000000}' * 2000).format(*(['a'] * 2000)) }}", "the format spec '1000000'"),
    "expandtabs": ("{{ ('\\t' * 300).expandtabs(1000000) }}", "expandtabs(1000000) would make 300,000,300"),
    "expandtabs-keyword": ("{{ ('\\t' * 300).expandtabs(tabsize=1000000) }}", "expandtabs(1000000)"),
    "bytes-repeat": ("{{ 'a'.encode() * 300000000 }}", "'*' would make 300,000,000"),
    # the same class: sizes announced by the items, not only the separators or the arguments
    "join-filter-items": ("{{ (['x' * 1000000] * 1000)|join }}", "join would make 1,000,000,000"),
    "join-method-items": ("{{ ''.join(['x' * 1000000] * 1000) }}", "join would make 1,000,000,000"),
    "join-a-generator": (
        "{{ range(1000)|map('string')|join('x' * 1000000) }}",
        "join would make 999,002,890",
    ),
    "indent": ("{{ ('x\\n' * 1000)|indent(1000000) }}", "the indent filter would make 1,001,002,000"),
    "wordwrap": (
        "{{ ('x ' * 1000)|wordwrap(1, wrapstring='y' * 1000000) }}",
        "the wordwrap filter would make",
    ),
}


@pytest.mark.parametrize("name", sorted(ALLOCATIONS))
def test_allocations_are_refused_before_they_happen(name: str) -> None:
    template, message = ALLOCATIONS[name]
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=BOUND) as e:
            render_chat(template, CONVERSATION)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(e.value)
    assert peak < MAX_PY_ALLOC, f"{peak / 2**20:.0f} MiB allocated before the refusal"
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize(
    "expression",
    [
        "'%5s|%-3d|%%|%.2f|%*d|%-*.*f' % ('a', 2, 1.5, 4, 7, 8, 2, 3.14159)",
        "'%(x)s-%(y)05d' % {'x': 'a', 'y': 42}",
        "'%s'|format('x') ~ '%*d'|format(3, 1) ~ '%(a)s'|format(a=1)",
        "'{:>5}|{:.2f}|{:{w}}|{!r:^9}'.format('a', 1.5, 'b', 'c', w=3) ~ '{0}{1}{0}'.format('x', 'y')",
        "'{:,}|{:>12,}'.format(1234567, 10**9) ~ '%d|%*d'|format(10**9, 12, 10**9)",
        "'{a[0]}{b}'.format_map({'a': [7], 'b': 'x'})",
        "'a\\tbc\\td'.expandtabs(4) ~ 'a\\tb'.expandtabs()",
        "('%08.3f' % 3.14159) ~ ('{:,}'.format(1234567))",
        "'y'.join(range(3)|map('string')) ~ [1, 2]|join(',') ~ [{'a': 'x'}, {'a': 'y'}]|join('-', attribute='a')",
        "'a\\nb'|indent(2, true) ~ 'a\\nb'|indent('> ') ~ 'aaa bbb ccc'|wordwrap(4) ~ 'aaa bbb'|wordwrap(3, wrapstring='|')",
    ],
)
def test_ordinary_operations_render_as_jinja_does(expression: str) -> None:
    """The bounds change nothing for ordinary formats, joins, indents and wraps: the output equals jinja2's
    own sandbox's."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = "{{ " + expression + " }}"
    expected = ImmutableSandboxedEnvironment().from_string(template).render()
    assert render_chat(template, CONVERSATION) == expected


def test_a_gguf_template_that_formats_gigabytes_is_refused(tmp_path: Path) -> None:
    """The reported file: 9.8 GB and 118 s before; measured now ~80 MB and 3 s (the whole CLI)."""
    model = tiny_gguf(
        tmp_path / "m.gguf", tokenizer__chat_template="{{ ('%1000000s' * 2000) % (('a',) * 2000) }}"
    )
    p, rss_mb, wall_s = run(["chat", str(model), "--backend", "llama.cpp", *CHAT], tmp_path)
    one_error_line(p, "chat template exceeds its size bound: the format width", notices=True)
    assert rss_mb < 500 and wall_s < 60, (rss_mb, wall_s)


# ---- item 11: nesting, and templates too big to compile --------------------------------------------------
NESTED = {  # name: (template, the error's words)
    "5000-parentheses": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nests too deeply to compile"),
    "1000-ifs": ("{% if a %}" * 1000 + "x" + "{% endif %}" * 1000, "nests too deeply to compile"),
    "5000-ifs": (
        "{% if a %}" * 5000 + "x" + "{% endif %}" * 5000,
        f"more than {MAX_TEMPLATE_TOKENS:,} tokens",
    ),
    "3000-lists": ("{{ " + "[" * 3000 + "]" * 3000 + " }}", "nests too deeply to compile"),
    "5000-nots": ("{{ " + "not " * 5000 + "1 }}", "nests too deeply to compile"),
    "25-loops": (
        "{% for m in messages %}" * 25 + "x" + "{% endfor %}" * 25,
        "nests too deeply to compile (too many statically nested blocks)",
    ),
}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_deep_nesting_is_a_template_error(name: str) -> None:
    template, message = NESTED[name]
    with pytest.raises(TemplateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ChatTemplate(template)


@pytest.mark.parametrize("name", ["5000-parentheses", "1000-ifs", "5000-ifs"])
def test_deep_nesting_in_a_template_file_gives_one_line(name: str, tmp_path: Path) -> None:
    """``chat --template FILE`` compiles the file before any model loads: a RecursionError traceback and
    exit 1 before, one line and exit 2 now."""
    template, message = NESTED[name]
    path = tmp_path / "t.jinja"
    path.write_text(template)
    p, _, _ = run(["chat", "--template", str(path), *CHAT], tmp_path)
    one_error_line(p, message)


def test_templates_past_the_token_bound_are_refused_before_they_compile() -> None:
    """``{{ a }}`` is three tokens: 6,667 of them pass the bound and are refused after lexing alone; 6,666
    compile (measured: ~60 MB of Python allocations and a few seconds — a 1 MiB template took 1.3 GB)."""
    assert 3 * 6_666 <= MAX_TEMPLATE_TOKENS < 3 * 6_667
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=f"more than {MAX_TEMPLATE_TOKENS:,} tokens"):
            ChatTemplate("{{ a }}" * 6_667)
        with pytest.raises(TemplateError, match=f"more than {MAX_TEMPLATE_TOKENS:,} tokens"):
            ChatTemplate("{{ a }}" * 149_000)  # 1,043,000 characters: under MAX_TEMPLATE_CHARS
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PY_ALLOC and time.perf_counter() - t0 < 30
    # Text between tags is one token however long, comments and whitespace none: a long system prompt is fine.
    long_text = "You are a helpful assistant. " * 30_000 + "{# a comment #}   {{ messages[0].content }}"
    assert ChatTemplate(long_text).render(CONVERSATION).endswith("   hi")
    assert ChatTemplate("{{ a }}" * 6_666).render(CONVERSATION) == ""
