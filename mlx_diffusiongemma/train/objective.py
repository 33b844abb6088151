"""The block-diffusion training objective, on the inference passes themselves.

What is trained is what runs: the context (prompt, then the clean earlier canvases of the answer)
goes through `Model.encode_chunk` into a `PromptCache` exactly as at inference, and the canvas
through `Model.denoise`. The recipe (uniform-state corruption, which the sampler's renoising with
uniform ids implies):

1. the target canvas is the answer's slice for that canvas, padded with EOS to the canvas length;
2. corrupt it: per example t ~ U(t_eps, 1); each position independently becomes a uniformly random
   vocabulary id with probability t. Positions an example pins (a template's fixed text) stay clean,
   as the engine pins them at inference (canvas.py); with no pins this is the recipe unchanged;
3. self-conditioning with probability 1/2 per example: a first decoder pass without gradient on the
   same noisy canvas, its logits divided by a temperature drawn from U(t_min, t_max) of the sampler,
   is the self-conditioning input of the trained pass (the other examples get zeros, through the
   reference's `self_conditioning_mask`);
4. cross-entropy over every canvas position against the clean canvas.

The reference has no loss of its own; `tests/test_train_objective.py` checks that this loss equals
cross-entropy computed from the `transformers` model's logits on the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

# Bounds on what one training item may hold: a stranger's data file must not exhaust memory.
MAX_CONTEXT = 16_384


@dataclass(frozen=True)
class Example:
    """One training conversation: the rendered prompt (ending with the model-turn header) and
    the answer tokens (ending with the turn-end / EOS token)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    # Optional, per answer token: True where inference would pin the token (a template's fixed
    # text), so the corruption leaves it clean and the model learns to fill around given text.
    answer_pinned: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class CanvasItem:
    """What one decoder pass is trained on: the causal context and the clean target canvas."""

    context: tuple[int, ...]
    target: tuple[int, ...]
    pinned: tuple[bool, ...] | None = None  # per target position: never corrupted


def canvas_items(example: Example, canvas_length: int, eos_id: int, max_canvases: int | None = None) -> list[CanvasItem]:
    """Split an answer into canvases: canvas k's context is the prompt plus the clean canvases
    0..k-1 (as the engine encodes committed canvases), its target the k-th slice of the answer
    padded with `eos_id`. An answer that ends exactly at a canvas boundary gets no extra canvas of
    padding (generation stops once a committed canvas holds an EOS token)."""
    if not example.prompt_ids:
        raise ValueError("an example needs a non-empty prompt")
    answer = list(example.answer_ids)
    if example.answer_pinned is not None and len(example.answer_pinned) != len(answer):
        raise ValueError("answer_pinned needs one entry per answer token")
    n = max(1, math.ceil(len(answer) / canvas_length))
    if max_canvases is not None:
        n = min(n, max_canvases)
    items = []
    for k in range(n):
        piece = answer[k * canvas_length : (k + 1) * canvas_length]
        target = piece + [eos_id] * (canvas_length - len(piece))
        context = list(example.prompt_ids) + answer[: k * canvas_length]
        if len(context) > MAX_CONTEXT:
            raise ValueError(f"context of {len(context)} tokens is over the limit of {MAX_CONTEXT}")
        pinned = None
        if example.answer_pinned is not None:
            part = list(example.answer_pinned[k * canvas_length : (k + 1) * canvas_length])
            pinned = tuple(part + [False] * (canvas_length - len(part)))  # the padding stays live
        items.append(CanvasItem(tuple(context), tuple(target), pinned))
    return items


