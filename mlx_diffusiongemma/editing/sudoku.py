"""4x4 Sudoku on the canvas: the givens are pinned, the blanks are one-token holes.

The grid format is the demo model's (`Solve this sudoku:` then four rows of `d d d d`, `.` for a
blank; the answer is the full grid in the same format). Pure helpers plus `solve`, which runs
`stream_infill`-style events through the engine.
"""

from __future__ import annotations

from typing import Iterator

from . import template as tpl
from .infill import canvas_options, prepare_layout, run_layout
from .template import Fixed, Hole, TemplateError

DIGITS = ("1", "2", "3", "4")


def parse_puzzle(text: str) -> tuple[int, ...]:
    """`1..4/.4../..4./4..1`, 16 characters, or four whitespace-separated rows -> 16 cells (0 = blank)."""
    cells = [ch for ch in text if ch in "1234.0_"]
    if len(cells) != 16 or any(ch not in "1234.0_ /\n\t|" for ch in text):
        raise TemplateError("a 4x4 puzzle is 16 cells of 1-4 or '.' (rows may be split by '/' or new lines), "
                            f"got {text!r}")
    return tuple(0 if ch in ".0_" else int(ch) for ch in cells)


def format_grid(cells, blank: str = ".") -> str:
    return "\n".join(" ".join(str(v) if v else blank for v in cells[r * 4:r * 4 + 4]) for r in range(4))


def prompt(cells) -> str:
    return f"Solve this sudoku:\n{format_grid(cells)}"


def parse_grid(text: str) -> tuple[int, ...] | None:
    rows = [r.split() for r in text.strip().split("\n")]
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        return None
    try:
        return tuple(int(v) for r in rows for v in r)
    except ValueError:
        return None


def _groups():
    rows = [[r * 4 + c for c in range(4)] for r in range(4)]
    cols = [[r * 4 + c for r in range(4)] for c in range(4)]
    boxes = [[r * 4 + c for r in (br, br + 1) for c in (bc, bc + 1)] for br in (0, 2) for bc in (0, 2)]
    return rows + cols + boxes


def is_solution(grid, givens) -> bool:
    """A full valid grid that keeps every given."""
    if grid is None or len(grid) != 16:
        return False
    if any(g and g != v for g, v in zip(givens, grid)):
        return False
    return all(sorted(grid[i] for i in group) == [1, 2, 3, 4] for group in _groups())


def solutions(givens) -> int:
    """Number of valid completions (backtracking over the blanks)."""
    grid = list(givens)
    groups = [g for g in _groups()]
    of = {i: [g for g in groups if i in g] for i in range(16)}

    def count(i: int) -> int:
        if i == 16:
            return 1
        if grid[i]:
            return count(i + 1)
        total = 0
        for v in range(1, 5):
            if all(v not in (grid[j] for j in g) for g in of[i]):
                grid[i] = v
                total += count(i + 1)
                grid[i] = 0
        return total

    if any(givens[i] and any(givens[j] == givens[i] for g in of[i] for j in g if j != i) for i in range(16)):
        return 0
    return count(0)


def _spaced_digits(tokenizer) -> bool:
    """True when the tokenizer writes " 2" as one token (spaces joined to the next word, as in
    Gemma's and the demo model's tokenizers): a cell's hole then holds its leading space."""
    if tokenizer is None:
        return False
    return all(len(tokenizer.encode(" " + d, add_special_tokens=False)) == 1 for d in DIGITS)


def segments(cells, digits_only: bool = True, tokenizer=None) -> list[tpl.Segment]:
    """The answer grid as a template: givens (and line breaks) fixed, one 1-token hole per blank
    (restricted to the digits 1-4 when `digits_only`). With a tokenizer that joins a space to the
    next digit, a cell after the first of a row is " d" and its hole holds the space."""
    spaced = _spaced_digits(tokenizer)
    out: list[tpl.Segment] = []
    text = ""
    for i, v in enumerate(cells):
        sep = "" if i == 0 else ("\n" if i % 4 == 0 else " ")
        inner = sep == " " and spaced  # the separator belongs to the cell's token
        if not inner:
            text += sep
        if v:
            text += (sep if inner else "") + str(v)
            continue
        if text:
            out.append(Fixed(text))
        cell = tuple((" " + d if inner else d) for d in DIGITS)
        out.append(Hole(f"r{i // 4 + 1}c{i % 4 + 1}", 1, allowed=cell if digits_only else None, probes=cell))
        text = ""
    if text:
        out.append(Fixed(text))
    return out


def stream_solve(model, tokenizer, cells, *, digits_only: bool = True, options=None, **kwargs) -> Iterator:
    """Engine events for the pinned puzzle, then an InfillResult whose `.text` is the grid."""
    if not any(v == 0 for v in cells):
        raise TemplateError("the puzzle has no blank cell")
    opts = canvas_options(options, kwargs)
    ids, lay = prepare_layout(model, tokenizer, prompt(cells), segments(cells, digits_only, tokenizer), False)
    yield from run_layout(model, tokenizer, ids, lay, opts)
