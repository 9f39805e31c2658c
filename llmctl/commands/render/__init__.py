"""All terminal output of llmctl: the only package that imports rich; one module per command (``models``,
``memory``, ``quantize``, ``chat``, ``eval``) and, here, what they share (the consoles, JSON, notices,
byte counts, the progress bar, the Ctrl-C line).

Tables, charts and JSON go to stdout; notices go to stderr so that ``--json`` output stays parseable.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

GIB = 1024**3
_out: Console | None = None
_err: Console | None = None


def out() -> Console:
    global _out
    if _out is None:
        _out = Console(highlight=False, soft_wrap=False)
    return _out


def err() -> Console:
    global _err
    if _err is None:
        _err = Console(stderr=True, highlight=False)
    return _err


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f}"


def human_bytes(n: int | float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def notice(message: str) -> None:
    err().print(Text(message, style="dim"))


def plain(text: str) -> None:
    """Text exactly as given (a chat template): no markup, no wrapping."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


# ---- llmctl show ---------------------------------------------------------------------------------


class _Bar:
    """A transient rich progress bar on stderr, shown only on a terminal. ``with`` yields the subclass's
    ``update`` callback, or None when nothing is shown."""

    def __init__(self, enabled: bool, *columns: Any) -> None:
        from rich.progress import Progress

        self.enabled = enabled and err().is_terminal
        self.bar = Progress(*columns, console=err(), transient=True)
        self.task: Any = None

    def __enter__(self) -> Any:
        if self.enabled:
            self.bar.start()
        return self.update if self.enabled else None

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.stop()

    def update(self, *args: Any) -> None:
        raise NotImplementedError


_interrupt_said = False


def interrupted(message: str) -> None:
    """What a Ctrl-C left behind: one line on stderr, never wrapped (the CLI adds none of its own after it)."""
    global _interrupt_said
    _interrupt_said = True
    err().print(Text(message, style="yellow"), soft_wrap=True)


def interrupt_said() -> bool:
    return _interrupt_said
