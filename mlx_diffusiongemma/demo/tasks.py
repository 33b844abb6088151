"""The demo model's task suite: synthetic tasks that show what block diffusion does well.

Each family makes (prompt, answer) pairs from a random generator and judges an answer. A prompt
belongs to the held-out set when a hash of its text says so (`is_held_out`): training never
sees those prompts, evaluation uses only them. Pure Python (no MLX), so the training script, the
evaluation script, the chat's /help and the tests share one definition.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Callable

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain",
         "snow", "king", "ship", "book", "lamp", "rock", "milk", "bread", "apple", "river", "cloud", "stone")
NAMES = ("Ada", "Alan", "Grace", "Linus", "Marie", "Nikola", "Emmy", "Carl", "Rosa", "Ines", "Omar", "Yuki",
         "Lena", "Paul", "Sofia", "Hugo", "Mila", "Ravi", "Tara", "Ben")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Madrid", "Quito", "Dublin",
          "Seoul", "Delhi", "Lagos", "Vienna", "Prague", "Austin")


def is_held_out(prompt: str, fraction: int = 10) -> bool:
    """True for about 1/`fraction` of all prompts, decided by the prompt text alone."""
    return hashlib.sha256(prompt.encode()).digest()[0] % fraction == 0


def _nums(values) -> str:
    return " ".join(str(v) for v in values)


def _parse_ints(text: str) -> list[int] | None:
    try:
        return [int(t) for t in text.split()]
    except ValueError:
        return None


# -- 4x4 Sudoku ----------------------------------------------------------------------------------


def _sudoku_grids() -> list[tuple[int, ...]]:
    """All 288 valid 4x4 grids (rows, columns and 2x2 boxes hold 1-4 once), row-major."""
    grids = []
    perms = list(itertools.permutations(range(1, 5)))
    for rows in itertools.product(perms, repeat=4):
        cols_ok = all(len({rows[r][c] for r in range(4)}) == 4 for c in range(4))
        boxes_ok = all(len({rows[r][c] for r in (br, br + 1) for c in (bc, bc + 1)}) == 4
                       for br in (0, 2) for bc in (0, 2))
        if cols_ok and boxes_ok:
            grids.append(tuple(v for row in rows for v in row))
    return grids


_GRIDS: list[tuple[int, ...]] | None = None


def sudoku_grids() -> list[tuple[int, ...]]:
    global _GRIDS
    if _GRIDS is None:
        _GRIDS = _sudoku_grids()
    return _GRIDS


def sudoku_solutions(givens: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every grid compatible with `givens` (0 = empty)."""
    return [g for g in sudoku_grids() if all(v == 0 or v == g[i] for i, v in enumerate(givens))]


def format_grid(cells, blank: str = ".") -> str:
    return "\n".join(" ".join(str(v) if v else blank for v in cells[r * 4 : r * 4 + 4]) for r in range(4))


def parse_grid(text: str) -> tuple[int, ...] | None:
    rows = [r.split() for r in text.strip().split("\n")]
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        return None
    try:
        return tuple(int(v) if v != "." else 0 for r in rows for v in r)
    except ValueError:
        return None


def is_valid_solution(grid: tuple[int, ...] | None, givens: tuple[int, ...]) -> bool:
    return grid is not None and grid in set(sudoku_grids()) and all(v == 0 or v == grid[i] for i, v in enumerate(givens))


# -- the families ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, reference answer)
    # (prompt, reference, produced) -> correct? Exact match unless the family allows choices.
    judge: Callable[[str, str, str], bool]
    about: str
    example: str  # a prompt to try (shown by /help)


def _exact(prompt: str, reference: str, produced: str) -> bool:
    return produced.strip() == reference.strip()


def _sort(rng):
    values = [rng.randrange(100) for _ in range(rng.randint(4, 10))]
    return f"Sort these numbers: {_nums(values)}", _nums(sorted(values))


def _add(rng):
    a, b = rng.randrange(50), rng.randrange(50)
    return f"What is {a} + {b}?", str(a + b)


