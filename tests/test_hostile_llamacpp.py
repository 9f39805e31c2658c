"""GGUF files that llama.cpp or llama-cpp-python would choke on (issue 17, items 1, 2 and 6): each file is a
one-layer Llama of ~260 KB built here, with SmolLM2's first 400 tokens, and one hostile change.

* item 1: vocabularies llama.cpp aborts on (exit 134, nothing printed) — a duplicate token, a WordPiece
  vocabulary with a byte token, a SentencePiece one that cannot spell every byte — are refused in one line
  by ``gguf.vocab.check_vocabulary``; whatever still kills llama.cpp is caught by loading the vocabulary in
  a forked child first (shown here with the check switched off);
* item 2: llama-cpp-python never compiles the file's ``tokenizer.chat_template*`` values (a 2.4 MB named
  template took 2.9 GB and 60 s; a syntax error in one raised a traceback);
* item 6: no command reads a GGUF's neighbours or runs their code: with a ``tokenizer_config.json`` whose
  ``auto_map`` names a module that would write a marker, and "y" on stdin, the marker never appears.

Peak memory of a command is its ``ru_maxrss``, reported by a small Python that starts it.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import one_error_line, smollm2_path

from llmctl.errors import FormatError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 40
N_VOCAB = 400


# ---- the tiny GGUF ------------------------------------------------------------------------------------
@functools.cache
def _smollm2_metadata() -> dict[str, Any]:
    from llmctl.gguf.reader import read_gguf

    meta = dict(read_gguf(smollm2_path()).metadata)
    tokens = meta["tokenizer.ggml.tokens"][:N_VOCAB]
    keep = set(tokens)
    merges = [
        m
        for m in meta["tokenizer.ggml.merges"]
        if m.replace(" ", "") in keep and all(p in keep for p in m.split(" "))
    ]
    meta.update({
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"][:N_VOCAB],
        "tokenizer.ggml.merges": merges,
        "llama.vocab_size": N_VOCAB,
        "llama.block_count": 1,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "general.file_type": 0,
    })  # fmt: skip
    return meta


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (N_VOCAB, 64), "output_norm.weight": (64,)}
    for name, shape in {"attn_norm": (64,), "attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64),
                        "attn_output": (64, 64), "ffn_norm": (64,), "ffn_gate": (128, 64), "ffn_up": (128, 64),
                        "ffn_down": (64, 128)}.items():  # fmt: skip
        shapes[f"blk.0.{name}.weight"] = shape
    return {
        n: (np.ones(s) if len(s) == 1 else rng.normal(0, 0.2, s)).astype(np.float32)
        for n, s in shapes.items()
    }


_VTYPES = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
           str: gguf.GGUFValueType.STRING, list: gguf.GGUFValueType.ARRAY}  # fmt: skip


def tiny_gguf(path: Path, **changes: Any) -> Path:
    """The tiny Llama GGUF at ``path``; ``changes`` maps metadata keys (dots as ``__``) to new values, a
    function of the old value, or ``None`` to drop the key."""
    meta = dict(_smollm2_metadata())
    for key, value in changes.items():
        key = key.replace("__", ".")
        value = value(meta[key]) if callable(value) else value
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    w = gguf.GGUFWriter(path, arch=meta.pop("general.architecture"))
    for key, value in meta.items():
        w.add_key_value(key, value, _VTYPES[type(value)])
    for name, array in _tensors().items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def replaced(i: int, token: str | None = None, *, copy_of: int | None = None):
    """A change of the token list: token ``i`` becomes ``token`` (or token ``copy_of``)."""

    def change(tokens: list[str]) -> list[str]:
        tokens = list(tokens)
        tokens[i] = tokens[copy_of] if copy_of is not None else token
        return tokens

    return change


# ---- running the CLI ------------------------------------------------------------------------------------
# A small Python starts the command and reports its peak RSS: a child's ru_maxrss counts the RSS of the
# process it was forked from (Linux keeps the high-water mark across exec), and pytest may be gigabytes.
_MEASURE = (
    "import os, resource, subprocess, sys; r = subprocess.run(sys.argv[2:], timeout=290); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "r.returncode < 0 and os.kill(os.getpid(), -r.returncode); sys.exit(r.returncode)"
)


def run(
    args: list[str], cwd: Path, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float, float]:
    """``llmctl ARGS`` in a subprocess; returns it, its peak RSS in MB and its wall time in s."""
    rss = cwd / ".peak-rss-kb"
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(rss), sys.executable, "-m", "llmctl", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, input=stdin, env=env or ENV,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    peak_mb = int(rss.read_text()) / 1024 if rss.exists() else float("nan")
    rss.unlink(missing_ok=True)
    return subprocess.CompletedProcess(args, p.returncode, p.stdout, p.stderr), peak_mb, wall




CHAT = ("--prompt", "hi", "--max-tokens", "4", "--threads", "1", "--seed", "1")


def commands(model: Path, data: Path) -> dict[str, list[str]]:
    return {
        "chat-llama.cpp": ["chat", str(model), "--backend", "llama.cpp", *CHAT],
        "chat-torch": ["chat", str(model), "--backend", "torch", *CHAT],
        "eval-llama.cpp": ["eval", str(model), "--data", str(data), "--backend", "llama.cpp", "-c", "64",
                           "--chunks", "2", "--threads", "1"],
        "eval-torch": ["eval", str(model), "--data", str(data), "--backend", "torch", "-c", "64", "--chunks", "2",
                       "--threads", "1"],
    }  # fmt: skip


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


# ---- item 1: vocabularies llama.cpp aborts on -----------------------------------------------------------
BAD_VOCABULARIES = {  # case: (changes, the error's words)
    "duplicate-token": (
        {"tokenizer__ggml__tokens": replaced(300, copy_of=299)},
        "tokenizer.ggml.tokens holds 'el' twice (ids 299 and 300)",
    ),
    "duplicate-after-a-nul-byte": (  # llama.cpp reads a token up to its first NUL
        {"tokenizer__ggml__tokens": replaced(300, "el\0x")},
        "tokenizer.ggml.tokens holds 'el' twice (ids 299 and 300)",
    ),
    "empty-token-named-like-another": (  # llama.cpp renames an empty token 300 to [EMPTY_300]
        {"tokenizer__ggml__tokens": lambda t: [*t[:300], "", "[EMPTY_300]", *t[302:]]},
        "holds '[EMPTY_300]' twice (ids 300 and 301)",
    ),
    "wordpiece-with-a-byte-token": (  # GGML_ABORT in token_to_byte while the vocabulary loads
        {"tokenizer__ggml__model": "bert", "tokenizer__ggml__token_type": lambda t: [*t[:100], 6, *t[101:]]},
        "tokenizer.ggml.model is 'bert', not a tokenizer of the model families llmctl runs",
    ),
    "sentencepiece-that-cannot-spell-every-byte": (  # uncaught std::out_of_range when it tokenizes
        {"tokenizer__ggml__model": "llama"},
        "the SentencePiece vocabulary lacks the byte token <0x00>",
    ),
    "token-types-short": (
        {"tokenizer__ggml__token_type": lambda t: t[:10]},
        "tokenizer.ggml.token_type has 10 entries for 400 tokens",
    ),
    "scores-short": (
        {"tokenizer__ggml__scores": [0.0] * 10},
        "tokenizer.ggml.scores has 10 entries for 400 tokens",
    ),
    "bos-outside-the-vocabulary": (
        {"tokenizer__ggml__bos_token_id": 400},
        "tokenizer.ggml.bos_token_id is 400, outside the vocabulary of 400 tokens",
    ),
}


def test_the_untouched_tiny_gguf_chats_and_evaluates(tmp_path: Path, data: Path) -> None:
    """The control: without its hostile change the file works, so each refusal below is the change's."""
    model = tiny_gguf(tmp_path / "m.gguf")
    assert model.stat().st_size < 300_000
    for name in ("chat-llama.cpp", "eval-llama.cpp"):
        p, _, _ = run(commands(model, data)[name], tmp_path)
        assert p.returncode == 0, (name, p.stderr)


