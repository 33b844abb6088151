"""Per-step sampler math of DiffusionGemma's entropy-bound (EB) sampler, as pure MLX functions.

Reference: `transformers` 5.23 `generation_diffusion_gemma.py` -- `LinearTemperatureScheduleLogitsProcessor`,
`EntropyBoundSampler` (`initialize_canvas` / `accept_canvas` / `renoise_canvas`),
`StableAndConfidentStoppingCriteria`, `_denoising_step` and `_finalize_canvas`.

Everything here is a function of its arguments: randomness comes in as explicit arrays (uniforms for the
multinomial draw, token ids for renoising) so that tests can feed the very same random numbers to the
reference, and so that the functions can be wrapped in `mx.compile` (no Python branching on array values,
no host syncs). Shapes: logits `[B, C, V]` float32, canvases `[B, C]` int32, per-token entropies `[B, C]`.

Known, documented divergences from the PyTorch reference (all confined to ties / the last float ulp):

* Tie order in the acceptance sort. The reference calls `torch.sort(stable=False)`. On CPU, PyTorch's
  unstable sort is an introsort that only behaves stably for rows of <= 16 elements (insertion-sort
  threshold); for longer rows equal entropies come out in an implementation-defined order (e.g. twenty
  equal values sort as [10, 19, 18, ..., 11, 0, 9, ..., 1]). The order of equal keys is not part of the
  reference's contract and differs across its devices, so we break ties by canvas position (a stable
  sort), and we do it with unique sort keys rather than by trusting the backend sort to be stable. This
  gives the reference's decisions whenever no group of *equal* entropies straddles the acceptance
  boundary (always true for zero-entropy ties, which are the ties that occur in practice), and always for
  canvases of <= 16 tokens; otherwise the same *number* of tied tokens is accepted, possibly at other
  positions of the tie group.
* `torch.cumsum` on CPU accumulates float32 in float64; `mx.cumsum` accumulates in float32. The
  acceptance test `cumsum - sorted <= bound` can therefore differ only when it is within ~1 ulp of the bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..model.args import step_chunk_rows
from .topk import top_k_stats

__all__ = [
    "temperature",
    "temperature_f32",
    "entropy",
    "sample_uniforms",
    "draw_tokens",
    "argmax_canvas",
    "stable_argsort",
    "accept_mask",
    "accept",
    "renoise",
    "random_canvas",
    "init_history",
    "push_history",
    "is_stable",
    "mean_entropy",
    "StopResult",
    "stop_check",
    "commit",
    "StepResult",
    "step",
    "compiled_step",
    "RowResult",
    "row_step",
    "canvas_step",
    "chunked_step",
]

_F32_MIN = float(np.finfo(np.float32).min)  # torch.finfo(float32).min, the clamp used by Categorical.entropy


# --------------------------------------------------------------------------------------------------
# Temperature schedule
# --------------------------------------------------------------------------------------------------


def temperature(cur_step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear temperature schedule, in Python (float64) arithmetic.

    `cur_step` counts DOWN from `max_steps` (first step, hottest: t_max) to 1 (last step, ~t_min), which is
    how the reference iterates (`reversed(range(1, max_steps + 1))`). This is exactly the value
    `LinearTemperatureScheduleLogitsProcessor` computes when called with a plain `int` step.
    """
    return t_min + (t_max - t_min) * (cur_step / max_steps)


