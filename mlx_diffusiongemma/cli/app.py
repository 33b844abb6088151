"""`dgemma`: chat, generate, serve and convert. Commands, options and error handling.

Errors the user can act on (`DiffusionGemmaError`, bad values) print one line `error: ...` on
stderr and exit 1; typer's usage errors keep code 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"  # == loading.DEFAULT_MODEL (kept import-free)
RECIPES = ("mixed-4bit", "8bit", "bf16")  # == weights.RECIPES

app = typer.Typer(
    name="dgemma",
    help="Run Google's DiffusionGemma block-diffusion LM with MLX.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# -- options shared by chat and generate -------------------------------------------------------



def _positive(value):
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"{value} is not a finite number > 0")
    return value


def _non_negative(value):
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise typer.BadParameter(f"{value} is not a finite number >= 0")
    return value


def _finite(value):
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _recipe(value: str) -> str:
    if value not in RECIPES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(RECIPES)}")
    return value


Model = Annotated[str, typer.Option(
    "--model", "-m", help="Hub repo id or local folder; 'demo' is a small model trained on toy tasks "
    "(offline; /help in chat lists prompts), 'demo-random' a tiny random one (noise).")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per reply.")]
MAX_STEPS = 1024  # == engine._MAX_STEPS
Steps = Annotated[Optional[int], typer.Option(
    "--steps", min=1, max=MAX_STEPS, help="Max denoising steps per block (default: the checkpoint's).")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", min=0, max=2**64 - 1, help="Random seed, 0 to 2^64-1 (default: fresh each run).")]
System = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
Think = Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode (thought channel shown dimmed).")]
NoLive = Annotated[bool, typer.Option("--no-live", help="No redrawn view of the block being refined.")]
EntropyBound = Annotated[Optional[float], typer.Option(
    "--entropy-bound", callback=_positive, help="Sampler: entropy budget accepted per step.")]
TMin = Annotated[Optional[float], typer.Option(
    "--t-min", callback=_non_negative, help="Sampler: final temperature (>= 0, below --t-max).")]
TMax = Annotated[Optional[float], typer.Option("--t-max", callback=_positive, help="Sampler: first temperature.")]
Stability = Annotated[Optional[int], typer.Option(
    "--stability-threshold", min=0, max=MAX_STEPS, help="Sampler: steps the draft must stay unchanged to stop.")]
Confidence = Annotated[Optional[float], typer.Option(
    "--confidence-threshold", min=0, callback=_finite,
    help="Sampler: mean entropy under which a stable block stops.")]
Fast = Annotated[bool, typer.Option(
    "--fast/--exact", help="Fast mode (settled positions frozen, live rows only; see docs/performance.md) "
                           "or the exact reference sampler.")]
FastCommitGap = Annotated[Optional[float], typer.Option(
    "--fast-commit-gap", min=0, callback=_finite,
    help="Fast mode: commit a canvas once every live position's top-2 gap of logits reaches this "
         "(0: off; default 1.5, tuned on the demo model: measure it on yours).")]
FastEosTail = Annotated[Optional[bool], typer.Option(
    "--fast-eos-tail/--no-fast-eos-tail",
    help="Fast mode: freeze a certain end-of-text tail right after the step that predicts it (default on).")]
Offline = Annotated[bool, typer.Option("--offline", help="Never reach the hub; use the local cache only.")]
AdapterPath = Annotated[Optional[str], typer.Option(
    "--adapter-path", help="Folder of fine-tuned adapters (from `dgemma finetune`) to apply.")]
Images = Annotated[Optional[list[Path]], typer.Option(
    "--image", "-i", help="An image file for the prompt (repeatable).")]
TextOnly = Annotated[bool, typer.Option("--text-only", help="Leave the vision tower out (less memory; no images).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _sampler(steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold) -> dict:
    values = dict(max_denoising_steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max,
                  stability_threshold=stability_threshold, confidence_threshold=confidence_threshold)
    if t_min is not None and t_max is not None and t_max <= t_min:
        # Known before loading anything; with only one of them given, the engine checks the pair
        # against the checkpoint's default for the other.
        raise ValueError(f"t_max must be greater than t_min (got t_max {t_max}, t_min {t_min})")
    return {k: v for k, v in values.items() if v is not None}


def _fast_options(fast: bool, commit_gap: float | None, eos_tail: bool | None):
    """The FastOptions the fast-mode flags ask for (None: the defaults); the flags need --fast."""
    if commit_gap is None and eos_tail is None:
        return None
    if not fast:
        raise ValueError("--fast-commit-gap and --fast-eos-tail apply to fast mode: add --fast")
    from dataclasses import replace

    from mlx_diffusiongemma.fast import FastOptions

    options = FastOptions()
    if commit_gap is not None:
        options = replace(options, commit_gap=commit_gap or None)
    if eos_tail is False:
        options = replace(options, eos_tail_gap=None)
    return options


# -- errors ----------------------------------------------------------------------------------------


def _fail(message: str, code: int = 1):
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def _nothing():
    yield


@contextmanager
def handle_errors(debug: bool):
    """One line on stderr and exit 1 for errors; the traceback too with --debug."""
    from mlx_diffusiongemma.errors import DiffusionGemmaError

    try:
        yield
    except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
        raise
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        signum = getattr(e, "signum", 2)  # convert turns SIGTERM/SIGHUP into an interrupt too
        print("interrupted" if signum == 2 else f"interrupted ({e})", file=sys.stderr)
        raise typer.Exit(128 + signum)
    except BrokenPipeError:
        # The reader went away (`dgemma generate ... | head`): stop quietly, like other CLI tools.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0)
    except (DiffusionGemmaError, ValueError, OSError) as e:
        if debug:
            traceback.print_exc()
        _fail(str(e))
    except Exception as e:
        if debug:
            traceback.print_exc()
            _fail(f"{type(e).__name__}: {e}")
        _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)")


def read_stdin_text() -> str:
    """All of stdin as text; invalid UTF-8 is reported, not passed on (see check_text)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"the prompt on stdin is not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`"
            ) from None
    return data


