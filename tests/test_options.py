"""Every generation knob is declared once (`diffusion/options.py`) and checked by one function: the
Python API, the command line and the server refuse the same values with the same words, take the
same seed range, and the command line's flags are the declarations' own."""

from __future__ import annotations

import json

import pytest

from conftest import invoke
from mlx_diffusiongemma.diffusion.options import (
    GENERATION_KNOBS,
    FastOptions,
    GenerationOptions,
    KnobError,
    SamplerOptions,
)
from mlx_diffusiongemma.server import protocol as P
from mlx_diffusiongemma.diffusion.engine import Request

BAD = [  # (knob, value, words of the one message)
    ("max_denoising_steps", 0, "max_denoising_steps must be between 1 and 1024"),
    ("max_denoising_steps", 5000, "max_denoising_steps must be between 1 and 1024"),
    ("stability_threshold", 2000, "stability_threshold must be between 0 and 1024"),
    ("entropy_bound", 0, "entropy_bound must be > 0"),
    ("t_min", -0.5, "t_min must be >= 0"),
    ("t_max", 0, "t_max must be > 0"),
    ("max_tokens", 0, "max_tokens must be at least 1"),
    ("seed", -1, "seed must be a whole number from 0 to 2**64 - 1"),
    ("seed", 2**64, "seed must be a whole number from 0 to 2**64 - 1"),
]


@pytest.mark.parametrize("name, value, words", BAD)
def test_the_api_the_cli_and_the_server_refuse_a_value_in_the_same_words(runner, name, value, words):
    with pytest.raises(KnobError, match=words.replace("*", r"\*")):
        GenerationOptions.from_kwargs(**{name: value})
    flag = GENERATION_KNOBS[name].flag or "--" + name.replace("_", "-")
    result = invoke(runner, ["generate", "--model", "demo-random", "-p", "hi", flag, str(value)])
    shown = " ".join(result.output.replace("│", " ").split())  # typer draws usage errors in a box
    assert result.exit_code == 2 and words in shown, result.output
    with pytest.raises(P.APIError) as info:
        P.parse_common({"model": "m", name: value}, "chat", default_max_tokens=8, max_tokens_limit=10**6)
    assert words in info.value.message and info.value.param == name


def test_one_seed_range_everywhere(runner):
    top = 2**64 - 1
    assert GenerationOptions(seed=top).seed == top
    assert P.parse_common({"model": "m", "seed": top}, "chat", default_max_tokens=8,
                          max_tokens_limit=8).options.seed == top  # the server took only 2^32 - 1 before
    result = invoke(runner, ["generate", "--model", "demo-random", "-p", "hi", "--seed", str(top),
                             "--max-tokens", "8", "--steps", "2", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["seed"] == top


def test_the_command_line_flags_are_the_declarations():
    """`dgemma generate --help` shows every knob it takes under the declared flag with the
    declared help, so nothing about a knob is written twice."""
    from typer.main import get_command

    from mlx_diffusiongemma.cli.app import app
    from mlx_diffusiongemma.cli.generate import TEXT_KNOBS

    params = {p.name: p for p in get_command(app).commands["generate"].params}
    for name in TEXT_KNOBS:
        spec = GENERATION_KNOBS[name]
        flag = spec.flag or "--" + name.replace("_", "-")
        assert flag in params[name].opts, name
        assert params[name].help.split(" (default")[0].rstrip(".") == spec.help.split(" (default")[0].rstrip(".")


def test_options_from_keywords():
    # Fast mode by default (docs/fast-mode.md, "The default"), in keywords and in the options object;
    # a request built by hand for the engine is the reference path unless it names fast mode.
    assert GenerationOptions.from_kwargs().fast == GenerationOptions().fast == FastOptions()
    assert GenerationOptions.from_kwargs().mode == "fast"
    assert GenerationOptions.from_kwargs(mode="exact").fast is None
    assert Request([1]).fast is None and Request.of([1], GenerationOptions()).fast == FastOptions()
    assert GenerationOptions.from_kwargs(mode="fast").fast == FastOptions()
    custom = FastOptions(commit_gap=None)
    assert GenerationOptions.from_kwargs(fast=custom).fast == custom  # fast options alone mean fast mode
    assert GenerationOptions.from_kwargs(mode="exact", fast=custom).fast is None
    opts = GenerationOptions.from_kwargs(max_denoising_steps=4, seed=3, mode="fast")
    assert opts.sampler == SamplerOptions(max_denoising_steps=4) and opts.mode == "fast"
    # updated() keeps what is not named, and mode="fast" alone keeps the techniques chosen
    assert opts.updated(seed=5).sampler.max_denoising_steps == 4
    assert GenerationOptions(fast=custom).updated(mode="fast").fast == custom
    assert opts.updated(mode="exact").fast is None
    # The exact path's own knobs are refused in fast mode rather than ignored.
    for knob in ({"stop_check_interval": 4}, {"self_conditioning_top_k": 16}):
        with pytest.raises(ValueError, match="add mode='exact'"):
            GenerationOptions.from_kwargs(**knob)
        assert GenerationOptions.from_kwargs(mode="exact", **knob).mode == "exact"
    with pytest.raises(TypeError, match="temperature"):
        GenerationOptions.from_kwargs(temperature=0.5)
    with pytest.raises(KnobError, match="mode must be 'exact' or 'fast'"):
        GenerationOptions.from_kwargs(mode="turbo")
    with pytest.raises(ValueError, match="t_max must be greater than t_min"):
        GenerationOptions.from_kwargs(t_min=0.5, t_max=0.5)


def test_the_sampler_defaults_are_written_once():
    from mlx_diffusiongemma.demo.files import generation_config
    from mlx_diffusiongemma.model.args import SAMPLER_DEFAULTS, GenerationDefaults

    d = GenerationDefaults()
    assert {k: getattr(d, k) for k in SAMPLER_DEFAULTS} == SAMPLER_DEFAULTS
    assert SamplerOptions().resolve(d) == SamplerOptions(**SAMPLER_DEFAULTS)
    written = generation_config([1])
    assert written["max_denoising_steps"] == SAMPLER_DEFAULTS["max_denoising_steps"]
    assert written["sampler_config"]["entropy_bound"] == SAMPLER_DEFAULTS["entropy_bound"]
