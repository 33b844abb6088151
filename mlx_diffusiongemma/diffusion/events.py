"""What the engine yields: a `StepEvent` per denoising step, a `BlockEvent` per committed block and a
final `GenerationResult`. Plain data: arrays, numbers and strings, nothing to call back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import mlx.core as mx

from .options import FastOptions, SamplerOptions


@dataclass(frozen=True)
class StepEvent:
    """One denoising step of one block.

    `canvas` is the next decoder input (accepted tokens kept, the rest renoised), `argmax` the
    greedy canvas of this step (the draft; what gets committed when the block stops; decode it
    with `tokenizer.decode(event.argmax.tolist())`), `accepted` the positions the entropy-bound
    rule accepted this step, `pinned` the positions whose token was given when this step ran
    (template text, edit context, frozen positions; None when nothing can be pinned). Arrays are
    `[canvas_length]`.
    """

    block: int  # 0-based block index
    step: int  # 1-based step number within the block
    max_steps: int
    canvas: mx.array
    argmax: mx.array
    accepted: mx.array
    mean_entropy: float
    pinned: mx.array | None = None
    live_rows: int | None = None  # fast mode: canvas rows the decoder computed at this step

    @property
    def accepted_count(self) -> int:
        return int(self.accepted.sum().item())


@dataclass(frozen=True)
class BlockEvent:
    """A committed block: its tokens (cut after the first EOS, EOS kept), and the text delta."""

    block: int
    tokens: list[int]
    text: str  # delta: the deltas of all blocks concatenate to the final text
    steps: int
    stop_reason: str  # "converged" (stable and confident), "step_cap", or "eos"
    converged: bool


@dataclass(frozen=True)
class GenerationResult:
    """The whole generation: its text and tokens, and what it took."""

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
    seed: int | None = None  # the seed the noise came from (drawn fresh when none was given)
    decoder_passes: int = 0
    host_syncs: int = 0  # reads of the device by the host during denoising
    sampler: SamplerOptions | None = None  # the sampler's knobs as used (the checkpoint's defaults filled in)
    fast: FastOptions | None = None  # the fast-mode techniques, None on the exact path
    encoded_canvases: list[list[int]] = field(default_factory=list)  # committed canvases written to the cache
    live_rows: list[list[int]] | None = None  # fast mode: rows computed per step, per block
    padded_rows: list[list[int]] | None = None  # fast mode: rows the decoder ran per step (with padding)

    @property
    def mode(self) -> str:
        return "exact" if self.fast is None else "fast"

    @property
    def generation_tokens(self) -> int:
        return len(self.tokens)

    @property
    def thinking(self) -> str | None:
        return _split(self.text)[0]

    @property
    def answer(self) -> str:
        return _split(self.text)[1]

    def to_json(self) -> dict:
        """The result as JSON-ready values (what `dgemma generate --json` prints)."""
        return {
            "text": self.text,
            "thinking": self.thinking,
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "tokens": self.generation_tokens,
            "token_ids": list(self.tokens),
            "prompt_tokens": self.prompt_tokens,
            "prefill_time": self.prefill_time,
            "prefill_tps": self.prefill_tps,
            "steps_per_block": list(self.steps_per_block),
            "tokens_per_forward": self.tokens_per_forward,
            "generation_time": self.generation_time,
            "generation_tps": self.generation_tps,
            "peak_memory_gb": self.peak_memory_gb,
            "seed": self.seed,
            "mode": self.mode,
            "decoder_passes": self.decoder_passes,
            "sampler": asdict(self.sampler) if self.sampler is not None else None,
            **({"fast": asdict(self.fast)} if self.fast is not None else {}),
        }


def _split(text: str):
    # Imported on use: prompts.channels imports mlx-lm's tool-call parser, and with it mlx-lm and
    # transformers, which the command line's views (that import these events) need only later.
    from ..prompts.channels import split_thinking

    return split_thinking(text)
