"""The block loop: one canvas denoised until the stop fires or the step cap, whatever the denoiser.

`denoise_block` is the reference's denoising loop (`DiffusionGemmaGenerationMixin.generate`, one
block) written once: the initial canvas, the temperature schedule, the noise, the stop test, the
hooks and pins, the NaN check, the host synchronisations and the events. A *denoiser* says how a
step's decoder pass and sampler math are computed:

- `exact.ExactDenoiser`: the reference's, over the whole canvas.
- `fast.FastDenoiser`: only the canvas rows that are still changing (docs/fast-mode.md); its
  settle rule is a step hook, run before the request's own.

Either's passes can be batched with other requests' passes of the same kind (the server does:
`run_calls`).

A denoiser's `begin(block, state)` returns the block's run, which gives `call(canvas, state)` (the
decoder pass the next step needs, or None when every position is settled) and `sample(...)` (the
step, as canvas-wide arrays). Every step's math goes through `sampler.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, NamedTuple, Protocol, Sequence

import mlx.core as mx

from ..errors import NumericalError
from ..model.cache import CanvasKV, PromptCache
from . import sampler
from .canvas import CanvasState, StepHook, StepView, initial_canvas, live_state, state_for
from .events import StepEvent
from .options import SamplerOptions


@dataclass(eq=False)
class DenoiseCall:
    """A decoder pass over a whole canvas: `model.denoise(canvas, cache, self_conditioning, ...)`.
    Such passes of several requests run as one batched pass (`run_calls`, `Model.denoise_batch`)."""

    canvas: mx.array  # [1, C]
    cache: PromptCache
    self_conditioning: mx.array | None
    top_k: int | None

    def run(self, model) -> mx.array:
        return model.denoise(self.canvas, self.cache, self.self_conditioning, self_conditioning_top_k=self.top_k)

    def finite(self, logits: mx.array) -> mx.array:
        return mx.isfinite(logits).all()


@dataclass(eq=False)
class RowsCall:
    """A decoder pass over some canvas rows (fast mode): `model.denoise_rows(...)`. The rows after
    the first `live` are padding (shape buckets). Such passes of several requests run as one
    batched pass (`run_calls`, `Model.denoise_rows_batch`)."""

    canvas: mx.array  # [1, C]
    rows: mx.array  # [L] int32; C marks a padding row
    cache: PromptCache
    canvas_kv: CanvasKV
    soft: mx.array | None
    live: int

    def run(self, model) -> mx.array:
        return model.denoise_rows(self.canvas, self.rows, self.cache, self.canvas_kv, self.soft)

    def finite(self, logits: mx.array) -> mx.array:
        return mx.isfinite(logits[:, : self.live]).all()


DecoderCall = DenoiseCall | RowsCall


def join_rows(chunks: Sequence[mx.array]) -> mx.array:
    """Per-chunk `[B, rows, ...]` arrays (`sampler.chunked_step`'s kept outputs) as one."""
    return chunks[0] if len(chunks) == 1 else mx.concatenate(list(chunks), axis=1)


def batches(calls: Sequence[DecoderCall]) -> list[list[int]]:
    """The indices of `calls` that `run_calls` runs together: the whole-canvas passes in one batch,
    fast mode's row passes in another (two decoder passes at most, whatever the number of calls)."""
    groups = [[i for i, c in enumerate(calls) if isinstance(c, kind)] for kind in (DenoiseCall, RowsCall)]
    return [g for g in groups if g]


def run_calls(model, calls: Sequence[DecoderCall]) -> list[mx.array]:
    """Logits `[1, C or L, V]` for each call, each batch of `batches(calls)` in one decoder pass
    (`Model.denoise_batch`, `Model.denoise_rows_batch`): the weights are read once per batch
    instead of once per request."""
    out: list[mx.array | None] = [None] * len(calls)
    for batch in batches(calls):
        group = [calls[i] for i in batch]
        if isinstance(group[0], DenoiseCall):
            logits = model.denoise_batch([c.canvas for c in group], [c.cache for c in group],
                                         [c.self_conditioning for c in group], [c.top_k for c in group])
            parts = [logits[r : r + 1] for r in range(len(group))]
        else:
            parts = model.denoise_rows_batch([c.canvas for c in group], [c.rows for c in group],
                                             [c.cache for c in group], [c.canvas_kv for c in group],
                                             [c.soft for c in group])
        for i, part in zip(batch, parts):
            out[i] = part
    return out


class StepOutput(NamedTuple):
    """One step of a block, canvas-wide (`[1, C]` arrays), as a denoiser computed it."""

    canvas: mx.array  # the next decoder input
    argmax: mx.array  # the draft
    accepted: mx.array  # bool
    token_entropy: mx.array  # 0 at pinned positions and at rows not computed
    counted: mx.array | None  # positions the stop test's mean counts (None: all, the reference's)
    processed_logits: mx.array | None = None  # [C, V], for hooks (the exact path)
    gap: mx.array | None = None  # [C] top-2 gap (fast mode; inf where not computed)
    early_stop: mx.array | None = None  # [] bool: commit now (fast mode's early commit)


class BlockRun(Protocol):
    """A denoiser's state for one block (see the module docstring)."""

    hooks: tuple[StepHook, ...]  # run after every step, before the request's hooks
    defers_sync: bool  # may read the stop decision every k steps (`stop_check_interval`)
    live_rows: list[int] | None  # rows computed per step (None: always the whole canvas)
    padded_rows: list[int] | None

    def call(self, canvas: mx.array, state: CanvasState | None) -> DecoderCall | None: ...

    def sample(self, logits: mx.array, call: DecoderCall, canvas: mx.array, argmax: mx.array, t: mx.array,
               u: mx.array, noise_ids: mx.array, state: CanvasState | None, entropy_bound: float) -> StepOutput: ...

    def advance(self, stopped: mx.array, deferred: bool) -> None: ...

    def final_call(self, argmax: mx.array, state: CanvasState | None) -> DecoderCall | None:
        """A last decoder pass over the finished canvas (fast mode's repair), or None."""

    def repaired(self, logits: mx.array, call: DecoderCall, argmax: mx.array, state: CanvasState | None) -> mx.array:
        """The canvas to commit after `final_call`'s pass."""

    def arrays(self) -> list[mx.array]: ...


class Denoiser(Protocol):
    needs_state: bool  # runs with a CanvasState even for a request without one

    def begin(self, block: int, state: CanvasState | None) -> BlockRun: ...


class BlockOutcome(NamedTuple):
    argmax: mx.array  # [1, C] the canvas to commit
    steps: int
    converged: bool
    syncs: int
    live_rows: list[int] | None = None
    padded_rows: list[int] | None = None


def denoise_block(model, block: int, opts: SamplerOptions, request, noise, denoiser: Denoiser,
                  external_decoder: bool = False) -> Generator[StepEvent | DecoderCall, Any, BlockOutcome]:
    """Denoise one canvas until the stop fires or the step cap; yields a StepEvent per step (and,
    with `external_decoder`, each decoder pass as a call whose logits the caller sends back).

    Without a canvas state and hooks this is the reference loop; with them, pinned positions
    follow canvas.py's rules. The stop decision is read from the device every
    `request.stop_check_interval` steps when the denoiser allows it; steps computed past a stop
    are computed with the block frozen on the device and discarded. A denoiser may ask for one
    last pass over the finished canvas (`final_call`: fast mode's repair), which decides what is
    committed."""
    c = model.canvas_length
    state = state_for(request.canvases, block)
    if state is None and (request.hooks or denoiser.needs_state):
        state = live_state(c)
    run = denoiser.begin(block, state)
    box: list[CanvasState | None] = [state]
    outcome = yield from _denoise_steps(model, block, opts, request, noise, run, box, external_decoder)
    fix = run.final_call(outcome.argmax, box[0])
    if fix is None:
        return outcome
    logits = (yield fix) if external_decoder else fix.run(model)
    argmax = run.repaired(logits, fix, outcome.argmax, box[0])
    mx.eval(argmax)
    return BlockOutcome(argmax, outcome.steps, outcome.converged, outcome.syncs + 1, outcome.live_rows,
                        outcome.padded_rows)


def _denoise_steps(model, block: int, opts: SamplerOptions, request, noise, run: BlockRun,
                   box: list, external_decoder: bool) -> Generator[StepEvent | DecoderCall, Any, BlockOutcome]:
    """`denoise_block`'s steps; `box[0]` holds the block's canvas state, kept current for the caller."""
    c, vocab, n = model.canvas_length, model.vocab_size, opts.max_denoising_steps
    state = box[0]
    canvas = initial_canvas(state, noise.canvas(block, 1, c, vocab))
    hooks = tuple(run.hooks) + tuple(request.hooks)
    interval = request.stop_check_interval if run.defers_sync else 1
    history = sampler.init_history(opts.stability_threshold, 1, c)
    argmax = canvas
    stopped = mx.zeros((1,), dtype=mx.bool_)
    steps = syncs = 0
    finite: mx.array | None = None
    pending: list[tuple] = []
    for index, cur_step in enumerate(range(n, 0, -1), start=1):
        call = run.call(canvas, state)
        if call is None:  # every position has settled: the canvas is final
            return BlockOutcome(argmax, index - 1, True, syncs, run.live_rows, run.padded_rows)
        logits = (yield call) if external_decoder else call.run(model)
        if index == 1:
            # NaN/inf weights (or an overflow) make every distribution NaN and the reply all <pad>:
            # check the first step's logits. The flag rides along with the step's outputs to the
            # block's first sync, so no synchronisation is added and no value changes.
            finite = call.finite(logits)
        t = mx.array(sampler.temperature_f32(cur_step, n, opts.t_min, opts.t_max), dtype=mx.float32)
        u, r = noise.step(block, index, 1, c, vocab)
        out = run.sample(logits, call, canvas, argmax, t, u, r, state, opts.entropy_bound)
        logits = call = None  # the step's vocabulary-sized inputs can go as soon as nothing else holds them
        stop, new_history = sampler.stop_check(history, out.argmax, out.token_entropy, opts.confidence_threshold,
                                               out.counted)
        mean_entropy = sampler.mean_entropy(out.token_entropy, out.counted)[0]
        next_canvas, next_argmax = out.canvas, out.argmax
        ran_with = None if state is None else state.pinned  # the pins this step ran with, for its event
        if hooks:
            for hook in hooks:
                view = StepView(block, index, n, state, out.argmax[0], out.canvas[0], out.accepted[0],
                                out.token_entropy[0], (stopped | stop)[0], out.processed_logits, out.gap, canvas[0])
                replaced = hook(view)
                if replaced is not None:
                    state = box[0] = replaced
            # Pins take effect at once: in the next decoder input and in the draft.
            next_canvas = mx.where(state.pinned[None], state.ids[None], next_canvas)
            next_argmax = mx.where(state.pinned[None], state.ids[None], next_argmax)
        deferred = interval > 1
        run.advance(stopped, deferred)
        if deferred:  # freeze on the device once the block has stopped (no host round trip)
            argmax = mx.where(stopped[:, None], argmax, next_argmax)
            canvas = mx.where(stopped[:, None], canvas, next_canvas)
            history = mx.where(stopped[None, :, None], history, new_history)
        else:
            argmax, canvas, history = next_argmax, next_canvas, new_history
        stopped = stopped | stop
        pending.append((next_canvas, next_argmax, out.accepted, mean_entropy, stop, out.early_stop, ran_with))
        if len(pending) < interval and cur_step > 1:
            continue
        state_arrays = [] if state is None else [state.pinned, state.ids, state.frozen]
        mx.eval([x for p in pending for x in p if x is not None], argmax, canvas, history, run.arrays(),
                state_arrays, *([finite] if finite is not None else []))  # the one sync
        syncs += 1
        if finite is not None:
            if not finite.item():
                raise NumericalError(
                    f"the model produced non-finite logits (NaN or inf) at the first denoising step of "
                    f"block {block + 1}: the checkpoint's weights hold NaN/inf values or overflow in "
                    f"{str(model.embed_dtype).rsplit('.', 1)[-1]}; check or re-download the weights"
                )
            finite = None
        for next_c, step_argmax, accepted, mean_e, step_stop, early, pinned in pending:
            steps += 1
            yield StepEvent(block, steps, n, next_c[0], step_argmax[0], accepted[0], mean_e.item(), pinned=pinned,
                            live_rows=run.live_rows[steps - 1] if run.live_rows is not None else None)
            if step_stop.item() or (early is not None and early.item()):
                return BlockOutcome(argmax, steps, True, syncs, run.live_rows, run.padded_rows)
        pending = []
    return BlockOutcome(argmax, steps, False, syncs, run.live_rows, run.padded_rows)
