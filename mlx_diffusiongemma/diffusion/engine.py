"""The generation loop: prefill, then per block denoise until stop or cap, commit, extend. Yields events.

This is the reference `generate` (transformers 5.23, `DiffusionGemmaGenerationMixin.generate`)
for one sequence, written as a generator. Randomness comes from a `NoiseSource` consumed in the
reference's order (canvas init; per step: the multinomial draw's uniforms, then the renoise ids),
so a test can replay the same stream through the reference. Each block is denoised by
`block.denoise_block` with the denoiser the request asks for: exact (`exact.py`) or fast
(`fast.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

import mlx.core as mx

from ..errors import ContextLengthError
from ..model.cache import PromptCache
from . import sampler
from .block import DecoderCall, denoise_block
from .canvas import CanvasState, StepHook, check_state, state_for
from .events import BlockEvent, GenerationResult, StepEvent
from .exact import ExactDenoiser
from .fast import FastDenoiser
from .noise import NoiseSource
from .options import FastOptions, GenerationOptions


@dataclass(frozen=True)
class Request(GenerationOptions):
    """One generation as the engine takes it: the prompt ids, the options (`GenerationOptions`'s
    fields, given by keyword) and what the canvas powers add."""

    prompt_ids: list[int]
    # A request built by hand runs the reference path unless it names fast mode's techniques: the
    # engine's requests say exactly what runs. The faces build theirs from `GenerationOptions`,
    # whose default is fast mode (`Request.of`).
    fast: FastOptions | None = field(default=None, kw_only=True)
    # Canvas position states (canvas.py): per-block pins / warm starts / allowed tokens, as a
    # {block: CanvasState} mapping or a sequence; per-step hooks that may pin or freeze more.
    # None / () is the exact reference path.
    canvases: Mapping[int, CanvasState] | Sequence[CanvasState | None] | None = None
    hooks: tuple[StepHook, ...] = ()
    # False: commit whole canvases and never stop at an EOS (template filling: an end token
    # inside a hole must not cut the pinned text after it).
    stop_at_eos: bool = True
    # Images of the prompt (`processor.ProcessedImage`, in prompt order): their soft tokens fill
    # the prompt's image token positions (already expanded: <boi>, n image tokens, <eoi>).
    images: Sequence[Any] = ()

    @classmethod
    def of(cls, prompt_ids: list[int], options: GenerationOptions, **inputs: Any) -> "Request":
        """The request for `prompt_ids` with `options` and the other inputs (canvases, hooks, ...)."""
        return cls(prompt_ids, **inputs, **{f.name: getattr(options, f.name) for f in fields(GenerationOptions)})


def request_positions(model, prompt_len: int, max_tokens: int) -> int:
    """Positions a request's cache holds at most: the prompt plus every canvas of the reply."""
    c = model.canvas_length
    return prompt_len + math.ceil(max_tokens / c) * c


def check_fits(model, prompt_len: int, max_tokens: int, cached: int = 0) -> None:
    """Reject, before any work, a request whose prompt plus canvases cannot fit the context, or
    the memory MLX can use here beside the weights (the loader's `model.memory_plan`;
    `MemoryLimitError`)."""
    c = model.canvas_length
    need = request_positions(model, cached + prompt_len, max_tokens)
    limit = model.text.max_position_embeddings
    if need > limit:
        error = ContextLengthError(
            f"prompt ({cached + prompt_len} tokens) plus {math.ceil(max_tokens / c)} canvas(es) of {c} "
            f"needs {need} positions; the model's context is {limit}. Shorten the prompt or lower max_tokens."
        )
        error.need, error.limit = need, limit  # a chat front end words its own advice (/reset)
        raise error
    plan = getattr(model, "memory_plan", None)
    if plan is not None:
        plan.check_request(need)


def max_tokens_of(model, request: GenerationOptions) -> int:
    """The request's reply length, or the checkpoint's default (`max_new_tokens`)."""
    return request.max_tokens if request.max_tokens is not None else model.generation.max_new_tokens


