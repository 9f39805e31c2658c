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

Containers were measured in items, not in the text they hold (issue 17, "untrusted files stay harmless"):
``{{ ['x' * 1000000] * 1000 }}`` is a list of 1,000 references (8 KB) whose text is 1 GB, so it reached
1,063 MiB of Python allocations before the output bound stopped it, and ``|tojson`` of it 1,911 MiB. The
same class (``CONTAINERS`` below, measured before the fix with tracemalloc): a namespace list gaining a
fresh 1 MB string per iteration 958 MiB; ``map('center', 1000000)|list`` 2,016 MiB; ``batch(1000, s)``'s
padding 1,062 MiB; ``('%(k)s' * 1000) % {'k': s}`` 1,061 MiB and ``('{0}' * 1000).format(s)`` 957 MiB;
``tojson(indent=1000000)`` of a list of strings 1,911 MiB, with a 1 MB separator 957 MiB;
``('x' * 1000000).translate({120: 'y' * 1000000})`` 6 GB (out of memory); a generator of 1 MB strings
listed by ``loop.length``, ``m(*gen)`` or ``{}.fromkeys(gen)`` 1,910 MiB; ``pprint`` of 300 nested levels
293 MiB and 31 s; ``('ā' * 1000000)|sort`` 226 MiB and 12 s, ``|batch``/``|list`` ~100 MiB. Now lists, tuples
and dicts (and a namespace's text) are measured by the text they hold — strings with quotes and
separators, nested containers as often as they occur — when ``*`` and ``+`` are about to make them, when a
literal, a call or a filter makes one, and a call's arguments together; generators are listed, measured,
before a loop, ``*`` or a call lists them; ``%``/``format`` count each field's value, ``tojson`` and
``pprint`` stop as their text passes the bound, ``split``, ``translate``, listing filters, ``urlize`` and
``urlencode`` announce their result first. Lists, tuples, dicts and namespaces may hold only data (a
namespace's contents could grow after the list holding it was measured). Each case here is refused with
Python allocations under ``MAX_PY_ALLOC`` — measured: under 8 MB and 1.3 s.

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
from llmctl.runtime.chat_template import (
    MAX_TEMPLATE_TOKENS,
    MIN_RENDER_GROWTH_BYTES,
    ChatTemplate,
    render_chat,
)

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
    # the same class: sizes announced by the items, not only the separators or the arguments (a list of them
    # is refused when it is made, see CONTAINERS; a generator's items are counted as join lists them)
    "join-filter-items": (
        "{{ range(1000)|map('string')|map('center', 1000000)|join }}",
        "join would make 2,000,000",
    ),
    "join-method-items": (
        "{{ ''.join(range(1000)|map('string')|map('center', 1000000)) }}",
        "join would make 2,000,000",
    ),
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


S = "{% set s = 'x' * 1000000 %}"  # a string within the bound (1 MiB + 4x the inputs)
CONTAINERS = {  # name: (template, the error's words); each took 0.1-6 GB before
    "list-repeat": ("{{ ['x' * 1000000] * 1000 }}", "'*' would make 1,000,004,002"),
    "tuple-repeat": ("{{ ('x' * 1000000,) * 1000 }}", "'*' would make 1,000,004,002"),
    "dict-repeat": ("{{ [{'k': 'x' * 1000000}] * 1000 }}", "'*' would make 1,000,013,002"),
    "list-repeat-tojson": ("{{ (['x' * 1000000] * 1000)|tojson }}", "'*' would make 1,000,004,002"),
    "list-doubling": (
        "{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(12) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
        "'+' would make 2,000,012",
    ),
    "fresh-items": (
        "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + ['x' * 1000000 ~ i] %}{% endfor %}",
        "'+' would make 2,000,014",
    ),
    "nested-literals": (
        S + "{% set a = [s, s, s, s] %}{% set b = [a, a, a, a] %}{% set c = [b, b, b, b] %}{{ c }}",
        "a list, tuple or dict would make",
    ),
    "filter-made-list": (
        "{{ range(1000)|map('string')|map('center', 1000000)|list }}",
        "the list filter would make 2,000,008",
    ),
    "characters-listed": ("{{ ('ā' * 1000000)|list }}", "the list filter would make 5,000,000"),
    "characters-sorted": ("{{ ('ā' * 1000000)|sort }}", "the sort filter would make 5,000,000"),
    "characters-batched": ("{{ ('ā' * 1000000)|batch(3)|list }}", "the batch filter would make 5,000,000"),
    "batch-padding": ("{% for b in messages|batch(1000, 'x' * 1000000) %}{{ b }}{% endfor %}", "the batch filter would make 1,000,002,000"),
    "macro-varargs": (S + "{% macro m() %}{{ varargs }}{% endmacro %}{{ m(s, s, s) }}", "the arguments of m would make 2,000,000"),
    "cycler-items": (S + "{{ cycler(s, s, s).items }}", "the arguments of Cycler would make 2,000,000"),
    "namespace-text": (S + "{% set ns = namespace() %}{% set ns.a = s %}{% set ns.b = s %}{{ ns }}", "a namespace's text would make 2,000,033"),
    "percent-mapping-key": ("{{ ('%(k)s' * 1000) % {'k': 'x' * 1000000} }}", "formatting with '%' would make 2,005,000"),
    "brace-repeated-field": ("{{ ('{0}' * 1000).format('x' * 1000000) }}", "the fields of a format would make 2,000,000"),
    "tojson-indent": ("{{ ('x' * 1000)|list|tojson(indent=1000000) }}", "the tojson filter would make 2,000,010"),
    "tojson-separators": ("{{ ('x' * 1000)|list|tojson(separators=('x' * 1000000, ':')) }}", "the tojson filter would make 2,000,010"),
    "pprint-nesting": (  # pprint keeps each enclosing level's repr alive: 300 levels of 1 MB
        "{% set ns = namespace(v='x' * 1000000) %}{% for i in range(300) %}{% set ns.v = [ns.v] %}{% endfor %}{{ ns.v|pprint }}",
        "the pprint filter would make 300,360,600",
    ),
    "translate": ("{{ ('x' * 1000000).translate({120: 'y' * 1000000}) }}", "translate() would make 1,000,000,000,000"),
    "split-pieces": ("{{ ('ā,' * 500000).split(',') }}", "split() would make 3,000,004"),
    "urlize": ("{{ ('www.' * 250000)|urlize }}", "the urlize filter would make 2,000,000"),
    "urlencode": ("{{ ('😀' * 1000000)|urlencode }}", "the urlencode filter would make 3,000,000"),
    # generators listed where the template cannot see it: loop.length, f(*gen), dict(gen)
    "loop-length": (
        "{% for x in range(2000)|map('string')|map('center', 1000000) %}{{ loop.length }}{% break %}{% endfor %}",
        "a for loop would make 2,000,000",
    ),
    "star-arguments": (
        "{% macro m() %}{{ varargs|length }}{% endmacro %}{{ m(*(range(2000)|map('string')|map('center', 1000000))) }}",
        "'*' arguments would make 2,000,004",
    ),
    "star-characters": (  # a string spread into arguments: one argument a character, a pointer in each tuple
        "{{ cycler(*('x' * 1000000 ~ 'x')) }}",
        "'*' arguments would make 8,000,008",
    ),
    "generator-argument": (
        "{{ {}.fromkeys(range(2000)|map('string')|map('center', 1000000))|length }}",
        "the arguments of fromkeys would make 2,000,000",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ALLOCATIONS) + sorted(CONTAINERS))
def test_allocations_are_refused_before_they_happen(name: str) -> None:
    template, message = ALLOCATIONS.get(name) or CONTAINERS[name]
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
        # containers, now measured as they are made
        "([1, 'a', none, 2.5, [true]] + [{'k': (1,)}]) ~ (1, 2) * 2 ~ ['x'] * 3 ~ {'a': [1], 'b': {}}",
        "[[1], [2, 3]]|sum(start=[]) ~ [(1,), (2,)]|sum(start=()) ~ [1, 2.5]|sum ~ [{'a': 1}, {'a': 2}]|sum(attribute='a')",
        "'ba'|list ~ 'cab'|sort ~ range(3)|map('string')|reverse|join ~ [3, 1]|batch(1, 0)|list ~ 'abcde'|slice(2)|list",
        "'a,b'.split(',') ~ 'a b\\n c'.split() ~ 'a\\nb\\r\\nc'.splitlines() ~ 'abc'.translate({97: 'xy', 98: none})",
        "'%(a)s%(a)s' % {'a': 'x'} ~ '{0}{0}{1}'.format('y', [1]) ~ namespace(a=1, b=[2]) ~ 'x'|urlize ~ 'a b'|urlencode",
        "{'b': [1, {'c': 'd'}], 'a': none}|pprint ~ (range(30)|list)|pprint ~ ('long word ' * 20)|wordwrap(7, false)",
    ],
)
def test_ordinary_operations_render_as_jinja_does(expression: str) -> None:
    """The bounds change nothing for ordinary formats, joins, indents and wraps: the output equals jinja2's
    own sandbox's."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = "{{ " + expression + " }}"
    expected = ImmutableSandboxedEnvironment().from_string(template).render()
    assert render_chat(template, CONVERSATION) == expected


def test_tojson_makes_what_json_dumps_makes() -> None:
    """tojson is written piece by piece now (to stop at the bound); the text is json.dumps' (transformers')."""
    import json

    value = {"b": [1, 2.5, None, True, "ā<&>'"], "a": {"c": []}}
    for kwargs in ({}, {"indent": 2}, {"indent": "\t", "sort_keys": True}, {"separators": (",", ":")}):
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        template = "{{ value|tojson(" + args + ") }}"
        assert render_chat(template, CONVERSATION, value=value) == json.dumps(
            value, ensure_ascii=False, **kwargs
        )


@pytest.mark.parametrize(
    ("template", "kept"),
    [
        ("{% set ns = namespace() %}{{ [ns] }}", "'SafeNamespace'"),
        ("{% set ns = namespace() %}{% set ns.inner = namespace() %}", "'SafeNamespace'"),
        ("{% for m in messages %}{% set ns = namespace(loop=loop) %}{% endfor %}", "'LoopContext'"),
        ("{% macro m() %}{% endmacro %}{{ {'m': m} }}", "'Macro'"),
        ("{% set ns = namespace() %}{% set ns.roles = messages|map(attribute='role') %}", "'generator'"),
        ("{{ [cycler(1, 2)] }}", "'Cycler'"),
    ],
)
def test_containers_and_namespaces_hold_only_data(template: str, kept: str) -> None:
    """A namespace can grow after the list holding it was measured; a loop, macro or generator keeps alive
    whatever it was made from: lists, tuples, dicts and namespaces may hold only data."""
    with pytest.raises(TemplateError, match=f"may keep only data .* not a {kept}"):
        render_chat(template, CONVERSATION)


def test_summing_lists_takes_linear_time() -> None:
    """jinja2's sum is Python's, which copies the total at every list: 100,000 one-item lists took 11 s."""
    t0 = time.perf_counter()
    assert render_chat("{{ (range(100000)|batch(1))|sum(start=[])|length }}", CONVERSATION) == "100000"
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(TemplateError, match='can only concatenate list \\(not "int"\\) to list'):
        render_chat("{{ [[1], 2]|sum(start=[]) }}", CONVERSATION)


def test_slow_steps_meet_the_deadline() -> None:
    """Wrapping a long word copies its rest once per line (4 s for 990,000 characters); the deadline is
    checked per line. CPython's punycode is quadratic (5 s for 300,000 characters): refused."""
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="did not finish within 0.2 s"):
        ChatTemplate("{{ ('x' * 990000)|wordwrap(20) }}", timeout_s=0.2).render(CONVERSATION)
    assert time.perf_counter() - t0 < 2.0
    for template in ("{{ ('ā' * 300000).encode('punycode') }}", "{{ 'a'.encode().decode('IDNA') }}"):
        with pytest.raises(TemplateError, match="that codec takes time growing with the square of the text"):
            render_chat(template, CONVERSATION)


