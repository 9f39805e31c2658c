"""llmctl quantize (FP8/int8/int4/NF4 with per-group scales): not available in this version (issue [4 of 7])."""

from __future__ import annotations

import typer

from llmctl.errors import NotAvailableError


def quantize(
    ctx: typer.Context,
    model: str = typer.Argument(None, help="Model: folder, .gguf, hub id org/name, or bundled name."),
) -> None:
    """Not yet available in this version of llmctl (exits with code 2)."""
    raise NotAvailableError(
        "`llmctl quantize` is not yet available in this version of llmctl; see the README for what works today"
    )
