"""First contact (issue 29): what a new user tries first gives what the docs say.

- Every example the README and docs/*.md mark as a demo example (`<!-- demo-example -->` on the
  line before its fence) is extracted from the docs, run as shown on the trained demo model and
  compared with the output the docs print. There is no second list of examples here to drift.
- The prompts chat's `/help` suggests on the demo are right (a few seeds each).
- The server answers as the CLI does by default, and takes mlx-lm's own documented requests.
- mlx-lm's flag names carry over (or are refused with a message that says what to use).
- Spans snap to token boundaries; templates refuse only real contradictions; piped prompts lose
  their trailing newline; the sudoku grid draws its cells; the demo's notices.
"""

from __future__ import annotations

import codecs
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_diffusiongemma as dg
from conftest import invoke

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- demo-example -->"
STATS = re.compile(r"^\d+ tokens? (·|in the holes)")  # a reply's stats line (terminal only)


# -- the docs' examples ---------------------------------------------------------------------------


def _blocks():
    """(doc, line, language, lines) of every fenced block marked as a demo example."""
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARKER:
                continue
            fence = lines[i + 1]
            assert fence.startswith("```"), f"{doc.name}:{i + 1}: the marker must stand right above a fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            yield doc.relative_to(ROOT), i + 2, fence[3:].strip(), lines[i + 2:end]


def _examples():
    """Each command of the marked console blocks (with its expected output and chat inputs) and
    each marked Python block."""
    out = []
    for doc, at, lang, lines in _blocks():
        if lang == "python":
            out.append(pytest.param("python", "\n".join(lines), [], [], id=f"{doc}:{at}"))
            continue
        assert lang == "console", f"{doc}:{at}: a demo example is a console or python block"
        commands = []  # [command, expected lines, chat inputs, line]
        for n, line in enumerate(lines):
            if line.startswith("$ "):
                commands.append([line[2:], [], [], at + n + 1])
            elif commands and commands[-1][0].endswith("\\"):
                commands[-1][0] = commands[-1][0][:-1] + " " + line.strip()
            elif commands and line.startswith(">>> "):
                commands[-1][2].append(line[4:])
            elif commands and not (commands[-1][0].startswith("dgemma chat") and not commands[-1][2]):
                commands[-1][1].append(line)  # (a chat's banner, before its first message, is stderr)
        out.append(pytest.param("shell", commands, [], [], id=f"{doc}:{at}"))  # in order, in one folder
    return out


def _ansi_c(command: str) -> str:
    """bash's $'...' quoting (escapes decoded), which shlex does not know, as a plain quoted word."""
    return re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                  lambda m: shlex.quote(codecs.decode(m.group(1), "unicode_escape")), command)


def _expected_stdout(lines: list[str], chat: bool) -> list[str]:
    """What a piped run prints on stdout. A chat transcript, as captured in a terminal, also shows
    what goes to stderr when piped or is drawn only in a terminal: the banner before the first
    message, the live canvas and status lines, the stats lines and the slash commands' answers."""
    if not chat:
        return lines
    keep = []
    for line in lines:
        if "■" in line or line.startswith("block ") or STATS.match(line) or line in ("conversation cleared",):
            continue
        keep.append(line)
    return keep


def _matches(got: list[str], want: list[str]) -> bool:
    """Line by line; a `...` line in the docs stands for any number of lines."""
    if not want:
        return True
    if want[0] == "...":
        return any(_matches(got[k:], want[1:]) for k in range(len(got) + 1))
    return bool(got) and got[0].rstrip() == want[0].rstrip() and _matches(got[1:], want[1:])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind, code, expected, inputs", _examples())
def test_docs_examples_run_as_shown(runner, workdir, kind, code, expected, inputs):
    if kind == "python":
        exec(compile(code, "<docs example>", "exec"), {})
        return
    for command, want, chat_inputs, line in code:
        _run_as_shown(runner, command, want, chat_inputs, line)


_RUNS: dict = {}


