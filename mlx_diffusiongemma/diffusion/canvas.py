"""Canvas position states: one per-position state drives pins, warm starts, freezing and streaming.

API note (for editing, fast mode and streaming)
-----------------------------------------------
Every canvas position is in one of three states:

* LIVE   -- denoised exactly as the reference sampler does.
* PINNED -- its token is given (`CanvasState.ids`). It is in the canvas from the first step, counts as
  accepted at every step, is never renoised, and its argmax (what gets committed) is the given token.
  For the entropy-bound acceptance its entropy counts as 0, so it never consumes the budget; the
  lowest-entropy LIVE position is therefore still always accepted (progress is guaranteed).
  Stop test: the mean entropy of the stable-and-confident rule averages over LIVE positions only
  (a canvas with every position pinned counts as confident). With no pins that is exactly the
  reference mean. (Fast mode, by default, also counts FROZEN positions, as certain ones: see
  `FastOptions.stop_mean_over_canvas`.)
* FROZEN -- a position a schedule declared settled: it is PINNED (`pinned` is True, `ids` holds the
  token it settled on) and also flagged in `frozen`, which tells the decoder it MAY reuse the
  position's stale per-layer K/V instead of recomputing it (fast mode). The sampler treats
  FROZEN exactly like PINNED (except that fast mode's `bound_window` counts the frozen neighbours of
  live positions in the entropy bound with their current entropy, their token kept, and its
  `thaw` makes one the bound rejects LIVE again: `thaw(state, mask)`). Invariant: `frozen` implies
  `pinned`.

`CanvasState` (per block, arrays of length C = canvas_length) holds `pinned [C] bool`,
`ids [C] int32`, `frozen [C] bool`, optionally a warm start (`warm [C] int32` with `warm_mask
[C] bool`: those positions start from `warm` instead of noise; pinned positions start from `ids`)
and optionally `allowed`: a `[C, V] bool` mask of the tokens each position may take (logits of
the others are set to -inf before the sampler; used for constrained holes, e.g. JSON values).

How the engine uses it (`engine.Request`):

* `Request.canvases`: per-block states, a `{block index: CanvasState}` mapping or a sequence
  (None entries and blocks past the end are plain LIVE canvases).
* `Request.hooks`: callables run after every denoising step, `hook(view: StepView) ->
  CanvasState | None`. Returning a state replaces the block's state from the next step on (pin or
  freeze more positions, e.g. `freeze(state, mask, view.argmax)`); the next canvas and the draft
  are forced to the new pins at once. Hooks get device arrays and should not force host syncs if they care
  about speed. With `stop_check_interval` k > 1 a hook may also see up to k - 1 steps computed
  after the block stopped; those steps are discarded (the state is frozen on the device).
* `Request.stop_at_eos` (default True): False keeps whole canvases (templates: an end token
  inside a hole must not end the generation).

Every path runs the one step kernel, `sampler.step`: pins, padding and allowed-token masks are
its arguments. The exact path is a block with no state and no hooks: the engine then calls it
without them, the reference step op for op.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Sequence

import mlx.core as mx

__all__ = [
    "CanvasState",
    "StepView",
    "StepHook",
    "live_state",
    "pin",
    "freeze",
    "thaw",
    "initial_canvas",
    "state_for",
    "check_state",
]


@dataclass(frozen=True)
class CanvasState:
    """Position states of one canvas (see the module docstring). Arrays are `[C]` unless noted."""

    pinned: mx.array  # bool; True for PINNED and FROZEN positions
    ids: mx.array  # int32; the token of each pinned position (ignored elsewhere)
    frozen: mx.array  # bool; subset of `pinned`: the decoder may reuse the position's stale K/V
    warm: mx.array | None = None  # int32; warm-start tokens
    warm_mask: mx.array | None = None  # bool; positions that start from `warm` (None: all of them)
    allowed: mx.array | None = None  # [C, V] bool; tokens each position may take (None: all)

    @property
    def length(self) -> int:
        return self.pinned.shape[0]

    @classmethod
    def from_lists(cls, length: int, pins: dict[int, int] | None = None, warm: Sequence[int] | None = None,
                   warm_mask: Sequence[bool] | None = None, allowed: mx.array | None = None) -> "CanvasState":
        """A state from host values: `pins` maps canvas positions to token ids."""
        pins = pins or {}
        for pos in pins:
            if not 0 <= pos < length:
                raise ValueError(f"pinned position {pos} is outside the canvas (0..{length - 1})")
        pinned = [i in pins for i in range(length)]
        ids = [int(pins.get(i, 0)) for i in range(length)]
        if warm is not None and len(warm) != length:
            raise ValueError(f"warm canvas has {len(warm)} tokens, the canvas has {length}")
        if warm_mask is not None and len(warm_mask) != length:
            raise ValueError(f"warm mask has {len(warm_mask)} entries, the canvas has {length}")
        return cls(
            pinned=mx.array(pinned, dtype=mx.bool_),
            ids=mx.array(ids, dtype=mx.int32),
            frozen=mx.zeros((length,), dtype=mx.bool_),
            warm=None if warm is None else mx.array(list(warm), dtype=mx.int32),
            warm_mask=None if warm_mask is None else mx.array(list(warm_mask), dtype=mx.bool_),
            allowed=allowed,
        )


def live_state(length: int) -> CanvasState:
    """Every position LIVE (behaves exactly as no state at all)."""
    return CanvasState.from_lists(length)


def pin(state: CanvasState, mask: mx.array, ids: mx.array) -> CanvasState:
    """`state` with the positions of `mask` pinned to `ids` (already pinned ones keep their token)."""
    new = mask & ~state.pinned
    return replace(state, pinned=state.pinned | mask, ids=mx.where(new, ids.astype(mx.int32), state.ids))


def freeze(state: CanvasState, mask: mx.array, ids: mx.array) -> CanvasState:
    """`state` with the positions of `mask` FROZEN at `ids` (normally the step's argmax)."""
    return replace(pin(state, mask, ids), frozen=state.frozen | mask)


def thaw(state: CanvasState, mask: mx.array) -> CanvasState:
    """`state` with the FROZEN positions of `mask` LIVE again (the request's own pins stay)."""
    mask = mask & state.frozen
    return replace(state, pinned=state.pinned & ~mask, frozen=state.frozen & ~mask)


class StepView(NamedTuple):
    """What a hook sees after one step of one block (device arrays, `[C]`)."""

    block: int
    step: int  # 1-based
    max_steps: int
    state: CanvasState
    argmax: mx.array  # this step's argmax canvas (pinned positions hold their pins)
    canvas: mx.array  # next decoder input
    accepted: mx.array  # bool, accepted this step (pinned positions always)
    token_entropy: mx.array  # float32; 0 at pinned positions
    stopped: mx.array  # [] bool; True once the block has stopped (steps computed past it are discarded)
    processed_logits: mx.array | None = None  # [C, V] float32, this step's temperature-scaled logits
    gap: mx.array | None = None  # [C] float32 top-2 gap of processed logits (fast mode; inf where not computed)
    step_input: mx.array | None = None  # [C] int32, the canvas this step's decoder pass read


StepHook = Callable[[StepView], "CanvasState | None"]


def initial_canvas(state: CanvasState | None, noise_canvas: mx.array) -> mx.array:
    """The first decoder input of a block, `[1, C]`: noise, warm tokens where warm, pins where pinned.

    The noise canvas is always drawn first (the reference draws it even when a starting canvas is
    given), so a warm start does not shift the random stream of anything after it.
    """
    if state is None:
        return noise_canvas
    canvas = noise_canvas[0]
    if state.warm is not None:
        canvas = state.warm if state.warm_mask is None else mx.where(state.warm_mask, state.warm, canvas)
    canvas = mx.where(state.pinned, state.ids, canvas)
    return canvas[None].astype(mx.int32)


def state_for(canvases, block: int) -> CanvasState | None:
    """The state a request gives `block` (a mapping or a sequence; None when absent)."""
    if canvases is None:
        return None
    if isinstance(canvases, dict):
        return canvases.get(block)
    return canvases[block] if block < len(canvases) else None


def check_state(state: CanvasState, canvas_length: int, vocab_size: int) -> None:
    """Reject, before any work, a state that does not fit the model."""
    if state.length != canvas_length:
        raise ValueError(f"canvas state has {state.length} positions, the model's canvas has {canvas_length}")
    ids = state.ids.tolist()
    pinned = state.pinned.tolist()
    if any(p and not 0 <= i < vocab_size for p, i in zip(pinned, ids)):
        raise ValueError(f"pinned token id outside the vocabulary (0..{vocab_size - 1})")
    if state.warm is not None and not all(0 <= i < vocab_size for i in state.warm.tolist()):
        raise ValueError(f"warm-start token id outside the vocabulary (0..{vocab_size - 1})")
    if state.allowed is not None:
        if tuple(state.allowed.shape) != (canvas_length, vocab_size):
            raise ValueError(f"allowed mask must be [{canvas_length}, {vocab_size}]")
        if not bool(mx.all(mx.any(state.allowed, axis=-1)).item()):
            raise ValueError("a constrained position allows no token at all")
