"""Tokenizers (HF folder and GGUF via llama.cpp) against transformers, streaming detokenization, and chat
templates: transformers-identical rendering, sandbox escapes refused, runaway templates stopped."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import gemma3_path, smollm2_path

from llmctl.errors import SourceError, TemplateError, UsageError
from llmctl.runtime.chat_template import CHATML_TEMPLATE, ChatTemplate, render_chat
from llmctl.runtime.tokenizer import GGUFTokenizer, HFTokenizer, StreamDecoder, load_tokenizer

TEXTS = [
    "Hello world",
    "  leading and trailing  ",
    "héllo wörld — naïve café",
    "日本語のテキストです。",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n\treturn x ** 2  # square\n",
    "a    b\n\n\n\tc      \n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>",
    "",
    " ",
    "\n",
    "Ｈｅｌｌｏ ｗｏｒｌｄ",
    "x" * 300,
    "https://example.com/a?b=c&d=e#f",
    "Ünïcödé ∑∫√ ¿¡ «»",
]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <b>3+3</b> & 'more'? 😀"},
]


# ---- a tiny Hugging Face folder, built here -------------------------------------------------------
def make_hf_folder(folder: Path, tokenizer_config: dict, *, post_bos: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, héllo wörld", "the quick brown fox", "naïve café"] * 20, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_hf_folder_special_ids_and_bos_rules(tmp_path: Path) -> None:
    base = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    folder = make_hf_folder(tmp_path / "a", base)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.bos_token, tok.eos_token) == (0, "<s>", "</s>")
    assert tok.eos_ids == {1, 3}  # EOS and <|im_end|> from generation_config and the special tokens
    assert tok.special_tokens == {"<s>": 0, "</s>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    assert tok.add_bos_default  # the post-processor prepends <s>
    assert tok.encode("hello")[0] == 0 and tok.encode("hello", add_bos=False)[0] != 0
    assert tok.encode("<|im_start|>hello")[:2] == [0, 2]  # special tokens in text are parsed
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.render_chat(CONVERSATION[:2]) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )

    # tokenizer_config's add_bos_token wins over the post-processor; without either, no BOS.
    off = load_tokenizer(make_hf_folder(tmp_path / "b", {**base, "add_bos_token": False}))
    assert not off.add_bos_default and off.encode("hello")[0] != 0
    plain = load_tokenizer(make_hf_folder(tmp_path / "c", base, post_bos=False))
    assert not plain.add_bos_default and plain.chat_template is None


def test_hf_folder_matches_transformers_and_streams(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = make_hf_folder(tmp_path / "t", {"bos_token": "<s>", "eos_token": "</s>"})
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in ["hello world", "héllo 😀 wörld", "naïve  café\n", "<|im_start|>x<|im_end|>"]:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
        pieces = list(ours.stream_decoder().feed(ids))
        assert "".join(pieces) == ours.decode(ids) and not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters(tmp_path: Path) -> None:
    tok = load_tokenizer(make_hf_folder(tmp_path / "s", {"bos_token": "<s>"}))
    ids = tok.encode("😀", add_bos=False)  # an unseen emoji: one token per UTF-8 byte
    assert len(ids) == 4
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", "", "", "😀"]
    assert dec.flush() == ""
    dec = StreamDecoder(tok)
    dec.push(ids[0])
    assert dec.flush() == "\ufffd"  # an unfinished character is flushed as U+FFFD, never dropped


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)
    with pytest.raises(SourceError, match=r"not a .gguf file or a folder with tokenizer.json"):
        load_tokenizer(tmp_path / "missing.bin")
    tok = load_tokenizer(make_hf_folder(tmp_path / "e", {"bos_token": "<s>"}))
    with pytest.raises(UsageError, match=r"token id 100000 is outside the vocabulary \(0..\d+\)"):
        tok.decode([1, 100000])
    with pytest.raises(UsageError, match="token ids must be integers, got str"):
        tok.decode(["1"])  # type: ignore[list-item]
    import numpy as np

    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6])
    with pytest.raises(UsageError, match="encode\\(\\) takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ---- chat templates ------------------------------------------------------------------------------
TEMPLATES = {
    "loop_vars": "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %} {{ m.role }}\n{% endfor %}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages if m.role == 'user' %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "tojson": "{{ messages[-1] | tojson }}|{{ {'b': 1, 'a': [2]} | tojson(indent=2, sort_keys=True) }}",
    "whitespace": "{%- for m in messages %}\n  {%- if m.role == 'user' %}\n    U: {{ m.content | trim }}\n  {% endif %}\n{% endfor %}",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}{% endfor %}",
    "loopcontrols": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
    "reasoning": "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}|{% endfor %}",
    "bos_eos": "{{ bos_token }}{% for m in messages %}{{ m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
    "string_ops": "{{ messages[0].content.split(' ')|join('_')|upper }}{{ '%s-%d' % ('a', 3) }}{{ '{}:{}'.format(1, 'x') }}{{ 'ab' * 3 }}{{ [1, 2] + [3] }}{{ 'x' ~ 1 }}{{ 2 ** 10 }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_like_transformers(name: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = {"add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"}
    conversation = [*CONVERSATION, {"role": "assistant", "content": "ok", "reasoning": "because"}]
    ref, _ = render_jinja_template([conversation], chat_template=TEMPLATES[name], **kwargs)
    assert render_chat(TEMPLATES[name], conversation, **kwargs) == ref[0]


def test_chatml_fallback() -> None:
    t = ChatTemplate(None)
    assert t.is_fallback and not ChatTemplate("{{ 1 }}").is_fallback
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.render([{"role": "assistant", "content": None}]) == "<|im_start|>assistant\n<|im_end|>\n"


def test_template_helpers() -> None:
    year = render_chat("{{ strftime_now('%Y') }}", [])
    assert year == time.strftime("%Y")
    with pytest.raises(
        TemplateError, match="the chat template refused the conversation: system role unsupported"
    ):
        render_chat("{{ raise_exception('system role unsupported') }}", CONVERSATION)
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        render_chat("ok\n{% for %}", [])
    with pytest.raises(TemplateError, match="chat template failed: UndefinedError"):
        render_chat("{{ nothing.here }}", [])
    with pytest.raises(TemplateError, match="message 0 must be an object with a string 'role'"):
        render_chat(CHATML_TEMPLATE, [{"content": "no role"}])
    # Objects are reduced to JSON types before the template sees them.
    assert render_chat("{{ messages[0].content }}", [{"role": "user", "content": object()}]) == "<object>"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ ''|attr('__class__') }}",
        "{{ ''['__class__'] }}",
        "{{ messages.__class__ }}",
        "{{ namespace.__init__ }}",
        "{{ messages.append(1) }}",
        "{{ dict.__call__ }}",
        "{{ messages|map(attribute='__class__')|list }}",
        "{{ strftime_now.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    ],
)
def test_sandbox_escapes_raise(template: str) -> None:
    with pytest.raises(TemplateError, match="chat template tried an unsafe operation"):
        render_chat(template, CONVERSATION)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "more than 1,000,000 loop iterations",
        ),
        (
            "{% for a in messages %}{% for b in messages %}{% for c in messages %}{% for d in messages %}{% for e in messages %}{% for f in messages %}{% for g in messages %}{% for h in messages %}{% for i in messages %}{% for j in messages %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
            "loop iterations",
        ),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{{ 'x' * 50 }}{% endfor %}{% endfor %}",
            "output exceeds",
        ),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
        (
            "{% set s = 'x' * 500000 %}{% macro m() %}{% for i in range(99999) %}{{ s }}{% endfor %}{% endmacro %}{{ m() }}",
            "a macro or block would make",
        ),
        ("{{ 'x' * 10**12 }}", "'\\*' would make 1,000,000,000,000"),
        ("{% for i in range(10**12) %}{% endfor %}", "argument 1000000000000"),
        ("{{ 9 ** 9999999 }}", "power 9999999"),
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "'~' would make",
        ),
        (
            "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "'\\+' would make",
        ),
        ("{{ 'x'|center(10**10) }}", "the center filter with argument 10000000000"),
        ("{{ 'x'.ljust(10**10) }}", "calling ljust with argument 10000000000"),
        ("{{ '{:>9999999999}'.format(1) }}", "the format spec"),
        ("{{ '%9999999999s' % 1 }}", "the format width 9999999999"),
        (
            "{% set ns = namespace(s='abcdefgh') %}{% for i in range(9) %}{% set ns.s = ns.s|replace('', ns.s) %}{% endfor %}",
            "replace would make",
        ),
    ],
)
def test_runaway_templates_are_stopped(template: str, message: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match=message):
        render_chat(template, CONVERSATION * 10)
    assert time.perf_counter() - t0 < 5.0


def test_deadline() -> None:
    slow = "{% for i in range(99999) %}{{ messages|tojson|length }}{% endfor %}"
    with pytest.raises(TemplateError, match="did not finish within 0.01 s"):
        ChatTemplate(slow, timeout_s=0.01).render(CONVERSATION * 50)


# ---- the bundled models against transformers -----------------------------------------------------


_CACHE: dict[str, tuple] = {}


def bundle(name: str, tmp_factory: pytest.TempPathFactory) -> tuple:
    """(ours from the GGUF, ours from a HF folder saved by transformers, transformers' tokenizer)."""
    if name not in _CACHE:
        from transformers import AutoTokenizer

        path = smollm2_path() if name == "smollm2" else gemma3_path()
        ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        folder = tmp_factory.mktemp(name)
        ref.save_pretrained(folder)
        _CACHE[name] = (GGUFTokenizer(path), HFTokenizer(folder), ref)
    return _CACHE[name]


EXPECTED = {  # bos id, model adds BOS, ids that end a turn
    "smollm2": (1, False, {2, 0}),  # <|im_start|> (unused by the template), <|im_end|>, <|endoftext|>
    "gemma3": (2, True, {1, 106}),  # <bos>, <eos>, <end_of_turn>
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_token_ids_match_transformers(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from_gguf, from_folder, ref = bundle(name, tmp_path_factory)
    bos, adds_bos, eos = EXPECTED[name]
    specials = {t.content: i for i, t in ref.added_tokens_decoder.items() if t.special}
    for tok in (from_gguf, from_folder):
        assert tok.bos_id == bos and tok.add_bos_default == adds_bos and eos <= tok.eos_ids
        assert tok.vocab_size == len(ref) and tok.special_tokens == specials
    for text in TEXTS:
        expected = ref(text).input_ids
        assert from_gguf.encode(text) == expected, text
        assert from_folder.encode(text) == expected, text
        plain = ref(text, add_special_tokens=False).input_ids
        assert from_gguf.encode(text, add_bos=False) == plain == from_folder.encode(text, add_bos=False)
        assert from_gguf.encode(text, add_bos=True)[0] == bos


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_decode_roundtrip_and_streaming(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from_gguf, from_folder, ref = bundle(name, tmp_path_factory)
    for text in TEXTS:
        ids = ref(text).input_ids
        full = ref.decode(ids)
        for tok in (from_gguf, from_folder):
            assert tok.decode(ids) == full, text
            assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True), text
            plain = tok.encode(text, add_bos=False)
            if "<" not in text:  # special tokens round-trip as text too, but keep the check simple
                assert tok.decode(plain) == text
            pieces = list(tok.stream_decoder().feed(ids))
            assert "".join(pieces) == full, text
            assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(tmp_path_factory: pytest.TempPathFactory) -> None:
    from_gguf, from_folder, ref = bundle("smollm2", tmp_path_factory)
    assert from_gguf.chat_template == ref.chat_template == from_folder.chat_template
    for gen in (True, False):
        expected = ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert from_gguf.render_chat(CONVERSATION, add_generation_prompt=gen) == expected
        assert from_folder.render_chat(CONVERSATION, add_generation_prompt=gen) == expected
    text = ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert from_gguf.encode_chat(CONVERSATION) == ref(text, add_special_tokens=False).input_ids
    # The default system prompt the template inserts when the conversation has none.
    assert from_gguf.render_chat(CONVERSATION[1:2]) == ref.apply_chat_template(
        CONVERSATION[1:2], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_gemma3_base_has_no_template_and_falls_back(tmp_path_factory: pytest.TempPathFactory) -> None:
    from_gguf, _, _ = bundle("gemma3", tmp_path_factory)
    assert from_gguf.chat_template is None
    ids = from_gguf.encode_chat(CONVERSATION[1:2])
    assert ids[0] == 2  # BOS added once: the ChatML fallback does not write it
    assert from_gguf.decode(ids).startswith("<bos><|im_start|>user\nWhat is 2+2?")


@pytest.mark.slow
def test_llama_cpp_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    tok = GGUFTokenizer(smollm2_path())
    tok.decode(tok.encode("hello"))
    tok.close()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