def temperature_f32(cur_step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """The temperature the reference *generate loop* actually divides by.

    `_denoising_step` turns `cur_step` into an int32 tensor before calling the logits processor, so the
    schedule is evaluated in float32 tensor arithmetic, each Python scalar rounded to float32 first:
    t = f32(t_min) + f32(t_max - t_min) * (f32(cur_step) / f32(max_steps)). For about a quarter of the steps
    this is 1 ulp away from `float32(temperature(...))`, which changes `logits / t` bit patterns; using this
    value keeps the processed logits bit-identical to the reference's generate. Returned as a Python float
    that is exactly representable in float32.
    """
    f32 = np.float32
    frac = f32(cur_step) / f32(max_steps)
    return float(f32(t_min) + f32(t_max - t_min) * frac)


# --------------------------------------------------------------------------------------------------
# Per-token quantities
# --------------------------------------------------------------------------------------------------


def entropy(logits: mx.array) -> mx.array:
    """Entropy of softmax(logits) along the last axis, `[B, C, V] -> [B, C]`, in float32.

    Computed like `torch.distributions.Categorical(logits=...).entropy()`: normalise the logits by their
    logsumexp, clamp the log-probabilities at the most negative finite float32 (so `-inf` logits give
    `finite * 0 = -0` instead of `-inf * 0 = NaN`), and return `-sum(p * log p)` with `p = softmax(log p)`.
    Matching that recipe (rather than e.g. `logsumexp - sum(p * x)`) keeps the values within float32
    rounding of the reference, which matters because the acceptance rule sorts and thresholds them.
    """
    x = logits.astype(mx.float32)
    log_p = x - mx.logsumexp(x, axis=-1, keepdims=True)
    probs = mx.softmax(log_p, axis=-1)
    return -mx.sum(mx.maximum(log_p, _F32_MIN) * probs, axis=-1)


def sample_uniforms(key: mx.array, shape: Sequence[int]) -> mx.array:
    """Float32 uniforms in [0, 1) from an explicit PRNG key (one per canvas token for `draw_tokens`)."""
    return mx.random.uniform(shape=tuple(shape), dtype=mx.float32, key=key)


def draw_tokens(processed_logits: mx.array, u: mx.array) -> mx.array:
    """One multinomial draw per token from softmax(processed_logits), driven by explicit uniforms.

    Inverse-CDF sampling: with `cdf = cumsum(softmax(logits))`, the token is the first index whose cdf
    exceeds `u * cdf[-1]` (scaling by the float32 total instead of assuming it is exactly 1 keeps every
    `u` in [0, 1) inside the support). This is the distribution `torch.multinomial(probs, 1)` samples, but
    as a deterministic function of `u`, so the same uniforms can be replayed through the reference.
    A zero-probability token is never returned: its cdf equals its predecessor's, so it can never be the
    first index past the target. For float32 `u < 1`, `u * total < total` always holds, so the final
    `minimum` only matters for `u == 1.0` (uniforms from an inclusive generator): it clamps to the last
    token that still increased the cdf instead of running off the end or onto a zero-probability tail.

    Args:
        processed_logits: `[B, C, V]` temperature-scaled logits.
        u: `[B, C]` float32 uniforms in [0, 1).

    Returns:
        `[B, C]` int32 token ids.
    """
    probs = mx.softmax(processed_logits.astype(mx.float32), axis=-1)
    cdf = mx.cumsum(probs, axis=-1)
    total = cdf[..., -1:]
    target = u.astype(mx.float32)[..., None] * total
    first_above = mx.sum(cdf <= target, axis=-1)
    last_support = mx.sum(cdf < total, axis=-1)
    return mx.minimum(first_above, last_support).astype(mx.int32)


def argmax_canvas(processed_logits: mx.array) -> mx.array:
    """Greedy canvas `[B, C]` int32; ties go to the lowest token id, as `torch.argmax` does on CPU.

    (`mx.argmax` returns uint32; the canvas is int32 everywhere in this package.)
    """
    return mx.argmax(processed_logits, axis=-1).astype(mx.int32)


# --------------------------------------------------------------------------------------------------
# Entropy-bound acceptance and renoising
# --------------------------------------------------------------------------------------------------


def stable_argsort(values: mx.array) -> mx.array:
    """Ascending argsort of float32 `values` along the last axis, equal values kept in index order.

    Stability is enforced by construction instead of relying on the backend's sort: each float is mapped
    to an int32 with the same ordering (IEEE bits, magnitude bits flipped for negatives; -0.0 folded onto
    +0.0 so the two zeros tie), widened to int64 and combined with its position, so all keys are distinct.
    """
    n = values.shape[-1]
    v = values.astype(mx.float32)
    v = mx.where(v == 0, 0.0, v)
    bits = mx.view(v, mx.int32)
    ordered = mx.where(bits < 0, bits ^ 0x7FFFFFFF, bits).astype(mx.int64)
    keys = ordered * n + mx.arange(n, dtype=mx.int64)
    return mx.argsort(keys, axis=-1)


def accept_mask(token_entropy: mx.array, entropy_bound: float) -> mx.array:
    """Which canvas tokens the EB sampler accepts this step, `[B, C]` bool.

    Tokens are visited from lowest to highest entropy; sorted position i is accepted when
    `cumsum_i - sorted_i <= entropy_bound`, i.e. when the summed entropy of the *cheaper* tokens stays
    within the bound (an upper bound on their joint mutual information; the first token is therefore always
    accepted). The sorted decisions are scattered back to canvas positions. Ties are broken by canvas
    position -- see the module docstring for how this relates to the reference's unstable sort.
    """
    order = stable_argsort(token_entropy)
    sorted_entropy = mx.take_along_axis(token_entropy.astype(mx.float32), order, axis=-1)
    cumulative = mx.cumsum(sorted_entropy, axis=-1)
    sorted_mask = (cumulative - sorted_entropy) <= entropy_bound
    return mx.put_along_axis(mx.zeros(sorted_mask.shape, dtype=mx.bool_), order, sorted_mask, axis=-1)


def accept(current: mx.array, denoiser: mx.array, mask: mx.array) -> mx.array:
    """Accepted canvas: the denoiser's token where `mask`, the current token elsewhere."""
    return mx.where(mask, denoiser, current)


def renoise(accepted_canvas: mx.array, mask: mx.array, noise_ids: mx.array) -> mx.array:
    """Next canvas: accepted tokens kept, every other position replaced by fresh noise.

    `noise_ids` `[B, C]` are uniform ids over the WHOLE vocabulary, supplied by the caller (see
    `random_canvas`), mirroring the reference's `renoise_canvas`, which draws a full new random canvas
    each step and uses it where the token was not accepted.
    """
    return mx.where(mask, accepted_canvas, noise_ids.astype(accepted_canvas.dtype))


def random_canvas(key: mx.array, batch: int, canvas_length: int, vocab_size: int) -> mx.array:
    """`[batch, canvas_length]` int32 ids uniform over [0, vocab_size): the initial canvas and the
    renoising source (the reference's `initialize_canvas`)."""
    return mx.random.randint(0, vocab_size, (batch, canvas_length), dtype=mx.int32, key=key)


# --------------------------------------------------------------------------------------------------
# Stable-and-confident stopping (functional form of StableAndConfidentStoppingCriteria)
# --------------------------------------------------------------------------------------------------


def init_history(stability_threshold: int, batch: int, canvas_length: int) -> mx.array:
    """Fresh argmax history `[stability_threshold, B, C]` int32 filled with -1.

    -1 is never a token id, so no row can be stable before it has produced `stability_threshold`
    argmax canvases; with threshold 0 the history is empty and every row is always stable. Create a new
    one per canvas (the reference calls `reset()` before each denoising loop).
    """
    return mx.full((stability_threshold, batch, canvas_length), -1, dtype=mx.int32)


def is_stable(history: mx.array, argmax: mx.array) -> mx.array:
    """`[B]` bool: the new argmax canvas equals ALL canvases in the history (vacuously true if empty)."""
    return mx.all(mx.all(history == argmax[None].astype(history.dtype), axis=-1), axis=0)


def push_history(history: mx.array, argmax: mx.array) -> mx.array:
    """History rolled by one: oldest canvas dropped, `argmax` appended (no-op for an empty history).

    Branches only on the static history length, so it is safe under `mx.compile`.
    """
    if history.shape[0] == 0:
        return history
    return mx.concatenate([history[1:], argmax[None].astype(history.dtype)], axis=0)


class StopResult(NamedTuple):
    stop: mx.array  # [B] bool
    history: mx.array  # [S, B, C] int32, to pass to the next call


def mean_entropy(token_entropy: mx.array, counted: mx.array | None = None) -> mx.array:
    """`[B]` mean per-token entropy: over the whole canvas (the reference's), or over the
    positions in `counted` `[B, C]` (`token_entropy` must be 0 elsewhere).

    Written as `mean * (C / counted)` so that with every position counted it is the reference
    value bit for bit; nothing counted: 0 (confident)."""
    mean = mx.mean(token_entropy, axis=-1)
    if counted is None:
        return mean
    c = token_entropy.shape[-1]
    n = mx.maximum(mx.sum(counted.astype(mx.float32), axis=-1), 1.0)
    return mean * (c / n)


def stop_check(
    history: mx.array, argmax: mx.array, token_entropy: mx.array, confidence_threshold: float,
    counted: mx.array | None = None,
) -> StopResult:
    """One call of `StableAndConfidentStoppingCriteria`: `stop = stable & confident`, plus the new history.

    Stability is checked against the history *before* the new canvas is pushed, exactly as the reference
    does. `token_entropy` must be the entropy of the processed (temperature-scaled) logits; the mean is
    over `counted` positions when given (see `mean_entropy`: pins of a template do not count).
    """
    stop = is_stable(history, argmax) & (mean_entropy(token_entropy, counted) < confidence_threshold)
    return StopResult(stop, push_history(history, argmax))


# --------------------------------------------------------------------------------------------------
# Committing a finished canvas
# --------------------------------------------------------------------------------------------------


def commit(argmax_canvas: mx.array, eos_ids: Sequence[int] | mx.array) -> tuple[mx.array, mx.array]:
    """Cut a committed canvas at its first end-of-sequence token.

    Returns `(keep, finished)`: `keep` `[B, C]` bool is True up to and including the first token that is
    any of `eos_ids` and False after it (the complement of `_finalize_canvas`'s pad mask, which keeps the
    EOS itself); `finished` `[B]` bool says whether the canvas contains an EOS (the reference's
    `EosTokenCriteria` over the whole canvas). Kept token count per row is `keep.sum(-1)`.
    """
    eos = eos_ids if isinstance(eos_ids, mx.array) else mx.array(list(eos_ids), dtype=mx.int32)
    canvas = argmax_canvas.astype(mx.int32)
    is_eos = mx.any(canvas[..., None] == eos.astype(mx.int32).reshape(1, 1, -1), axis=-1)
    seen = mx.cumsum(is_eos.astype(mx.int32), axis=-1)
    keep = (seen == 0) | ((seen == 1) & is_eos)
    return keep, mx.any(is_eos, axis=-1)


# --------------------------------------------------------------------------------------------------
# The denoising step: the one kernel of every path
# --------------------------------------------------------------------------------------------------

_EMPTY = (0,)  # shape of an output that was not asked for
_PAD_ENTROPY = 1e30  # padding rows sort after every real row in the acceptance rule


class StepResult(NamedTuple):
    next_canvas: mx.array  # [B, C] int32, decoder input of the next step
    argmax: mx.array  # [B, C] int32, the draft / the canvas that gets committed
    accepted: mx.array  # [B, C] bool
    processed_logits: mx.array  # [B, C, V] float32 (the next step's self-conditioning); top-k: [B, C, k] log-probs
    token_entropy: mx.array  # [B, C] float32 (0 at pinned positions), reuse for `stop_check`
    gap: mx.array  # [B, C] float32 top-1 minus top-2 processed logit (inf at pinned); shape (0,) unless asked
    top_k_ids: mx.array  # [B, C, k] int32 token ids of `processed_logits` with top_k; shape (0,) otherwise


class RowResult(NamedTuple):
    """The per-row part of a step (`row_step`): every field is a function of its own row."""

    denoiser: mx.array  # [B, L] int32 the drawn tokens (pinned: their token)
    argmax: mx.array  # [B, L] int32
    token_entropy: mx.array  # [B, L] float32 (0 at pinned positions)
    gap: mx.array  # [B, L] float32, shape (0,) unless asked
    processed_logits: mx.array  # [B, L, V] float32; top-k: [B, L, k] log-probs
    top_k_ids: mx.array  # [B, L, k] int32 with top_k; shape (0,) otherwise


def row_step(
    logits: mx.array,
    t: float | mx.array,
    u: mx.array,
    pinned: mx.array | None = None,
    ids: mx.array | None = None,
    allowed: mx.array | None = None,
    top_k: int | None = None,
    with_gap: bool = False,
) -> RowResult:
    """The vocabulary-sized part of `step`, row by row: processed logits, draw, argmax, gap,
    entropy (pinned rows forced). Nothing in it mixes rows, so any split of the rows gives the
    same bits per row (`chunked_step`)."""
    if allowed is not None:
        logits = mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))
    processed = logits.astype(mx.float32) / t
    if top_k is None:
        denoiser = draw_tokens(processed, u)
        greedy = argmax_canvas(processed)
        gap = mx.zeros(_EMPTY, dtype=mx.float32)
        if with_gap:
            top2 = mx.topk(processed, 2, axis=-1) if processed.shape[-1] > 1 else mx.concatenate([processed] * 2, -1)
            gap = top2.max(-1) - top2.min(-1)
        token_entropy = entropy(processed)
        signal, token_ids = processed, mx.zeros(_EMPTY, dtype=mx.int32)
    else:
        denoiser, greedy, token_entropy, gap, signal, token_ids = top_k_stats(processed, u, top_k)
    if pinned is not None:
        ids = ids.astype(mx.int32)
        denoiser = mx.where(pinned, ids, denoiser)
        greedy = mx.where(pinned, ids, greedy)
        token_entropy = mx.where(pinned, mx.array(0.0, dtype=mx.float32), token_entropy)
        if gap.size:
            gap = mx.where(pinned, mx.inf, gap)
    return RowResult(denoiser, greedy, token_entropy, gap, signal, token_ids)


