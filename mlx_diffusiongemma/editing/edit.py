"""Edits: a canvas started from existing text (warm start) with a fraction of positions renoised, or
marked spans rewritten with everything else pinned."""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np

from ..diffusion.canvas import CanvasState
from ..diffusion.engine import Request, check_fits, run
from ..diffusion.events import GenerationResult
from ..diffusion.options import GenerationOptions, fresh_seed
from ..prompts.render import prompt_ids
from . import template as tpl
from .infill import CanvasPlan, InfillResult, canvas_options, layout_plan, prepare_layout, run_layout, run_plan
from .template import Fixed, Hole, Layout, TemplateError


def token_bounds(tokenizer, text: str) -> list[int]:
    """The character offsets in `text` where its tokens start or end (0 and len(text) included):
    where a span can begin or end without cutting a token."""
    ids = tpl.encode(tokenizer, text)
    bounds = {0, len(text)}
    for k in range(1, len(ids)):
        prefix = tokenizer.decode(ids[:k])
        if text.startswith(prefix):  # a token that decodes to part of a character has no bound
            bounds.add(len(prefix))
    return sorted(bounds)


def snap_span(bounds: Sequence[int], a: int, b: int) -> tuple[int, int]:
    """The span (a, b) widened to the nearest token bounds: (4, 7) in "The cat sat" becomes (3, 7),
    " cat", when the tokenizer writes the space with the word."""
    return max(x for x in bounds if x <= a), min(x for x in bounds if x >= b)


def span_segments(text: str, spans: Sequence[tuple[int, int]], slack: int, tokenizer) -> list[tpl.Segment]:
    bounds = token_bounds(tokenizer, text)
    segments: list[tpl.Segment] = []
    pos = 0
    for i, (a, b) in enumerate(sorted(spans)):
        if not (0 <= a < b <= len(text)):
            raise TemplateError(f"span {a}:{b} is empty or outside the text")
        a, b = snap_span(bounds, a, b)
        if a < pos:
            raise TemplateError(f"span {a}:{b} overlaps another (spans are widened to whole tokens)")
        if a > pos:
            segments.append(Fixed(text[pos:a]))
        n = len(tpl.encode(tokenizer, text[a:b]))
        # The span's own text is the typical value the merge check probes the edges with.
        segments.append(Hole(f"span{i}", n + slack, exact=False, probes=(text[a:b],)))
        pos = b
    if pos < len(text):
        segments.append(Fixed(text[pos:]))
    return segments


def find_span(text: str, needle: str) -> tuple[int, int]:
    """Character span of the first occurrence of `needle` in `text` (TemplateError if absent)."""
    start = text.find(needle)
    if not needle or start < 0:
        raise TemplateError(f"{needle!r} does not occur in the text")
    return start, start + len(needle)


def edit_prompt(instruction: str, text: str, include_text: bool = True, context: Sequence[dict] | None = None):
    """The prompt of an edit: the instruction and the text, after the `context` turns if given."""
    prompt = f"{instruction}\n\n{text}" if include_text else instruction
    if context:  # earlier turns of a conversation, then the instruction as the user's message
        prompt = list(context) + [{"role": "user", "content": prompt}]
    return prompt


def span_edit_plan(model, tokenizer, ids: list[int], text: str, spans: Sequence[tuple[int, int]], *,
                   slack: int = 4, strength: float | None = None, options: GenerationOptions) -> CanvasPlan:
    """The plan that rewrites `spans` of `text` after the prompt `ids`, everything else pinned.
    `strength` None: each span is rewritten from noise; a number: each span starts from its own
    tokens (warm start) with that fraction of them renoised (the seed picks which; drawn when
    none is given), and its slack positions from noise."""
    if not text:
        raise TemplateError("nothing to edit: the text is empty")
    lay = tpl.layout(tokenizer, span_segments(text, spans, slack, tokenizer))
    tpl.check_context(lay, model, len(ids))
    warm = None
    if strength is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError("strength must be between 0 and 1")
        options = options.updated(seed=options.seed if options.seed is not None else fresh_seed())
        rng = np.random.default_rng(options.seed)
        warm = [-1] * lay.length
        bounds = token_bounds(tokenizer, text)  # the spans as span_segments widened them
        for h, (a, b) in zip(lay.holes, (snap_span(bounds, a, b) for a, b in sorted(spans))):
            own = tpl.encode(tokenizer, text[a:b])
            keep = rng.random(len(own)) >= strength
            warm[h.start:h.start + len(own)] = [t if k else -1 for t, k in zip(own, keep)]
    plan = layout_plan(model, tokenizer, ids, lay, options, warm=warm)
    plan.reply = lambda out: (out.text, sum(len(d["tokens"]) for d in out.details.values()), "stop")
    return plan


