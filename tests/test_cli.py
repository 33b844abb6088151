"""`dgemma` through typer's CliRunner (not a terminal: piped mode), plus the renderers on a
forced-terminal console. Every run uses the tiny demo model and a few tokens and steps."""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import error_line, invoke
from mlx_diffusiongemma.cli import chat as chat_command
from mlx_diffusiongemma.cli.views import LiveView, render, visible
from mlx_diffusiongemma.prompts.channels import TextStream
from mlx_diffusiongemma.prompts.labels import TokenLabels
from mlx_diffusiongemma.prompts.channels import THOUGHT_CLOSE, THOUGHT_OPEN

FAST = ["--max-tokens", "32", "--steps", "3"]
ANSI = re.compile(r"\x1b\[")
JSON_KEYS = {"text", "finish_reason", "tokens", "prompt_tokens", "prefill_time", "steps_per_block",
             "tokens_per_forward", "generation_tps", "peak_memory_gb"}


# -- chat ------------------------------------------------------------------------------------------


def test_chat_piped_prints_only_the_replies(runner):
    result = invoke(runner, ["chat", "--model", "demo", *FAST, "--seed", "1"], input="hello\n/stats\n/quit\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert not ANSI.search(out)
    assert out.endswith("\n")
    for noise in ("block ", "step ", "tok/s", "tokens/forward", ">>>", "demo model", "DiffusionGemma chat"):
        assert noise not in out
    assert "demo model" in result.stderr and "toy tasks" in result.stderr  # said plainly, on stderr
    assert "tokens per forward" in result.stderr  # /stats goes to stderr when piped


def test_chat_replies_match_generate(runner):
    """The piped chat prints exactly the committed text (same seed, same prompt as generate)."""
    chat = invoke(runner, ["chat", "--model", "demo", *FAST, "--seed", "3"], input="hi\n")
    gen = invoke(runner, ["generate", "--model", "demo", *FAST, "--seed", "3", "--prompt", "hi", "--json"])
    assert chat.exit_code == 0 and gen.exit_code == 0, chat.output + gen.output
    assert chat.stdout == json.loads(gen.stdout)["answer"] + "\n"


def test_chat_slash_commands(runner, tmp_path):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    script = "\n".join([
        "/help", "first", "/steps 2", "/steps", "/steps zero", "/think on", "second", "/think off",
        "/think", f"/save {md}", f"/save {js}", "/reset", f"/save {tmp_path / 'empty.json'}",
        "/stats", "/bogus", "/quit", "never sent",
    ]) + "\n"
    result = invoke(runner, ["chat", "--model", "demo", *FAST, "--system", "be brief"], input=script)
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "/reset" in err and "/save FILE" in err  # /help
    assert "max denoising steps per block: 2" in err
    assert "usage: /steps N" in err
    assert "thinking on" in err and "thinking off" in err and "thinking is off" in err
    assert "unknown command /bogus" in err
    messages = json.loads(js.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "first" and messages[3]["content"] == "second"
    text = md.read_text()
    assert "## user\n\nfirst" in text and "## system\n\nbe brief" in text and "## assistant" in text
    assert json.loads((tmp_path / "empty.json").read_text()) == [{"role": "system", "content": "be brief"}]
    assert len([line for line in result.stdout.splitlines()]) >= 2  # two replies, nothing after /quit


def test_chat_save_to_a_bad_path_is_an_error_line(runner, tmp_path):
    result = invoke(runner, ["chat", "--model", "demo", *FAST], input=f"/save {tmp_path}/no/such/dir/t.md\n")
    assert result.exit_code == 0
    assert "error: could not write" in result.stderr


def test_chat_turn_error_keeps_going_and_exits_1_when_piped(runner):
    result = invoke(runner, ["chat", "--model", "demo", "--max-tokens", "100000"], input="hello\n/stats\n")
    assert result.exit_code == 1
    assert "error: " in result.stderr and "context" in result.stderr
    assert "no reply yet" in result.stderr  # the loop went on
    assert result.stdout == ""


def test_chat_terminal_mode(runner, monkeypatch):
    """As in a terminal (input() prompts, banner, stats line), without and with the live view."""
    monkeypatch.setattr(chat_command, "is_terminal", lambda: True)
    for extra in (["--no-live"], []):
        result = invoke(runner, ["chat", "--model", "demo", *FAST, *extra], input="hello\n/stats\n")
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "DiffusionGemma chat" in out and ">>> " in out
        assert "steps/block" in out and "tokens/forward" in out  # the stats line after the reply
        assert "tokens per forward" in out  # /stats


# -- generate --------------------------------------------------------------------------------------


def test_generate_json(runner):
    result = invoke(runner, ["generate", "--model", "demo", *FAST, "--seed", "0", "--prompt", "hi", "--json",
                             "--entropy-bound", "0.2", "--t-min", "0.3", "--t-max", "0.9",
                             "--stability-threshold", "2", "--confidence-threshold", "0.01"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert JSON_KEYS <= set(data)
    assert data["finish_reason"] in ("stop", "length")
    assert 0 < data["tokens"] <= 32 and data["tokens"] == len(data["token_ids"])
    assert all(1 <= s <= 3 for s in data["steps_per_block"])
    assert data["prompt_tokens"] > 0 and data["seed"] == 0


def test_generate_text_and_stdin_prompt(runner):
    args = ["generate", "--model", "demo", *FAST, "--seed", "5"]
    plain = invoke(runner, [*args, "--prompt", "why is the sky blue?"])
    piped = invoke(runner, [*args, "--prompt", "-"], input="why is the sky blue?")
    as_json = invoke(runner, [*args, "--prompt", "why is the sky blue?", "--json"])
    assert plain.exit_code == piped.exit_code == as_json.exit_code == 0, plain.output + piped.output
    assert not ANSI.search(plain.stdout)
    assert plain.stdout == piped.stdout == json.loads(as_json.stdout)["text"] + "\n"


def test_generate_think_and_system(runner):
    result = invoke(runner, ["generate", "--model", "demo", *FAST, "--think", "--system", "terse",
                             "--prompt", "hi", "--json"])
    assert result.exit_code == 0, result.output
    assert "thinking" in json.loads(result.stdout)


def test_generate_empty_stdin_prompt(runner):
    result = invoke(runner, ["generate", "--model", "demo", "--prompt", "-"], input="  \n")
    assert result.exit_code == 1
    assert error_line(result) == "error: empty prompt"


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["chat", "--steps", "0"],
    ["generate", "--prompt", "x", "--max-tokens", "0"],
    ["generate", "--prompt", "x", "--t-min", "-1"],  # t_min = 0 is valid, as in the reference
    ["generate", "--prompt", "x", "--entropy-bound", "-1"],
    ["chat", "--stability-threshold", "-1"],
    ["generate"],  # --prompt is required
    ["convert", "src", "-o", "dst", "--recipe", "3bit"],
    ["convert", "src", "-o", "dst", "--shard-size", "0"],
])
def test_bad_option_values_are_usage_errors(runner, args):
    result = invoke(runner, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_missing_model_folder(runner, tmp_path):
    result = invoke(runner, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 1
    assert "no such folder" in error_line(result)


def test_not_a_diffusiongemma_checkpoint(runner, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    result = invoke(runner, ["chat", "--model", str(tmp_path)], input="hi\n")
    assert result.exit_code == 1
    assert "gemma3" in error_line(result)


def test_offline_hub_model_suggests_the_demo(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke(runner, ["chat", "--model", "nobody/not-a-real-model", "--offline"], input="hi\n")
    assert result.exit_code == 1
    assert "--model demo" in error_line(result)


def test_debug_shows_the_traceback(runner, tmp_path):
    result = invoke(runner, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--debug"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr
    assert "error: " in result.stderr


# -- convert ---------------------------------------------------------------------------------------


def test_convert_then_generate(runner, tiny_checkpoint, tmp_path):
    _, src = tiny_checkpoint
    dst = tmp_path / "mlx"
    result = invoke(runner, ["convert", str(src), "-o", str(dst), "--recipe", "8bit", "--shard-size", "0.0001"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for row in ("size on disk", "bits per weight", "parameters, 8-bit", "parameters, bfloat16",
                "vision tensors"):
        assert row in out
    assert "converting" in result.stderr and "tensors" in result.stderr  # the progress bar
    assert (dst / "config.json").exists() and (dst / "model.safetensors.index.json").exists()

    again = invoke(runner, ["convert", str(src), "-o", str(dst)])
    assert again.exit_code == 1
    assert "already exists" in error_line(again)

    forced = invoke(runner, ["convert", str(src), "-o", str(dst), "--recipe", "bf16", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "replaced" in forced.stdout

    gen = invoke(runner, ["generate", "--model", str(dst), "--prompt", "hi", "--max-tokens", "8", "--steps", "2",
                          "--json"])
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["tokens"] > 0


def test_convert_bad_source(runner, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    result = invoke(runner, ["convert", str(tmp_path / "src"), "-o", str(tmp_path / "dst")])
    assert result.exit_code == 1
    assert "gemma3" in error_line(result)
    assert not (tmp_path / "dst").exists()


# -- renderers -------------------------------------------------------------------------------------


def test_visible_replaces_control_characters():
    assert visible("a\nb\tc\rd\x00e\x1b") == "a↵b→c␍d␀e␛"
    assert "\n" not in visible("x\u2028y")


def test_the_terminal_splits_thought_and_answer_with_the_servers_splitter():
    s = TextStream(parse_tools=False)
    deltas = []
    # The opening marker is cut between two blocks: nothing of it may leak into the answer.
    for piece in ["<|chan", "nel>thought\nlet me ", "think\n" + THOUGHT_CLOSE + "The ", "answer."]:
        deltas.append(s.feed(piece))
    deltas.append(s.finish())
    thought = "".join(d.reasoning for d in deltas)
    answer = "".join(d.content for d in deltas)
    assert thought == "let me think" and answer == "The answer."  # the thought's last newline dropped
    plain = TextStream(parse_tools=False)
    assert plain.feed("a <").content == "a "  # "<" may start a marker: held back
    assert plain.feed("b").content == "<b"
    assert THOUGHT_OPEN not in answer
    # Tool calls stay text in the terminal.
    call = "<|tool_call>call:f{a:1}<tool_call|>"
    assert TextStream(parse_tools=False).feed(call + "!").content == call + "!"


def test_live_view_on_a_terminal(runner, home, monkeypatch):
    """The live region on a forced terminal: status line per step, committed text kept."""
    from rich.console import Console

    from mlx_diffusiongemma import load, stream_generate
    from mlx_diffusiongemma.demo.random import demo_dir

    monkeypatch.setenv("MLX_DIFFUSIONGEMMA_HOME", str(home))
    model, tok = load(demo_dir())
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, color_system="standard")
    labels = TokenLabels(tok, model.generation.eos_token_ids, model.generation.pad_token_id)
    result = render(stream_generate(model, tok, "hi", max_tokens=64, max_denoising_steps=3, seed=2),
                    LiveView(console, labels))
    raw = buf.getvalue()
    assert "step 1/3" in raw and "step 3/3" in raw and "accepted " in raw and "entropy " in raw
    assert "\x1b[1A" in raw and "\x1b[2K" in raw  # redrawn in place: cursor up, erase line
    # After the region is gone (transient), only the end of the committed text is printed.
    end = raw[raw.rindex("\x1b[?25h"):]
    assert "step " not in end and end.endswith("\n")
    squeeze = lambda s: "".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", s).split())
    assert squeeze(result.text)[-8:] in squeeze(end)


def _thinking_events():
    from mlx_diffusiongemma.diffusion.events import BlockEvent

    deltas = [THOUGHT_OPEN[:6], THOUGHT_OPEN[6:] + "\nweigh it", THOUGHT_CLOSE + "Blue.", "\nDone"]
    return [BlockEvent(i, [0], d, 3, "step_cap", False) for i, d in enumerate(deltas)]


def test_thought_channel_is_shown_apart_and_dimmed():
    from rich.console import Console

    from mlx_diffusiongemma.cli.views import ConsoleView, PlainView

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, color_system="standard")
    render(iter(_thinking_events()), ConsoleView(console))
    raw = buf.getvalue()
    assert "\x1b[2;3mweigh it" in raw  # dim italic
    assert re.sub(r"\x1b\[[0-9;]*m", "", raw) == "weigh it\n\nBlue.\nDone\n"
    assert "<|channel>" not in raw

    out, err = io.StringIO(), io.StringIO()
    render(iter(_thinking_events()), PlainView(out, err))
    assert out.getvalue() == "Blue.\nDone\n" and err.getvalue() == "weigh it\n"
