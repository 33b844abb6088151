"""Completion with the text after the cursor: the prefix is the prompt, the middle is a hole of at
most `max_tokens` canvas positions, and the suffix is pinned on the canvas right after it, so
the middle is written knowing what follows (an autoregressive model cannot see it while writing).

The reply is the middle alone, by the template hole rule (its tokens up to the first end token).
Only the suffix's start that shares a canvas with the middle can be seen by it (later canvases
are denoised after it), so the suffix is pinned up to the end of the middle's last canvas, with
one more canvas when that would leave fewer than `min(len(suffix), canvas / 4)` of its tokens.
The prefix is raw text (no chat template), as `/v1/completions` takes it.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

from ..diffusion.options import GenerationOptions
from . import template as tpl
from .infill import CanvasPlan, InfillResult, canvas_options, layout_plan, run_plan
from .template import Fixed, Hole, HoleSpan, Layout, TemplateError

DEFAULT_MIDDLE_TOKENS = 64


def completion_ids(tokenizer, prefix: str | Sequence[int]) -> list[int]:
    """The prompt ids of a raw-text prefix (as the server's completions encode a prompt)."""
    if isinstance(prefix, str):
        return list(tokenizer.encode(prefix))
    return [int(t) for t in prefix]


def middle_layout(model, tokenizer, suffix: str, max_tokens: int) -> Layout:
    """The canvas layout: a hole of at most `max_tokens` positions, then the suffix's pinned start.

    The suffix is not checked for merges with the hole (template.check_merges): code after a
    cursor starts anywhere, and a split the tokenizer would not make only costs a little quality."""
    c = model.canvas_length
    limit = model.text.max_position_embeddings
    if not 1 <= max_tokens <= limit:
        raise TemplateError(f"max_tokens must be between 1 and the model's context ({limit}), got {max_tokens}")
    suffix_ids = tpl.encode(tokenizer, suffix) if suffix else []
    if len(suffix_ids) > limit:
        raise TemplateError(f"the suffix is {len(suffix_ids)} tokens, longer than the model's context ({limit})")
    blocks = math.ceil(max_tokens / c)
    room = blocks * c - max_tokens
    if room < min(len(suffix_ids), c // 4):
        room += c
    kept = suffix_ids[:room]
    segments = [Hole("middle", max_tokens, exact=False)] + ([Fixed(tokenizer.decode(kept))] if kept else [])
    holes = [HoleSpan("middle", 0, max_tokens, exact=False)]
    return Layout(segments, [-1] * max_tokens + kept, holes, [(max_tokens, segments[-1].text)] if kept else [])


def complete_plan(model, tokenizer, prefix_ids: list[int], suffix: str, max_tokens: int,
                  options: GenerationOptions) -> CanvasPlan:
    """The plan of a completion between `prefix_ids` (the prompt) and `suffix`; TemplateError
    before any work when it cannot fit."""
    if not prefix_ids:
        raise TemplateError("the prefix is empty: there is nothing to complete after")
    lay = middle_layout(model, tokenizer, suffix, max_tokens)
    tpl.check_context(lay, model, len(prefix_ids))
    plan = layout_plan(model, tokenizer, prefix_ids, lay, options)
    end = tpl.end_ids(model)

    def finish(result) -> InfillResult:
        out = plan.finish(result)
        out.text = out.holes["middle"]  # the reply is the middle alone
        return out

    def visible(tokens: list[int]) -> list[int]:
        middle = tokens[:max_tokens]
        cut = next((i for i, t in enumerate(middle) if t in end), len(middle))
        return middle[:cut]

    def reply(out: InfillResult) -> tuple[str, int, str]:
        d = out.details["middle"]
        return out.text, len(d["tokens"]), "stop" if d["ended"] else "length"

    return CanvasPlan(plan.request, finish, visible, reply)


def stream_complete(model, tokenizer, prefix: str | Sequence[int], suffix: str = "", *,
                    max_tokens: int = DEFAULT_MIDDLE_TOKENS, options: GenerationOptions | None = None,
                    **kwargs: Any) -> Iterator:
    """`complete` as events; the last item is the InfillResult (`.text` the middle)."""
    opts = canvas_options(options, kwargs)
    plan = complete_plan(model, tokenizer, completion_ids(tokenizer, prefix), suffix, max_tokens, opts)
    yield from run_plan(model, tokenizer, plan)


def complete(model, tokenizer, prefix: str | Sequence[int], suffix: str = "", *,
             max_tokens: int = DEFAULT_MIDDLE_TOKENS, **options: Any) -> InfillResult:
    """The text between `prefix` (raw text or ids, no chat template) and `suffix`, at most
    `max_tokens` tokens, written on the canvas with the suffix pinned after it. `.text` is the
    middle; `.details["middle"]["ended"]` says whether it ended before using all its room.
    Options are `stream_generate`'s (`seed`, the sampler's knobs, `mode`, ...)."""
    out = None
    for item in stream_complete(model, tokenizer, prefix, suffix, max_tokens=max_tokens, **options):
        out = item
    return out