def _run_as_shown(runner, command: str, expected: list[str], inputs: list[str], line: int) -> None:
    command = _ansi_c(command)
    stdin = None
    if " | dgemma " in command:  # `echo "..." | dgemma ...`: the pipe's left side as stdin
        left, command = command.split(" | ", 1)
        stdin = subprocess.run(["bash", "-c", left], capture_output=True, text=True, check=True).stdout
    words = shlex.split(command, comments=True)
    if words[0] != "dgemma":  # a setup step (printf ... > notes.txt)
        subprocess.run(["bash", "-c", command], check=True)
        return
    chat = words[1] == "chat"
    if chat:
        stdin = "".join(text + "\n" for text in inputs)
    # The same command on the same files (the README repeats an example of editing.md) runs once.
    key = (command, stdin, tuple(sorted((p.name, p.read_bytes()) for p in Path.cwd().iterdir() if p.is_file())))
    if key not in _RUNS:
        _RUNS[key] = invoke(runner, words[1:], input=stdin)
    result = _RUNS[key]
    assert result.exit_code == 0, f"line {line}: {command}\n{result.output}"
    got = [text for text in result.stdout.splitlines() if text.strip()]
    want = [text for text in _expected_stdout(expected, chat) if text.strip()]
    assert _matches(got, want), f"line {line}: {command}\ndocs say:\n{chr(10).join(want)}\ngot:\n{result.stdout}"


def test_the_docs_mark_examples():
    """The extraction finds the examples (a renamed marker would silently check nothing)."""
    docs = {str(doc) for doc, *_ in _blocks()}
    assert {"README.md", "docs/editing.md", "docs/fast-mode.md", "docs/python-api.md"} <= docs, docs


# -- chat's /help on the demo ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    return dg.load("demo")


def test_help_suggests_prompts_the_demo_answers(trained):
    from mlx_diffusiongemma.cli.chat import demo_help
    from mlx_diffusiongemma.demo.tasks import FAMILIES

    model, tok = trained
    text = demo_help()
    suggested = [f for f in FAMILIES.values() if f.example in text]
    assert len(suggested) >= 4 and "Not learnt" in text
    for family in suggested:  # the prompts as /help shows them, judged as the evaluation does
        for seed in range(3):
            got = dg.generate(model, tok, family.example, seed=seed).text
            assert family.judge(family.example, "", got) if family.name == "pick" else got.strip() == _answer(family), \
                (family.example, seed, got)


def _answer(family) -> str:
    """The right answer to a family's example prompt (the family's own maker, run backwards: the
    examples are fixed prompts, so their answers are computed here from the prompt's numbers)."""
    p = family.example
    if family.name == "sort":
        return " ".join(map(str, sorted(int(x) for x in p.split(":")[1].split())))
    if family.name == "reverse":
        return " ".join(reversed(p.split(":")[1].split()))
    if family.name == "card":
        name, age, city = re.match(r"Make a card for (\w+), (\d+), from (\w+)\.", p).groups()
        return f"Name: {name}\nAge: {age}\nCity: {city}"
    if family.name == "yesno":
        a, rel, b = re.match(r"Is (\d+) (greater|less) than (\d+)\?", p).groups()
        return "yes" if (int(a) > int(b)) == (rel == "greater") else "no"
    raise AssertionError(f"/help suggests {family.name}, which this test cannot judge")


# -- the server's defaults and mlx-lm's documented requests ---------------------------------------

# mlx-lm's server documentation (mlx_lm/SERVER.md) shows these two requests, sent here as written
# there: a chat completion with no "model" field and a temperature, and the model list.
MLX_LM_CHAT = """{
     "messages": [{"role": "user", "content": "Say this is a test!"}],
     "temperature": 0.7
   }"""


@pytest.fixture(scope="module")
def served(trained):
    from helpers_server import running
    from mlx_diffusiongemma.server import ServerConfig, create_app

    model, tok = trained
    with running(create_app(model, tok, ServerConfig(model_id="demo"))) as url:
        yield url


def _post(url: str, path: str, body: str | None = None, method: str = "POST"):
    import http.client
    import urllib.parse

    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    answer = json.loads(res.read().decode())
    conn.close()
    return res.status, answer


def test_mlx_lm_documented_requests_work_as_sent(served):
    status, answer = _post(served, "/v1/chat/completions", MLX_LM_CHAT)
    assert status == 200, answer
    [choice] = answer["choices"]
    assert answer["model"] == "demo" and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)  # "" rather than null for an empty reply
    status, listed = _post(served, "/v1/models", method="GET")
    assert status == 200 and [m["id"] for m in listed["data"]] == ["demo"]


