"""Streaming inside a canvas: emit the settled left part of the block while the rest denoises.

A step hook (canvas.py's `Request.hooks`) looks at each step's draft. The positions at the left
end of the canvas whose argmax has stayed the same for `stability` consecutive steps and whose
entropy is below `max_entropy` are *settled*; the longest run of settled positions after what
was already emitted is emitted and PINNED (canvas.py), so the engine can never change it: the
committed block starts with exactly the emitted tokens, and the text a client received is never
taken back. The rest of the canvas keeps denoising (pinned positions count as accepted and
certain, so they neither consume the entropy budget nor hold back the stop test).

The cost: a pinned token was decided before the block converged, so the block can differ from
what block-only streaming would have committed (docs/server.md measures it). The gain: the first
text of a block leaves after a few steps instead of after the whole block.
"""

from __future__ import annotations

import mlx.core as mx

from ..diffusion.canvas import StepView, pin

DEFAULT_STABILITY = 2  # the argmax unchanged over the last 2 steps
DEFAULT_MAX_ENTROPY = 0.5  # nats


class PrefixStreamer:
    """A step hook for one request; `take()` returns the tokens emitted since the last call."""

    def __init__(self, eos_ids, max_tokens: int, stability: int = DEFAULT_STABILITY,
                 max_entropy: float = DEFAULT_MAX_ENTROPY):
        self.eos = set(eos_ids)
        self.room = max_tokens  # tokens the request may still produce (the worker lowers it per block)
        self.stability = max(1, stability)
        self.max_entropy = max_entropy
        self.block = -1
        self.emitted: list[int] = []  # tokens of the current block emitted so far
        self._pending: list[int] = []
        self._prev: mx.array | None = None
        self._streak: mx.array | None = None
        self._closed = False  # an EOS was emitted, or the room is used up: nothing more this block

    def take(self) -> list[int]:
        out, self._pending = self._pending, []
        return out

    def emitted_in(self, block: int) -> list[int]:
        return self.emitted if block == self.block else []

    def __call__(self, view: StepView):
        if view.block != self.block:
            self.block, self.emitted, self._prev, self._closed = view.block, [], None, False
        argmax = view.argmax
        if self._prev is None:
            streak = mx.zeros(argmax.shape, dtype=mx.int32)
        else:
            streak = mx.where(argmax == self._prev, self._streak + 1, 0)
        self._prev, self._streak = argmax, streak
        if self._closed:
            return None
        settled = view.state.pinned | ((streak >= self.stability - 1) & (view.token_entropy < self.max_entropy))
        flags = settled.tolist()
        n = len(self.emitted)
        end = n
        while end < len(flags) and flags[end]:
            end += 1
        end = min(end, n + max(0, self.room - n))
        if end <= n or bool(view.stopped.item()):
            return None  # nothing new (a stopped block is committed whole right after this step)
        ids = argmax.tolist()
        new = ids[n:end]
        for i, t in enumerate(new):
            if t in self.eos:  # the reply ends here: the rest of the canvas will be cut at commit
                new = new[: i + 1]
                self._closed = True
                break
        end = n + len(new)
        if end >= self.room:
            self._closed = True
        self.emitted += new
        self._pending += new
        positions = mx.arange(argmax.shape[0])
        return pin(view.state, (positions >= n) & (positions < end), argmax)