def _reverse(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _dedup(rng):
    pool = [rng.randrange(100) for _ in range(rng.randint(2, 6))]
    values = [rng.choice(pool) for _ in range(rng.randint(4, 10))]
    seen: list[int] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return f"Remove duplicates: {_nums(values)}", _nums(seen)


def _card(rng):
    name, age, city = rng.choice(NAMES), rng.randint(18, 99), rng.choice(CITIES)
    style = rng.randrange(3)
    if style == 0:
        prompt = f"Make a card for {name}, {age}, from {city}."
    elif style == 1:
        prompt = f"Make a card: {name} lives in {city} and is {age}."
    else:
        prompt = f"Make a card for {name} from {city}, age {age}."
    return prompt, f"Name: {name}\nAge: {age}\nCity: {city}"


def _sudoku(rng):
    while True:
        grid = rng.choice(sudoku_grids())
        keep = rng.randint(6, 10)
        cells = rng.sample(range(16), keep)
        givens = tuple(grid[i] if i in cells else 0 for i in range(16))
        if len(sudoku_solutions(givens)) == 1:
            return f"Solve this sudoku:\n{format_grid(givens)}", format_grid(grid)


def _sudoku_givens(prompt: str) -> tuple[int, ...] | None:
    return parse_grid(prompt.split("\n", 1)[1]) if "\n" in prompt else None


def _judge_sudoku(prompt, reference, produced):
    givens = _sudoku_givens(prompt)
    return givens is not None and is_valid_solution(parse_grid(produced), givens)


def _yesno(rng):
    kind = rng.randrange(3)
    n = rng.randrange(100)
    if kind == 0:
        return f"Is {n} even?", "yes" if n % 2 == 0 else "no"
    m = rng.randrange(100)
    if kind == 1:
        return f"Is {n} greater than {m}?", "yes" if n > m else "no"
    return f"Is {n} less than {m}?", "yes" if n < m else "no"


def _count(rng):
    start = rng.randrange(0, 40)
    end = rng.randint(start + 10, min(start + 90, 99))
    return f"Count from {start} to {end}.", _nums(range(start, end + 1))


def _pick(rng):
    n = rng.randint(5, 12)
    values = sorted(rng.sample(range(100), n))
    return f"Pick {n} different numbers in increasing order.", _nums(values)


def _judge_pick(prompt, reference, produced):
    n = int(prompt.split()[1])
    values = _parse_ints(produced)
    return (values is not None and len(values) == n and all(0 <= v < 100 for v in values)
            and all(a < b for a, b in zip(values, values[1:])))


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("sort", _sort, _exact, "sort 4-10 numbers", "Sort these numbers: 42 7 19 88 3"),
    Family("add", _add, _exact, "add two numbers below 50", "What is 23 + 19?"),
    Family("reverse", _reverse, _exact, "reverse 3-8 words", "Reverse the words: sun moon star rain"),
    Family("dedup", _dedup, _exact, "drop repeated numbers, keep the first", "Remove duplicates: 5 3 5 9 3 1"),
    Family("card", _card, _exact, "a name/age/city card (template filling)", "Make a card for Ada, 36, from Paris."),
    Family("sudoku", _sudoku, _judge_sudoku, "solve a 4x4 sudoku", "Solve this sudoku:\n1 . . 4\n. 4 . .\n. . 4 .\n4 . . 1"),
    Family("yesno", _yesno, _exact, "greater / less questions", "Is 37 greater than 12?"),
    Family("count", _count, _exact, "count between two numbers (up to 2 canvases)", "Count from 5 to 70."),
    Family("pick", _pick, _judge_pick, "free choice: any valid increasing numbers", "Pick 8 different numbers in increasing order."),
]}

