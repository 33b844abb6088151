"""Fast mode: fewer decoder FLOPs per committed token, each technique switchable.

The exact path (`engine._denoise_block`) runs the reference sampler over the whole canvas at
every step. Fast mode runs the same entropy-bound sampler, with the same noise stream, but:

- `freeze`: a position whose token has settled (its input token equals the argmax, and the
  argmax did not change since the previous step) is frozen: its token is final, it counts as
  accepted with entropy 0 (the canvas state FROZEN, see CANVAS_DESIGN) and the decoder no
  longer recomputes it. Only the live rows run through the decoder (`Model.denoise_rows`),
  attending to the frozen rows' per-layer K/V kept from their last computation (dKV-Cache /
  Fast-dLLM's approximation) and to the prompt cache, read in place.
- `eos_stop`: once an end-of-sequence token has settled at position e, positions after e are
  dropped (what the commit would cut anyway): no longer computed and out of the stop test. A
  canvas whose positions up to e are all frozen is finished.
- `top_k`: the sampler's math on the top-k processed logits of each row (exact two-stage
  top-k over the vocabulary): argmax, the top-2 gap, the draw (from the top-k renormalised,
  its CDF in token-id order as the exact draw's, so that with the tail mass ~0 the same
  uniform picks the same token), the entropy (top-k terms plus an upper bound for the tail
  mass) and the next step's self-conditioning (`softmax @ E` from the top-k rows of E).
  None: full-vocabulary math.
- `bucket`: the live-row count is padded up to a bucket (multiples of 8 to 64, then of 32),
  so the decoder and the compiled sampler see a handful of shapes instead of one per count
  (MLX compiles and plans kernels per shape). Padding rows compute on a dummy slot.
- `eos_tail_gap`: an end-of-sequence tail frozen at first sight: when every position from some
  position p to the end of the canvas has an end token as its argmax with a top-2 gap of at least
  this (or is already frozen or pinned there), those positions are frozen at once, at whatever
  step that happens, usually the first. `eos_stop` waits for the EOS to settle, which takes a
  second full-canvas step; on a trained model most of a short answer's canvas is such a tail at
  the first step. Their K/V stay those of the pass that predicted them (computed from their
  noisy input tokens): the same staleness as a frozen row, one step earlier. None: off.
- `commit_gap`: Prophet-style early commit: when every live row's top-2 gap of processed
  logits is at least this, the canvas is committed now; with `freeze`, a single row whose
  gap reaches it (and whose input already holds its argmax) is frozen without waiting for
  the argmax to repeat. Default 1.5, chosen on a tuning draw of held-out prompts (not the
  evaluation set): the smallest gap tried (1, 1.5, 2, 3) whose per-family counts stay within
  one prompt of the larger gaps' (gap 1 lost 3 sudoku prompts of 40; docs/performance.md).
  None: off.
- `stop_mean_over_canvas`: the stop test's mean entropy divides by every position the request did
  not pin, frozen ones counting as certain (entropy 0), as a settled row adds ~0 to the
  reference's whole-canvas mean. Off: it divides by the rows computed at the step, so once a tail
  is frozen the few answer rows alone must get below the threshold.

The stop test is the reference's (argmax canvas stable over `stability_threshold` steps and
mean entropy below `confidence_threshold`), the mean as `stop_mean_over_canvas` says. With
every technique off this loop computes every row at every step and gives the exact path's
tokens (a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Generator, NamedTuple

import mlx.core as mx

from . import canvas as canvas_state
from . import sampler
from .canvas import CanvasState

_PAD_ENTROPY = 1e30  # padding rows sort after every real row in the acceptance rule
_F32_MIN = float(-3.4028234663852886e38)


@dataclass(frozen=True)
class FastOptions:
    """Which fast-mode techniques are on. `FastOptions()` is the full fast mode."""

    freeze: bool = True
    eos_stop: bool = True
    top_k: int | None = 64
    bucket: bool = True
    commit_gap: float | None = 1.5
    eos_tail_gap: float | None = 8.0
    stop_mean_over_canvas: bool = True

    def check(self) -> "FastOptions":
        if self.top_k is not None and not 1 <= self.top_k <= 4096:
            raise ValueError("fast top_k must be between 1 and 4096 (or None for the whole vocabulary)")
        for name in ("commit_gap", "eos_tail_gap"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number (or None)")
        return self

    @classmethod
    def none(cls) -> "FastOptions":
        """Every technique off: the fast loop computing the exact path."""
        return cls(freeze=False, eos_stop=False, top_k=None, bucket=False, commit_gap=None, eos_tail_gap=None,
                   stop_mean_over_canvas=False)


# --------------------------------------------------------------------------------------------
# Sampler math on live rows
# --------------------------------------------------------------------------------------------


def bucket_rows(n: int, canvas_length: int) -> int:
    """The padded row count for `n` live rows: a multiple of 8 up to 64, then of 32, capped at
    the canvas length (so a canvas of 256 has 14 shapes at most)."""
    step = 8 if n <= 64 else 32
    return min(canvas_length, -(-n // step) * step) if n else 0


def top_k_two_stage(x: mx.array, k: int, chunk: int = 2048) -> tuple[mx.array, mx.array]:
    """Exact top-k of `x` along the last axis, values descending: `(values, indices)` `[..., k]`.

    Stage one takes the top k of every chunk of `chunk` columns; stage two the top k of those
    candidates. Exact, because each of the global top k is among its own chunk's top k. Both
    stages are partial selections over short rows, the cheap form on a GPU for a 262144-wide row.
    """
    v = x.shape[-1]
    k = min(k, v)
    if v <= chunk or v <= 2 * k:
        idx = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k] if k < v else mx.broadcast_to(
            mx.arange(v), x.shape)
    else:
        n_chunks = -(-v // chunk)
        pad = n_chunks * chunk - v
        xp = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-mx.inf) if pad else x
        xc = xp.reshape(*x.shape[:-1], n_chunks, chunk)
        kk = min(k, chunk)
        local = mx.argpartition(-xc, kth=kk - 1, axis=-1)[..., :kk]  # [..., n_chunks, kk]
        cand = (local + (mx.arange(n_chunks) * chunk)[:, None]).reshape(*x.shape[:-1], -1)
        cand_vals = mx.take_along_axis(x, mx.minimum(cand, v - 1), axis=-1)
        cand_vals = mx.where(cand < v, cand_vals, -mx.inf)
        best = mx.argpartition(-cand_vals, kth=k - 1, axis=-1)[..., :k]
        idx = mx.take_along_axis(cand, best, axis=-1)
    vals = mx.take_along_axis(x, idx, axis=-1)
    # Descending by value, ties by the lower token id (so index 0 is `argmax`'s choice).
    order = _order_desc(vals, idx)
    return mx.take_along_axis(vals, order, axis=-1), mx.take_along_axis(idx, order, axis=-1).astype(mx.int32)


def _order_desc(vals: mx.array, idx: mx.array) -> mx.array:
    """Argsort by value descending, then token id ascending (unique keys, so any sort is stable)."""
    v = vals.astype(mx.float32)
    v = mx.where(v == 0, 0.0, v)
    bits = mx.view(v, mx.int32)
    ordered = mx.where(bits < 0, bits ^ 0x7FFFFFFF, bits).astype(mx.int64)  # float order as ints
    keys = -ordered * (1 << 31) + idx.astype(mx.int64)
    return mx.argsort(keys, axis=-1)


class RowStep(NamedTuple):
    tokens: mx.array  # [1, L] int32: the row's next input (accepted draw, pin, or fresh noise)
    greedy: mx.array  # [1, L] int32 argmax (the pin at pinned rows)
    accepted: mx.array  # [1, L] bool
    entropy: mx.array  # [1, L] float32 (0 at pinned rows, a huge value at padding rows)
    gap: mx.array  # [1, L] float32 top-1 minus top-2 processed logit (inf at pinned rows)
    sc_values: mx.array  # [1, L, V] processed logits, or [1, L, k] log-probabilities (top-k)
    sc_indices: mx.array  # [1, L, k] int32 token ids (top-k); [1] when full vocabulary


def _finish(denoiser, greedy, ent, gap, canvas_rows, noise, valid, pinned, ids, entropy_bound):
    """Pins, padding and the entropy-bound acceptance, as `canvas.pinned_step` does for a canvas."""
    ids = ids.astype(mx.int32)
    denoiser = mx.where(pinned, ids, denoiser)
    greedy = mx.where(pinned, ids, greedy)
    ent = mx.where(pinned, 0.0, ent)
    ent = mx.where(valid, ent, _PAD_ENTROPY)
    gap = mx.where(pinned, mx.inf, gap)
    mask = (sampler.accept_mask(ent, entropy_bound) | pinned) & valid
    tokens = sampler.renoise(sampler.accept(canvas_rows.astype(mx.int32), denoiser, mask), mask, noise)
    return tokens, greedy, mask, ent, gap


def _row_step_full(logits, canvas_rows, t, u, noise, valid, pinned, ids, entropy_bound):
    processed = logits.astype(mx.float32) / t
    denoiser = sampler.draw_tokens(processed, u)
    greedy = sampler.argmax_canvas(processed)
    top2 = mx.topk(processed, 2, axis=-1) if processed.shape[-1] > 1 else mx.concatenate([processed] * 2, -1)
    gap = top2.max(-1) - top2.min(-1)
    out = _finish(denoiser, greedy, sampler.entropy(processed), gap, canvas_rows, noise, valid, pinned, ids,
                  entropy_bound)
    return RowStep(*out, processed, mx.zeros((1,), dtype=mx.int32))


def _row_step_top_k(logits, canvas_rows, t, u, noise, valid, pinned, ids, entropy_bound, k):
    processed = logits.astype(mx.float32) / t
    vocab = processed.shape[-1]
    vals, idx = top_k_two_stage(processed, k)
    k = vals.shape[-1]
    logp = vals - mx.logsumexp(processed, axis=-1, keepdims=True)
    p = mx.exp(logp)
    greedy = idx[..., 0]
    gap = vals[..., 0] - vals[..., 1] if k > 1 else mx.full(greedy.shape, mx.inf)
    # Draw from the top-k renormalised, by inverse CDF on the same uniforms as the exact draw,
    # with the CDF in token-id order as `sampler.draw_tokens` builds it: when the tail mass is
    # ~0 the same uniform then picks the same token as the exact path (in value order it would
    # pick another, and fast mode's trajectory would part from the exact one for no reason).
    by_id = mx.argsort(idx, axis=-1)
    idx_by_id = mx.take_along_axis(idx, by_id, axis=-1)
    cdf = mx.cumsum(mx.take_along_axis(p, by_id, axis=-1), axis=-1)
    total = cdf[..., -1:]
    first = mx.minimum(mx.sum(cdf <= u[..., None] * total, axis=-1), mx.sum(cdf < total, axis=-1))
    denoiser = mx.take_along_axis(idx_by_id, first[..., None], axis=-1)[..., 0]
    # Entropy: the top-k terms exactly, the tail mass m at its maximum (spread uniformly over
    # the other V - k tokens), so the estimate never makes a row look more certain than it is.
    head = -mx.sum(p * mx.maximum(logp, _F32_MIN), axis=-1)
    m = mx.maximum(1.0 - total[..., 0], 0.0)
    tail = mx.where(m > 0, -m * (mx.log(mx.maximum(m, 1e-38)) - math.log(max(vocab - k, 1))), 0.0)
    out = _finish(denoiser, greedy, head + tail, gap, canvas_rows, noise, valid, pinned, ids, entropy_bound)
    return RowStep(*out, logp, idx)


@lru_cache(maxsize=None)
def _compiled(k: int | None, entropy_bound: float):
    if k is None:
        return mx.compile(lambda *a: _row_step_full(*a, entropy_bound))
    return mx.compile(lambda *a: _row_step_top_k(*a, entropy_bound, k))


def row_step(logits, canvas_rows, t, u, noise, valid, pinned, ids, entropy_bound: float,
             top_k: int | None) -> RowStep:
    """Sampler math of one step on the computed rows (compiled once per shape and setting).
    `valid` marks real rows (not padding); `pinned`/`ids` the rows whose token is given."""
    return _compiled(top_k, float(entropy_bound))(logits, canvas_rows, t, u, noise, valid, pinned, ids)


# --------------------------------------------------------------------------------------------
# The fast block loop
# --------------------------------------------------------------------------------------------


class FastBlockOutcome(NamedTuple):
    argmax: mx.array  # [1, C]
    steps: int
    converged: bool
    syncs: int
    live_rows: list[int]  # rows computed per step (without padding)
    padded_rows: list[int]  # rows the decoder ran per step (with padding)


class SettleRule:
    """The fast schedule's freezing rule, a hook in the sense of canvas.py: after a step, the
    positions whose decoder input already held the argmax token and whose argmax did not change
    since the previous step are settled (with `commit_gap`, also those whose input held the argmax
    and whose top-2 gap reaches it). `freeze` freezes them; `eos_stop` freezes a settled EOS and
    every position after it (the commit cuts there, so they need no more work); `eos_tail_gap`
    freezes a tail of certain end tokens that reaches the canvas's end, without waiting for it
    to settle."""

    def __init__(self, fast: FastOptions, eos_ids: tuple[int, ...], stop_at_eos: bool):
        self.fast = fast
        self.eos = mx.array(list(eos_ids) or [-1], dtype=mx.int32)
        self.eos_stop = fast.eos_stop and stop_at_eos
        self.tail_gap = fast.eos_tail_gap if stop_at_eos else None

    def _is_eos(self, argmax: mx.array) -> mx.array:
        return mx.any(argmax[:, None] == self.eos[None, :], axis=-1)

    def __call__(self, state: CanvasState, step_input: mx.array, argmax: mx.array, previous: mx.array,
                 gap: mx.array) -> CanvasState:
        """All arrays `[C]`; `gap` is +inf at rows not computed this step (they cannot settle by gap)."""
        same = (step_input == argmax) & ~state.pinned
        settled = same & (argmax == previous)
        if self.fast.commit_gap is not None:
            settled = settled | (same & (gap >= self.fast.commit_gap) & mx.isfinite(gap))
        freeze_now = settled if self.fast.freeze else mx.zeros_like(settled)
        if self.eos_stop:
            final = settled | state.pinned  # final tokens: frozen or given
            is_eos = self._is_eos(argmax) & final
            after = mx.cumsum(is_eos.astype(mx.int32)) > 0  # the first final EOS and everything after it
            freeze_now = freeze_now | (after & ~state.pinned)
        if self.tail_gap is not None:
            is_eos = self._is_eos(argmax)
            certain = (gap >= self.tail_gap) & mx.isfinite(gap)
            sure = is_eos & (certain | state.frozen | state.pinned)
            # Every position from here to the canvas's end is a sure end token: a suffix test, so
            # a confident EOS followed by anything else (a template's pinned text, an uncertain
            # row) freezes nothing.
            tail = mx.cumprod(sure.astype(mx.int32), reverse=True) > 0
            freeze_now = freeze_now | (tail & ~state.pinned)
        return canvas_state.freeze(state, freeze_now, argmax)

    def commit_gap_min(self, state: CanvasState, argmax: mx.array, gap: mx.array) -> mx.array:
        """The smallest top-2 gap the early commit looks at: over the positions that are not
        pinned, and (with `eos_stop`) only up to the first EOS that is itself certain (a gap of
        at least `commit_gap`, or pinned): what comes after it is cut by the commit anyway."""
        considered = ~state.pinned
        if self.eos_stop and self.fast.commit_gap is not None:
            is_eos = self._is_eos(argmax)
            certain = is_eos & ((gap >= self.fast.commit_gap) | state.pinned)
            after = (mx.cumsum(certain.astype(mx.int32)) - certain.astype(mx.int32)) > 0  # strictly after it
            considered = considered & ~after
        return mx.where(considered, gap, mx.inf).min()


def denoise_block(model, cache, block: int, opts, request, noise, decode, fast: FastOptions,
                  eos_ids: tuple[int, ...], make_event) -> Generator:
    """Denoise one canvas in fast mode; yields a StepEvent per step (via `make_event`).

    The block's `CanvasState` (from the request, or all LIVE) carries pins and frozen positions;
    after each step the settle rule and the request's hooks may freeze or pin more. Rows that are
    not FROZEN run through the decoder (`Model.denoise_rows`); pinned-but-not-frozen rows are
    computed and forced to their token, as on the exact path."""
    c, vocab, n = model.canvas_length, model.vocab_size, opts.max_denoising_steps
    state = canvas_state.state_for(request.canvases, block) or canvas_state.live_state(c)
    canvas = canvas_state.initial_canvas(state, noise.canvas(block, 1, c, vocab))
    argmax = canvas
    history = sampler.init_history(opts.stability_threshold, 1, c)
    previous = mx.full((c,), -1, dtype=mx.int32)
    rule = SettleRule(fast, eos_ids, request.stop_at_eos)
    kv = model.make_canvas_kv()
    soft_buf = None  # [1, C + 1, D] self-conditioning embedding of every row's last step
    live_trace: list[int] = []
    padded_trace: list[int] = []
    syncs = 0
    stopped = mx.zeros((1,), dtype=mx.bool_)
    frozen = state.frozen.tolist()
    for index, cur_step in enumerate(range(n, 0, -1), start=1):
        live = [i for i in range(c) if not frozen[i]]
        if not live:
            return FastBlockOutcome(argmax, index - 1, True, syncs, live_trace, padded_trace)
        width = bucket_rows(len(live), c) if fast.bucket else len(live)
        rows_list = live + [c] * (width - len(live))
        rows = mx.array(rows_list, dtype=mx.int32)
        valid = mx.array([[r < c for r in rows_list]])
        pad1 = lambda a: mx.concatenate([a, a[..., :1]], axis=-1)  # noqa: E731 (slot C: padding rows)
        soft = None if soft_buf is None else soft_buf[:, rows]
        logits = model.denoise_rows(canvas, rows, cache, kv, soft)
        # NaN/inf weights: caught at the block's first step, as on the exact path (engine.py).
        finite = mx.isfinite(logits[:, : len(live)]).all() if index == 1 else None
        if state.allowed is not None:
            allowed = mx.concatenate([state.allowed, state.allowed[:1]], axis=0)[rows]
            logits = mx.where(allowed[None], logits, mx.array(-float("inf"), dtype=logits.dtype))
        t = sampler.temperature_f32(cur_step, n, opts.t_min, opts.t_max)
        u, r = noise.step(block, index, 1, c, vocab)
        step_input = canvas
        in_rows = pad1(canvas)[:, rows]
        res = row_step(logits, in_rows, mx.array(t, dtype=mx.float32), pad1(u)[:, rows], pad1(r)[:, rows],
                       valid, pad1(state.pinned)[rows][None], pad1(state.ids)[rows][None],
                       opts.entropy_bound, fast.top_k)

        def scatter(full, part, fill=None):
            base = pad1(full if fill is None else mx.full(full.shape, fill, dtype=part.dtype))
            return mx.put_along_axis(base, rows[None], part.astype(base.dtype), axis=-1)[..., :c]

        frozen_now = state.frozen[None]
        canvas = mx.where(frozen_now, canvas, scatter(canvas, res.tokens))
        argmax = mx.where(frozen_now, argmax, scatter(argmax, res.greedy))
        accepted = state.pinned[None] | scatter(argmax, res.accepted, False)
        entropy = scatter(argmax, res.entropy, 0.0).astype(mx.float32) * (~state.pinned[None])
        gap = scatter(argmax, res.gap, float("inf")).astype(mx.float32)
        # Self-conditioning for the next step, per row (a row's embedding depends on its row only).
        if fast.top_k is None:  # cast first, as the exact path (and the reference) do
            soft_rows = model.soft_embeddings(res.sc_values.astype(model.embed_dtype))
        else:
            soft_rows = model.soft_embeddings_top_k(res.sc_indices, res.sc_values)
        if soft_buf is None:
            soft_buf = mx.zeros((1, c + 1, soft_rows.shape[-1]), dtype=soft_rows.dtype)
        soft_buf = mx.put_along_axis(soft_buf, mx.broadcast_to(rows[None, :, None], soft_rows.shape), soft_rows, axis=1)
        # The stop test: the whole argmax canvas stable, and the mean entropy below the threshold.
        # Its numerator sums the computed rows that are not pinned (FROZEN and PINNED positions
        # are certain, entropy 0: canvas.py's convention). Its denominator counts those rows, or
        # with `stop_mean_over_canvas` every position not pinned by the request (frozen ones
        # included): the reference averages over the whole canvas, where a settled row adds ~0.
        counted = valid & ~pad1(state.pinned)[rows][None]
        if fast.stop_mean_over_canvas:
            n_counted = mx.maximum((~(state.pinned & ~state.frozen)).sum(), 1)
        else:
            n_counted = mx.maximum(counted.sum(), 1)
        mean_entropy = mx.where(counted, res.entropy, 0.0).sum() / n_counted
        stop = sampler.is_stable(history, argmax) & (mean_entropy < opts.confidence_threshold)
        history = sampler.push_history(history, argmax)
        min_gap = rule.commit_gap_min(state, argmax[0], gap[0])
        new_state = rule(state, step_input[0], argmax[0], previous, gap[0])
        for hook in request.hooks:
            view = canvas_state.StepView(block, index, n, new_state, argmax[0], canvas[0], accepted[0], entropy[0],
                                         stopped | stop)
            replaced = hook(view)
            if replaced is not None:
                new_state = replaced
        state = new_state
        canvas = mx.where(state.pinned[None], state.ids[None], canvas)
        argmax = mx.where(state.pinned[None], state.ids[None], argmax)
        previous = argmax[0]
        mx.eval(canvas, argmax, accepted, soft_buf, kv.state(), history, stop, mean_entropy, min_gap,
                state.pinned, state.ids, state.frozen, *([finite] if finite is not None else []))
        syncs += 1
        if finite is not None and not finite.item():
            from .errors import NumericalError

            raise NumericalError(
                f"the model produced non-finite logits (NaN or inf) at the first denoising step of "
                f"block {block + 1}: the checkpoint's weights hold NaN/inf values or overflow in "
                f"{str(model.embed_dtype).rsplit('.', 1)[-1]}; check or re-download the weights"
            )
        live_trace.append(len(live))
        padded_trace.append(width)
        yield make_event(block, index, n, canvas[0], argmax[0], accepted[0], mean_entropy.item(), decode,
                         pinned=state.pinned, live_rows=len(live))
        if stop.item() or (fast.commit_gap is not None and min_gap.item() >= fast.commit_gap):
            return FastBlockOutcome(argmax, index, True, syncs, live_trace, padded_trace)
        frozen = state.frozen.tolist()
    return FastBlockOutcome(argmax, n, False, syncs, live_trace, padded_trace)
