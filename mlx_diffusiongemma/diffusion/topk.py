"""The sampler's statistics from the top-k processed logits of each row (fast mode's `top_k`).

An exact two-stage top-k over the vocabulary (stage one: the top k of every chunk of columns; stage
two: the top k of those candidates), then, on the k values only: the argmax, the top-2 gap, the
draw (from the top-k renormalised, its CDF in token-id order as `sampler.draw_tokens` builds it,
so that with the tail mass ~0 the same uniform picks the same token), the entropy (the top-k terms
plus an upper bound for the tail mass) and the log-probabilities the next step's
self-conditioning is made of (`softmax @ E` from the top-k rows of E).
"""

from __future__ import annotations

import math

import mlx.core as mx

F32_MIN = float(-3.4028234663852886e38)


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


def top_k_stats(processed: mx.array, u: mx.array, k: int) -> tuple[mx.array, ...]:
    """(draw, argmax, entropy, top-2 gap, top-k log-probabilities, their token ids) of each row of
    `processed` `[..., V]`, from its top k values only."""
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
    head = -mx.sum(p * mx.maximum(logp, F32_MIN), axis=-1)
    m = mx.maximum(1.0 - total[..., 0], 0.0)
    tail = mx.where(m > 0, -m * (mx.log(mx.maximum(m, 1e-38)) - math.log(max(vocab - k, 1))), 0.0)
    return denoiser, greedy, head + tail, gap, logp, idx
