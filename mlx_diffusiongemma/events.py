"""Small result objects yielded by the engine (`stream_generate`) and rendered by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx

THOUGHT_OPEN = "<|channel>thought"
THOUGHT_CLOSE = "<channel|>"


@dataclass
class StepEvent:
    """One denoising step of one block.

    `canvas` is the next decoder input (accepted tokens kept, the rest renoised), `argmax` the
    greedy canvas of this step (the draft; what gets committed when the block stops), `accepted`
    the positions the entropy-bound rule accepted this step, `pinned` the positions whose token
    was given (template text, edit context, frozen positions; None when nothing can be pinned).
    Arrays are `[canvas_length]`.
    """

    block: int  # 0-based block index
    step: int  # 1-based step number within the block
    max_steps: int
    canvas: mx.array
    argmax: mx.array
    accepted: mx.array
    mean_entropy: float
    _decode: Callable[[list[int]], str] | None = field(default=None, repr=False)
    _draft: str | None = field(default=None, repr=False)
    pinned: mx.array | None = None
    live_rows: int | None = None  # fast mode: canvas rows the decoder computed at this step

    @property
    def draft_text(self) -> str:
        """The argmax canvas decoded as one sequence (decoded on first access only)."""
        if self._draft is None:
            self._draft = self._decode(self.argmax.tolist()) if self._decode else ""
        return self._draft

    @property
    def accepted_count(self) -> int:
        return int(self.accepted.sum().item())


@dataclass
class BlockEvent:
    """A committed block: its tokens (cut after the first EOS, EOS kept), and the text delta."""

    block: int
    tokens: list[int]
    text: str  # delta: the deltas of all blocks concatenate to the final text
    steps: int
    stop_reason: str  # "converged" (stable and confident), "step_cap", or "eos"
    converged: bool


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (an EOS was generated) or "length"
    prompt_tokens: int
    prefill_time: float
    prefill_tps: float
    steps_per_block: list[int]
    tokens_per_forward: float
    generation_time: float
    generation_tps: float
    peak_memory_gb: float
    encoded_tokens: int = 0  # prompt tokens the encoder actually ran (fewer with a chat session cache)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generation_tokens(self) -> int:
        return len(self.tokens)

    @property
    def thinking(self) -> str | None:
        return split_thinking(self.text)[0]

    @property
    def answer(self) -> str:
        return split_thinking(self.text)[1]


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thought channel or None, answer) for text in Gemma 4's channel format."""
    start = text.find(THOUGHT_OPEN)
    if start < 0:
        return None, text
    body_start = start + len(THOUGHT_OPEN)
    end = text.find(THOUGHT_CLOSE, body_start)
    if end < 0:  # still thinking (or cut by the length budget)
        return text[body_start:].lstrip("\n"), text[:start]
    thought = text[body_start:end].strip("\n")
    return thought, (text[:start] + text[end + len(THOUGHT_CLOSE):]).lstrip("\n")