def canvas_step(rows: RowResult, canvas: mx.array, noise_ids: mx.array, entropy_bound: float,
                pinned: mx.array | None = None, valid: mx.array | None = None) -> StepResult:
    """The canvas-wide part of `step`: the acceptance over all rows' entropies, then renoising."""
    rows = RowResult(*rows)  # (a plain tuple when it comes through `mx.compile`)
    token_entropy = rows.token_entropy
    if valid is not None:
        token_entropy = mx.where(valid, token_entropy, _PAD_ENTROPY)
    mask = accept_mask(token_entropy, entropy_bound)
    if pinned is not None:
        mask = mask | pinned
    if valid is not None:
        mask = mask & valid
    accepted_canvas = accept(canvas.astype(mx.int32), rows.denoiser, mask)
    next_canvas = renoise(accepted_canvas, mask, noise_ids)
    return StepResult(next_canvas, rows.argmax, mask, rows.processed_logits, token_entropy, rows.gap, rows.top_k_ids)


def step(
    logits: mx.array,
    canvas: mx.array,
    t: float | mx.array,
    u: mx.array,
    noise_ids: mx.array,
    entropy_bound: float,
    pinned: mx.array | None = None,
    ids: mx.array | None = None,
    valid: mx.array | None = None,
    allowed: mx.array | None = None,
    top_k: int | None = None,
    with_gap: bool = False,
) -> StepResult:
    """Sampler math of one denoising step, in the reference's order (`_denoising_step` 1.c.ii-iii).

    processed = logits / t; denoiser canvas = multinomial draw from softmax(processed) (via `u`);
    argmax canvas; entropies of processed; accept the low-entropy set; renoise the rest with `noise_ids`.
    Pass `t` from `temperature_f32` to reproduce the reference generate loop bit for bit; pass it as an
    `mx.array` scalar under `mx.compile` so a new temperature does not trigger a recompile.

    The canvas powers and fast mode are arguments of this one step (left out, the step is the
    reference's, op for op):
    - `pinned`, `ids` `[B, C]`: pinned positions take their token in the denoiser and argmax
      canvases, enter the acceptance sort with entropy 0 (so they never consume the entropy bound),
      are always accepted and never renoised (see `canvas.py`);
    - `valid` `[B, C]`: False at padding rows (fast mode's shape buckets): never accepted, sorted last;
    - `allowed` `[B or 1, C, V]` bool: the tokens each position may take (other logits -> -inf);
    - `top_k`: the statistics from the top-k processed logits of each row (`topk.top_k_stats`);
      `processed_logits` then holds their log-probabilities and `top_k_ids` their token ids;
    - `with_gap`: also the top-2 gap of the processed logits (always computed with `top_k`).

    It is `row_step` (per row, vocabulary-sized) followed by `canvas_step` (across rows, `[B, C]`).
    """
    rows = row_step(logits, t, u, pinned, ids, allowed, top_k, with_gap)
    return canvas_step(rows, canvas, noise_ids, entropy_bound, pinned, valid)


