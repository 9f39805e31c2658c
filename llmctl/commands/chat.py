"""`llmctl chat [MODEL]`: an interactive chat REPL, or one reply with --prompt / piped stdin.

The engine is ``llmctl.runtime.session`` (conversation, template, KV reuse, sampling); this module reads
options and lines, dispatches the slash commands and hands every output to ``render``.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from llmctl.commands import render
from llmctl.commands.render.chat import (
    CONTINUATION,
    PROMPT,
    chat_banner,
    chat_bye,
    chat_error,
    chat_help,
    chat_notice,
    chat_options,
    chat_stats,
    reply_end,
    reply_piece,
)
from llmctl.errors import LlmctlError, UsageError

COMMANDS = {
    "/help": "show this help",
    "/reset": "forget the conversation (system prompt and options stay)",
    "/system TEXT": "set the system prompt (/system alone shows it, /system none clears it)",
    "/set NAME VALUE": "set a sampling option, e.g. /set temperature 0.3 (/set alone lists them)",
    "/save FILE": "write the conversation as a JSON transcript",
    "/load FILE": "replace the conversation with a saved transcript",
    "/stats": "context use, KV cache, tokens and speed so far",
    "/exit": "leave (or Ctrl-D)",
}
MULTILINE = '"""'


def chat(
    model: str = typer.Argument(
        None, help="Folder, .gguf, hub id org/name[@rev][:FILE.gguf] or bundled name (default: smollm2-135m)."
    ),
    backend: str = typer.Option("auto", "--backend", "-b", help="auto (llama.cpp for GGUF, else torch), torch, llama.cpp, vllm (pip install 'llmctl[vllm]')."),
    tensor_parallel: int = typer.Option(None, "--tensor-parallel", "--tp", help="vllm: GPUs to split the model across (vLLM's tensor_parallel_size)."),
    context: int = typer.Option(
        None, "--context", "-c", help="Context tokens to allocate (default: the model's limit, at most 4096)."
    ),
    device: str = typer.Option(None, "--device", help="torch: auto, cpu, cuda, cuda:N, mps."),
    gpu_layers: int = typer.Option(None, "--gpu-layers", "-ngl", help="llama.cpp: layers to offload to the GPU (-1 all, 0 none; default: all when llama-cpp-python has GPU offload)."),
    dtype: str = typer.Option(None, "--dtype", help="torch compute dtype: fp32, bf16, fp16 (default: fp32 on CPU, bf16/fp16 on GPU)."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: the physical cores other processes leave idle, by the load average; shown on start)."),
    temperature: float = typer.Option(0.8, "--temperature", "--temp", help="0 = greedy."),
    top_k: int = typer.Option(40, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Keep the most likely tokens up to this mass (1 = off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min-p x the top token's probability."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalise recent tokens (1 = off)."),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="Tokens the penalties look at (-1 = all)."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="Subtracted once per recent token."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="Subtracted per occurrence."),
    seed: int = typer.Option(None, "--seed", help="Seed for reproducible sampling (default: random, shown by /stats and --json)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop the reply at this text (repeatable)."),
    system: str = typer.Option(None, "--system", "-s", help="System prompt."),
    template: Path = typer.Option(None, "--template", help="Jinja chat template file to use instead of the model's."),
    raw: bool = typer.Option(False, "--raw", help="Completion mode: continue the prompt as plain text, no chat template (the default for models without one)."),
    chat_mode: bool = typer.Option(False, "--chat", help="Chat even when the model has no chat template (with the ChatML fallback)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="One-shot: reply to this and exit."),
    json_: bool = typer.Option(False, "--json", help="One-shot: print one JSON object (reply, counts, timings)."),
) -> None:
    """Chat with a model: a REPL on a terminal, or one reply to --prompt or to text piped on stdin."""
    from llmctl.runtime.sampler import SamplingOptions
    from llmctl.runtime.session import Session, load_backend

    options = SamplingOptions(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        max_tokens=max_tokens,
        stop=tuple(stop or ()),
    )
    template_text = _read_template(template) if template is not None else None
    one_shot = prompt is not None or not sys.stdin.isatty()
    if json_ and not one_shot:
        raise UsageError("--json needs a one-shot prompt: pass --prompt TEXT or pipe the text on stdin")
    if one_shot and prompt is None:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise UsageError("no prompt: stdin was empty; pipe some text or pass --prompt TEXT")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty; pass the text to reply to")

    if raw and (chat_mode or template is not None):
        raise UsageError("--raw (completion mode) excludes --chat and --template; pass one of them")
    engine, line = load_backend(
        model, backend, context=context, device=device, dtype=dtype, threads=threads, gpu_layers=gpu_layers,
        tensor_parallel=tensor_parallel,
    )
    try:
        has_template = template_text is not None or bool((engine.tokenizer.chat_template or "").strip())
        completion = raw or (not has_template and not chat_mode)
        session = Session(engine, options, system=system, template=template_text, completion=completion)
        chat_notice(line)
        if completion:
            why = "--raw" if raw else "the model has no chat template"
            chat_notice(
                f"note: completion mode ({why}): the prompt is continued as plain text; "
                + ("drop --raw to chat" if raw else "pass --chat for the ChatML fallback, or --template FILE")
            )
        elif session.uses_fallback_template:
            chat_notice(
                "note: the model has no chat template; using the ChatML fallback "
                "(<|im_start|>role … <|im_end|>); pass --template FILE for another"
            )
        if one_shot:
            _one_shot(session, prompt or "", json_)
        else:
            _repl(session)
    finally:
        engine.close()


def _read_template(path: Path) -> str:
    from llmctl.runtime.chat_template import ChatTemplate

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--template {path}: no such file; pass a Jinja chat template file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--template {path}: cannot read it ({e})") from None
    if not text.strip():
        raise UsageError(f"--template {path}: the file is empty")
    # Compile and try it now: a broken or hostile template is reported before the model loads.
    ChatTemplate(text).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    return text


def _one_shot(session: Any, prompt: str, as_json: bool) -> None:
    from llmctl.runtime.session import Notice, Piece, Reply

    reply = None
    for event in session.reply(prompt):
        if isinstance(event, Piece) and not as_json:
            reply_piece(event.text)
        elif isinstance(event, Notice):
            chat_notice(event.text)
        elif isinstance(event, Reply):
            reply = event
    assert reply is not None
    if as_json:
        render.print_json(
            {
                "model": session.backend.source.display,
                "backend": session.backend.name,
                "mode": "completion" if session.completion else "chat",
                **reply.to_dict(),
            }
        )
    else:
        reply_end(reply, stats=False)
    if reply.finish_reason == "interrupted":
        raise typer.Exit(130)


# ---- the REPL ------------------------------------------------------------------------------------
def _repl(session: Any) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat_banner(COMMANDS)
    while True:
        try:
            text = _read_message()
        except EOFError:
            chat_bye()
            return
        except KeyboardInterrupt:
            chat_notice("\n(Ctrl-D or /exit leaves)")
            continue
        if text is None:
            continue
        try:
            if text.startswith("/") and not text.startswith("//"):
                if _command(session, text) == "exit":
                    return
            else:
                _turn(session, text.removeprefix("/"))
        except LlmctlError as e:
            chat_error(str(e))


def _read_message() -> str | None:
    """One message: a line; lines ending in a backslash continue; \"\"\" starts and ends a block."""
    line = input(PROMPT)
    if line.strip() == MULTILINE:
        lines = []
        while (nxt := input(CONTINUATION)).strip() != MULTILINE:
            lines.append(nxt)
        text = "\n".join(lines)
    else:
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = input(CONTINUATION)
        text = "\n".join([*lines, line])
    return text if text.strip() else None


def _turn(session: Any, text: str) -> None:
    from llmctl.runtime.session import Notice, Piece, Reply

    # Ctrl-C during a reply asks the session to stop at the next token (a KeyboardInterrupt raised inside
    # native code could be swallowed by a ctypes callback); a second Ctrl-C interrupts at once.
    requested = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    events = session.reply(text, requested.is_set)
    reply = None
    try:
        for event in events:
            if isinstance(event, Piece):
                reply_piece(event.text)
            elif isinstance(event, Notice):
                chat_notice(event.text)
            elif isinstance(event, Reply):
                reply = event
    except KeyboardInterrupt:
        events.close()  # the session keeps what was generated, marked interrupted
        reply = session.last
    finally:
        signal.signal(signal.SIGINT, previous)
    if reply is not None:
        reply_end(reply, stats=True)


def _command(session: Any, text: str) -> str | None:
    from llmctl.runtime.sampler import parse_option

    name, _, arg = text.strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        chat_bye()
        return "exit"
    if name in ("/help", "/?"):
        chat_help(COMMANDS)
    elif name == "/reset":
        session.reset()
        chat_notice("conversation cleared")
    elif name == "/system":
        if not arg:
            chat_notice(f"system prompt: {session.system!r}" if session.system else "no system prompt")
        else:
            session.set_system(None if arg.lower() == "none" else arg)
            chat_notice("system prompt cleared" if session.system is None else "system prompt set")
    elif name == "/set":
        if not arg:
            chat_options(session.options.to_dict(), session.seed)
            return None
        key, _, value = arg.partition(" ")
        field, parsed = parse_option(key, value)
        try:
            session.set_option(field, parsed)
        except UsageError as e:  # the options' checks name the command-line flag; here it is /set NAME
            raise UsageError(str(e).replace("--" + field.replace("_", "-"), f"/set {key}", 1)) from None
        shown = session.seed if field == "seed" else getattr(session.options, field)
        chat_notice(f"{field} = {shown!r}")
    elif name == "/save":
        if not arg:
            raise UsageError("/save needs a file name: /save FILE")
        path = session.save(arg)
        chat_notice(f"saved {len(session.messages)} messages to {path}")
    elif name == "/load":
        if not arg:
            raise UsageError("/load needs a file name: /load FILE")
        n = session.load(arg)
        chat_notice(f"loaded {n} messages from {arg}")
    elif name == "/stats":
        chat_stats(session.stats())
    else:
        raise UsageError(f"unknown command {name}; commands: {', '.join(c.split()[0] for c in COMMANDS)}")
    return None
