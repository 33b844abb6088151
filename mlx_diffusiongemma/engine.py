"""The block loop: prefill, then per block denoise until stop or cap, commit, extend. Yields events.

This is the reference `generate` (transformers 5.23, `DiffusionGemmaGenerationMixin.generate`)
for one sequence, written as a generator. Randomness comes from a `NoiseSource` consumed in the
reference's order (canvas init; per step: the multinomial draw's uniforms, then the renoise ids),
so a test can replay the same stream through the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator

import mlx.core as mx

from . import sampler
from .cache import PromptCache
from .config import GenerationDefaults
from .errors import ContextLengthError
from .events import BlockEvent, GenerationResult, StepEvent


@dataclass(frozen=True)
class SamplerOptions:
    """Every knob of the reference sampler; `None` means "the checkpoint's default"."""

    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None

    def resolve(self, defaults: GenerationDefaults) -> "SamplerOptions":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: (v if v is not None else getattr(defaults, k)) for k, v in values.items()}
        if out["max_denoising_steps"] < 1:
            raise ValueError("max_denoising_steps must be at least 1")
        if out["entropy_bound"] <= 0:
            raise ValueError("entropy_bound must be > 0")
        if out["stability_threshold"] < 0:
            raise ValueError("stability_threshold must be >= 0")
        if not 0 < out["t_min"] and 0 < out["t_max"]:
            raise ValueError("temperatures must be > 0")
        return SamplerOptions(**out)


class NoiseSource:
    """All randomness of a generation, from one seed: a fresh key for every draw."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int.from_bytes(__import__("os").urandom(4), "little")
        self.seed = seed
        self._key = mx.random.key(seed)

    def _next(self) -> mx.array:
        self._key, sub = mx.random.split(self._key)
        return sub

    def canvas(self, batch: int, length: int, vocab: int) -> mx.array:
        return sampler.random_canvas(self._next(), batch, length, vocab)

    def uniforms(self, batch: int, length: int) -> mx.array:
        return sampler.sample_uniforms(self._next(), (batch, length))

    def renoise_ids(self, batch: int, length: int, vocab: int) -> mx.array:
        return sampler.random_canvas(self._next(), batch, length, vocab)


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 256
    sampler: SamplerOptions = SamplerOptions()
    seed: int | None = None
    prefill_chunk: int = 512


def check_fits(model, prompt_len: int, max_tokens: int, cached: int = 0) -> None:
    """Reject, before any work, a request whose prompt plus canvases cannot fit the context."""
    c = model.canvas_length
    need = cached + prompt_len + math.ceil(max_tokens / c) * c
    limit = model.text.max_position_embeddings
    if need > limit:
        raise ContextLengthError(
            f"prompt ({cached + prompt_len} tokens) plus {math.ceil(max_tokens / c)} canvas(es) of {c} "
            f"needs {need} positions; the model's context is {limit}. Shorten the prompt or lower max_tokens."
        )


def run(
    model,
    request: Request,
    *,
    cache: PromptCache | None = None,
    decode: Callable[[list[int]], str] | None = None,
    detokenizer: Any = None,
    noise: NoiseSource | None = None,
) -> Iterator[StepEvent | BlockEvent | GenerationResult]:
    """Generate for one prompt. `cache` (optional) already holds a prefix: only
    `request.prompt_ids` are encoded after it; the cache ends holding every committed block but
    the last. Closing the generator stops the work (cancellation)."""
    defaults = getattr(model, "generation", None) or GenerationDefaults()
    opts = request.sampler.resolve(defaults)
    eos = mx.array(list(defaults.eos_token_ids), dtype=mx.int32)
    pad = defaults.pad_token_id
    c, vocab = model.canvas_length, model.vocab_size
    if request.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not request.prompt_ids and (cache is None or cache.length == 0):
        raise ValueError("empty prompt")
    check_fits(model, len(request.prompt_ids), request.max_tokens, cache.length if cache else 0)
    noise = noise or NoiseSource(request.seed)
    embed_dtype = model.embed_dtype
    step_fn = sampler.compiled_step

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if cache is None:
        cache = model.make_cache()
    if request.prompt_ids:
        model.extend(cache, request.prompt_ids, chunk_size=request.prefill_chunk)
    mx.eval(cache.state())
    prefill_time = time.perf_counter() - t0
    t1 = time.perf_counter()

    if detokenizer is not None:
        detokenizer.reset()
    tokens: list[int] = []
    steps_per_block: list[int] = []
    passes = 0
    encoded: list[list[int]] = []  # committed canvases written to the cache (all but the last)
    eos_set = set(defaults.eos_token_ids)
    valid = 0  # generated non-pad tokens up to the first EOS: the reference's tokens_per_forward numerator
    finish = "length"
    n_blocks = math.ceil(request.max_tokens / c)
    n = opts.max_denoising_steps
    for block in range(n_blocks):
        canvas = noise.canvas(1, c, vocab)
        history = sampler.init_history(opts.stability_threshold, 1, c)
        self_cond = None
        converged = False
        steps = 0
        for cur_step in range(n, 0, -1):
            logits = model.denoise(canvas, cache, self_cond)
            t = sampler.temperature_f32(cur_step, n, opts.t_min, opts.t_max)
            u = noise.uniforms(1, c)
            r = noise.renoise_ids(1, c, vocab)
            res = step_fn(logits, canvas, mx.array(t, dtype=mx.float32), u, r, opts.entropy_bound)
            stop, history = sampler.stop_check(history, res.argmax, res.token_entropy, opts.confidence_threshold)
            mean_entropy = res.token_entropy.mean()
            mx.eval(stop, mean_entropy, res.next_canvas, res.argmax, res.accepted, history)  # the one sync
            steps += 1
            passes += 1
            yield StepEvent(block, steps, n, res.next_canvas[0], res.argmax[0], res.accepted[0],
                            mean_entropy.item(), decode)
            self_cond = res.processed_logits.astype(embed_dtype)
            canvas = res.next_canvas
            argmax = res.argmax
            if stop.item():
                converged = True
                break
        steps_per_block.append(steps)
        keep, finished = sampler.commit(argmax, eos)
        committed = argmax[0].tolist()
        kept = committed[: int(keep.sum().item())]
        finished = bool(finished.item())
        room = request.max_tokens - len(tokens)
        new = kept[:room]
        if finished and len(new) == len(kept):
            finish = "stop"
        tokens.extend(new)
        valid += sum(1 for t_ in new if t_ != pad)
        text_ids = [t_ for t_ in new if t_ not in eos_set]
        last = finish == "stop" or len(tokens) >= request.max_tokens
        delta = ""
        if detokenizer is not None:
            for t_ in text_ids:
                detokenizer.add_token(t_)
            if last:
                detokenizer.finalize()
            delta = detokenizer.last_segment
        reason = "eos" if finished else ("converged" if converged else "step_cap")
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
        extra={"seed": noise.seed, "decoder_passes": passes, "sampler": opts, "encoded_canvases": encoded},
    )
