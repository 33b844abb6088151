"""The exact denoiser: the reference's step, every canvas position computed at every step.

Its decoder pass is `Model.denoise` over the whole canvas, self-conditioned on the previous step's
processed logits (exact, or from their top-k with `self_conditioning_top_k`). Such passes of
several requests can be batched into one (`block.run_calls`), which the server does.
"""

from __future__ import annotations

import mlx.core as mx

from ..model.cache import PromptCache
from . import sampler
from .block import DenoiseCall, StepOutput, join_rows
from .canvas import CanvasState


class ExactDenoiser:
    needs_state = False

    def __init__(self, model, cache: PromptCache, self_conditioning_top_k: int | None = None):
        self.model = model
        self.cache = cache
        self.top_k = self_conditioning_top_k

    def begin(self, block: int, state: CanvasState | None) -> "_ExactBlock":
        return _ExactBlock(self)


class _ExactBlock:
    hooks = ()
    defers_sync = True
    live_rows = None
    padded_rows = None

    def __init__(self, denoiser: ExactDenoiser):
        self.d = denoiser
        self.self_conditioning: mx.array | None = None  # the previous step's processed logits
        self.processed: mx.array | None = None

    def call(self, canvas: mx.array, state: CanvasState | None) -> DenoiseCall:
        return DenoiseCall(canvas, self.d.cache, self.self_conditioning, self.d.top_k)

    def sample(self, logits, call, canvas, argmax, t, u, noise_ids, state, entropy_bound) -> StepOutput:
        dtype = self.d.model.embed_dtype

        def keep(processed, _):  # the next step's self-conditioning; hooks (a state) also read the logits
            return [processed.astype(dtype)] if state is None else [processed.astype(dtype), processed]

        if state is None:  # the reference step, op for op
            res, kept = sampler.chunked_step(logits, canvas, t, u, noise_ids, entropy_bound, keep=keep)
            counted = None
        else:
            allowed = None if state.allowed is None else state.allowed[None]
            res, kept = sampler.chunked_step(logits, canvas, t, u, noise_ids, entropy_bound, keep=keep,
                                             pinned=state.pinned[None], ids=state.ids[None], allowed=allowed)
            counted = ~state.pinned[None]  # the stop test averages over LIVE positions
        self.processed = join_rows([k[0] for k in kept])
        processed = None if state is None else join_rows([k[1] for k in kept])[0]
        return StepOutput(res.next_canvas, res.argmax, res.accepted, res.token_entropy, counted,
                          processed_logits=processed)

    def advance(self, stopped: mx.array, deferred: bool) -> None:
        processed = self.processed
        if deferred and self.self_conditioning is not None:
            processed = mx.where(stopped[:, None, None], self.self_conditioning, processed)
        self.self_conditioning = processed

    def final_call(self, argmax, state) -> None:
        return None  # the reference commits the argmax canvas as it stands

    def repaired(self, logits, call, argmax, state) -> mx.array:
        return argmax

    def arrays(self) -> list[mx.array]:
        return [] if self.self_conditioning is None else [self.self_conditioning]
