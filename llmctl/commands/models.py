"""`llmctl models`: the models available locally (bundled and in the Hugging Face cache)."""

from __future__ import annotations

import typer

from llmctl.catalog import list_models
from llmctl.commands import render
from llmctl.commands.render.models import models_table


def models(
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """List bundled models, the models in the Hugging Face cache and the outputs `llmctl quantize` wrote."""
    entries = list_models()
    if json_:
        render.print_json({"models": [e.__dict__ for e in entries]})
    else:
        models_table(entries)
