"""The llmctl command line: registers the commands and maps every expected failure to one line + exit 2."""

from __future__ import annotations

import os
import sys

import typer

from llmctl import __version__
from llmctl.commands import chat, estimate_memory, models, quantize, serve, show
from llmctl.commands import eval as eval_cmd
from llmctl.errors import LlmctlError

app = typer.Typer(
    name="llmctl",
    help="Estimate, quantize, chat with and evaluate language models locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "org/name[@rev]" and "[default: …]" must survive as written
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Estimate, quantize, chat with and evaluate language models locally."""


app.command("estimate-memory")(estimate_memory.estimate_memory)
app.command("quantize")(quantize.quantize)
app.command("chat")(chat.chat)
app.command("eval")(eval_cmd.eval_)
app.command("models")(models.models)
app.command("show")(show.show)
app.command("serve")(serve.serve)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and ``python -m llmctl``."""
    # typer vendors its own click in recent versions: take the exception classes from where it lives.
    cx = sys.modules[typer.BadParameter.__module__]
    try:
        code = app(args=argv, prog_name="llmctl", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a silent Exit(130): say so, unless the command already did
            from llmctl.commands import render

            if not render.interrupt_said():
                print("interrupted", file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(code)
    except LlmctlError as e:
        _fail(str(e), e.exit_code)
    except cx.NoArgsIsHelpError:  # `llmctl` alone: typer printed the help; exit 2 as click does
        sys.exit(2)
    except cx.ClickException as e:
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx is not None else "llmctl"
        _fail(f"{e.format_message()} (see `{cmd} --help`)", 2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # `llmctl ... | head`: stop quietly, the reader is gone.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def _fail(message: str, code: int) -> None:
    line = " ".join(message.split())  # always one line
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)