def test_server_answers_as_the_cli_by_default(served, trained, runner):
    """The same prompt and seed: the server without a thinking field (and without "model") gives
    what `dgemma generate` gives; `enable_thinking: true` renders another prompt."""
    prompt = "Sort these numbers: 42 7 19 88 3"
    cli = invoke(runner, ["generate", "--model", "demo", "-p", prompt, "--seed", "0"])
    assert cli.exit_code == 0 and cli.stdout.strip() == "3 7 19 42 88", cli.output
    body = {"messages": [{"role": "user", "content": prompt}], "seed": 0}
    status, answer = _post(served, "/v1/chat/completions", json.dumps(body))
    assert status == 200 and answer["choices"][0]["message"]["content"] == "3 7 19 42 88", answer
    body["chat_template_kwargs"] = {"enable_thinking": True}
    status, thinking = _post(served, "/v1/chat/completions", json.dumps(body))
    assert status == 200 and thinking["usage"]["prompt_tokens"] > answer["usage"]["prompt_tokens"], (answer, thinking)


# -- mlx-lm's flags -------------------------------------------------------------------------------


def test_mlx_lm_flags_carry_over(runner):
    prompt = "Reverse the words: sun moon star rain"
    short = invoke(runner, ["generate", "--model", "demo", "-p", prompt, "-m", "2", "--seed", "0"])
    assert short.exit_code == 0 and short.stdout.strip() == "rain star", short.output  # -m is --max-tokens
    system = invoke(runner, ["generate", "--model", "demo", "-p", prompt, "--system-prompt", "Be brief.",
                             "--seed", "0", "--steps", "2"])
    assert system.exit_code == 0 and "not trained with system prompts" in system.stderr, system.output
    for flag, says in [("--temp", "no temperature knob; see --t-min/--t-max"), ("--top-p", "no top-p"),
                       ("--top-k", "no top-k"), ("--min-p", "no min-p")]:
        refused = invoke(runner, ["generate", "--model", "demo", "-p", prompt, flag, "0.5"])
        words = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.stderr).split())  # typer draws a box around it
        assert refused.exit_code == 2 and says in words, refused.output
    version = invoke(runner, ["--version"])
    from importlib.metadata import version as installed

    assert version.exit_code == 0 and version.stdout.strip() == f"mlx-diffusiongemma {installed('mlx-diffusiongemma')}"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("mlx-diffusiongemma "), out.stderr


def test_convert_takes_mlx_lm_names(runner, tiny_checkpoint, tmp_path):
    _, src = tiny_checkpoint
    dst = tmp_path / "out"
    done = invoke(runner, ["convert", "--hf-path", str(src), "--mlx-path", str(dst), "-q"])
    assert done.exit_code == 0, done.output
    assert json.loads((dst / "config.json").read_text())["quantization"], "-q quantizes (the default recipe)"
    for args, says in [(["--hf-path", str(src)], "-o DST"), ([str(src), "--hf-path", "other", "-o", "x"], "once"),
                       ([str(src), "-o", "x", "-q", "--recipe", "bf16"], "-q quantizes")]:
        refused = invoke(runner, ["convert", *args])
        assert refused.exit_code == 2 and says in refused.stderr, refused.output


# -- spans, templates, piped prompts, sudoku, notices ----------------------------------------------


def test_spans_snap_to_tokens(trained):
    from mlx_diffusiongemma.editing.edit import find_span, span_segments
    from mlx_diffusiongemma.editing import template as tpl

    _, tok = trained
    text = "The cat sat on the mat."
    snapped = span_segments(text, [(4, 7)], 4, tok)  # python-api.md's spans=[(4, 7)]: "cat"
    assert snapped == span_segments(text, [find_span(text, " cat")], 4, tok)
    assert snapped == span_segments(text, [find_span(text, "cat")], 4, tok)
    assert [s.text for s in snapped if isinstance(s, tpl.Fixed)] == ["The", " sat on the mat."]
    tpl.layout(tok, snapped)  # no TemplateError: the pinned split is the tokenizer's own
    assert span_segments(text, [(5, 6)], 4, tok) == snapped  # inside a token: the whole token
    with pytest.raises(tpl.TemplateError, match="overlaps"):
        span_segments(text, [(4, 6), (6, 7)], 4, tok)