def check_text(text: str, what: str) -> None:
    """Undecodable bytes reach Python as lone surrogates (from argv or a non-UTF-8 stream): the
    tokenizer would reject them with an internal message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid UTF-8 text (an undecodable byte at character {e.start}); "
            "convert it to UTF-8 first, e.g. `iconv -f LATIN1 -t UTF-8`"
        ) from None


def _is_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _load(name: str, offline: bool, ui: Console, adapter_path: str | None = None, text_only: bool = False):
    """(model, tokenizer) for --model; 'demo' is the trained demo model in the package,
    'demo-random' the random one (built on first use). In a terminal, a line says what is
    happening before the slow imports and the loading."""
    t0 = time.perf_counter()
    if name == "demo-random":
        from mlx_diffusiongemma.demo import demo_dir

        if not (demo_dir() / "config.json").exists():
            ui.print(f"[dim]creating the random demo model in {demo_dir()} (first use only, a few seconds)…[/]")
        elif ui.is_terminal:
            ui.print("[dim]loading the random demo model…[/]")
        with ui.status("[dim]preparing the random demo model…[/]") if ui.is_terminal else _nothing():
            from mlx_diffusiongemma.demo import ensure_demo
            from mlx_diffusiongemma.loading import load

            model, tokenizer = load(ensure_demo(), adapter_path=adapter_path, text_only=text_only)
        ui.print("[yellow]demo model: random weights, its output is noise.[/]")
        return model, tokenizer
    if name == "demo":
        from mlx_diffusiongemma.loading import load

        model, tokenizer = load("demo", adapter_path=adapter_path, text_only=text_only)
        ui.print("[yellow]demo model: a 2.9M-parameter DiffusionGemma trained on toy tasks only "
                 "(sorting, sums, reversing, sudoku…); /help in chat lists prompts to try.[/]")
        return model, tokenizer
    if ui.is_terminal:  # piped: errors stay one line on stderr
        ui.print(f"[dim]loading {name}…[/]")
    from mlx_diffusiongemma.loading import load

    model, tokenizer = load(name, offline=offline or None, adapter_path=adapter_path, text_only=text_only)
    if ui.is_terminal:
        ui.print(f"[dim]loaded {model.source} in {time.perf_counter() - t0:.1f} s[/]")
    return model, tokenizer


# -- commands --------------------------------------------------------------------------------------


@app.command()
def chat(
    model: Model = DEFAULT_MODEL,
    max_tokens: MaxTokens = 1024,
    steps: Steps = None,
    seed: Seed = None,
    system: System = None,
    think: Think = False,
    no_live: NoLive = False,
    entropy_bound: EntropyBound = None,
    t_min: TMin = None,
    t_max: TMax = None,
    stability_threshold: Stability = None,
    confidence_threshold: Confidence = None,
    fast: Fast = False,
    fast_commit_gap: FastCommitGap = None,
    fast_eos_tail: FastEosTail = None,
    image: Images = None,
    text_only: TextOnly = False,
    offline: Offline = False,
    adapter_path: AdapterPath = None,
    debug: Debug = False,
):
    """Chat with the model (multi-turn; /help lists the slash commands; --image or /image attach images)."""
    from .chat import ChatLoop

    interactive = _is_terminal()
    ui = Console(stderr=not interactive, highlight=False)
    with handle_errors(debug):
        if system is not None:
            check_text(system, "the system prompt")
        sampler = _sampler(steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold)
        fast_options = _fast_options(fast, fast_commit_gap, fast_eos_tail)
        if fast_options is not None:
            sampler["fast"] = fast_options
        from .images import check_image_options, preprocess

        check_image_options(image, text_only)
        llm, tokenizer = _load(model, offline, ui, adapter_path, text_only)
        pending = preprocess(llm, image)  # checked before the first message
        from mlx_diffusiongemma.generate import ChatSession

        session = ChatSession(llm, tokenizer, system=system, thinking=think, max_tokens=max_tokens,
                              seed=seed, mode="fast" if fast else "exact", **sampler)
        if interactive:
            ui.print("[bold]DiffusionGemma chat[/] [dim]· /help for commands · Ctrl-D to quit[/]")
        loop = ChatLoop(session, interactive=interactive, live=not no_live, ui=ui)
        loop.pending_images = pending
        code = loop.run()
    raise typer.Exit(code)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt; '-' reads it from stdin.")],
    model: Model = DEFAULT_MODEL,
    max_tokens: MaxTokens = 1024,
    steps: Steps = None,
    seed: Seed = None,
    system: System = None,
    think: Think = False,
    no_live: NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print text, finish reason and stats as JSON.")] = False,
    entropy_bound: EntropyBound = None,
    t_min: TMin = None,
    t_max: TMax = None,
    stability_threshold: Stability = None,
    confidence_threshold: Confidence = None,
    fast: Fast = False,
    fast_commit_gap: FastCommitGap = None,
    fast_eos_tail: FastEosTail = None,
    image: Images = None,
    text_only: TextOnly = False,
    offline: Offline = False,
    adapter_path: AdapterPath = None,
    tensor_parallel: Annotated[Optional[str], typer.Option(
        "--tensor-parallel", help="Under mlx.launch: also split 'attention' and/or 'mlp' (comma-separated).")] = None,
    debug: Debug = False,
):
    """Generate one reply to a prompt (--image: files for the model to read; under `mlx.launch`: the model split over the ranks)."""
    from .live import ConsoleView, LiveView, PlainView, TokenLabels, render, stats_line

    terminal = _is_terminal() and not as_json
    err = Console(stderr=True, highlight=False)
    with handle_errors(debug):
        from . import distributed

        if prompt == "-":
            prompt = read_stdin_text()
        check_text(prompt, "the prompt")
        if system is not None:
            check_text(system, "the system prompt")
        if not prompt.strip():
            _fail("empty prompt")
        sampler = _sampler(steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold)
        fast_options = _fast_options(fast, fast_commit_gap, fast_eos_tail)
        if distributed.launched():  # docs/distributed.md
            if fast_options is not None:
                _fail("--fast-commit-gap / --fast-eos-tail are not supported under mlx.launch yet")
            if image:
                _fail("--image is not supported under mlx.launch yet")
            if adapter_path:
                _fail("--adapter-path is not supported under mlx.launch yet: fuse the adapter first")
            tp = [p.strip() for p in (tensor_parallel or "").split(",") if p.strip()]
            return distributed.generate(prompt=prompt, model=model, max_tokens=max_tokens, seed=seed,
                                        system=system, think=think, sampler=sampler, as_json=as_json,
                                        offline=offline, tensor_parallel=tp, fast=fast)
        if tensor_parallel:
            _fail("--tensor-parallel needs several processes: start the command with mlx.launch")
        from .images import check_image_options, preprocess

        check_image_options(image, text_only)
        llm, tokenizer = _load(model, offline, err, adapter_path, text_only)
        images = preprocess(llm, image)  # every image checked before any model work
        from mlx_diffusiongemma.generate import stream_generate

        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        events = stream_generate(llm, tokenizer, messages, max_tokens=max_tokens, seed=seed,
                                 thinking=think, mode="fast" if fast else "exact", images=images,
                                 fast=fast_options, **sampler)
        if as_json:
            view = PlainView(io.StringIO())  # the text goes into the JSON object
        elif not terminal:
            view = PlainView(sys.stdout, sys.stderr if think else None)
        elif no_live:
            view = ConsoleView(Console(highlight=False))
        else:
            gen = llm.generation
            view = LiveView(Console(highlight=False), TokenLabels(tokenizer, gen.eos_token_ids, gen.pad_token_id))
        try:
            result = render(events, view)
        finally:
            events.close()
        if as_json:
            print(json.dumps(result_json(result), ensure_ascii=False))
        elif terminal:
            err.print(f"[dim]{stats_line(result)}[/]")


def result_json(result) -> dict:
    return {
        "text": result.text,
        "thinking": result.thinking,
        "answer": result.answer,
        "finish_reason": result.finish_reason,
        "tokens": result.generation_tokens,
        "token_ids": list(result.tokens),
        "prompt_tokens": result.prompt_tokens,
        "prefill_time": result.prefill_time,
        "prefill_tps": result.prefill_tps,
        "steps_per_block": list(result.steps_per_block),
        "tokens_per_forward": result.tokens_per_forward,
        "generation_time": result.generation_time,
        "generation_tps": result.generation_tps,
        "peak_memory_gb": result.peak_memory_gb,
        "seed": result.extra.get("seed"),
        "mode": result.extra.get("mode"),
    }


@app.command()
def fill(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The request; '-' reads it from stdin.")],
    template: Annotated[Optional[str], typer.Option(
        "--template", "-t", help="Text with holes {{name:N}} (N tokens) or {{name:..N}} (at most N).")] = None,
    template_file: Annotated[Optional[str], typer.Option("--template-file", help="Template from a file ('-': stdin).")] = None,
    schema: Annotated[Optional[str], typer.Option("--schema", help="A JSON schema file: fill an object that parses.")] = None,
    model: Model = DEFAULT_MODEL,
    steps: Steps = None,
    seed: Seed = None,
    no_live: NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, holes: {name: value}, ...} as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Fill the holes of a template (the fixed text is pinned on the canvas)."""
    from .fill import check_template, fill_command, read_source

    with handle_errors(debug):
        if sum(x is not None for x in (template, template_file, schema)) != 1:
            _fail("give exactly one of --template, --template-file or --schema")
        if prompt == "-" and template_file == "-":
            _fail("only one of --prompt and --template-file can read stdin")
        prompt = sys.stdin.read() if prompt == "-" else prompt
        if template_file is not None:
            template = read_source(template_file, "the template")
        parsed = json.loads(read_source(schema, "the schema")) if schema is not None else None
        check_template(template, parsed)  # syntax and schema errors before loading anything
        llm, tokenizer = _load(model, offline, Console(stderr=True, highlight=False))
        fill_command(llm, tokenizer, prompt=prompt, template=template, schema=parsed, seed=seed, as_json=as_json,
                     live=not no_live, terminal=_is_terminal(), sampler=_sampler(steps, None, None, None, None, None),
                     console=Console(highlight=False), err=Console(stderr=True, highlight=False))


