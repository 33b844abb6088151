"""`dgemma`: the command line. Each command lives in its own module; this one gathers them.

Errors the user can act on (`DiffusionGemmaError`, bad values) print one line `error: ...` on
stderr and exit 1; typer's usage errors keep code 2; `--debug` adds the traceback (`errors.py`).
The generation flags are derived from `GenerationOptions` (`flags.py`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from .chat import chat
from .complete import complete
from .convert_view import convert
from .fill import edit, fill, score
from .finetune import finetune, fuse
from .generate import generate
from .info import info
from .serve import serve
from .sudoku import sudoku

app = typer.Typer(
    name="dgemma",
    help="Run Google's DiffusionGemma block-diffusion LM with MLX.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mlx-diffusiongemma {version('mlx-diffusiongemma')}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run Google's DiffusionGemma block-diffusion LM with MLX."""


for command in (chat, generate, complete, fill, edit, score, sudoku, convert, info, serve, finetune, fuse):
    app.command()(command)


def main() -> None:
    app(prog_name="dgemma")


if __name__ == "__main__":
    main()
