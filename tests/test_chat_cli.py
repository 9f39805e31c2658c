"""`llmctl chat` as a user meets it: one-shot runs in a subprocess, and the REPL in a real pseudo-terminal
(pexpect): a two-turn conversation, /set, /reset, Ctrl-C during a reply, /save then /load, /stats, exit.

Runs use one thread: on a shared 2-core machine llama.cpp with 2 threads waits on its own busy threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ("--threads", "1", "--max-tokens", "24", "--seed", "5")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin if stdin is not None else "",
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def one_line_error(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (("--top-p", "1.5"), "--top-p must be between 0 and 1 (1 = off), got 1.5"),
        (("--temperature", "-1"), "--temperature must be >= 0 (0 = greedy), got -1.0"),
        (("--top-k", "-3"), "--top-k must be an integer >= 0 (0 = off), got -3"),
        (("--min-p", "2"), "--min-p must be between 0 and 1"),
        (("--repeat-penalty", "0"), "--repeat-penalty must be > 0"),
        (("--seed", "-4"), "--seed must be an integer between 0 and 4294967294"),
        (("--max-tokens", "0"), "--max-tokens must be an integer >= 1"),
        (("--stop", ""), "stop strings must be non-empty"),
        (("--backend", "tgi"), "--backend must be one of auto, torch, llama.cpp, vllm, got 'tgi'"),
        (("--context", "10"), "--context must be between 64 and the model's limit of 8192 tokens, got 10"),
        (("--backend", "llama.cpp", "--dtype", "bf16"), "--dtype is a torch-backend option"),
        (("--template", "/no/such/template.jinja"), "--template /no/such/template.jinja: no such file"),
        (("no-such-model",), "MODEL 'no-such-model' not found"),
    ],
)
def test_bad_options_give_one_line_errors(args: tuple[str, ...], message: str) -> None:
    one_line_error(run(*args, "--prompt", "hi"), message)


def test_empty_stdin_is_refused() -> None:
    one_line_error(run(stdin="  \n"), "no prompt: stdin was empty")


@pytest.mark.slow
def test_one_shot_prints_only_the_reply_and_json_agrees() -> None:
    p = run(*FAST, "--prompt", "Name a colour.")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and p.stdout.endswith("\n")
    assert "tok/s" not in p.stdout and "backend" not in p.stdout
    assert "backend: llama.cpp" in p.stderr and "(auto: the model is a GGUF file)" in p.stderr
    j = run(*FAST, "--json", stdin="Name a colour.")  # the same prompt piped on stdin
    assert j.returncode == 0, j.stderr
    data = json.loads(j.stdout)
    reply = data["reply"]  # same seed, options and backend: same text (stdout adds a final newline)
    assert p.stdout == reply + ("" if reply.endswith("\n") else "\n")
    assert data["backend"] == "llama.cpp" and data["model"] == "smollm2-135m" and data["seed"] == 5
    assert data["finish_reason"] in ("stop", "length")
    assert data["completion_tokens"] <= 24 and data["prompt_tokens"] == data["prefilled_tokens"] > 20
    assert data["ttft_s"] > 0 and data["total_s"] >= data["ttft_s"]


@pytest.mark.slow
def test_torch_backend_one_shot_is_reproducible_and_stops_at_stop_strings() -> None:
    args = (*FAST, "--backend", "torch", "--json", "--prompt", "Write a sentence about the sea.")
    a, b = json.loads(run(*args).stdout), json.loads(run(*args).stdout)
    assert a["backend"] == "torch" and a["reply"] == b["reply"]
    word = a["reply"].split()[1]
    c = json.loads(run(*args, "--stop", word).stdout)
    assert c["finish_reason"] == "stop" and c["reply"] == a["reply"][: a["reply"].index(word)]


@pytest.mark.slow
def test_template_override_and_sandbox(tmp_path: Path) -> None:
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    one_line_error(run(*FAST, "--template", str(evil), "--prompt", "hi"), "templates may not reach Python internals")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    one_line_error(run(*FAST, "--template", str(broken), "--prompt", "hi"), "chat template has a syntax error")


@pytest.mark.slow
def test_model_without_template_chats_with_the_fallback_on_request() -> None:
    p = run("gemma3-270m", *FAST, "--chat", "--prompt", "Hello")
    assert p.returncode == 0, p.stderr
    assert "the model has no chat template; using the ChatML fallback" in p.stderr
    assert "<|im_end|>" not in p.stdout


@pytest.mark.slow
def test_a_base_model_continues_the_prompt_in_completion_mode() -> None:
    """Gemma-3-270M base has no chat template: the fallback's stop marker came first and the reply was
    empty (issue 19, item 2). Without a template, chat continues the prompt as text and says so."""
    p = run("gemma3-270m", *FAST, "--temperature", "0", "--json", "--prompt", "The capital of France is")
    assert p.returncode == 0, p.stderr
    assert "note: completion mode (the model has no chat template)" in p.stderr
    data = json.loads(p.stdout)
    assert data["mode"] == "completion" and data["completion_tokens"] > 3 and data["reply"].strip()
    assert data["prompt_tokens"] <= 8  # the text and BOS, no template around it
    raw = run(*FAST, "--raw", "--temperature", "0", "--json", "--prompt", "Once upon a time")  # SmolLM2 has one
    assert raw.returncode == 0, raw.stderr
    assert "note: completion mode (--raw)" in raw.stderr and json.loads(raw.stdout)["mode"] == "completion"
    chat = run(*FAST, "--json", "--prompt", "Once upon a time")
    assert json.loads(chat.stdout)["mode"] == "chat" and "completion mode" not in chat.stderr


@pytest.mark.slow
def test_an_empty_reply_still_ends_its_line() -> None:
    """The reply stops at once (the stop string is its first character): stdout is one newline, so the
    shell's prompt starts on a line of its own."""
    p = run(*FAST, "--raw", "--temperature", "0", "--stop", " ", "--prompt", "The capital of France is")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "\n"


