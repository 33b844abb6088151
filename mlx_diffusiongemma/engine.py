"""The block loop: prefill, then per block denoise until stop or cap, commit, extend. Yields events.

This is the reference `generate` (transformers 5.23, `DiffusionGemmaGenerationMixin.generate`)
for one sequence, written as a generator. Randomness comes from a `NoiseSource` consumed in the
reference's order (canvas init; per step: the multinomial draw's uniforms, then the renoise ids),
so a test can replay the same stream through the reference.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Generator, Iterator, Mapping, Sequence

import mlx.core as mx

from . import canvas as canvas_state
from . import fast as fast_mode
from . import sampler
from .canvas import CanvasState, StepHook, StepView
from .cache import PromptCache
from .config import GenerationDefaults
from .errors import ContextLengthError, NumericalError
from .events import BlockEvent, GenerationResult, StepEvent


_MAX_BLOCKS = 4096
_MAX_STEPS = 1024


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
        """Fill `None`s from the checkpoint's defaults and check every value.

        The checks follow the reference (`DiffusionGemmaGenerationConfig.validate`): t_min >= 0,
        t_max > t_min (t_min = 0 is fine: every step's temperature is then still > 0). Beyond
        it: every value must be a finite number (an infinite temperature turns every
        distribution uniform and the reply into noise), and the step counts are bounded.
        `confidence_threshold` may be any finite number (<= 0: the adaptive stop never fires).
        """
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: (v if v is not None else getattr(defaults, k)) for k, v in values.items()}
        for name in ("max_denoising_steps", "stability_threshold"):
            v = out[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
            out[name] = int(v)
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            v = out[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            out[name] = float(v)
        if not 1 <= out["max_denoising_steps"] <= _MAX_STEPS:
            raise ValueError(f"max_denoising_steps must be between 1 and {_MAX_STEPS}")
        if out["entropy_bound"] <= 0:
            raise ValueError("entropy_bound must be > 0")
        if not 0 <= out["stability_threshold"] <= _MAX_STEPS:
            raise ValueError(f"stability_threshold must be between 0 and {_MAX_STEPS}")
        if out["t_min"] < 0:
            raise ValueError(f"t_min must be >= 0, got {out['t_min']}")
        if out["t_max"] <= out["t_min"]:
            raise ValueError(f"t_max must be greater than t_min (got t_max {out['t_max']}, t_min {out['t_min']})")
        return SamplerOptions(**out)


def check_seed(seed) -> int:
    """A seed is a whole number in [0, 2**64 - 1] (what `mx.random.key` takes)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")
    return int(seed)


class NoiseSource:
    """All randomness of a generation from one seed, with a key per (block, step).

    Keys are derived from their position, not from a running chain, so steps computed and then
    discarded (see `Request.stop_check_interval`) never shift the noise of later steps.
    Consumption order matches the reference: the canvas init, then per step the draw's uniforms
    and the renoise ids.
    """

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        seed = check_seed(seed)
        self.seed = seed
        self._base = mx.random.key(seed)
        self._block_keys: dict[int, mx.array] = {}

    def _key(self, block: int, index: int) -> mx.array:
        # Blocks and steps per block are bounded (max_tokens / canvas, max_denoising_steps), so
        # fixed-size splits give every position its own key.
        if block not in self._block_keys:
            self._block_keys[block] = mx.random.split(self._base, _MAX_BLOCKS)[block % _MAX_BLOCKS]
        return mx.random.split(self._block_keys[block], _MAX_STEPS + 1)[index]

    def canvas(self, block: int, batch: int, length: int, vocab: int) -> mx.array:
        return sampler.random_canvas(self._key(block, 0), batch, length, vocab)

    def step(self, block: int, step: int, batch: int, length: int, vocab: int) -> tuple[mx.array, mx.array]:
        """(uniforms for the draw, renoise ids) of 1-based `step` of `block`."""
        k_draw, k_renoise = mx.random.split(self._key(block, step))
        return sampler.sample_uniforms(k_draw, (batch, length)), sampler.random_canvas(k_renoise, batch, length, vocab)


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 256
    sampler: SamplerOptions = SamplerOptions()
    seed: int | None = None
    prefill_chunk: int = 512
    # Read the stop decision from the device every k steps (1: every step, as the reference).
    # With k > 1, steps after a stop are computed with the block's state frozen on the device
    # (as the reference does for finished batch rows) and then discarded: identical tokens,
    # 1/k host synchronisations per step, up to k - 1 wasted decoder passes per block.
    stop_check_interval: int = 1
    # None: exact self-conditioning (softmax over the whole vocabulary @ E). k: the top-k
    # probabilities only, by an embedding gather (error bounded by the uncaptured mass).
    self_conditioning_top_k: int | None = None
    # Canvas position states (canvas.py): per-block pins / warm starts / allowed tokens, as a
    # {block: CanvasState} mapping or a sequence; per-step hooks that may pin or freeze more.
    # None / () is the exact reference path.
    canvases: Mapping[int, CanvasState] | Sequence[CanvasState | None] | None = None
    hooks: tuple[StepHook, ...] = ()
    # False: commit whole canvases and never stop at an EOS (template filling: an end token
    # inside a hole must not cut the pinned text after it).
    stop_at_eos: bool = True
    # "exact": the reference sampler over the whole canvas. "fast": fewer decoder FLOPs per
    # committed token (frozen positions, live rows only, top-k sampler math, ...; see fast.py),
    # with the techniques chosen by `fast` (None: all of them, `FastOptions()`).
    mode: str = "exact"
    fast: fast_mode.FastOptions | None = None
    # Images of the prompt (`processor.ProcessedImage`, in prompt order): their soft tokens fill
    # the prompt's image token positions (already expanded: <boi>, n image tokens, <eoi>).
    images: Sequence[Any] = ()


def check_fits(model, prompt_len: int, max_tokens: int, cached: int = 0) -> None:
    """Reject, before any work, a request whose prompt plus canvases cannot fit the context."""
    c = model.canvas_length
    need = cached + prompt_len + math.ceil(max_tokens / c) * c
    limit = model.text.max_position_embeddings
    if need > limit:
        error = ContextLengthError(
            f"prompt ({cached + prompt_len} tokens) plus {math.ceil(max_tokens / c)} canvas(es) of {c} "
            f"needs {need} positions; the model's context is {limit}. Shorten the prompt or lower max_tokens."
        )
        error.need, error.limit = need, limit  # a chat front end words its own advice (/reset)
        raise error


@dataclass
class DenoiseCall:
    """What `run(..., external_decoder=True)` yields instead of running a decoder pass itself: the
    caller computes `model.denoise(canvas, cache, self_conditioning, self_conditioning_top_k=top_k)`
    (possibly batched with other requests' calls, see server/batch.py) and sends the logits back
    with `generator.send(logits)`."""

    canvas: mx.array  # [1, C]
    cache: PromptCache
    self_conditioning: mx.array | None
    top_k: int | None


@dataclass
class _BlockOutcome:
    argmax: mx.array  # [1, C] the canvas to commit
    steps: int
    converged: bool
    syncs: int


def _denoise_block(model, cache: PromptCache, block: int, opts: SamplerOptions, request: Request,
                   noise: NoiseSource, decode, external_decoder: bool = False) -> Generator[StepEvent, None, _BlockOutcome]:
    """Denoise one canvas until the stop fires or the step cap; yields a StepEvent per step.

    Without a canvas state and hooks this is the reference loop; with them, pinned positions
    follow canvas.py's rules (the same loop, the pinned variants of the step and stop test)."""
    c, vocab, n = model.canvas_length, model.vocab_size, opts.max_denoising_steps
    interval = request.stop_check_interval
    state = canvas_state.state_for(request.canvases, block)
    if state is None and request.hooks:
        state = canvas_state.live_state(c)
    canvas = canvas_state.initial_canvas(state, noise.canvas(block, 1, c, vocab))
    history = sampler.init_history(opts.stability_threshold, 1, c)
    self_cond = None
    argmax = canvas
    stopped = mx.zeros((1,), dtype=mx.bool_)
    steps = syncs = 0
    finite: mx.array | None = None
    pending: list[tuple] = []
    for index, cur_step in enumerate(range(n, 0, -1), start=1):
        # (Fast mode runs its own loop over the same states: fast.denoise_block.)
        if external_decoder:
            logits = yield DenoiseCall(canvas, cache, self_cond, request.self_conditioning_top_k)
        else:
            logits = model.denoise(canvas, cache, self_cond, self_conditioning_top_k=request.self_conditioning_top_k)
        if index == 1:
            # NaN/inf weights (or an overflow) make every distribution NaN and the reply all <pad>:
            # check the first step's logits. The flag rides along with the step's outputs to the
            # block's first sync, so no synchronisation is added and no value changes.
            finite = mx.isfinite(logits).all()
        t = mx.array(sampler.temperature_f32(cur_step, n, opts.t_min, opts.t_max), dtype=mx.float32)
        u, r = noise.step(block, index, 1, c, vocab)
        if state is None:  # the exact reference path
            res = sampler.compiled_step(logits, canvas, t, u, r, opts.entropy_bound)
            stop, new_history = sampler.stop_check(history, res.argmax, res.token_entropy, opts.confidence_threshold)
            mean_entropy = res.token_entropy.mean()
            pinned = None
        else:
            logits = canvas_state.mask_logits(logits, state)
            res = canvas_state.compiled_pinned_step(logits, canvas, t, u, r, opts.entropy_bound,
                                                    state.pinned[None], state.ids[None])
            stop, new_history = canvas_state.stop_check(history, res.argmax, res.token_entropy, state.pinned[None],
                                                        opts.confidence_threshold)
            mean_entropy = canvas_state.live_mean_entropy(res.token_entropy, state.pinned[None])[0]
            pinned = state.pinned
        processed = res.processed_logits.astype(model.embed_dtype)  # next step's self-conditioning
        next_canvas = res.next_canvas
        if request.hooks:
            for hook in request.hooks:
                view = StepView(block, index, n, state, res.argmax[0], next_canvas[0], res.accepted[0],
                                res.token_entropy[0], (stopped | stop)[0], res.processed_logits[0])
                new_state = hook(view)
                if new_state is not None:
                    state = new_state
            next_canvas = mx.where(state.pinned[None], state.ids[None], next_canvas)
        if interval > 1 and self_cond is not None:
            # Freeze on the device once the block has stopped (no host round trip needed).
            argmax = mx.where(stopped[:, None], argmax, res.argmax)
            canvas = mx.where(stopped[:, None], canvas, next_canvas)
            history = mx.where(stopped[None, :, None], history, new_history)
            processed = mx.where(stopped[:, None, None], self_cond, processed)
        else:
            argmax, canvas, history = res.argmax, next_canvas, new_history
        stopped = stopped | stop
        self_cond = processed
        pending.append((next_canvas, res.argmax, res.accepted, mean_entropy, stop, pinned))
        if len(pending) < interval and cur_step > 1:
            continue
        mx.eval([x for p in pending for x in p if x is not None], argmax, canvas, history, self_cond,
                *([finite] if finite is not None else []))  # the one sync
        syncs += 1
        if finite is not None:
            if not finite.item():
                raise NumericalError(
                    f"the model produced non-finite logits (NaN or inf) at the first denoising step of "
                    f"block {block + 1}: the checkpoint's weights hold NaN/inf values or overflow in "
                    f"{str(model.embed_dtype).rsplit('.', 1)[-1]}; check or re-download the weights"
                )
            finite = None
        for next_c, step_argmax, accepted, mean_e, step_stop, step_pinned in pending:
            steps += 1
            yield StepEvent(block, steps, n, next_c[0], step_argmax[0], accepted[0], mean_e.item(), decode,
                            pinned=step_pinned)
            if step_stop.item():
                return _BlockOutcome(argmax, steps, True, syncs)
        pending = []
    return _BlockOutcome(argmax, steps, False, syncs)


def run(
    model,
    request: Request,
    *,
    cache: PromptCache | None = None,
    decode: Callable[[list[int]], str] | None = None,
    detokenizer: Any = None,
    noise: NoiseSource | None = None,
    external_decoder: bool = False,
) -> Iterator[StepEvent | BlockEvent | GenerationResult]:
    """Generate for one prompt. `cache` (optional) already holds a prefix: only
    `request.prompt_ids` are encoded after it; the cache ends holding every committed block but
    the last. Closing the generator stops the work (cancellation). With `external_decoder` the
    generator also yields a `DenoiseCall` wherever it needs a decoder pass and expects the logits
    sent back (a server batches concurrent requests this way); nothing else changes."""
    defaults = getattr(model, "generation", None) or GenerationDefaults()
    opts = request.sampler.resolve(defaults)
    eos = mx.array(list(defaults.eos_token_ids), dtype=mx.int32)
    pad = defaults.pad_token_id
    c = model.canvas_length
    if request.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not request.prompt_ids and (cache is None or cache.length == 0):
        raise ValueError("empty prompt")
    check_fits(model, len(request.prompt_ids), request.max_tokens, cache.length if cache else 0)
    if request.stop_check_interval < 1:
        raise ValueError("stop_check_interval must be at least 1")
    for block in range(math.ceil(request.max_tokens / c)):
        state = canvas_state.state_for(request.canvases, block)
        if state is not None:
            canvas_state.check_state(state, c, model.vocab_size)
    if request.mode not in ("exact", "fast"):
        raise ValueError(f"mode must be 'exact' or 'fast', got {request.mode!r}")
    fast_opts = (request.fast or fast_mode.FastOptions()).check() if request.mode == "fast" else None
    if request.images and not getattr(model, "has_vision", False):
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
    syncs = 0
    live_rows: list[list[int]] = []  # fast mode: rows computed per step, per block
    padded_rows: list[list[int]] = []
    for block in range(n_blocks):
        if fast_opts is None:
            outcome = yield from _denoise_block(model, cache, block, opts, request, noise, decode, external_decoder)
        else:  # fast mode runs its own decoder passes (external_decoder does not apply)
            outcome = yield from fast_mode.denoise_block(model, cache, block, opts, request, noise, decode,
                                                         fast_opts, tuple(defaults.eos_token_ids), StepEvent)
            live_rows.append(outcome.live_rows)
            padded_rows.append(outcome.padded_rows)
        argmax, steps, converged = outcome.argmax, outcome.steps, outcome.converged
        passes += steps
        syncs += outcome.syncs
        steps_per_block.append(steps)
        committed = argmax[0].tolist()
        if request.stop_at_eos:
            keep, finished = sampler.commit(argmax, eos)
            kept = committed[: int(keep.sum().item())]
            finished = bool(finished.item())
        else:
            kept, finished = committed, False
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
        extra={"seed": noise.seed, "decoder_passes": passes, "host_syncs": syncs,
               "sampler": opts, "encoded_canvases": encoded, "mode": request.mode,
               **({"fast": fast_opts, "live_rows": live_rows, "padded_rows": padded_rows} if fast_opts else {})},
    )