@app.command()
def edit(
    text: Annotated[str, typer.Option("--text", help="File with the text to edit ('-': stdin).")],
    instruction: Annotated[str, typer.Option("--instruction", "-i", help="What to change.")],
    strength: Annotated[float, typer.Option(
        "--strength", min=0.0, max=1.0, help="Fraction of positions renoised (without --span).")] = 0.5,
    span: Annotated[Optional[list[str]], typer.Option(
        "--span", help="Rewrite only this part of the text (repeatable); the rest is pinned.")] = None,
    model: Model = DEFAULT_MODEL,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Room for a longer reply.")] = None,
    steps: Steps = None,
    seed: Seed = None,
    no_live: NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, holes, ...} as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Edit text in place: start the canvas from it (warm start) or rewrite marked spans."""
    from .fill import edit_command, read_source

    with handle_errors(debug):
        source = read_source(text, "the text").rstrip("\n")
        from mlx_diffusiongemma.editing import find_span

        for part in span or []:
            find_span(source, part)  # before loading anything
        llm, tokenizer = _load(model, offline, Console(stderr=True, highlight=False))
        edit_command(llm, tokenizer, text=source, instruction=instruction, strength=strength, spans=span or [],
                     seed=seed, max_tokens=max_tokens, as_json=as_json, live=not no_live, terminal=_is_terminal(),
                     sampler=_sampler(steps, None, None, None, None, None), console=Console(highlight=False),
                     err=Console(stderr=True, highlight=False))


@app.command()
def score(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question.")],
    option: Annotated[list[str], typer.Option("--option", "-o", help="A possible answer (repeat: at least 2).")],
    template: Annotated[str, typer.Option("--template", "-t", help="Reply template with one {{slot}}.")] = "{{answer}}",
    model: Model = DEFAULT_MODEL,
    seed: Annotated[int, typer.Option("--seed", help="Noise under the slot.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the probabilities as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Probabilities of a few answers from one decoder pass (classification, multiple choice)."""
    from .fill import check_template, score_command

    with handle_errors(debug):
        if len(option) < 2:
            _fail("give at least two --option values")
        check_template(template, None)
        llm, tokenizer = _load(model, offline, Console(stderr=True, highlight=False))
        score_command(llm, tokenizer, prompt=prompt, options=option, template=template, seed=seed, as_json=as_json,
                      console=Console(highlight=False))