@pytest.mark.parametrize("case", sorted(BAD_VOCABULARIES))
def test_bad_vocabulary_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    changes, message = BAD_VOCABULARIES[case]
    model = tiny_gguf(tmp_path / "m.gguf", **changes)
    p, _, _ = run(["chat", str(model), "--backend", "llama.cpp", *CHAT], tmp_path)
    one_error_line(p, message)


@pytest.mark.parametrize("command", ["chat-llama.cpp", "chat-torch", "eval-llama.cpp", "eval-torch"])
def test_duplicate_token_is_refused_by_every_command(command: str, tmp_path: Path, data: Path) -> None:
    """The reported case: one duplicate in tokenizer.ggml.tokens made chat and eval, on both backends (the
    torch backend tokenizes GGUFs with llama.cpp too), die with exit 134 and nothing on stderr."""
    model = tiny_gguf(tmp_path / "m.gguf", tokenizer__ggml__tokens=replaced(300, copy_of=299))
    p, _, _ = run(commands(model, data)[command], tmp_path)
    one_error_line(p, "tokenizer.ggml.tokens holds 'el' twice")


@pytest.mark.parametrize(
    ("case", "crash"),
    [
        ("duplicate-token", "SIGABRT: llama-vocab.cpp"),  # ...: GGML_ASSERT(id_to_token.size() == ...) failed
        ("wordpiece-with-a-byte-token", "SIGABRT: llama-vocab.cpp"),  # ...: fatal error
    ],
)
def test_what_still_kills_llama_cpp_is_caught_in_a_child(
    case: str, crash: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``check_vocabulary`` switched off, the vocabulary load that would abort this process runs in a
    forked child first: the child dies, this process raises a FormatError quoting llama.cpp's message."""
    import llmctl.gguf.vocab
    from llmctl.runtime.tokenizer import GGUFTokenizer

    monkeypatch.setattr(llmctl.gguf.vocab, "check_vocabulary", lambda info: None)
    model = tiny_gguf(tmp_path / "m.gguf", **BAD_VOCABULARIES[case][0])
    with pytest.raises(FormatError, match="llama.cpp crashes reading the vocabulary") as e:
        GGUFTokenizer(model)
    assert crash in str(e.value) and "\n" not in str(e.value)
    if case == "duplicate-token":
        assert "GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed" in str(e.value)


def test_the_crash_reaches_the_command_line_as_one_line(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "m.gguf", tokenizer__ggml__tokens=replaced(300, copy_of=299))
    code = (
        "import sys, llmctl.gguf.vocab as g; g.check_vocabulary = lambda info: None; "
        "from llmctl.cli import main; main(sys.argv[1:])"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "chat", str(model), "--backend", "llama.cpp", *CHAT],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV, input="",
    )  # fmt: skip
    one_error_line(p, "llama.cpp crashes reading the vocabulary (SIGABRT: llama-vocab.cpp:")


