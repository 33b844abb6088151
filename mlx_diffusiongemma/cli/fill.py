"""`dgemma fill`, `dgemma edit`, `dgemma score`: templates, edits and structured reads in a terminal.

The live view (`views.CanvasView`) redraws the canvases being denoised with the given (pinned)
tokens in their own style, so the model is seen writing around them; the final text is printed
with the generated values highlighted. `--json` prints one object instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from mlx_diffusiongemma.checkpoint.files import DEFAULT_MODEL, irregular_kind
from mlx_diffusiongemma.diffusion.options import GenerationOptions

from .errors import check_text, fail, handle_errors, is_terminal, read_stdin_text
from .flags import Debug, Model, NoLive, Offline, generation_flags
from .loader import load_model

VALUE_STYLE = "bold green"  # generated hole values in the final text
Json = Annotated[bool, typer.Option("--json", help="Print {text, holes: {name: value}, ...} as JSON.")]


@generation_flags("max_denoising_steps", "seed")
def fill(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The request; '-' reads it from stdin.")],
    template: Annotated[Optional[str], typer.Option(
        "--template", "-t", help="Text with holes {{name:N}} (N tokens) or {{name:..N}} (at most N).")] = None,
    template_file: Annotated[Optional[str], typer.Option(
        "--template-file", help="Template from a file ('-': stdin).")] = None,
    schema: Annotated[Optional[str], typer.Option("--schema", help="A JSON schema file: fill an object that parses.")] = None,
    model: Model = DEFAULT_MODEL,
    no_live: NoLive = False,
    as_json: Json = False,
    offline: Offline = False,
    debug: Debug = False,
    *,
    options: GenerationOptions,
):
    """Fill the holes of a template (the fixed text is pinned on the canvas)."""
    from mlx_diffusiongemma.editing import infill, schema as schema_fill, template as tpl

    with handle_errors(debug):
        if sum(x is not None for x in (template, template_file, schema)) != 1:
            fail("give exactly one of --template, --template-file or --schema")
        if prompt == "-" and template_file == "-":
            fail("only one of --prompt and --template-file can read stdin")
        prompt = read_stdin_text() if prompt == "-" else prompt
        check_text(prompt, "the prompt")
        if template_file is not None:
            template = read_source(template_file, "the template")
        elif template is not None:
            check_text(template, "the template")
        parsed = read_json_source(schema, "the schema") if schema is not None else None
        check_template(template, parsed)  # syntax and schema errors before loading anything
        llm, tokenizer = load_model(model, offline, Console(stderr=True, highlight=False))
        started = time.perf_counter()
        if parsed is not None:
            events = schema_fill.stream_fill_json(llm, tokenizer, prompt, parsed, options=options)
            length = None
        else:
            events = infill.stream_infill(llm, tokenizer, prompt, template, options=options)
            length = tpl.layout(tokenizer, tpl.parse(template)).length
        out = _run(events, llm, tokenizer, live=not no_live and not as_json, length=length)
        print_result(out, as_json=as_json, started=started)


@generation_flags("max_denoising_steps", "seed")
def edit(
    text: Annotated[str, typer.Option("--text", help="File with the text to edit ('-': stdin).")],
    instruction: Annotated[str, typer.Option("--instruction", "-i", help="What to change.")],
    strength: Annotated[float, typer.Option(
        "--strength", min=0.0, max=1.0, help="Fraction of positions renoised (without --span).")] = 0.5,
    span: Annotated[Optional[list[str]], typer.Option(
        "--span", help="Rewrite only this part of the text (repeatable); the rest is pinned.")] = None,
    model: Model = DEFAULT_MODEL,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Room for a longer reply.")] = None,
    no_live: NoLive = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {text, holes, ...} as JSON.")] = False,
    offline: Offline = False,
    debug: Debug = False,
    *,
    options: GenerationOptions,
):
    """Edit text in place: start the canvas from it (warm start) or rewrite marked spans."""
    from mlx_diffusiongemma.editing.edit import find_span, stream_edit

    with handle_errors(debug):
        source = read_source(text, "the text").rstrip("\n")
        check_text(instruction, "the instruction")
        for part in span or []:
            check_text(part, "a --span")
        ranges = [find_span(source, part) for part in span or []]  # before loading anything
        llm, tokenizer = load_model(model, offline, Console(stderr=True, highlight=False))
        started = time.perf_counter()
        events = stream_edit(llm, tokenizer, source, instruction, strength=strength, spans=ranges or None,
                             max_tokens=max_tokens, options=options)
        out = _run(events, llm, tokenizer, live=not no_live and not as_json)
        print_result(out, as_json=as_json, started=started)


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
    from mlx_diffusiongemma.editing.score import score as score_options

    with handle_errors(debug):
        if len(option) < 2:
            fail("give at least two --option values")
        check_template(template, None)
        llm, tokenizer = load_model(model, offline, Console(stderr=True, highlight=False))
        res = score_options(llm, tokenizer, prompt, option, template=template, seed=seed)
        if as_json:
            print(json.dumps(res.to_json(), ensure_ascii=False))
            return
        console = Console(highlight=False)
        slot = next(iter(res.slots.values()))
        for choice, p in sorted(slot.probabilities.items(), key=lambda kv: -kv[1]):
            mark = "→" if choice == slot.choice else " "
            console.print(f"{mark} {p:6.1%}  {choice}", highlight=False, markup=False)
        console.print(f"[dim]choice {slot.choice!r} · confidence {slot.confidence:.1%} · 1 decoder pass[/]")


def check_template(template: str | None, schema: dict | None) -> None:
    """Template syntax / schema errors, before the model is loaded."""
    from mlx_diffusiongemma.editing import schema as schema_fill, template as tpl

    if schema is not None:
        schema_fill.json_segments(schema)
    else:
        tpl.parse(template)


def _run(events, model, tokenizer, *, live: bool, length: int | None = None):
    """A canvas verb's events drawn live on a terminal (or drained); its InfillResult."""
    from .views import CanvasView, labels_for, run_events

    view = CanvasView(Console(highlight=False), labels_for(model, tokenizer), length) if live and is_terminal() else None
    return run_events(events, view=view)