@app.command()
def sudoku(
    puzzle: Annotated[str, typer.Option("--puzzle", help="16 cells, 1-4 or '.', rows split by '/'.")] = "..3./.4.2/21../..2.",
    model: Model = "demo",
    plain: Annotated[bool, typer.Option("--plain", help="No pins: the puzzle as a plain prompt (to compare).")] = False,
    free: Annotated[bool, typer.Option("--free", help="Blanks may take any token (default: digits 1-4).")] = False,
    steps: Steps = None,
    seed: Seed = None,
    delay: Annotated[float, typer.Option("--delay", min=0.0, help="Seconds to show each step.")] = 0.15,
    as_json: Annotated[bool, typer.Option("--json", help="Print the grid and whether it is solved as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Solve a 4x4 Sudoku with its givens pinned on the canvas (best with the trained demo model).
    Exit code 3 when the grid is not a solution."""
    from .sudoku import sudoku_command

    with handle_errors(debug):
        from mlx_diffusiongemma.sudoku import parse_puzzle

        parse_puzzle(puzzle)  # before loading anything
        llm, tokenizer = _load(model, offline, Console(stderr=True, highlight=False))
        code = sudoku_command(llm, tokenizer, puzzle=puzzle, plain=plain, free=free, seed=seed, steps=steps,
                              delay=delay, as_json=as_json, terminal=_is_terminal(), console=Console(highlight=False),
                              err=Console(stderr=True, highlight=False))
    raise typer.Exit(code)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Hugging Face checkpoint: local folder or hub repo id.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Destination folder (must not exist).")],
    recipe: Annotated[str, typer.Option(
        "--recipe", callback=_recipe, help=f"Weights precision: {', '.join(RECIPES)}.")] = "mixed-4bit",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing destination.")] = False,
    shard_size: Annotated[float, typer.Option(
        "--shard-size", callback=_positive, help="Largest shard, in GB (2^30 bytes).")] = 5.0,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="Leave the vision tower out (smaller; the folder cannot read images).")] = False,
    debug: Debug = False,
):
    """Convert a Hugging Face DiffusionGemma checkpoint into an MLX folder."""
    from .convert_view import run_convert

    with handle_errors(debug):
        run_convert(src, output, recipe=recipe, force=force, shard_size_bytes=int(shard_size * 2**30),
                    out=Console(highlight=False), err=Console(stderr=True, highlight=False), text_only=text_only)


@app.command()
def serve(
    model: Model = DEFAULT_MODEL,
    adapter_path: AdapterPath = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port.")] = 8080,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Default max_tokens of a request.")] = 512,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", min=1, help="Largest max_tokens accepted.")] = 16384,
    chat_template_args: Annotated[str, typer.Option(
        "--chat-template-args", help='JSON arguments for the chat template, e.g. \'{"enable_thinking":true}\'.')] = "{}",
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="DGEMMA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", min=1, help="Requests denoised in turn.")] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests waiting before 503.")] = 16,
    max_body_kb: Annotated[int, typer.Option("--max-body-kb", min=1, help="Largest request body.")] = 4096,
    prompt_cache_size: Annotated[int, typer.Option("--prompt-cache-size", min=0, help="KV caches kept.")] = 8,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")] = "INFO",
    fast: Annotated[bool, typer.Option(
        "--fast/--exact", help="Default path of a request that sends no 'mode': fast mode, or the exact "
        "reference sampler (default; batched across requests).")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Serve the model over an OpenAI-compatible HTTP API (and a web chat at /)."""
    from .serve import run_server

    ui = Console(stderr=True, highlight=False)
    with handle_errors(debug):
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            _fail(f"--log-level {log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        run_server(model=model, host=host, port=port, api_key=api_key, log_level=log_level,
                   chat_template_args=chat_template_args, load=lambda: _load(model, offline, ui, adapter_path), ui=ui,
                   default_max_tokens=max_tokens, max_tokens_limit=max_tokens_limit, max_active=max_concurrency,
                   max_queue=max_queue, max_body_bytes=max_body_kb * 1024, prompt_cache_size=prompt_cache_size,
                   default_mode="fast" if fast else "exact")


@app.command()
def finetune(
    data: Annotated[str, typer.Option("--data", help="Folder with train.jsonl and valid.jsonl (chat 'messages' or 'prompt'/'completion').")],
    model: Model = DEFAULT_MODEL,
    fine_tune_type: Annotated[str, typer.Option("--fine-tune-type", help="lora or full.")] = "lora",
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam, adamw, sgd or adafactor.")] = "adam",
    num_layers: Annotated[Optional[int], typer.Option("--num-layers", help="Layers to fine-tune, from the last (-1: all; default 16 or all).")] = None,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, max=1024, help="LoRA rank.")] = 8,
    lora_scale: Annotated[float, typer.Option("--lora-scale", help="LoRA scale (mlx-lm's, not alpha).")] = 20.0,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Canvases per step.")] = 4,
    learning_rate: Annotated[float, typer.Option("--learning-rate", callback=_positive, help="Learning rate.")] = 1e-5,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="constant or cosine.")] = "constant",
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Linear warm-up steps.")] = 0,
    adapter_path: Annotated[str, typer.Option("--adapter-path", help="Folder the adapters are written to.")] = "adapters",
    resume_adapter_file: Annotated[Optional[str], typer.Option("--resume-adapter-file", help="adapters.safetensors of an earlier run to start from.")] = None,
    val_batches: Annotated[int, typer.Option("--val-batches", min=-1, help="Validation batches (-1: all, 0: none).")] = 25,
    steps_per_eval: Annotated[int, typer.Option("--steps-per-eval", min=1, help="Validate every N steps.")] = 200,
    steps_per_report: Annotated[int, typer.Option("--steps-per-report", min=1, help="Log a line every N steps (piped output).")] = 10,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Save the adapters every N steps.")] = 100,
    max_seq_length: Annotated[int, typer.Option("--max-seq-length", min=1, help="Longest example, prompt + answer tokens.")] = 2048,
    grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint", help="Recompute feed-forward activations in the backward pass (less memory).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order and the corruption noise.")] = 0,
    offline: Offline = False,
    debug: Debug = False,
):
    """Fine-tune with the block-diffusion objective: LoRA (also on 4-bit models) or full."""
    from mlx_diffusiongemma.train.finetune import FinetuneSettings

    from .finetune import run_finetune

    err = Console(stderr=True, highlight=False)
    with handle_errors(debug):
        settings = FinetuneSettings(
            model=model, data=data, fine_tune_type=fine_tune_type, optimizer=optimizer, num_layers=num_layers,
            lora_rank=lora_rank, lora_scale=lora_scale, iters=iters, batch_size=batch_size,
            learning_rate=learning_rate, lr_schedule=lr_schedule, warmup=warmup, adapter_path=adapter_path,
            resume_adapter_file=resume_adapter_file, val_batches=val_batches, steps_per_eval=steps_per_eval,
            save_every=save_every, max_seq_length=max_seq_length, grad_checkpoint=grad_checkpoint, seed=seed,
            offline=offline or None)
        code = run_finetune(settings, steps_per_report=steps_per_report, out=Console(highlight=False), err=err,
                            interactive=err.is_terminal)
    raise typer.Exit(code)


