"""What ``llmctl chat`` and ``llmctl serve`` print: the prompt, the streamed reply, chat commands, the server line."""

from __future__ import annotations

import sys
from typing import Any

from rich.text import Text

from llmctl.commands.render import err, human_bytes, interrupted, out

PROMPT = ">>> "
CONTINUATION = "... "


def reply_piece(text: str) -> None:
    """Streamed reply text: written as is (no markup) and flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def reply_end(reply: Any, *, stats: bool) -> None:
    """End the streamed reply's line; in the REPL add a dim line with tokens, TTFT and tokens/s."""
    if not reply.text.endswith("\n"):  # an empty reply too: the shell prompt starts on a line of its own
        sys.stdout.write("\n")
    sys.stdout.flush()
    if reply.finish_reason == "interrupted":
        interrupted("[interrupted]")
    elif reply.finish_reason in ("length", "context") and stats:
        why = "--max-tokens reached" if reply.finish_reason == "length" else "context window full"
        err().print(Text(f"[reply cut: {why}]", style="yellow"))
    if not stats:
        return
    rate = f"{reply.decode_tok_s:.1f} tok/s" if reply.decode_tok_s else "- tok/s"
    line = (
        f"{reply.completion_tokens} tokens · TTFT {reply.ttft_s:.2f} s · {rate} · "
        f"prefilled {reply.prefilled_tokens}/{reply.prompt_tokens} · context {reply.context_used}/{reply.context_size}"
    )
    out().print(Text(line, style="dim"))


def chat_banner(commands: dict[str, str]) -> None:
    chat_notice('type a message; """ starts and ends a multi-line one, a trailing \\ continues a line; /help lists commands')


def chat_help(commands: dict[str, str]) -> None:
    width = max(map(len, commands))
    for cmd, what in commands.items():
        out().print(Text(f"{cmd:<{width}}  {what}"))
    out().print(
        Text('multi-line: """ on a line of its own starts and ends a block; a line ending in \\ continues; '
             "Ctrl-C stops a reply; //text sends text starting with /", style="dim")
    )  # fmt: skip


def chat_options(options: dict[str, Any], seed: int) -> None:
    for k, v in options.items():
        shown = f"{v!r}" if k != "seed" or v is not None else f"random ({seed} this session)"
        out().print(Text(f"{k:<18} {shown}"))


def chat_stats(stats: dict[str, Any]) -> None:
    kv = stats["kv_cache_bytes"]
    rows = [
        ("backend", stats["backend"]),
        ("template", stats["template"]),
        ("turns in context", str(stats["turns"])),
        ("context", f"{stats['context_used']} / {stats['context_size']} tokens"
                    + (f" ({stats['context_pending']} to prefill with the next message)" if stats.get("context_pending") else "")),
        ("KV cache", human_bytes(kv) if kv is not None else "held by llama.cpp"),
        ("replies", str(stats["replies"])),
        ("tokens generated", str(stats["generated_tokens"])),
        ("tokens prefilled", str(stats["prefilled_tokens"])),
        ("seed", str(stats["seed"])),
    ]
    last = stats["last"]
    if last:
        rate = f"{last['tokens_per_s']:.1f} tok/s" if last["tokens_per_s"] else "-"
        rows.append(("last reply", f"{last['completion_tokens']} tokens, TTFT {last['ttft_s']:.2f} s, {rate}, "
                                   f"{last['finish_reason']}"))  # fmt: skip
    for k, v in rows:
        out().print(Text(f"{k:<17} {v}"))


def chat_notice(message: str) -> None:
    """A dim line on stderr, never wrapped (so that tools reading stderr see one line per notice)."""
    err().print(Text(message, style="dim"), soft_wrap=True)


def chat_error(message: str) -> None:
    err().print(Text("error: " + " ".join(message.split()), style="red"), soft_wrap=True)


def chat_bye() -> None:
    chat_notice("bye")


# ---- llmctl serve -----------------------------------------------------------------------------------
def serve_started(
    backend_line: str, *, url: str, model: str, chat_mode: str, auth: bool, max_queue: int
) -> None:
    """What is served where, on stderr (the URL line first-class: scripts read it for --port 0)."""
    chat_notice(backend_line)
    chat_notice(
        f"chat requests: {chat_mode}; one generation at a time, up to {max_queue} waiting; "
        + ("API key required" if auth else "no API key")
    )
    err().print(Text(f"serving {model} at {url} (OpenAI API; Ctrl-C stops)"), soft_wrap=True)


# ---- llmctl eval (issue 5) ---------------------------------------------------------------------------
