"""Every random number of a generation, from one seed, in the reference's order."""

from __future__ import annotations

import mlx.core as mx

from . import sampler
from .options import MAX_BLOCKS, MAX_STEPS, check_seed, fresh_seed


class NoiseSource:
    """All randomness of a generation from one seed, with a key per (block, step).

    Keys are derived from their position, not from a running chain, so steps computed and then
    discarded (see `Request.stop_check_interval`) never shift the noise of later steps.
    Consumption order matches the reference: the canvas init, then per step the draw's uniforms
    and the renoise ids.
    """

    def __init__(self, seed: int | None = None):
        seed = check_seed(fresh_seed() if seed is None else seed)
        self.seed = seed
        self._base = mx.random.key(seed)
        self._block_keys: dict[int, mx.array] = {}

    def _key(self, block: int, index: int) -> mx.array:
        # Blocks and steps per block are bounded (max_tokens / canvas, max_denoising_steps), so
        # fixed-size splits give every position its own key.
        if block not in self._block_keys:
            self._block_keys[block] = mx.random.split(self._base, MAX_BLOCKS)[block % MAX_BLOCKS]
        return mx.random.split(self._block_keys[block], MAX_STEPS + 1)[index]

    def canvas(self, block: int, batch: int, length: int, vocab: int) -> mx.array:
        return sampler.random_canvas(self._key(block, 0), batch, length, vocab)

    def step(self, block: int, step: int, batch: int, length: int, vocab: int) -> tuple[mx.array, mx.array]:
        """(uniforms for the draw, renoise ids) of 1-based `step` of `block`."""
        k_draw, k_renoise = mx.random.split(self._key(block, step))
        return sampler.sample_uniforms(k_draw, (batch, length)), sampler.random_canvas(k_renoise, batch, length, vocab)