# ---- many values alive at once -------------------------------------------------------------------------
def test_many_values_alive_at_once_are_refused() -> None:
    """Each value is within the size bound, but 300 variables each set to a fresh 1 MB string kept 290 MB
    alive (the 20,000-token bound allows ~2,500 of them: ~2.5 GB). The process's growth during a render is
    bounded too. Run in a fresh interpreter: the bound is on resident memory, and a process that freed
    memory earlier (as pytest's has) reuses it unseen first."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from llmctl.errors import TemplateError\n"
        "from llmctl.runtime.chat_template import render_chat\n"
        "t = ''.join(f\"{{% set v{i} = 'x' * 1000000 ~ '{i}' %}}\" for i in range(1000)) + '{{ v0|length }}'\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    render_chat(t, [{'role': 'user', 'content': 'hi'}])\n"
        "except TemplateError as e:\n"
        "    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    message, grown = p.stdout.splitlines()
    assert "grew the process by more than 256 MiB (many values alive at once" in message
    assert int(grown) < MIN_RENDER_GROWTH_BYTES + 16 * 1024**2, grown


def test_the_growth_bound_scales_with_the_conversation() -> None:
    """A long conversation is not refused for the memory its own text takes: the bound is 16x the output
    bound (1 MiB + 4x the inputs) when that is larger than 256 MiB. 40 messages of 1 MB render in ChatML."""
    messages = [{"role": "user", "content": "y" * 1_000_000 + str(i)} for i in range(40)]
    text = render_chat(None, messages, add_generation_prompt=True)
    assert len(text) > 40_000_000 and text.endswith("<|im_start|>assistant\n")


def test_loop_controls_outside_a_loop_do_not_compile() -> None:
    """Python's SyntaxError for jinja2's code was always reported as nesting too deep."""
    with pytest.raises(TemplateError, match="chat template does not compile: 'break' outside loop"):
        ChatTemplate("{% break %}")


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
