"""`dgemma sudoku`: a 4x4 puzzle solved on the canvas, the givens pinned, drawn step by step."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from mlx_diffusiongemma import sudoku
from mlx_diffusiongemma.events import BlockEvent, GenerationResult, StepEvent

from .live import ACCEPTED_STYLE, NOISY_STYLE, PINNED_STYLE, STATUS_STYLE

DEFAULT_PUZZLE = "..3./.4.2/21../..2."


class GridView:
    """The reply canvas drawn as a grid: givens pinned-style, accepted cells bold, the rest dim."""

    def __init__(self, console: Console, tokenizer, length: int, delay: float):
        self.console, self.tokenizer, self.length, self.delay = console, tokenizer, length, delay
        self.live = Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False,
                         redirect_stderr=False)

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()
        return False

    def handle(self, event) -> None:
        if not isinstance(event, StepEvent) or event.block != 0:
            return
        n = self.length
        ids, accepted = event.argmax.tolist()[:n], event.accepted.tolist()[:n]
        pinned = event.pinned.tolist()[:n] if event.pinned is not None else [False] * n
        grid = Text()
        for token, ok, pin in zip(ids, accepted, pinned):
            piece = self.tokenizer.decode([token])
            if piece not in "\n ":
                piece = piece if len(piece) == 1 and piece.isprintable() else "?"
            grid.append(piece, PINNED_STYLE if pin else ACCEPTED_STYLE if ok else NOISY_STYLE)
        status = Text(f"step {event.step}/{event.max_steps} · accepted {sum(accepted)}/{n}", style=STATUS_STYLE)
        self.live.update(Group(grid, status), refresh=True)
        if self.delay:
            time.sleep(self.delay)


def sudoku_command(llm, tokenizer, *, puzzle: str, plain: bool, free: bool, seed, steps, delay: float,
                   as_json: bool, terminal: bool, console: Console, err: Console) -> int:
    from mlx_diffusiongemma import template as tpl
    from mlx_diffusiongemma.generate import generate

    cells = sudoku.parse_puzzle(puzzle)
    options = {"seed": seed} | ({"max_denoising_steps": steps} if steps else {})
    if plain:
        result = generate(llm, tokenizer, sudoku.prompt(cells), max_tokens=llm.canvas_length, **options)
        text = result.answer.strip()
        passes = result.extra["decoder_passes"]
    else:
        length = tpl.layout(tokenizer, sudoku.segments(cells, not free, tokenizer)).length
        events = sudoku.stream_solve(llm, tokenizer, cells, digits_only=not free, **options)
        out = None
        show = terminal and not as_json
        if show:
            err.print("[dim]givens pinned on the canvas:[/]")
        try:
            if show:
                with GridView(console, tokenizer, length, delay) as view:
                    for item in events:
                        view.handle(item)
                        out = item
            else:
                for item in events:
                    out = item
        finally:
            events.close()
        text = out.text
        passes = out.result.extra["decoder_passes"]
    grid = sudoku.parse_grid(text)
    solved = sudoku.is_solution(grid, cells)
    if as_json:
        print(json.dumps({"puzzle": sudoku.format_grid(cells), "text": text, "solved": solved,
                          "decoder_passes": passes, "mode": "plain" if plain else "pinned"}))
    elif terminal:
        if plain:
            console.print(text, highlight=False, markup=False)
        err.print(f"[{'green' if solved else 'red'}]{'solved' if solved else 'not solved'}[/] "
                  f"[dim]· {passes} decoder passes[/]")
    else:
        sys.stdout.write(text + "\n")
    return 0 if solved else 3