# What the shipped model has learnt (docs/demo-model.md, "Accuracy": 87-100% exact match on held-out
# prompts), and what not (30% or less; "Is n even?" is at chance). `/help`, the README and the web
# page suggest the first and name the second; tests/test_first_contact.py runs the suggestions.
LEARNT = ("sort", "reverse", "card", "sudoku", "yesno")
NOT_LEARNT = "sums, removing duplicates, counting, free choices (pick), and whether a number is even"
# One-line notices where a feature cannot work on the demo (trained on single-turn prompts, without
# thinking or system prompts), shown by the command line and the web chat instead of a silent
# empty or wrong reply.
NOTICES = {
    "think": "the demo model was not trained to think; with thinking on its replies are empty or wrong",
    "system": "the demo model was not trained with system prompts; with one its replies may be wrong",
    "second": "the demo model answers one task per conversation; /reset before a new task (this reply may be wrong)",
}

# Relative frequency in the training mix (harder families get more). Addition with numbers as
# single tokens is a 50x50 table to generalise from; a first run learnt almost none of it in
# 2750 steps, so it gets less of the budget than the copying families it would starve.
WEIGHTS = {"sort": 3, "add": 1, "reverse": 3, "dedup": 2, "card": 2, "sudoku": 4, "yesno": 2, "count": 1, "pick": 1}


def sample(rng: random.Random, family: str, held_out: bool,
           families: dict[str, Family] | None = None) -> tuple[str, str]:
    """A (prompt, answer) of `family` (of `families`, default `FAMILIES`) from the training or the
    held-out side of the split."""
    make = (families or FAMILIES)[family].make
    for _ in range(10_000):
        prompt, answer = make(rng)
        if is_held_out(prompt) == held_out:
            return prompt, answer
    raise RuntimeError(f"could not draw a {'held-out' if held_out else 'training'} {family} prompt")


def held_out_set(family: str, n: int, seed: int = 1234,
                 families: dict[str, Family] | None = None) -> list[tuple[str, str]]:
    """`n` distinct held-out prompts of a family (of `families`, default `FAMILIES`), deterministic."""
    rng = random.Random(f"{seed}-{family}")
    out, seen = [], set()
    for _ in range(100 * n):
        prompt, answer = sample(rng, family, held_out=True, families=families)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
        if len(out) == n:
            break
    return out


# -- the many-step instrument ------------------------------------------------------------------------
# Free-choice families whose answers have many right forms: a trained model's distribution stays
# spread over them, so the reference sampler's entropy budget accepts few positions per step and a
# canvas takes 20+ decoder passes, as real text does (docs/fast-mode.md). Judged by validity.
# A third free-choice family ("name n different words from a list") was dropped: it settled in 14
# passes (under the regime) and the 2.9M-parameter model did not learn to copy from the list.


def _pick_between(rng, low_n: int, high_n: int):
    n = rng.randint(low_n, high_n)
    lo = rng.randrange(0, 100 - (n + 10))
    hi = rng.randint(lo + n + 10, 99)
    values = sorted(rng.sample(range(lo, hi + 1), n))
    return f"Pick {n} different numbers from {lo} to {hi} in increasing order.", _nums(values)


def _judge_pick_between(prompt, reference, produced):
    words = prompt.split()
    n, lo, hi = int(words[1]), int(words[5]), int(words[7])
    values = _parse_ints(produced)
    return (values is not None and len(values) == n and all(lo <= v <= hi for v in values)
            and all(a < b for a, b in zip(values, values[1:])))


MANY_STEP_FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("pick", lambda rng: _pick_between(rng, 5, 12), _judge_pick_between,
           "free choice: 5-12 increasing numbers in a range", "Pick 8 different numbers from 10 to 60 in increasing order."),
    Family("pick_long", lambda rng: _pick_between(rng, 24, 40), _judge_pick_between,
           "free choice, long: 24-40 increasing numbers in a range (most of a canvas)",
           "Pick 30 different numbers from 5 to 90 in increasing order."),
    Family("sort", _sort, _exact, "sort 4-10 numbers (deterministic control)", "Sort these numbers: 42 7 19 88 3"),
]}
# The mix of the instrument's last training stage (scripts/train_manystep.py, docs/fast-mode.md):
# the long family gets the most, sorting enough to keep what the demo learnt.
MANY_STEP_WEIGHTS = {"pick": 3, "pick_long": 5, "sort": 2}
