"""Rendering engine events: committed text goes to the scrollback, the canvas being refined is
redrawn in place (rich `Live`, refreshed at each event, never by a timer).

Every view is a `View`: a context manager with `handle(event)` and `.result`, run by `render`.
- `TextView`s show the reply's committed text, read through the one splitter
  (`prompts.channels.TextStream`: thought channel apart):
  - `PlainView`: not a terminal: the answer's text only, on stdout, no escape sequences (the
    thought channel, if any, goes to stderr);
  - `ConsoleView`: a terminal without redraws (`--no-live`): committed text only, styled;
  - `LiveView`: a terminal; draft canvas and status line redrawn at every `StepEvent`.
- `CanvasView` (fill, edit) draws every canvas of a template as it is denoised, the given (pinned)
  tokens in their own style; `GridView` (sudoku) draws the reply canvas as a 4x4 grid.
`LiveView` and `CanvasView` share their redrawn region (`Redrawn`).
"""

from __future__ import annotations

import sys
import time
import unicodedata
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from mlx_diffusiongemma.diffusion.events import BlockEvent, GenerationResult, StepEvent
from mlx_diffusiongemma.prompts.labels import TokenLabels

THOUGHT_STYLE = "dim italic"
ACCEPTED_STYLE = "bold"  # positions the sampler accepted this step
NOISY_STYLE = "dim cyan"  # positions still being denoised
PINNED_STYLE = "black on bright_white"  # positions whose token was given (template text, edit context)
STATUS_STYLE = "dim"

_SYMBOLS = {"\n": "↵", "\t": "→", "\r": "␍"}


