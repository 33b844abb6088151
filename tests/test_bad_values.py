"""Bad values through the API and the CLI, and the chat loop's resilience (issue 14, items 3, 8,
9, 10): a message naming the problem, never a traceback, never silently wrong output, and a chat
session that survives any failed turn."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

import mlx_diffusiongemma as dg
from conftest import error_line, invoke
from mlx_diffusiongemma.demo.random import DEMO_VERSION
from mlx_diffusiongemma.errors import NumericalError

FAST = ["--max-tokens", "16", "--steps", "2"]


@pytest.fixture(scope="module")
def demo(home):
    return dg.load(home / f"demo-v{DEMO_VERSION}")


# -- 9. sampler values, aligned with the reference ------------------------------------------------


def test_t_min_zero_is_accepted_as_in_the_reference(demo):
    model, tok = demo
    r = dg.generate(model, tok, "Hi", seed=0, max_tokens=8, max_denoising_steps=2, t_min=0.0)
    assert r.sampler.t_min == 0.0 and r.tokens


@pytest.mark.parametrize("bad, words", [
    ({"t_min": 5.0, "t_max": 0.1}, "t_max must be greater than t_min"),
    ({"t_min": 0.5, "t_max": 0.5}, "t_max must be greater than t_min"),
    ({"t_max": math.inf}, "t_max must be a finite number"),
    ({"t_min": math.nan}, "t_min must be a finite number"),
    ({"entropy_bound": math.inf}, "entropy_bound must be a finite number"),
    ({"confidence_threshold": math.nan}, "confidence_threshold must be a finite number"),
    ({"max_denoising_steps": 2.5}, "max_denoising_steps must be a whole number"),
    ({"max_denoising_steps": 5000}, "between 1 and 1024"),
    ({"stability_threshold": True}, "stability_threshold must be a whole number"),
    ({"stability_threshold": 10**9}, "stability_threshold must be between 0 and 1024"),
    ({"t_max": "0.8"}, "t_max must be a finite number"),
])
def test_sampler_values_are_checked_before_any_work(demo, bad, words):
    model, tok = demo
    with pytest.raises(ValueError, match=words):
        next(dg.stream_generate(model, tok, "Hi", seed=0, max_tokens=8, **bad))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7"])
def test_bad_seed(demo, seed):
    model, tok = demo
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to 2\\*\\*64 - 1"):
        next(dg.stream_generate(model, tok, "Hi", seed=seed, max_tokens=8))


def test_largest_seed_works(demo):
    model, tok = demo
    r = dg.generate(model, tok, "Hi", seed=2**64 - 1, max_tokens=8, max_denoising_steps=2)
    assert r.seed == 2**64 - 1


# -- 9. NaN weights: detected at the first step, not all <pad> ---------------------------------------


@pytest.fixture(scope="module")
def nan_model(home, tmp_path_factory):
    folder = Path(shutil.copytree(home / f"demo-v{DEMO_VERSION}", tmp_path_factory.mktemp("nan") / "m"))
    import mlx.core as mx

    tensors = mx.load(str(folder / "model.safetensors"))
    w = tensors["model.decoder.norm.weight"]
    tensors["model.decoder.norm.weight"] = mx.full(w.shape, float("nan"), dtype=w.dtype)
    mx.save_safetensors(str(folder / "model.safetensors"), tensors, metadata={"format": "mlx"})
    return dg.load(folder)


@pytest.mark.parametrize("interval", [1, 4])
def test_nan_weights_raise_at_the_first_step(nan_model, interval):
    model, tok = nan_model
    events = []
    with pytest.raises(NumericalError, match="non-finite logits .* first denoising step"):
        for e in dg.stream_generate(model, tok, "Hi", seed=0, max_tokens=8, max_denoising_steps=6,
                                    stop_check_interval=interval, mode="exact"):
            events.append(e)
    assert not events  # nothing was shown from the broken step


def test_nan_weights_through_the_cli(runner, nan_model):
    result = invoke(runner, ["generate", "--model", str(nan_model[0].source), "-p", "hi", *FAST])
    assert result.exit_code == 1
    assert "non-finite logits" in error_line(result)


# -- 8/9. the CLI's option values ------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--seed", "-1"],
    ["--seed", str(2**64)],
    ["--t-max", "inf"],
    ["--t-max", "nan"],
    ["--t-min", "-0.5"],
    ["--entropy-bound", "inf"],
    ["--confidence-threshold", "inf"],
    ["--steps", "5000"],
])
def test_bad_option_values_are_usage_errors(runner, args):
    result = invoke(runner, ["generate", "--model", "demo", "-p", "hi", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_t_min_above_t_max_is_an_error_line(runner):
    result = invoke(runner, ["generate", "--model", "demo", "-p", "hi", "--t-min", "5", "--t-max", "0.1", *FAST])
    assert result.exit_code == 1
    assert "t_max must be greater than t_min" in error_line(result)


def test_t_min_zero_on_the_command_line(runner):
    result = invoke(runner, ["generate", "--model", "demo", "-p", "hi", "--t-min", "0", *FAST])
    assert result.exit_code == 0, result.output


def test_invalid_utf8_on_stdin(runner):
    result = invoke(runner, ["generate", "--model", "demo", "-p", "-", *FAST], input=b"caf\xe9 \xff\n")
    assert result.exit_code == 1
    line = error_line(result)
    assert "not valid UTF-8" in line and "0xe9" in line


def test_surrogates_in_a_prompt_argument(runner):
    result = invoke(runner, ["generate", "--model", "demo", "-p", "caf\udce9", *FAST])
    assert result.exit_code == 1
    assert "not valid UTF-8" in error_line(result)


def test_mistyped_relative_path_says_no_such_folder(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, ["generate", "--model", "models/mymodel", "-p", "hi", "--offline"])
    assert result.exit_code == 1
    line = error_line(result)
    assert "no folder 'models/mymodel'" in line and "Hugging Face cache" in line


def test_missing_tokenizer_through_the_cli(runner, home, tmp_path):
    folder = Path(shutil.copytree(home / f"demo-v{DEMO_VERSION}", tmp_path / "m"))
    for p in folder.glob("tokenizer*.json"):
        p.unlink()
    result = invoke(runner, ["generate", "--model", str(folder), "-p", "hi", *FAST])
    assert result.exit_code == 1
    assert "no tokenizer" in error_line(result)
    assert result.stdout == ""


def test_convert_error_has_no_blank_line_first(runner, tmp_path):
    result = invoke(runner, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no such folder" in error_line(result)


# -- 3. the chat loop: every slash-command value validated, no error ends the session -------------


@pytest.mark.parametrize("value", ["5000", "²", "0", "-3", "abc", "1e3", "٣"])
def test_bad_steps_values_keep_the_session(runner, value):
    result = invoke(runner, ["chat", "--model", "demo", *FAST, "--seed", "1"],
                    input=f"/steps {value}\nhello\n/steps\n")
    assert result.exit_code == 0, result.output
    assert "usage: /steps N" in result.stderr
    assert "max denoising steps per block: 2" in result.stderr  # unchanged
    assert result.stdout.strip()  # the message after the bad command got its reply


def test_steps_at_the_bound_is_accepted(runner):
    result = invoke(runner, ["chat", "--model", "demo", "--max-tokens", "8"], input="/steps 1024\n/steps\n")
    assert result.exit_code == 0
    assert "max denoising steps per block: 1024" in result.stderr


def test_invalid_utf8_line_in_chat_keeps_the_session(runner):
    result = invoke(runner, ["chat", "--model", "demo", *FAST, "--seed", "1"], input=b"caf\xe9\nhello\n")
    assert result.exit_code == 1  # piped: a failed turn is reported in the exit code
    assert "not valid UTF-8" in result.stderr
    assert result.stdout.strip()  # the second message still got its reply


def test_unexpected_failure_during_a_reply_keeps_the_session(runner, monkeypatch):
    from mlx_diffusiongemma.api import ChatSession

    original = ChatSession.stream
    calls = {"n": 0}

    def flaky(self, message, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("[metal] something odd")
        return original(self, message, **kw)

    monkeypatch.setattr(ChatSession, "stream", flaky)
    result = invoke(runner, ["chat", "--model", "demo", *FAST, "--seed", "1"], input="first\nsecond\n")
    assert "error: RuntimeError: [metal] something odd" in result.stderr
    assert result.stdout.strip()
    assert result.exit_code == 1


def test_context_limit_in_chat_points_to_reset(demo):
    """After a turn, a conversation that no longer fits is answered with /reset, not with
    "shorten the prompt"."""
    import io

    from rich.console import Console

    from mlx_diffusiongemma.cli.chat import ChatLoop
    from mlx_diffusiongemma.api import ChatSession

    model, tok = demo
    session = ChatSession(model, tok, max_tokens=8, max_denoising_steps=2, seed=0)
    session.send("hello")
    limit = model.text.max_position_embeddings
    try:
        model.text.max_position_embeddings = len(session.cached_ids) + 8
        loop = ChatLoop(session, interactive=False, live=False, ui=Console(file=io.StringIO()))
        import contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            loop.reply("and a second, longer message to push it over the limit")
    finally:
        model.text.max_position_embeddings = limit
    assert "/reset" in err.getvalue() and "too long" in err.getvalue()
    assert "max_tokens" not in err.getvalue()
    assert len(session.messages) == 2  # the conversation is as it was
