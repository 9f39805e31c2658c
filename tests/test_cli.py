"""The command line as a user meets it: a real subprocess, stderr and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import llmctl


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=120, env=env
    )


def assert_one_line_error(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0], lines[0]


def test_help_lists_commands() -> None:
    p = run("--help")
    assert p.returncode == 0
    for cmd in ("estimate-memory", "quantize", "chat", "eval", "models", "show", "serve"):
        assert cmd in p.stdout


@pytest.mark.parametrize("cmd", ["estimate-memory", "quantize", "chat", "eval", "serve"])
def test_help_keeps_bracketed_text(cmd: str) -> None:
    """Help is plain text: rich markup used to eat ``org/name[@rev]`` and every ``[default: …]``."""
    p = run(cmd, "--help")
    assert p.returncode == 0 and "[default:" in p.stdout and "org/name[@rev]" in p.stdout


def test_a_misspelt_bundled_name_gets_a_suggestion() -> None:
    assert_one_line_error(run("chat", "smolm2-135m", "--prompt", "hi"), "did you mean smollm2-135m?")
    assert_one_line_error(run("eval", "gema3-270m", "--data", "sotu"), "did you mean gemma3-270m?")


def test_quantize_without_a_model_says_which_it_takes() -> None:
    p = run("quantize", "-f", "int8", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    assert "no MODEL given: quantizing the bundled smollm2-135m" in p.stderr


@pytest.mark.parametrize("out", ["folder", "x.gguf"])
def test_dry_run_summarises_kinds_and_lists_every_tensor_on_request(out: str, tmp_path) -> None:
    """The dry run printed one row per tensor (903 lines for Gemma); now one per kind, --verbose for all."""
    args = ("quantize", "smollm2-135m", "-f", "q4_0" if out.endswith(".gguf") else "int4", "-g", "32",
            "-o", str(tmp_path / out), "--dry-run")  # fmt: skip
    if out.endswith(".gguf"):
        args = tuple(a for a in args if a not in ("-g", "32"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}  # rows unfolded
    short, full = run(*args, env=env), run(*args, "--verbose", env=env)
    assert short.returncode == 0 and full.returncode == 0, short.stderr + full.stderr
    assert "tensors in" in short.stderr and "kinds; --verbose lists every tensor" in short.stderr
    layer = "blk.29.ffn_down.weight" if out.endswith(".gguf") else "model.layers.29.mlp.down_proj.weight"
    assert layer not in short.stdout and layer in full.stdout
    assert len(short.stdout.splitlines()) < len(full.stdout.splitlines()) / 3


def test_version() -> None:
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"llmctl {llmctl.__version__}"


@pytest.mark.parametrize("cmd", ["estimate-memory", "quantize", "chat", "eval", "models", "show"])
def test_every_command_refuses_unknown_options_in_one_line(cmd: str) -> None:
    assert_one_line_error(run(cmd, "--some-option", "1"), "No such option: --some-option")


def test_unknown_command_and_option() -> None:
    assert_one_line_error(run("frobnicate"), "No such command 'frobnicate'")
    assert_one_line_error(run("estimate-memory", "x", "--no-such-flag"), "No such option: --no-such-flag")


def test_import_is_light() -> None:
    code = "import sys, llmctl.cli; print(sorted(m for m in ('torch','transformers','llama_cpp','gguf') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr


def test_short_flags_mean_the_same_option_in_chat_eval_and_quantize() -> None:
    """-p was chat's --prompt and eval's --protocol; chat's --backend had no -b (eval's had)."""
    import typer

    from llmctl.cli import app

    group = typer.main.get_command(app)
    meaning: dict[str, set[str]] = {}
    for name in ("chat", "eval", "quantize"):
        for param in group.commands[name].params:
            if not param.opts[0].startswith("-"):
                continue  # an argument
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if not o.startswith("--")):
                meaning.setdefault(short, set()).add(longs[0])
    assert {k: v for k, v in meaning.items() if len(v) > 1} == {}
    assert meaning["-b"] == {"--backend"} and meaning["-p"] == {"--prompt"}


def test_ctrl_c_says_interrupted_once() -> None:
    """typer turns Ctrl-C into a silent exit 130; the CLI says 'interrupted' (in a real terminal, during
    eval's scoring), and never a second line after a command's own (quantize's: tests/test_quantize_terminal.py)."""
    import os

    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "llmctl", "eval", "--data", "sotu", "--chunks", "64", "--threads", "1"],
                          encoding="utf-8", timeout=300, dimensions=(40, 200), env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    child.expect(r"scoring 64 windows")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, (child.exitstatus, child.signalstatus)
    tail = child.before.replace("\r\n", "\n")
    assert tail.count("interrupted") == 1 and "Traceback" not in tail, tail[-1000:]
