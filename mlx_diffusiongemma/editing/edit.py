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
from .infill import InfillResult, canvas_options, prepare_layout, run_layout
from .template import Fixed, Hole, Layout, TemplateError


def _span_segments(text: str, spans: Sequence[tuple[int, int]], slack: int, tokenizer) -> list[tpl.Segment]:
    spans = sorted(spans)
    segments: list[tpl.Segment] = []
    pos = 0
    for i, (a, b) in enumerate(spans):
        if not (0 <= a < b <= len(text)) or a < pos:
            raise TemplateError(f"span {a}:{b} is empty, outside the text or overlaps another")
        if a > pos:
            segments.append(Fixed(text[pos:a]))
        n = len(tpl.encode(tokenizer, text[a:b]))
        segments.append(Hole(f"span{i}", n + slack, exact=False))
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


def stream_edit(model, tokenizer, text: str, instruction: str, *, strength: float = 0.5,
                spans: Sequence[tuple[int, int]] | None = None, slack: int = 4, include_text: bool = True,
                context: Sequence[dict] | None = None, thinking: bool | None = None,
                max_tokens: int | None = None, options: GenerationOptions | None = None, **kwargs: Any) -> Iterator:
    """`edit` as events; the last item is an InfillResult (holes are the spans, if any)."""
    if not text:
        raise TemplateError("nothing to edit: the text is empty")
    c = model.canvas_length
    prompt = f"{instruction}\n\n{text}" if include_text else instruction
    if context:  # earlier turns of a conversation, then the instruction as the user's message
        prompt = list(context) + [{"role": "user", "content": prompt}]
    opts = canvas_options(options, kwargs, thinking)
    if spans:
        segments = _span_segments(text, spans, slack, tokenizer)
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