def styled_fill(out) -> Text:
    """The filled template with the generated values highlighted."""
    from mlx_diffusiongemma.editing.template import Fixed

    text = Text()
    if not out.segments:
        return Text(out.text)
    for seg in out.segments:
        if isinstance(seg, Fixed):
            text.append(seg.text)
        else:
            text.append(out.holes.get(seg.name, ""), VALUE_STYLE)
    return text


MAX_SOURCE_CHARS = 1_000_000


def read_source(value: str, what: str) -> str:
    """A file path or '-' (stdin) -> its text, bounded. Only a regular file is opened (a FIFO or
    a device would block or never end); text that is not UTF-8 is refused naming the file."""
    limit = MAX_SOURCE_CHARS
    if value == "-":
        name = f"{what} on stdin"
        if not hasattr(sys.stdin, "buffer"):
            return _bounded(sys.stdin.read(limit + 1), what)
        raw = sys.stdin.buffer.read(4 * limit + 4)
    else:
        name = value
        try:
            info = os.stat(os.path.expanduser(value))
        except FileNotFoundError:
            raise ValueError(f"{value}: no such file ({what})") from None
        except OSError as e:
            raise ValueError(f"{value}: cannot read {what} ({e.strerror or e})") from None
        kind = irregular_kind(info)
        if kind is not None:
            raise ValueError(f"{value} is {kind}; give {what} as a file or '-' (stdin)")
        with open(os.path.expanduser(value), "rb") as f:
            raw = f.read(4 * limit + 4)
    if len(raw) > 4 * limit:  # more bytes than any `limit` characters take
        raise ValueError(f"{what} is larger than {limit} characters")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not valid UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         "convert it first, e.g. `iconv -f LATIN1 -t UTF-8`") from None
    return _bounded(text, what)


def _bounded(text: str, what: str) -> str:
    if len(text) > MAX_SOURCE_CHARS:
        raise ValueError(f"{what} is larger than {MAX_SOURCE_CHARS} characters")
    return text


def read_json_source(value: str, what: str):
    """`read_source`, parsed as JSON; errors name the file."""
    try:
        return json.loads(read_source(value, what))
    except RecursionError:
        raise ValueError(f"{value}: {what} is JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{value}: {what} is not valid JSON ({e})") from None


def print_result(out, *, as_json: bool, started: float) -> None:
    if as_json:
        print(json.dumps(out.to_json(), ensure_ascii=False))
        return
    if is_terminal():
        Console(highlight=False).print(styled_fill(out), soft_wrap=True)
        r = out.result
        Console(stderr=True, highlight=False).print(
            f"[dim]{len(r.steps_per_block)} canvas(es) · {r.decoder_passes} decoder passes · "
            f"{time.perf_counter() - started:.1f} s · seed {r.seed}[/]")
    else:
        sys.stdout.write(out.text + "\n")
