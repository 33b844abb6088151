"""`dgemma fill`, `dgemma edit`, `dgemma score` through CliRunner on the random demo model (its
character-level tokenizer makes every character one token, so the templates here hold exactly;
the quality on the trained demo is scripts/eval_editing.py's), and the canvas view's pinned
style on a forced terminal."""

from __future__ import annotations

import io
import json

import mlx.core as mx
from rich.console import Console

from mlx_diffusiongemma.cli.views import PINNED_STYLE, CanvasView, draft_text
from mlx_diffusiongemma.prompts.labels import TokenLabels
from mlx_diffusiongemma.diffusion.events import StepEvent
from conftest import error_line, invoke

FAST = ["--steps", "3", "--seed", "1"]


def test_fill_json_has_the_text_and_each_hole(runner):
    result = invoke(runner, ["fill", "--model", "demo-random", "-p", "A person.", "-t", "Name: {{name:5}}; age {{age:..3}}.",
                             *FAST, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["holes"]) == {"name", "age"}
    assert out["text"] == f"Name: {out['holes']['name']}; age {out['holes']['age']}."
    assert out["seed"] == 1
    again = json.loads(invoke(runner, ["fill", "--model", "demo-random", "-p", "A person.", "-t",
                                       "Name: {{name:5}}; age {{age:..3}}.", *FAST, "--json"]).stdout)
    assert again == out


def test_fill_template_file_from_stdin_and_plain_output(runner):
    result = invoke(runner, ["fill", "--model", "demo-random", "-p", "x", "--template-file", "-", *FAST],
                    input="A{{a:3}}B\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("A") and "B\n" in result.stdout


def test_fill_bad_template_is_one_line_before_loading(runner):
    result = invoke(runner, ["fill", "--model", "demo-random", "-p", "x", "-t", "Name: {{name:six}}"])
    assert result.exit_code == 1
    assert "unknown hole syntax" in error_line(result)
    result = invoke(runner, ["fill", "--model", "demo-random", "-p", "x"])
    assert result.exit_code == 1 and "exactly one of" in error_line(result)


def test_fill_schema_always_parses(runner, tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer"}, "ok": {"type": "boolean"},
                                               "size": {"enum": ["S", "M", "L"]}}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    for seed in ("1", "2"):
        result = invoke(runner, ["fill", "--model", "demo-random", "-p", "x", "--schema", str(path), "--steps", "3",
                                 "--seed", seed, "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        value = json.loads(out["text"])
        assert value == out["value"] and value["size"] in ("S", "M", "L") and isinstance(value["ok"], bool)
        assert "<" not in value["name"] or ">" not in value["name"]  # no control tokens in strings


def test_edit_span_and_warm_start(runner, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("The cat sat on the mat.\n")
    result = invoke(runner, ["edit", "--model", "demo-random", "--text", str(path), "-i", "Another animal.",
                             "--span", "cat", *FAST, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["text"] == "The " + out["holes"]["span0"] + " sat on the mat."
    result = invoke(runner, ["edit", "--model", "demo-random", "--text", "-", "-i", "Shorter.", "--strength", "0.3",
                             *FAST, "--json"], input="Some text to rework.")
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)["text"], str)
    result = invoke(runner, ["edit", "--model", "demo-random", "--text", str(path), "-i", "x", "--span", "dog"])
    assert result.exit_code == 1 and "does not occur" in error_line(result)


def test_score_json(runner):
    result = invoke(runner, ["score", "--model", "demo-random", "-p", "Is 7 odd?", "-o", "yes", "-o", "no", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    probs = out["slots"]["answer"]["probabilities"]
    assert set(probs) == {"yes", "no"} and abs(sum(probs.values()) - 1) < 1e-5
    assert out["decoder_passes"] == 1


def test_pinned_tokens_have_their_own_style():
    class Tok:
        def decode(self, ids):
            return "".join(chr(65 + i) for i in ids)

    text = draft_text([0, 1, 2, 3], [True, False, True, True], TokenLabels(Tok()), [True, False, False, True])
    styles = [(text.plain[s.start:s.end], str(s.style)) for s in text.spans]
    assert ("A", PINNED_STYLE) in styles and ("D", PINNED_STYLE) in styles
    assert all(style != PINNED_STYLE for piece, style in styles if piece in ("B", "C"))
    # and the canvas view draws it on a terminal
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60)
    event = StepEvent(0, 1, 3, mx.array([0, 1, 2, 3]), mx.array([0, 1, 2, 3]), mx.array([True] * 4), 0.5,
                      pinned=mx.array([True, False, False, True]))
    with CanvasView(console, TokenLabels(Tok()), length=3) as view:
        view.handle(event)
        assert view.draft.plain == "ABC"
    assert "\x1b[" in buf.getvalue()


def test_chat_fill_and_edit(runner):
    script = "/fill Name: {{n:4}}!\nhello\n/edit make it shorter\n/fill {{x:abc}}\n/stats\n/quit\n"
    result = invoke(runner, ["chat", "--model", "demo-random", "--steps", "3", "--seed", "1", "--max-tokens", "32"],
                    input=script)
    assert result.exit_code == 1  # the bad /fill is an error (piped: exit code 1 at the end)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Name: ") and lines[0].endswith("!") and len(lines) >= 2
    assert "unknown hole syntax" in result.stderr


def test_sudoku_pins_the_givens(runner):
    result = invoke(runner, ["sudoku", "--model", "demo-random", "--steps", "3", "--seed", "0", "--json"])
    assert result.exit_code in (0, 3), result.output
    out = json.loads(result.stdout)
    rows = out["text"].split("\n")
    puzzle = out["puzzle"].split("\n")
    assert len(rows) == 4
    for row, given in zip(rows, puzzle):  # givens kept, blanks are digits
        for cell, g in zip(row.split(" "), given.split(" ")):
            assert cell == g if g != "." else cell in "1234"
    assert out["solved"] == (result.exit_code == 0)
    bad = invoke(runner, ["sudoku", "--model", "demo-random", "--puzzle", "12"])
    assert bad.exit_code == 1 and "4x4 puzzle" in error_line(bad)


def test_sudoku_helpers():
    from mlx_diffusiongemma.editing import sudoku

    assert sudoku.solutions(sudoku.parse_puzzle("..3./.4.2/21../..2.")) == 1  # the default puzzle
    assert sudoku.solutions(sudoku.parse_puzzle("1..4/.4../..4./4..1")) == 2
    assert sudoku.solutions((0,) * 16) == 288
    grid = (1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1)
    assert sudoku.is_solution(grid, (0,) * 16)
    assert not sudoku.is_solution(grid, (2,) + (0,) * 15)
    assert sudoku.parse_grid(sudoku.format_grid(grid)) == grid
