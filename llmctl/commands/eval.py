"""llmctl eval (perplexity and KL divergence): not available in this version (issue [5 of 7])."""

from __future__ import annotations

import typer

from llmctl.errors import NotAvailableError


def eval_(
    ctx: typer.Context,
    model: str = typer.Argument(None, help="Model: folder, .gguf, hub id org/name, or bundled name."),
) -> None:
    """Not yet available in this version of llmctl (exits with code 2)."""
    raise NotAvailableError(
        "`llmctl eval` is not yet available in this version of llmctl; see the README for what works today"
    )
