"""The demo task suite: answers are right by construction, the held-out split is disjoint, the
judges accept the reference answers and reject wrong ones."""

from __future__ import annotations

import random
from itertools import islice

import pytest

from mlx_diffusiongemma.demo.tasks import (
    FAMILIES,
    format_grid,
    held_out_set,
    is_held_out,
    parse_grid,
    sample,
    sudoku_grids,
    sudoku_solutions,
)


def test_there_are_288_sudoku_grids_and_puzzles_have_one_solution():
    assert len(sudoku_grids()) == 288
    rng = random.Random(0)
    for _ in range(20):
        prompt, answer = FAMILIES["sudoku"].make(rng)
        givens = parse_grid(prompt.split("\n", 1)[1])
        assert sudoku_solutions(givens) == [parse_grid(answer)]
        assert format_grid(parse_grid(answer)) == answer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_judges_accept_references_and_reject_changes(family):
    f = FAMILIES[family]
    for prompt, answer in held_out_set(family, 10):
        assert is_held_out(prompt)
        assert f.judge(prompt, answer, answer)
        assert not f.judge(prompt, answer, answer + " 7 x")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_draws_never_hit_held_out_prompts(family):
    rng = random.Random(1)
    held = {p for p, _ in held_out_set(family, 30)}
    for _ in range(200):
        prompt, _ = sample(rng, family, held_out=False)
        assert not is_held_out(prompt) and prompt not in held


def test_answers_are_right():
    rng = random.Random(2)
    p, a = FAMILIES["sort"].make(rng)
    assert [int(v) for v in a.split()] == sorted(int(v) for v in p.split(":")[1].split())
    p, a = FAMILIES["add"].make(rng)
    x, y = p.removeprefix("What is ").removesuffix("?").split(" + ")
    assert int(a) == int(x) + int(y)
    p, a = FAMILIES["reverse"].make(rng)
    assert a.split() == p.split(":")[1].split()[::-1]
    assert FAMILIES["pick"].judge("Pick 3 different numbers in increasing order.", "", "4 9 60")
    assert not FAMILIES["pick"].judge("Pick 3 different numbers in increasing order.", "", "4 4 60")


@pytest.mark.parametrize("digits", [False, True])
def test_the_demo_tokenizer_spells_numbers_as_asked(tmp_path, digits):
    """`build_tokenizer(digits=True)` splits numbers into digits as Gemma's tokenizer does, so a
    fact about a number (parity, a sum) is learnable from other numbers; without it 0-99 are single
    tokens. Either way the task texts decode back exactly and the chat's special tokens are whole."""
    from tokenizers import Tokenizer

    from mlx_diffusiongemma.demo.files import SPECIAL_TOKENS
    from mlx_diffusiongemma.demo.build import build_tokenizer

    build_tokenizer(tmp_path, digits=digits)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    pieces = tok.encode("What is 23 + 19?").tokens
    assert (["▁", "2", "3"] == pieces[2:5]) if digits else ("▁23" in pieces)
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    for family in FAMILIES:
        for prompt, answer in held_out_set(family, 3):
            for text in (prompt, answer):
                ids = tok.encode(text).ids
                assert tok.decode(ids) == text
                if digits:
                    assert all(not any(c.isdigit() for c in t) or len(t) == 1
                               for t in tok.encode(text).tokens)


def test_the_training_mix_follows_the_weights_it_is_given():
    from collections import Counter

    from mlx_diffusiongemma.demo.build import training_mix

    only_add = {name: 0 for name in FAMILIES} | {"add": 1}
    assert {family for family, _, _ in islice(training_mix(0, only_add), 50)} == {"add"}
    # Families not named keep demo_tasks.WEIGHTS: sort at 0 disappears, the others stay.
    counts = Counter(family for family, _, _ in islice(training_mix(0, {"sort": 0}), 2000))
    assert "sort" not in counts and set(counts) == set(FAMILIES) - {"sort"}
    default = [draw for draw in islice(training_mix(5), 30)]
    assert default == list(islice(training_mix(5, {}), 30))  # no weights: the shipped model's mix
    with pytest.raises(ValueError, match="sorting"):
        next(training_mix(0, {"sorting": 1}))


def test_many_step_families_judge_validity_and_keep_the_split():
    from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES as many

    for name, f in many.items():
        held = held_out_set(name, 50, families=many)
        assert len({p for p, _ in held}) == 50  # 50 distinct held-out prompts per family
        for prompt, answer in held[:10]:
            assert is_held_out(prompt) and f.judge(prompt, answer, answer)
            assert not f.judge(prompt, answer, answer + " 7 x")
        rng = random.Random(3)
        assert not any(is_held_out(sample(rng, name, held_out=False, families=many)[0]) for _ in range(50))
    pick = many["pick"].judge
    q = "Pick 3 different numbers from 10 to 40 in increasing order."
    assert pick(q, "", "11 20 40") and not pick(q, "", "11 20 20") and not pick(q, "", "20 11 30")
    assert not pick(q, "", "5 20 30") and not pick(q, "", "11 20 41") and not pick(q, "", "11 20")
    assert set(many) >= {"pick", "pick_long", "sort"}
