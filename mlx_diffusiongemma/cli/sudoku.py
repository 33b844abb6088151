"""`dgemma sudoku`: a 4x4 puzzle solved on the canvas, the givens pinned, drawn step by step."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlx_diffusiongemma.diffusion.options import GenerationOptions

from .errors import fail, handle_errors, is_terminal
from .flags import Debug, Model, Offline, generation_flags
from .loader import load_model

DEFAULT_PUZZLE = "..3./.4.2/21../..2."
MAX_DELAY = 10.0  # seconds per step: a slow demo, not a sleep of years (or an OverflowError)


def delay_seconds(value: float) -> float:
    if not 0.0 <= value <= MAX_DELAY:  # NaN fails this too
        raise typer.BadParameter(f"{value} is not a number of seconds from 0 to {MAX_DELAY:g}")
    return value


@generation_flags("max_denoising_steps", "seed")
def sudoku(
    grid: Annotated[Optional[str], typer.Argument(
        metavar="[PUZZLE]", help=f"16 cells, 1-4 or '.', rows split by '/' (default {DEFAULT_PUZZLE}).")] = None,
    puzzle: Annotated[Optional[str], typer.Option("--puzzle", help="The puzzle, as an option.")] = None,
    model: Model = "demo",
    plain: Annotated[bool, typer.Option("--plain", help="No pins: the puzzle as a plain prompt (to compare).")] = False,
    free: Annotated[bool, typer.Option("--free", help="Blanks may take any token (default: digits 1-4).")] = False,
    delay: Annotated[float, typer.Option("--delay", callback=delay_seconds,
                                         help=f"Seconds to show each step (0 to {MAX_DELAY:g}).")] = 0.15,
    as_json: Annotated[bool, typer.Option("--json", help="Print the grid and whether it is solved as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
    *,
    options: GenerationOptions,
):
    """Solve a 4x4 Sudoku with its givens pinned on the canvas (best with the trained demo model).
    Exit code 3 when the grid is not a solution."""
    from mlx_diffusiongemma.editing import sudoku as puzzles

    with handle_errors(debug):
        if grid is not None and puzzle is not None and grid != puzzle:
            fail("give the puzzle once: PUZZLE or --puzzle", 2)
        cells = puzzles.parse_puzzle(grid or puzzle or DEFAULT_PUZZLE)  # before loading anything
        llm, tokenizer = load_model(model, offline, Console(stderr=True, highlight=False))
        code = solve(llm, tokenizer, cells, plain=plain, free=free, options=options, delay=delay, as_json=as_json)
    raise typer.Exit(code)


def solve(llm, tokenizer, cells, *, plain: bool, free: bool, options: GenerationOptions, delay: float,
          as_json: bool) -> int:
    from mlx_diffusiongemma.api import generate
    from mlx_diffusiongemma.editing import sudoku as puzzles, template as tpl

    from .views import GridView, labels_for, run_events

    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    terminal = is_terminal()
    if plain:
        result = generate(llm, tokenizer, puzzles.prompt(cells), options=options.updated(max_tokens=llm.canvas_length))
        text = result.answer.strip()
        passes = result.decoder_passes
    else:
        length = tpl.layout(tokenizer, puzzles.segments(cells, not free, tokenizer)).length
        events = puzzles.stream_solve(llm, tokenizer, cells, digits_only=not free, options=options)
        show = terminal and not as_json
        if show:
            err.print("[dim]givens pinned on the canvas:[/]")
        view = GridView(console, labels_for(llm, tokenizer), length, delay) if show else None
        out = run_events(events, view=view)
        text = out.text
        passes = out.result.decoder_passes
    grid = puzzles.parse_grid(text)
    solved = puzzles.is_solution(grid, cells)
    if as_json:
        print(json.dumps({"puzzle": puzzles.format_grid(cells), "text": text, "solved": solved,
                          "decoder_passes": passes, "mode": "plain" if plain else "pinned"}))
    elif terminal:
        if plain:
            console.print(text, highlight=False, markup=False)
        err.print(f"[{'green' if solved else 'red'}]{'solved' if solved else 'not solved'}[/] "
                  f"[dim]· {passes} decoder passes[/]")
    else:
        sys.stdout.write(text + "\n")
    return 0 if solved else 3