def stream_edit(model, tokenizer, text: str, instruction: str, *, strength: float = 0.5,
                spans: Sequence[tuple[int, int]] | None = None, slack: int = 4, warm_spans: bool = False,
                include_text: bool = True,
                context: Sequence[dict] | None = None, thinking: bool | None = None,
                max_tokens: int | None = None, options: GenerationOptions | None = None, **kwargs: Any) -> Iterator:
    """`edit` as events; the last item is an InfillResult (holes are the spans, if any)."""
    if not text:
        raise TemplateError("nothing to edit: the text is empty")
    c = model.canvas_length
    prompt = edit_prompt(instruction, text, include_text, context)
    opts = canvas_options(options, kwargs, thinking)
    if spans and warm_spans:
        ids = prompt_ids(tokenizer, prompt, opts.thinking)
        yield from run_plan(model, tokenizer, span_edit_plan(model, tokenizer, ids, text, spans, slack=slack,
                                                             strength=strength, options=opts))
        return
    if spans:
        segments = span_segments(text, spans, slack, tokenizer)
        ids, lay = prepare_layout(model, tokenizer, prompt, segments, opts.thinking)
        yield from run_layout(model, tokenizer, ids, lay, opts)
        return
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be between 0 and 1")
    tokens = tpl.encode(tokenizer, text)
    ids = prompt_ids(tokenizer, prompt, opts.thinking)
    n_blocks = max(math.ceil(len(tokens) / c), math.ceil((max_tokens or 0) / c))
    check_fits(model, len(ids), n_blocks * c)  # before a canvas is built (max_tokens may be huge)
    # The seed chooses the renoised positions too: drawn here when none is given.
    opts = opts.updated(seed=opts.seed if opts.seed is not None else fresh_seed(), max_tokens=n_blocks * c)
    rng = np.random.default_rng(opts.seed)
    renoise = rng.random(len(tokens)) < strength
    warm = [-1 if r else t for t, r in zip(tokens, renoise)]
    lay = Layout([Fixed(text)], [-1] * len(tokens), [], [])
    tpl.check_context(lay, model, len(ids))
    states = []
    for b in range(n_blocks):
        part = warm[b * c:(b + 1) * c]
        part = part + [-1] * (c - len(part))
        states.append(CanvasState.from_lists(c, warm=[max(t, 0) for t in part], warm_mask=[t >= 0 for t in part]))
    result = None
    for event in run(model, Request.of(ids, opts, canvases=states), detokenizer=tokenizer.detokenizer):
        if isinstance(event, GenerationResult):
            result = event
        yield event
    yield InfillResult(result.text, {}, {}, result)


def edit(model, tokenizer, text: str, instruction: str, **options: Any) -> InfillResult:
    """Rewrite `text` following `instruction` (the prompt).

    Without `spans`: the canvases start from `text` with a `strength` fraction of positions
    renoised (all positions stay live, as the reference's starting canvas); the reply may end
    early (EOS) and `max_tokens` may add canvases after the text. With `spans` (character
    ranges, see `find_span`): everything outside the spans is pinned, each span is rewritten from
    noise into a hole of up to its token count + `slack` tokens (the template hole rule).
    The prompt is the instruction followed by the text (`include_text=False`: the instruction
    alone; the canvas then carries the text), after the `context` messages if given."""
    out = None
    for item in stream_edit(model, tokenizer, text, instruction, **options):
        out = item
    return out