@app.command()
def fuse(
    adapter_path: Annotated[str, typer.Option("--adapter-path", help="Adapter folder from `dgemma finetune`.")] = "adapters",
    save_path: Annotated[str, typer.Option("--save-path", help="Destination folder (must not exist).")] = "fused_model",
    model: Model = DEFAULT_MODEL,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Write unquantized weights.")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Merge fine-tuned adapters into the weights and write a model folder."""
    from .finetune import run_fuse

    with handle_errors(debug):
        run_fuse(model, adapter_path, save_path, dequantize=dequantize, offline=offline or None,
                 out=Console(highlight=False), err=Console(stderr=True, highlight=False))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context):
    """Run the benchmark against the other MLX port (scripts/bench.py; --help for its options)."""
    # The benchmark lives in the source repository's scripts/ (it builds venvs and checkpoints
    # of its own), so it is run from there rather than shipped inside the package.
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"
    if not script.exists():
        _fail("the benchmark ships with the source repository: clone it and run "
              "`python scripts/bench.py` (or install it editable, then `dgemma bench`)")
    import runpy

    module = runpy.run_path(str(script), run_name="dgemma_bench")
    raise typer.Exit(module["main"](list(ctx.args)) or 0)


def main() -> None:
    app(prog_name="dgemma")


if __name__ == "__main__":
    main()
