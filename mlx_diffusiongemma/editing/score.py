"""The structured read: option probabilities of a template's slots from ONE decoder pass."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..diffusion.canvas import initial_canvas
from ..diffusion.noise import NoiseSource
from . import template as tpl
from .infill import log_softmax, option_scores, prepare_layout
from .template import Hole, TemplateError


@dataclass
class SlotScore:
    choice: str
    probabilities: dict[str, float]  # over the options, summing to 1
    confidence: float  # probability of the choice
    margin: float  # choice minus the runner-up


@dataclass
class ScoreResult:
    slots: dict[str, SlotScore]
    decoder_passes: int = 1
    seed: int | None = None  # the noise under the slots
    prompt_tokens: int = 0

    @property
    def choice(self) -> str:
        return next(iter(self.slots.values())).choice

    @property
    def probabilities(self) -> dict[str, float]:
        return next(iter(self.slots.values())).probabilities

    @property
    def confidence(self) -> float:
        return next(iter(self.slots.values())).confidence

    def to_json(self) -> dict:
        return {"slots": {k: vars(v) for k, v in self.slots.items()}, "decoder_passes": self.decoder_passes}


def score(model, tokenizer, prompt, options: Sequence[str] | dict[str, Sequence[str]], *,
          template: str = "{{answer}}", seed: int = 0, thinking: bool = False) -> ScoreResult:
    """Read option probabilities from ONE decoder pass, without sampling.

    The template (default: the whole reply is one slot) is put on the first canvas: fixed text
    pinned, each `{{slot}}` as noise, exactly as a denoising loop's first step sees it. One
    decoder pass gives per-position probabilities; an option's score is the log-probability of
    its tokens at the slot's positions and of an end token at the slot's unused ones; the
    probabilities are those scores normalised over the options. `options` is a list (for a
    single slot) or {slot name: options}."""
    segments = tpl.parse(template)
    slot_names = [s.name for s in segments if isinstance(s, Hole)]
    if not isinstance(options, dict):
        if len(slot_names) != 1:
            raise TemplateError(f"the template has {len(slot_names)} slots: give options as {{name: [...]}}")
        options = {slot_names[0]: list(options)}
    if set(options) != set(slot_names):
        raise TemplateError(f"options are given for {sorted(options)}, the template's slots are {sorted(slot_names)}")
    segments = [replace(s, options=tuple(options[s.name])) if isinstance(s, Hole) else s for s in segments]
    ids, lay = prepare_layout(model, tokenizer, prompt, segments, thinking)
    c = model.canvas_length
    if lay.length > c:
        raise TemplateError(f"a scoring template must fit one canvas ({c} tokens); this one has {lay.length}")
    state = tpl.states(lay, c, model.vocab_size)[0]
    noise = NoiseSource(seed)
    canvas = initial_canvas(state, noise.canvas(0, 1, c, model.vocab_size))  # as a block's first step sees it
    cache = model.make_cache()
    model.extend(cache, ids)
    logits = model.denoise(canvas, cache, None)
    logp = log_softmax(logits[0])
    end = tpl.end_ids(model)
    slots = {}
    for h in lay.holes:
        scores = option_scores(logp[h.start:h.start + h.length], h.option_ids, end)
        p = np.exp(scores - np.logaddexp.reduce(scores))
        order = np.argsort(-p)
        probs = {o: float(q) for o, q in zip(h.options, p)}
        best = h.options[int(order[0])]
        runner = float(p[order[1]]) if len(order) > 1 else 0.0
        slots[h.name] = SlotScore(best, probs, float(p[order[0]]), float(p[order[0]]) - runner)
    return ScoreResult(slots, 1, noise.seed, len(ids))
