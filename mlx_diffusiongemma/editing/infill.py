"""Templates filled on the canvas: the fixed text pinned, the holes denoised (`infill`), and the
runner the other canvas verbs share (`layout_plan` / `run_layout`: JSON in `schema.py`, edits in `edit.py`, the
Sudoku in `sudoku.py`; `score.py` reads one decoder pass instead).

The stream variants yield the engine's events (`StepEvent` with `.pinned`, `BlockEvent`,
`GenerationResult`) and then one `InfillResult`. Options are `stream_generate`'s (`seed`, the
sampler's knobs, `mode`, ...), checked before any work. Library code never prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..diffusion.engine import Request, run
from ..diffusion.events import GenerationResult
from ..diffusion.options import GenerationOptions
from ..prompts.render import prompt_ids
from . import template as tpl
from .template import Layout


@dataclass
class InfillResult:
    """A filled template: `text` (fixed text with every hole's value), `holes` (name -> value),
    `details` (name -> tokens, and whether the value ended early / filled its whole hole),
    `result` (the engine's GenerationResult: steps, tokens_per_forward, seed...)."""

    text: str
    holes: dict[str, str]
    details: dict[str, dict]
    result: GenerationResult
    value: Any = None  # fill_json: the parsed object
    segments: list = field(default_factory=list)  # the template's fixed text and holes, in order

    def to_json(self) -> dict:
        out = {"text": self.text, "holes": dict(self.holes),
               "steps_per_block": list(self.result.steps_per_block),
               "decoder_passes": self.result.decoder_passes,
               "seed": self.result.seed}
        if self.value is not None:
            out["value"] = self.value
        return out


def prepare_layout(model, tokenizer, prompt, segments, thinking: bool) -> tuple[list[int], Layout]:
    """Everything checked before any model work: template, tokenization, context."""
    lay = tpl.layout(tokenizer, segments)
    ids = prompt_ids(tokenizer, prompt, thinking)
    tpl.check_context(lay, model, len(ids))
    return ids, lay


@dataclass
class CanvasPlan:
    """A canvas verb ready to run on any engine loop (`run` here, the server's worker there): the
    engine's request (prompt ids, options, canvas states, hooks) and how the engine's result
    becomes the verb's `InfillResult` (`finish`). `visible(tokens)` gives, for the tokens committed
    so far, the reply's token ids that can already be shown (None: nothing before the end);
    `reply(out)` is the reply a face sends: (text, tokens in it, "stop" or "length")."""

    request: Request
    finish: Callable[[GenerationResult], "InfillResult"]
    visible: Callable[[list[int]], list[int] | None] = lambda tokens: None
    reply: Callable[["InfillResult"], tuple[str, int, str]] = lambda out: (out.text, len(out.result.tokens), "stop")


def run_plan(model, tokenizer, plan: CanvasPlan) -> Iterator:
    """Run a plan's request to the end; yields the engine's events, then the InfillResult."""
    result = None
    for event in run(model, plan.request, detokenizer=tokenizer.detokenizer):
        if isinstance(event, GenerationResult):
            result = event
        yield event
    yield plan.finish(result)


def layout_plan(model, tokenizer, ids: list[int], lay: Layout, options: GenerationOptions, *,
                warm=None) -> CanvasPlan:
    """The plan of a template laid out on canvases: fixed text pinned, holes denoised (option slots
    resolved from the committing step's probabilities)."""
    c = model.canvas_length
    states = tpl.states(lay, c, model.vocab_size, warm=warm, allowed_rows=tpl.allowed_rows(tokenizer, model, lay))
    slots = [h for h in lay.holes if h.option_ids is not None]
    slot_rows = [p for h in slots for p in range(h.start, h.start + h.length)]
    captured: dict[tuple[int, int], tuple[list[int], mx.array]] = {}

    def capture(view):
        # Log-probabilities at option-slot positions of every step; the committing step's pick
        # the best option (a slot may straddle two canvases).
        rows = [p for p in slot_rows if p // c == view.block]
        if rows and view.processed_logits is not None:  # (fast mode has no full logits)
            lp = log_softmax(view.processed_logits[mx.array([p - view.block * c for p in rows])])
            mx.async_eval(lp)
            captured[(view.block, view.step)] = (rows, lp)
        return None

    def finish(result: GenerationResult) -> InfillResult:
        tokens = list(result.tokens)
        end = tpl.end_ids(model)
        final = {}
        for block in {p // c for p in slot_rows}:
            if (block, result.steps_per_block[block]) in captured:
                rows, lp = captured[(block, result.steps_per_block[block])]
                final.update({p: row for p, row in zip(rows, np.array(lp))})
        for h in slots:  # resolve each option slot from the committing step's probabilities
            span = range(h.start, h.start + h.length)
            if all(p in final for p in span):
                scores = option_scores(np.stack([final[p] for p in span]), h.option_ids, end)
            else:  # no logits (fast mode): the option that agrees with most committed tokens
                committed = tokens[h.start:h.start + h.length]
                scores = np.array([sum(a == b for a, b in zip(committed, o + [min(end)] * h.length))
                                   for o in h.option_ids])
            best = h.option_ids[int(np.argmax(scores))]
            tokens[h.start:h.start + h.length] = best + [min(end)] * (h.length - len(best))
        details = tpl.hole_values(tokenizer, lay, tokens, end)
        values = {k: v["text"] for k, v in details.items()}
        return InfillResult(tpl.fill_text(lay, values), values, details, result, segments=list(lay.segments))

    request = Request.of(ids, options.updated(max_tokens=len(states) * c), canvases=states, stop_at_eos=False,
                         hooks=(capture,) if slots else ())
    return CanvasPlan(request, finish)


def run_layout(model, tokenizer, ids: list[int], lay: Layout, options: GenerationOptions, *,
               warm=None) -> Iterator:
    """Run the engine over the template's canvases; yields events, then the InfillResult."""
    yield from run_plan(model, tokenizer, layout_plan(model, tokenizer, ids, lay, options, warm=warm))


def log_softmax(x: mx.array) -> mx.array:
    """Log-probabilities along the last axis, in float32."""
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def option_scores(logp: mx.array, option_ids: Sequence[Sequence[int]], end_ids: set[int]) -> np.ndarray:
    """Log-probability of each option on a slot: its tokens at its positions, an end token (any of
    them) at the slot's unused positions -- the hole rule of template.py."""
    lp = np.asarray(logp, dtype=np.float32)
    ends = sorted(end_ids)
    end_lp = np.logaddexp.reduce(lp[:, ends], axis=-1)
    out = []
    for ids in option_ids:
        s = sum(lp[i, t] for i, t in enumerate(ids)) + end_lp[len(ids):].sum()
        out.append(float(s))
    return np.array(out)


def canvas_options(options: GenerationOptions | None, kwargs: dict[str, Any],
                   thinking: bool | None = None) -> GenerationOptions:
    """The options of a canvas verb, as `stream_generate` takes them (an options object and/or
    keywords), except `max_tokens`: the template sets the length."""
    if "max_tokens" in kwargs or (options is not None and options.max_tokens is not None):
        raise TypeError("templates take no max_tokens: the template sets the length")
    if thinking is not None:
        kwargs = dict(kwargs, thinking=thinking)
    # The canvas verbs run the exact path unless asked for fast mode: their accuracy is measured
    # there (docs/editing.md), not on fast mode's instruments.
    base = options or GenerationOptions(fast=None)
    return base.updated(**kwargs) if kwargs else base


def stream_infill(model, tokenizer, prompt, template: str, *, thinking: bool | None = None,
                  options: GenerationOptions | None = None, **kwargs: Any) -> Iterator:
    """`infill` as events (see the module docstring); the last item is the InfillResult."""
    opts = canvas_options(options, kwargs, thinking)
    ids, lay = prepare_layout(model, tokenizer, prompt, tpl.parse(template), opts.thinking)
    yield from run_layout(model, tokenizer, ids, lay, opts)


def infill(model, tokenizer, prompt, template: str, **options: Any) -> InfillResult:
    """Fill the holes of `template` as the reply to `prompt` (a string, messages or ids).

    Options are `stream_generate`'s (`seed`, sampler knobs, `thinking`, ... or `options=`) except
    `max_tokens`, which the template sets. Raises TemplateError (before any work) for a bad
    template."""
    out = None
    for item in stream_infill(model, tokenizer, prompt, template, **options):
        out = item
    return out
