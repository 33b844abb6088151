"""`dgemma generate`: one reply to a prompt, drawn live in a terminal, plain or as JSON when piped."""

from __future__ import annotations

import io
import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlx_diffusiongemma.checkpoint.files import DEFAULT_MODEL
from mlx_diffusiongemma.diffusion.options import GenerationOptions

from .errors import check_text, fail, handle_errors, is_terminal, read_stdin_text
from .flags import (
    AdapterPath,
    Debug,
    Images,
    KvBits,
    KvGroupSize,
    Model,
    NoLive,
    Offline,
    System,
    TextOnly,
    generation_flags,
)
from .loader import demo_notice, load_model

# The knobs `dgemma generate` and `dgemma chat` take, with their command-line defaults.
TEXT_KNOBS = ("max_tokens", "max_denoising_steps", "seed", "thinking", "entropy_bound", "t_min", "t_max",
              "stability_threshold", "confidence_threshold")
TEXT_DEFAULTS = {"max_tokens": 1024}


@generation_flags(*TEXT_KNOBS, fast=True, **TEXT_DEFAULTS)
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; '-' reads it from stdin.")],
    model: Model = DEFAULT_MODEL,
    system: System = None,
    no_live: NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print text, finish reason and stats as JSON.")] = False,
    image: Images = None,
    text_only: TextOnly = False,
    kv_bits: KvBits = None,
    kv_group_size: KvGroupSize = None,
    offline: Offline = False,
    adapter_path: AdapterPath = None,
    tensor_parallel: Annotated[Optional[str], typer.Option(
        "--tensor-parallel", help="Under mlx.launch: also split 'attention' and/or 'mlp' (comma-separated).")] = None,
    debug: Debug = False,
    *,
    options: GenerationOptions,
):
    """Generate one reply to a prompt (--image: files for the model to read; under `mlx.launch`: the model split over the ranks)."""
    from .views import ConsoleView, LiveView, PlainView, labels_for, render, stats_line

    terminal = is_terminal() and not as_json
    err = Console(stderr=True, highlight=False)
    with handle_errors(debug):
        from . import distributed

        if prompt == "-":
            prompt = read_stdin_text()
        check_text(prompt, "the prompt")
        if system is not None:
            check_text(system, "the system prompt")
        if not prompt.strip():
            fail("empty prompt")
        if distributed.launched():  # docs/distributed.md
            if image:
                fail("--image is not supported under mlx.launch yet")
            if adapter_path:
                fail("--adapter-path is not supported under mlx.launch yet: fuse the adapter first")
            tp = [p.strip() for p in (tensor_parallel or "").split(",") if p.strip()]
            return distributed.generate(prompt=prompt, model=model, system=system, options=options, as_json=as_json,
                                        offline=offline, tensor_parallel=tp)
        if tensor_parallel:
            fail("--tensor-parallel needs several processes: start the command with mlx.launch")
        from .images import check_image_options, preprocess

        check_image_options(image, text_only)
        llm, tokenizer = load_model(model, offline, err, adapter_path, text_only, kv_bits, kv_group_size)
        images = preprocess(llm, image)  # every image checked before any model work
        if options.thinking:
            demo_notice(llm, "think", err)
        if system:
            demo_notice(llm, "system", err)
        from mlx_diffusiongemma.api import stream_generate

        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        events = stream_generate(llm, tokenizer, messages, images=images, options=options)
        if as_json:
            view = PlainView(io.StringIO())  # the text goes into the JSON object
        elif not terminal:
            view = PlainView(sys.stdout, sys.stderr if options.thinking else None)
        elif no_live:
            view = ConsoleView(Console(highlight=False))
        else:
            view = LiveView(Console(highlight=False), labels_for(llm, tokenizer))
        try:
            result = render(events, view)
        finally:
            events.close()
        if as_json:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        elif terminal:
            err.print(f"[dim]{stats_line(result)}[/]")
