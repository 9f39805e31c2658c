"""`llmctl show [MODEL]`: a model's architecture, weights, quantization, template and license."""

from __future__ import annotations

import typer

from llmctl.commands import render
from llmctl.commands.render import models as models_render
from llmctl.errors import UsageError


def show(
    model: str = typer.Argument(
        None, help="Folder, .gguf, hub id org/name[@rev][:FILE.gguf] or bundled name (default: smollm2-135m)."
    ),
    template: bool = typer.Option(False, "--template", help="Print the model's chat template as stored, and nothing else."),
    json_: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show what a model is: architecture, parameters, stored weight types, quantization, chat template, license."""
    from llmctl.model_info import model_info
    from llmctl.runtime.tokenizer import chat_template_of
    from llmctl.sources import resolve

    if template and json_:
        raise UsageError("--template prints the template as text; drop --json (the JSON says whether there is one)")
    source = resolve(model, need_weights=False, allow_config=True)  # headers and small files only
    if template:
        text = chat_template_of(source.path)
        if text is None:
            raise UsageError(
                f"{source.display} has no chat template (a base model: `llmctl chat` runs it in completion mode)"
            )
        render.plain(text)
        return
    info = model_info(source)
    if json_:
        render.print_json(info)
    else:
        models_render.model_info(info)