def visible(text: str) -> str:
    """Control characters and line breaks as visible one-cell symbols (a stable live region)."""
    out = []
    for ch in text:
        if ch in _SYMBOLS:
            out.append(_SYMBOLS[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(chr(0x2400 + ord(ch)) if ord(ch) < 32 else "·")
        else:
            out.append(ch)
    return "".join(out)


def labels_for(model, tokenizer) -> TokenLabels:
    """How a model's draft tokens are labelled: its end-of-sequence and padding ids told apart."""
    gen = model.generation
    return TokenLabels(tokenizer, gen.eos_token_ids, gen.pad_token_id)


def shown(labels: TokenLabels, token: int) -> str:
    """How the terminal draws a token of a draft: end tokens as symbols, the rest made visible."""
    if labels.is_eos(token):
        return "■"
    if labels.is_pad(token):
        return "·"
    return visible(labels(token))


def stats_line(result: GenerationResult) -> str:
    spb = result.steps_per_block
    mean_steps = sum(spb) / len(spb) if spb else 0.0
    return (
        f"{result.generation_tokens} token{'s' if result.generation_tokens != 1 else ''} · "
        f"{result.generation_tps:.1f} tok/s · "
        f"{mean_steps:.1f} steps/block · {result.tokens_per_forward:.2f} tokens/forward · "
        f"prefill {result.prefill_time:.2f} s"
    )


def stats_rows(result: GenerationResult) -> list[tuple[str, str]]:
    """Every number of a result, for `/stats`."""
    spb = result.steps_per_block
    return [
        ("tokens", f"{result.generation_tokens} ({result.finish_reason})"),
        ("generation", f"{result.generation_time:.2f} s, {result.generation_tps:.1f} tok/s"),
        ("steps per block", ", ".join(map(str, spb)) or "-"),
        ("tokens per forward", f"{result.tokens_per_forward:.2f}"),
        ("prompt", f"{result.prompt_tokens} tokens, {result.encoded_tokens} encoded this turn"),
        ("prefill", f"{result.prefill_time:.3f} s, {result.prefill_tps:.0f} tok/s"),
        ("peak memory", f"{result.peak_memory_gb:.2f} GB"),
        ("seed", str(result.seed if result.seed is not None else "-")),
    ]


def draft_text(ids: list[int], accepted: list[bool], labels: TokenLabels, pinned: list[bool] | None = None) -> Text:
    """A draft canvas styled per position: pinned (given), accepted this step, or still noisy."""
    styles = [PINNED_STYLE if pinned and pinned[i] else ACCEPTED_STYLE if ok else NOISY_STYLE
              for i, ok in enumerate(accepted)]
    text = Text()
    run, run_style = [], None
    for token, style in zip(ids, styles):  # runs of one style: short escape sequences
        if style != run_style and run:
            text.append("".join(run), run_style)
            run = []
        run.append(shown(labels, token))
        run_style = style
    if run:
        text.append("".join(run), run_style)
    return text


def live_region(console: Console, transient: bool = True) -> Live:
    """A region redrawn only when a view asks (at each event, never by a timer), leaving the
    program's own stdout and stderr alone."""
    return Live(console=console, transient=transient, auto_refresh=False, vertical_overflow="ellipsis",
                redirect_stdout=False, redirect_stderr=False)


class View:
    """The events of one generation, shown as they come; `result` is the final GenerationResult.
    Subclasses draw steps (`_step`) and committed blocks (`_block`)."""

    def __init__(self):
        self.result: GenerationResult | None = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        return False

    def handle(self, event) -> None:
        if isinstance(event, BlockEvent):
            self._block(event)
        elif isinstance(event, StepEvent):
            self._step(event)
        elif isinstance(event, GenerationResult):
            self.result = event

    def _step(self, event: StepEvent) -> None:
        pass

    def _block(self, event: BlockEvent) -> None:
        pass


def _pieces(delta) -> list[tuple[str, str]]:
    """A splitter's Delta as (kind, text) pieces: the thought first, then the answer."""
    return [(kind, text) for kind, text in (("thought", delta.reasoning), ("answer", delta.content)) if text]


class TextView(View):
    """The reply's committed text, split into thought channel and answer as it comes; subclasses
    say how the pieces are written."""

    def __init__(self):
        super().__init__()
        # Tool calls stay as the model wrote them: the terminal shows them as text.
        # Imported here: prompts.channels imports mlx-lm's tool-call parser (and so mlx-lm and
        # transformers), which `dgemma --help` and the errors found before loading do not need.
        from mlx_diffusiongemma.prompts.channels import TextStream

        self.splitter = TextStream(parse_tools=False)
        self._last_kind: str | None = None  # kind of the last piece written

    def __exit__(self, exc_type, *exc) -> bool:
        self._write(_pieces(self.splitter.finish()))
        if exc_type is None or self._last_kind is not None:  # no stray newline after a failed start
            self._end()
        return False

    def handle(self, event) -> None:
        if isinstance(event, BlockEvent):
            self._write(_pieces(self.splitter.feed(event.text)))
        super().handle(event)

    def _write(self, pieces: list[tuple[str, str]]) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError


class PlainView(TextView):
    """Not a terminal: the answer on `out`, the thought channel (if any) on `err`."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        super().__init__()
        self.out = out or sys.stdout
        self.err = err
        self._thought = False

    def _write(self, pieces):
        for kind, text in pieces:
            stream = self.out if kind == "answer" else self.err
            if stream is not None:
                stream.write(text)
                stream.flush()
            self._thought |= kind == "thought"
            self._last_kind = kind

    def _end(self):
        if self._thought and self.err is not None:
            self.err.write("\n")
        self.out.write("\n")
        self.out.flush()


class ConsoleView(TextView):
    """A terminal without redraws: committed text as it comes, the thought channel dimmed."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def _styled(self, pieces) -> Text:
        text = Text()
        for kind, piece in pieces:
            if self._last_kind == "thought" and kind == "answer":
                text.append("\n\n")
            text.append(piece, THOUGHT_STYLE if kind == "thought" else "")
            self._last_kind = kind
        return text

    def _write(self, pieces):
        if pieces:
            self.console.print(self._styled(pieces), end="", soft_wrap=True)

    def _end(self):
        self.console.print(soft_wrap=True)


class Redrawn:
    """What the live views share (a mixin before their `View` class): a transient region redrawn
    in place, holding what `_above()` gives, then the draft canvas, then a status line."""

    def _open_region(self, console: Console) -> None:
        self.live = live_region(console)
        self.draft = Text()
        self.status = Text("encoding the prompt…", style=STATUS_STYLE)

    def _above(self) -> list[Text]:
        raise NotImplementedError

    def __enter__(self):
        self.live.start()
        self._refresh()
        return self

    def __exit__(self, *exc) -> bool:
        self.live.stop()  # transient: the draft and the status line vanish
        self.draft = Text()
        return super().__exit__(*exc)

    def _refresh(self) -> None:
        self.live.update(Group(Text.assemble(*self._above(), self.draft), self.status), refresh=True)


class LiveView(Redrawn, ConsoleView):
    """The block being refined, redrawn in place after the committed text, plus a status line.

    Committed text is printed above the live region one whole line at a time; the unfinished
    last line (`tail`) is drawn inside the region, with the draft canvas continuing it."""

    def __init__(self, console: Console, labels: TokenLabels):
        super().__init__(console)
        self.labels = labels
        self.tail = Text()
        self.tokens = 0
        self._start: float | None = None
        self._open_region(console)

    def _above(self) -> list[Text]:
        return [self.tail]

    def _step(self, event: StepEvent) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        ids, accepted = event.argmax.tolist(), event.accepted.tolist()
        self.draft = draft_text(ids, accepted, self.labels, event.pinned.tolist() if event.pinned is not None else None)
        elapsed = time.perf_counter() - self._start
        rate = f"{self.tokens / elapsed:.1f} tok/s" if self.tokens and elapsed > 0 else "- tok/s"
        self.status = Text(
            f"block {event.block + 1} · step {event.step}/{event.max_steps} · "
            f"accepted {sum(accepted)}/{len(ids)} · entropy {event.mean_entropy:.2f} · {rate}",
            style=STATUS_STYLE, no_wrap=True, overflow="ellipsis",
        )
        self._refresh()

    def _block(self, event: BlockEvent) -> None:
        self.tokens += len(event.tokens)
        self.draft = Text()
        self._refresh()

    def _write(self, pieces):
        if not pieces:
            return
        self.tail.append_text(self._styled(pieces))
        if not self.live.is_started:  # after the region is gone: plain printing
            self.console.print(self.tail, end="", soft_wrap=True)
            self.tail = Text()
            return
        # Whole lines, and rows the terminal would wrap anyway, go to the scrollback.
        cut = self.tail.plain.rfind("\n") + 1
        if cut:
            head, self.tail = self.tail[:cut], self.tail[cut:]
            self.console.print(head, end="", soft_wrap=True)
        rows = self.tail.wrap(self.console, self.console.width)
        if len(rows) > 1:
            for row in rows[:-1]:
                self.console.print(row, soft_wrap=True)
            self.tail = rows[-1]

    def _end(self):
        self.console.print(self.tail, soft_wrap=True)
        self.tail = Text()


class CanvasView(Redrawn, View):
    """Every canvas of a template or an edit drawn live (cropped to `length` tokens, if given):
    committed canvases stay above the draft, given (pinned) tokens in their own style."""

    def __init__(self, console: Console, labels: TokenLabels, length: int | None = None):
        super().__init__()
        self.console = console
        self.labels = labels
        self.length = length
        self.done: list[Text] = []
        self._open_region(console)

    def _above(self) -> list[Text]:
        return self.done

    def _crop(self, event: StepEvent) -> int:
        c = event.argmax.shape[0]
        if self.length is None:
            return c
        return max(0, min(c, self.length - event.block * c))

    def _step(self, event: StepEvent) -> None:
        n = self._crop(event)
        pinned = event.pinned.tolist()[:n] if event.pinned is not None else None
        self.draft = draft_text(event.argmax.tolist()[:n], event.accepted.tolist()[:n], self.labels, pinned)
        self.status = Text(f"canvas {event.block + 1} · step {event.step}/{event.max_steps} · "
                           f"accepted {event.accepted_count}/{event.argmax.shape[0]} · "
                           f"entropy {event.mean_entropy:.2f}", style=STATUS_STYLE, no_wrap=True)
        self._refresh()

    def _block(self, event: BlockEvent) -> None:
        self.done.append(self.draft)
        self.draft = Text()
        self._refresh()


def grid_cell(label: str) -> str:
    """A token's label as one cell of the drawn grid: its spaces kept (a cell is a token such as
    `" 2"`, its separator included), the rest one printable character or `?` (noise)."""
    body = label.lstrip(" ")
    if body in ("", "\n"):
        return label
    return label[:len(label) - len(body)] + (body if len(body) == 1 and body.isprintable() else "?")


class GridView(View):
    """The reply canvas of a 4x4 Sudoku drawn as a grid (its first `length` tokens): givens in the
    pinned style, accepted cells bold, the rest dim; each step shown for `delay` seconds."""

    def __init__(self, console: Console, labels: TokenLabels, length: int, delay: float):
        super().__init__()
        self.console, self.labels, self.length, self.delay = console, labels, length, delay
        self.live = live_region(console, transient=False)  # the solved grid stays on screen

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.live.stop()
        return False

    def _step(self, event: StepEvent) -> None:
        if event.block != 0:
            return
        n = self.length
        ids, accepted = event.argmax.tolist()[:n], event.accepted.tolist()[:n]
        pinned = event.pinned.tolist()[:n] if event.pinned is not None else [False] * n
        grid = Text()
        for token, ok, pin in zip(ids, accepted, pinned):
            piece = grid_cell(self.labels(token))
            grid.append(piece, PINNED_STYLE if pin else ACCEPTED_STYLE if ok else NOISY_STYLE)
        status = Text(f"step {event.step}/{event.max_steps} · accepted {sum(accepted)}/{n}", style=STATUS_STYLE)
        self.live.update(Group(grid, status), refresh=True)
        if self.delay:
            time.sleep(self.delay)


def render(events, view: View) -> GenerationResult | None:
    """Run the events through a view; returns the final result (None if there was none)."""
    with view:
        for event in events:
            view.handle(event)
    return view.result


def run_events(events, *, view: View | None):
    """Drain a canvas verb's stream (events, then its final result, e.g. an InfillResult) through
    `view` (none: nothing drawn); returns that final item. The stream is closed either way."""
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