def run(
    model,
    request: Request,
    *,
    cache: PromptCache | None = None,
    detokenizer: Any = None,
    noise: NoiseSource | None = None,
    external_decoder: bool = False,
) -> Iterator[StepEvent | BlockEvent | GenerationResult | DecoderCall]:
    """Generate for one prompt. `cache` (optional) already holds a prefix: only
    `request.prompt_ids` are encoded after it; the cache ends holding every committed block but
    the last. Closing the generator stops the work (cancellation). With `external_decoder` the
    generator also yields each decoder pass it needs (a `block.DecoderCall`) and expects the logits
    sent back; the calls say which can be batched with other requests' (`block.run_calls` runs a
    list of them). Nothing else changes."""
    defaults = model.generation
    opts = request.sampler.resolve(defaults)
    eos = mx.array(list(defaults.eos_token_ids), dtype=mx.int32)
    pad = defaults.pad_token_id
    c = model.canvas_length
    max_tokens = max_tokens_of(model, request)
    if not request.prompt_ids and (cache is None or cache.length == 0):
        raise ValueError("empty prompt")
    check_fits(model, len(request.prompt_ids), max_tokens, cache.length if cache else 0)
    n_blocks = math.ceil(max_tokens / c)
    for block in range(n_blocks):
        state = state_for(request.canvases, block)
        if state is not None:
            check_state(state, c, model.vocab_size)
    if request.images and not model.has_vision:
        raise ValueError("this model has no vision tower (a text-only checkpoint, or loaded text-only); "
                         "it cannot read images")
    noise = noise or NoiseSource(request.seed)

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if cache is None:
        cache = model.make_cache()
    if request.prompt_ids:
        features = [model.encode_image(im.pixel_values, im.position_ids, im.grid) for im in request.images]
        model.extend(cache, request.prompt_ids, chunk_size=request.prefill_chunk, image_features=features or None)
    mx.eval(cache.state())
    prefill_time = time.perf_counter() - t0
    t1 = time.perf_counter()

    if request.fast is None:
        denoiser = ExactDenoiser(model, cache, request.self_conditioning_top_k)
    else:
        denoiser = FastDenoiser(model, cache, request.fast, tuple(defaults.eos_token_ids), request.stop_at_eos)
    if detokenizer is not None:
        detokenizer.reset()
    tokens: list[int] = []
    steps_per_block: list[int] = []
    passes = syncs = 0
    encoded: list[list[int]] = []  # committed canvases written to the cache (all but the last)
    eos_set = set(defaults.eos_token_ids)
    valid = 0  # generated non-pad tokens up to the first EOS: the reference's tokens_per_forward numerator
    finish = "length"
    live_rows: list[list[int]] = []  # fast mode: rows computed per step, per block
    padded_rows: list[list[int]] = []
    for block in range(n_blocks):
        outcome = yield from denoise_block(model, block, opts, request, noise, denoiser, external_decoder)
        argmax, steps, converged = outcome.argmax, outcome.steps, outcome.converged
        passes += steps
        syncs += outcome.syncs
        steps_per_block.append(steps)
        if outcome.live_rows is not None:
            live_rows.append(outcome.live_rows)
            padded_rows.append(outcome.padded_rows)
        committed = argmax[0].tolist()
        if request.stop_at_eos:
            keep, finished = sampler.commit(argmax, eos)
            kept = committed[: int(keep.sum().item())]
            finished = bool(finished.item())
        else:
            kept, finished = committed, False
        room = max_tokens - len(tokens)
        new = kept[:room]
        if finished and len(new) == len(kept):
            finish = "stop"
        tokens.extend(new)
        valid += sum(1 for t_ in new if t_ != pad)
        text_ids = [t_ for t_ in new if t_ not in eos_set]
        last = finish == "stop" or len(tokens) >= max_tokens
        delta = ""
        if detokenizer is not None:
            for t_ in text_ids:
                detokenizer.add_token(t_)
            if last:
                detokenizer.finalize()
            delta = detokenizer.last_segment
        reason = "eos" if finish == "stop" else ("converged" if converged else "step_cap")
        yield BlockEvent(block, new, delta, steps, reason, converged)
        if last:
            break
        model.extend(cache, committed)  # the whole argmax canvas; the last canvas is never encoded
        encoded.append(committed)

    gen_time = time.perf_counter() - t1
    text = detokenizer.text if detokenizer is not None else ""
    ntok = len(tokens)
    yield GenerationResult(
        text=text,
        tokens=tokens,
        finish_reason=finish,
        prompt_tokens=cache.length - sum(map(len, encoded)),
        prefill_time=prefill_time,
        prefill_tps=len(request.prompt_ids) / prefill_time if prefill_time > 0 else 0.0,
        steps_per_block=steps_per_block,
        tokens_per_forward=valid / passes if passes else 0.0,
        generation_time=gen_time,
        generation_tps=ntok / gen_time if gen_time > 0 else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        encoded_tokens=len(request.prompt_ids),
        seed=noise.seed,
        decoder_passes=passes,
        host_syncs=syncs,
        sampler=opts,
        fast=request.fast,
        encoded_canvases=encoded,
        live_rows=live_rows if request.fast is not None else None,
        padded_rows=padded_rows if request.fast is not None else None,
    )