def test_templates_refuse_only_real_contradictions(tmp_path):
    """With a BPE merge `d e`, fixed text ending in `d` before a free hole is accepted (a value
    that starts with a space keeps `d` apart); a trailing space, which every word merges with, and
    a constrained hole whose options merge, are still refused."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from mlx_diffusiongemma.editing import template as tpl

    chars = list("abcdefghijklmnopqrstuvwxyzAST12 ")
    vocab = {ch: i for i, ch in enumerate(chars)} | {"de": len(chars), " a": len(chars) + 1}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("d", "e"), (" ", "a")]))
    bpe.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    lay = tpl.layout(tok, tpl.parse("a b d{{x:1}} o q"))
    assert lay.holes[0].start == len(tok.encode("a b d", add_special_tokens=False))
    with pytest.raises(tpl.TemplateError, match="merges with the next word"):
        tpl.layout(tok, tpl.parse("a b {{x:1}} o q"))  # the pinned " " would merge with " a"
    with pytest.raises(tpl.TemplateError, match="merges with the next word"):
        tpl.layout(tok, [tpl.Fixed("a b d"), tpl.Hole("x", None, options=("e", "f"))])


def test_piped_prompt_loses_its_newline(runner):
    prompt = "Reverse the words: sun moon star rain"
    piped = invoke(runner, ["generate", "--model", "demo", "-p", "-", "--seed", "0"], input=prompt + "\n")
    typed = invoke(runner, ["generate", "--model", "demo", "-p", prompt, "--seed", "0"])
    assert piped.exit_code == typed.exit_code == 0
    assert piped.stdout == typed.stdout and piped.stdout.strip() == "rain star moon sun", piped.output


def test_sudoku_grid_draws_token_cells(trained):
    from rich.console import Console

    from mlx_diffusiongemma.diffusion.options import GenerationOptions
    from mlx_diffusiongemma.editing import sudoku as puzzles, template as tpl
    from mlx_diffusiongemma.cli.views import GridView, grid_cell, labels_for, run_events

    assert [grid_cell(x) for x in (" 2", "3", "\n", " ", " Paris", "■")] == [" 2", "3", "\n", " ", " ?", "■"]
    model, tok = trained
    cells = puzzles.parse_puzzle("1..4/.4../..4./4..1")
    length = tpl.layout(tok, puzzles.segments(cells, True, tok)).length
    console = Console(record=True, force_terminal=True, width=40)
    events = puzzles.stream_solve(model, tok, cells, digits_only=True, options=GenerationOptions(seed=0))
    out = run_events(events, view=GridView(console, labels_for(model, tok), length, 0))
    drawn = console.export_text()
    assert out.text.strip() == "1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1" and "?" not in drawn
    assert "1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1" in drawn, drawn


def test_demo_notices(runner):
    lines = ["Sort these numbers: 42 7 19 88 3", "Reverse the words: sun moon star rain", "/think on", "/quit"]
    chat = invoke(runner, ["chat", "--model", "demo", "--seed", "0", "--steps", "2", "--system", "Hi."],
                  input="".join(line + "\n" for line in lines))
    assert chat.exit_code == 0, chat.output
    err = " ".join(chat.stderr.split())
    for notice in ("not trained with system prompts", "one task per conversation; /reset", "not trained to think"):
        assert notice in err, chat.stderr
    think = invoke(runner, ["generate", "--model", "demo", "-p", "hi", "--think", "--steps", "2", "-m", "4"])
    assert think.exit_code == 0 and "not trained to think" in think.stderr, think.output


def test_web_chat_on_the_demo(served):
    """The web page on the trained demo lists prompts to try and what it has not learnt, and says
    so when thinking is on (chromium headless, as tests/test_server_browser.py)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium / chromedriver not installed")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(served + "/")
        panel = driver.find_element(By.ID, "demo").text
        assert "Sort these numbers: 42 7 19 88 3" in panel and "Not learnt" in panel, panel
        driver.find_element(By.ID, "think").click()
        box = driver.find_element(By.ID, "prompt")
        box.send_keys("Sort these numbers: 42 7 19 88 3")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.notice"))
        assert "not trained to think" in driver.find_element(By.CSS_SELECTOR, ".msg.notice").text
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-done]"))
    finally:
        driver.quit()


def test_a_template_reply_counts_the_hole_tokens(trained):
    """Chat's stats line after /fill counts what the model wrote into the holes, not the 64
    canvas positions (`/fill Name:{{name:..4}}` read "32.00 tokens/forward")."""
    from mlx_diffusiongemma.cli.chat import canvas_stats_line

    model, tok = trained
    out = dg.infill(model, tok, "Make a card for Ada, 36, from Paris.", "Name:{{name:..4}}", seed=0)
    written = sum(len(d["tokens"]) for d in out.details.values())
    assert written <= 4 and canvas_stats_line(out).startswith(f"{written} token")
    assert f"{written / out.result.decoder_passes:.2f} tokens/forward" in canvas_stats_line(out)