compiled_step = mx.compile(step)
"""`step` under `mx.compile` (same results; `entropy_bound`, `top_k` and `with_gap` are baked in as
constants per value, and the graph is traced once per set of optional arguments given)."""

_compiled_rows = mx.compile(row_step)
_compiled_canvas = mx.compile(canvas_step)


def chunked_step(logits: mx.array, canvas: mx.array, t: float | mx.array, u: mx.array, noise_ids: mx.array,
                 entropy_bound: float, *, keep=None, pinned: mx.array | None = None, ids: mx.array | None = None,
                 valid: mx.array | None = None, allowed: mx.array | None = None, top_k: int | None = None,
                 with_gap: bool = False) -> tuple[StepResult, list]:
    """`compiled_step` with the rows taken `model.args.step_chunk_rows(V)` at a time: the same bits (every
    vocabulary-sized op is per row, and MLX's CPU matmuls and reductions give every row the same
    bits whatever the row count: tests/test_chunked_step.py checks it), with the vocabulary-sized
    arrays of one chunk alive at a time instead of the whole canvas's.

    `keep(processed_logits, top_k_ids)` says what a denoiser keeps of each chunk's vocabulary-sized
    outputs (a list of arrays, e.g. the self-conditioning for the next step), evaluated with the
    chunk; the kept lists come back, one per chunk, and the result's `processed_logits` is left
    out (shape (0,)). One chunk runs as `compiled_step` itself."""
    n = logits.shape[1]
    size = step_chunk_rows(logits.shape[-1])
    rows_args = (pinned, ids, allowed)
    if size >= n:
        res = compiled_step(logits, canvas, t, u, noise_ids, entropy_bound, pinned=pinned, ids=ids, valid=valid,
                            allowed=allowed, top_k=top_k, with_gap=with_gap)
        kept = [] if keep is None else keep(res.processed_logits, res.top_k_ids)
        res = StepResult(res.next_canvas, res.argmax, res.accepted, mx.zeros(_EMPTY, dtype=mx.float32),
                         res.token_entropy, res.gap, res.top_k_ids)
        return res, [kept]
    parts, kept = [], []
    for start in range(0, n, size):
        rows = slice(start, start + size)

        def cut(a):
            return None if a is None else a[:, rows] if a.shape[1] == n else a

        part = _compiled_rows(logits[:, rows], t, u[:, rows], *(cut(a) for a in rows_args), top_k, with_gap)
        kept.append([] if keep is None else keep(part.processed_logits, part.top_k_ids))
        small = RowResult(part.denoiser, part.argmax, part.token_entropy, part.gap,
                          mx.zeros(_EMPTY, dtype=mx.float32), part.top_k_ids)
        mx.eval(small, kept[-1])  # this chunk's vocabulary-sized arrays are done
        parts.append(small)
    joined = RowResult(*(mx.concatenate(f, axis=1) if f[0].size or f[0].ndim > 1 else f[0] for f in zip(*parts)))
    return _compiled_canvas(joined, canvas, noise_ids, entropy_bound, pinned, valid), kept
