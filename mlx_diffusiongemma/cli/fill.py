"""`dgemma fill`, `dgemma edit`, `dgemma score`: templates, edits and structured reads in a terminal.

The live view redraws the canvases being denoised with the given (pinned) tokens in their own
style, so the model is seen writing around them; committed canvases stay above the draft. The
final text is printed with the generated values highlighted. `--json` prints one object instead.
"""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from mlx_diffusiongemma.events import BlockEvent, StepEvent

from .live import STATUS_STYLE, TokenLabels, draft_text

VALUE_STYLE = "bold green"  # generated hole values in the final text


class CanvasView:
    """Every canvas of a template or an edit drawn live (cropped to `length` tokens, if given)."""

    def __init__(self, console: Console, labels: TokenLabels, length: int | None = None):
        self.console = console
        self.labels = labels
        self.length = length
        self.done: list[Text] = []
        self.draft = Text()
        self.status = Text("encoding the prompt…", style=STATUS_STYLE)
        self.live = Live(console=console, transient=True, auto_refresh=False, vertical_overflow="ellipsis",
                         redirect_stdout=False, redirect_stderr=False)
        self._last: StepEvent | None = None

    def __enter__(self):
        self.live.start()
        self._refresh()
        return self

    def __exit__(self, *exc) -> bool:
        self.live.stop()
        return False

    def _refresh(self) -> None:
        self.live.update(Group(Text.assemble(*self.done, self.draft), self.status), refresh=True)

    def _crop(self, event: StepEvent) -> int:
        c = len(event.argmax.tolist())
        if self.length is None:
            return c
        return max(0, min(c, self.length - event.block * c))

    def handle(self, event) -> None:
        if isinstance(event, StepEvent):
            n = self._crop(event)
            pinned = event.pinned.tolist()[:n] if event.pinned is not None else None
            self.draft = draft_text(event.argmax.tolist()[:n], event.accepted.tolist()[:n], self.labels, pinned)
            self.status = Text(f"canvas {event.block + 1} · step {event.step}/{event.max_steps} · "
                               f"accepted {event.accepted_count}/{len(event.argmax.tolist())} · "
                               f"entropy {event.mean_entropy:.2f}", style=STATUS_STYLE, no_wrap=True)
            self._last = event
            self._refresh()
        elif isinstance(event, BlockEvent):
            self.done.append(self.draft)
            self.draft = Text()
            self._refresh()


def check_template(template: str | None, schema: dict | None) -> None:
    """Template syntax / schema errors, before the model is loaded."""
    from mlx_diffusiongemma import editing, template as tpl

    if schema is not None:
        editing.json_segments(schema)
    else:
        tpl.parse(template)


def labels_for(model, tokenizer) -> TokenLabels:
    gen = model.generation
    return TokenLabels(tokenizer, gen.eos_token_ids, gen.pad_token_id)


def styled_fill(out) -> Text:
    """The filled template with the generated values highlighted."""
    from mlx_diffusiongemma.template import Fixed

    text = Text()
    if not out.segments:
        return Text(out.text)
    for seg in out.segments:
        if isinstance(seg, Fixed):
            text.append(seg.text)
        else:
            text.append(out.holes.get(seg.name, ""), VALUE_STYLE)
    return text


def run_events(events, *, view: CanvasView | None):
    """Drain a stream (events, then the final result); returns the final result."""
    final = None
    try:
        if view is None:
            for item in events:
                final = item
        else:
            with view:
                for item in events:
                    view.handle(item)
                    final = item
    finally:
        events.close()
    return final


def read_source(value: str, what: str) -> str:
    """A file path or '-' (stdin) -> its text, bounded."""
    limit = 1_000_000
    if value == "-":
        text = sys.stdin.read(limit + 1)
    else:
        with open(value, encoding="utf-8") as f:
            text = f.read(limit + 1)
    if len(text) > limit:
        raise ValueError(f"{what} is larger than {limit} characters")
    return text


def print_result(out, *, as_json: bool, console: Console, err: Console, terminal: bool, started: float) -> None:
    if as_json:
        print(json.dumps(out.to_json(), ensure_ascii=False))
        return
    if terminal:
        console.print(styled_fill(out), soft_wrap=True)
        r = out.result
        passes = r.extra.get("decoder_passes")
        err.print(f"[dim]{len(r.steps_per_block)} canvas(es) · {passes} decoder passes · "
                  f"{time.perf_counter() - started:.1f} s · seed {r.extra.get('seed')}[/]")
    else:
        sys.stdout.write(out.text + "\n")


def fill_command(llm, tokenizer, *, prompt: str, template: str | None, schema: dict | None, seed, as_json: bool,
                 live: bool, terminal: bool, sampler: dict, console: Console, err: Console) -> None:
    from mlx_diffusiongemma import editing, template as tpl

    started = time.perf_counter()
    if schema is not None:
        events = editing.stream_fill_json(llm, tokenizer, prompt, schema, seed=seed, **sampler)
        length = None
    else:
        events = editing.stream_infill(llm, tokenizer, prompt, template, seed=seed, **sampler)
        length = tpl.layout(tokenizer, tpl.parse(template)).length
    view = CanvasView(console, labels_for(llm, tokenizer), length) if live and terminal and not as_json else None
    out = run_events(events, view=view)
    print_result(out, as_json=as_json, console=console, err=err, terminal=terminal and not as_json, started=started)


def edit_command(llm, tokenizer, *, text: str, instruction: str, strength: float, spans: list[str], seed,
                 max_tokens, as_json: bool, live: bool, terminal: bool, sampler: dict, console: Console,
                 err: Console) -> None:
    from mlx_diffusiongemma import editing

    started = time.perf_counter()
    ranges = [editing.find_span(text, s) for s in spans]
    events = editing.stream_edit(llm, tokenizer, text, instruction, strength=strength, spans=ranges or None,
                                 seed=seed, max_tokens=max_tokens, **sampler)
    view = CanvasView(console, labels_for(llm, tokenizer)) if live and terminal and not as_json else None
    out = run_events(events, view=view)
    print_result(out, as_json=as_json, console=console, err=err, terminal=terminal and not as_json, started=started)


def score_command(llm, tokenizer, *, prompt: str, options: list[str], template: str, seed: int, as_json: bool,
                  console: Console) -> None:
    from mlx_diffusiongemma import editing

    res = editing.score(llm, tokenizer, prompt, options, template=template, seed=seed)
    if as_json:
        print(json.dumps(res.to_json(), ensure_ascii=False))
        return
    slot = next(iter(res.slots.values()))
    for option, p in sorted(slot.probabilities.items(), key=lambda kv: -kv[1]):
        mark = "→" if option == slot.choice else " "
        console.print(f"{mark} {p:6.1%}  {option}", highlight=False, markup=False)
    console.print(f"[dim]choice {slot.choice!r} · confidence {slot.confidence:.1%} · 1 decoder pass[/]")