@dataclass
class Batch:
    context: mx.array  # [B, P] int32, left-padded
    context_valid: mx.array  # [B, P] bool, False at padding
    target: mx.array  # [B, C] int32
    # Counted on the host when the batch is built, so the training step never waits on the device
    # for them: real context tokens, and whether any context is padded.
    context_tokens: int | None = None
    padded: bool | None = None
    pinned: mx.array | None = None  # [B, C] bool, positions left clean by the corruption; None: none

    def __post_init__(self):
        if self.context_tokens is None or self.padded is None:
            n = int(self.context_valid.sum().item())
            self.context_tokens = n
            self.padded = n != self.context_valid.size

    @property
    def size(self) -> int:
        return self.target.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens processed (real context tokens plus canvas positions)."""
        return self.context_tokens + self.target.size


def make_batch(items: Sequence[CanvasItem], pad_id: int = 0, multiple: int = 8) -> Batch:
    """Left-pad the contexts to a common length (a multiple of `multiple`, so that few distinct
    shapes occur) and stack the targets."""
    width = max(len(it.context) for it in items)
    width = ((width + multiple - 1) // multiple) * multiple
    ctx = [[pad_id] * (width - len(it.context)) + list(it.context) for it in items]
    valid = [[False] * (width - len(it.context)) + [True] * len(it.context) for it in items]
    real = sum(len(it.context) for it in items)
    pinned = None
    if any(it.pinned is not None and any(it.pinned) for it in items):
        pinned = mx.array([list(it.pinned) if it.pinned is not None else [False] * len(it.target) for it in items])
    return Batch(mx.array(ctx, dtype=mx.int32), mx.array(valid), mx.array([list(it.target) for it in items], dtype=mx.int32),
                 context_tokens=real, padded=real != width * len(items), pinned=pinned)


def encode_context(model, batch: Batch):
    """The encoder pass over the context, one chunk, differentiable (no intermediate eval)."""
    cache = model.make_cache()
    model.encode_chunk(cache, batch.context, batch.context_valid if batch.padded else None)
    return cache


@dataclass
class Corruption:
    """The random choices of one loss evaluation (explicit, so a test can replay them)."""

    noisy: mx.array  # [B, C] int32 corrupted canvas
    self_condition: mx.array  # [B] bool
    temperature: mx.array  # [B] float32, divides the self-conditioning logits


def corrupt(key: mx.array, target: mx.array, vocab_size: int, *, t_eps: float = 1e-3,
            t_min: float = 0.4, t_max: float = 0.8, self_cond_prob: float = 0.5,
            pinned: mx.array | None = None) -> Corruption:
    """Uniform-state corruption plus the self-conditioning draws of one batch. `pinned` (`[B, C]`
    bool) marks positions that stay clean; the random draws are the same with or without it."""
    b, c = target.shape
    k_t, k_mask, k_ids, k_sc, k_temp = mx.random.split(key, 5)
    t = mx.random.uniform(t_eps, 1.0, (b, 1), key=k_t)
    replace = mx.random.uniform(shape=(b, c), key=k_mask) < t
    if pinned is not None:
        replace = replace & ~pinned
    noise = mx.random.randint(0, vocab_size, (b, c), dtype=mx.int32, key=k_ids)
    noisy = mx.where(replace, noise, target.astype(mx.int32))
    self_condition = mx.random.uniform(shape=(b,), key=k_sc) < self_cond_prob
    temperature = mx.random.uniform(t_min, t_max, (b,), key=k_temp)
    return Corruption(noisy, self_condition, temperature)


def canvas_logits(model, cache, corruption: Corruption) -> mx.array:
    """The trained decoder pass: float32 logits `[B, C, V]`, self-conditioned per example."""
    self_cond = None
    # One host read per step (a [B] bool): a batch where no example self-conditions skips the
    # extra no-gradient decoder pass, about a third of a step's compute.
    if bool(corruption.self_condition.any().item()):
        first = mx.stop_gradient(model.denoise(corruption.noisy, cache))
        self_cond = first / corruption.temperature[:, None, None]
    return model.denoise(corruption.noisy, cache, self_cond, self_conditioning_mask=corruption.self_condition)


def cross_entropy(logits: mx.array, target: mx.array) -> mx.array:
    """Mean cross-entropy over every canvas position of every example."""
    return nn.losses.cross_entropy(logits, target, reduction="mean")


def diffusion_loss(model, batch: Batch, key: mx.array, *, t_min: float = 0.4, t_max: float = 0.8,
                   self_cond_prob: float = 0.5) -> tuple[mx.array, mx.array]:
    """(mean loss, number of target positions) of one batch; differentiable in the model's
    trainable parameters. `t_min`/`t_max` are the sampler's temperatures (generation_config)."""
    corruption = corrupt(key, batch.target, model.vocab_size, t_min=t_min, t_max=t_max,
                         self_cond_prob=self_cond_prob, pinned=batch.pinned)
    cache = encode_context(model, batch)
    logits = canvas_logits(model, cache, corruption)
    return cross_entropy(logits, batch.target), mx.array(batch.target.size)
