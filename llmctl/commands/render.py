"""All terminal output of llmctl: the only module that imports rich.

Tables, charts and JSON go to stdout; notices go to stderr so that ``--json`` output stays parseable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
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


# ---- llmctl models ---------------------------------------------------------------------------------
def models_table(entries: Sequence[Any]) -> None:
    table = Table(title="Models available to llmctl", title_justify="left")
    for col in ("name", "kind", "status", "size", "path"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(
            e.name, e.kind, e.status, human_bytes(e.size_bytes) if e.size_bytes else "-", e.path or "-"
        )
    out().print(table)
    if not entries:
        out().print("no models found")