def test_probing_twice_loads_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child is forked once per file and process; a changed file is probed again."""
    from llmctl.runtime import tokenizer

    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    model = tiny_gguf(tmp_path / "m.gguf")
    for _ in range(2):
        tokenizer.GGUFTokenizer(model).close()
    assert len(forks) == 1
    tiny_gguf(model, general__name="changed")
    tokenizer.GGUFTokenizer(model).close()
    assert len(forks) == 2


# ---- item 2: llama-cpp-python never compiles the file's templates ----------------------------------------
def test_llama_cpp_python_sees_no_chat_template(tmp_path: Path) -> None:
    import llama_cpp

    from llmctl.runtime.llama_lib import captured_native_output, load_guard

    model = tiny_gguf(tmp_path / "m.gguf", tokenizer__chat_template__x="{% if %}")
    with captured_native_output(), load_guard():
        llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        assert not any(k.startswith("tokenizer.chat_template") for k in llm.metadata)
        assert llm._chat_handlers == {}
        assert llm.metadata["general.architecture"] == "llama"  # the rest of the metadata is there
    finally:
        with captured_native_output():
            llm.close()


@pytest.mark.parametrize(
    ("key", "template"),
    [
        ("tokenizer__chat_template__x", "{{ a }}" * 300_000),  # 2.1 MB: 2.9 GB and 60 s to compile before
        ("tokenizer__chat_template__tool_use", "{% if %}"),  # a traceback and exit 1 before
    ],
    ids=["huge", "syntax-error"],
)
def test_named_templates_are_never_compiled(key: str, template: str, tmp_path: Path, data: Path) -> None:
    """llmctl uses only ``tokenizer.chat_template``; the named ones are left alone, so chat and eval run."""
    model = tiny_gguf(tmp_path / "m.gguf", **{key: template})
    for name in ("chat-llama.cpp", "eval-llama.cpp"):
        p, rss_mb, wall_s = run(commands(model, data)[name], tmp_path)
        assert p.returncode == 0, (name, p.stderr[-2000:])
        assert rss_mb < 500 and wall_s < 60, (name, rss_mb, wall_s)  # measured: ~90 MB / 3 s for chat


def test_a_huge_default_template_is_refused_before_it_compiles(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "m.gguf", tokenizer__chat_template="{{ a }}" * 140_000)  # 980 KB
    p, rss_mb, wall_s = run(["chat", str(model), "--backend", "llama.cpp", *CHAT], tmp_path)
    one_error_line(p, "chat template has more than 20,000 tokens", notices=True)
    assert rss_mb < 500 and wall_s < 60, (rss_mb, wall_s)  # compiling it: 1.3 GB and 30 s


# ---- item 6: no repository code runs, no neighbour is read ----------------------------------------------
def test_no_from_pretrained_trusts_remote_code() -> None:
    """Every transformers ``from_pretrained`` call in llmctl passes ``trust_remote_code=False``."""
    root = Path(__file__).parents[1] / "llmctl"
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                trust = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
                calls.append((f"{path.relative_to(root)}:{node.lineno}", trust))
    assert calls, "no from_pretrained call found: update this test"
    for where, trust in calls:
        assert len(trust) == 1 and isinstance(trust[0], ast.Constant) and trust[0].value is False, where


@pytest.mark.slow
def test_repository_code_beside_a_gguf_never_runs(tmp_path: Path, data: Path) -> None:
    """A folder with the GGUF, a tokenizer_config.json whose auto_map points at evil.py (which would write a
    marker) and whose chat template would fail: chat, eval and quantize, with "y" on stdin for any prompt,
    never run it and never read the folder's files."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = tiny_gguf(folder / "model.gguf")
    marker = tmp_path / "RAN"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('evil.py ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]},
        "chat_template": "{{ raise_exception('the folder was read') }}",
    }))  # fmt: skip
    env = {
        **ENV,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # where transformers would copy evil.py
        "LLMCTL_CACHE": str(tmp_path / "cache"),  # no tokenizer converted by an earlier run
    }
    runs = {
        k: v for k, v in commands(model, data).items() if k in ("chat-llama.cpp", "chat-torch", "eval-torch")
    }
    runs["quantize"] = ["quantize", str(model), "-f", "int8", "-g", "32", "-o", str(tmp_path / "out")]
    for name, args in runs.items():
        p, _, _ = run(args, tmp_path, stdin="y\ny\n", env=env)
        assert p.returncode == 0, (name, p.stderr[-2000:])
        assert not marker.exists(), name
        assert "custom code" not in p.stdout + p.stderr, name
    saved = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and "raise_exception" not in json.dumps(saved)