def test_set_errors_name_the_repl_command() -> None:
    from types import SimpleNamespace

    from llmctl.commands.chat import _command
    from llmctl.errors import UsageError
    from llmctl.runtime.sampler import SamplingOptions

    class Fake(SimpleNamespace):
        def set_option(self, name, value):
            self.options = self.options.with_(**{name: value})

    session = Fake(options=SamplingOptions(), seed=1)
    with pytest.raises(UsageError, match=r"^/set temperature must be >= 0 \(0 = greedy\), got -1.0$"):
        _command(session, "/set temperature -1")
    with pytest.raises(UsageError, match=r"^/set top-p must be between 0 and 1"):
        _command(session, "/set top-p 3")
    assert session.options == SamplingOptions()


def test_raw_excludes_a_template(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    one_line_error(run("--raw", "--template", str(tmp_path / "t.jinja"), "--prompt", "hi"), "--raw (completion mode) excludes")
    one_line_error(run("--raw", "--chat", "--prompt", "hi"), "--raw (completion mode) excludes")


@pytest.mark.slow
def test_repl_in_a_terminal(tmp_path: Path) -> None:
    import pexpect

    transcript = tmp_path / "chat.json"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llmctl", "chat", "--threads", "1", "--seed", "1", "--max-tokens", "30"],
        encoding="utf-8",
        timeout=180,
        dimensions=(40, 200),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    prompt = ">>> "
    stats_line = r"\d+ tokens · TTFT [\d.]+ s · [\d.-]+ tok/s · prefilled (\d+)/(\d+)"
    try:
        child.expect("backend: llama.cpp")
        child.expect(prompt)
        # Turn 1 and turn 2: the second prefills only its new tokens (the cache keeps turn 1).
        child.sendline("What is the capital of France?")
        child.expect(stats_line)
        new1, total1 = map(int, child.match.groups())
        assert new1 == total1
        child.expect(prompt)
        child.sendline("/set temperature 0.3")
        child.expect("temperature = 0.3")
        child.expect(prompt)
        child.sendline("/set top-k -3")
        child.expect("error: /set top-k must be an integer >= 0")
        child.expect(prompt)
        child.sendline("And of Italy?")
        child.expect(stats_line)
        new2, total2 = map(int, child.match.groups())
        assert new2 < total2 and total2 > total1
        child.expect(prompt)
        # Ctrl-C stops a long reply, not the program.
        child.sendline("/set max_tokens 2000")
        child.expect(prompt)
        child.sendline("Write a very long essay about the history of Rome.")
        child.expect("Rome.\r\n")  # the echo of the typed line
        child.expect(r"[A-Za-z]{3,}")  # the reply is streaming (a word; escape codes have no 3 letters in a row)
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"turns in context\s+3")
        child.expect(prompt)
        child.sendline(f"/save {transcript}")
        child.expect("saved 6 messages")
        child.expect(prompt)
        saved = json.loads(transcript.read_text())
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 3
        assert saved["messages"][2]["content"] == "And of Italy?"
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"turns in context\s+0")
        child.expect(prompt)
        child.sendline(f"/load {transcript}")
        child.expect("loaded 6 messages")
        child.expect(prompt)
        child.sendline("/set max_tokens 8")
        child.expect(prompt)
        # A multi-line message continues the loaded conversation.
        child.sendline('"""')
        child.sendline("Thanks.")
        child.sendline("Bye!")
        child.sendline('"""')
        child.expect(stats_line)
        child.expect(prompt)
        child.sendline("/stats")
        child.expect(r"turns in context\s+4")
        child.expect(prompt)
        child.sendline("/nope")
        child.expect("error: unknown command /nope")
        child.expect(prompt)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
