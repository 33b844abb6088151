"""One decoder pass for several requests: their canvases denoised together, each over its own cache.

Rows differ in their cached prefix (length, content) and position. Everything that reads weights
runs batched, `[B, C]` rows at once: embeddings, self-conditioning, q/k/v and output
projections, the dense MLP, the routed experts and the LM head. Those dominate a denoising step
(the MoE weights are read once for all rows instead of once per request). Attention is computed
per row, over that row's cache read in place and its own canvas (the same `split_attention` call
as a single request's pass: no padding, no masks, no copy of any cache). The rows run as one
sequence with a position per token (the model's per-row-position form, which fast mode uses too).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from ..engine import DenoiseCall
from ..model import split_attention


def denoise_batch(model, calls: Sequence[DenoiseCall]) -> mx.array:
    """Logits `[B, C, V]` (float32), row r equal to `model.denoise` of `calls[r]` up to rounding."""
    if len(calls) == 1:
        c = calls[0]
        return model.denoise(c.canvas, c.cache, c.self_conditioning, self_conditioning_top_k=c.top_k)
    # The rows are laid end to end as ONE sequence of B * C tokens, each with its own position
    # (the model's per-row-position form, `[L]` offsets at batch 1): every per-token layer
    # (projections, norms, MLPs, experts) is then exactly the single-request computation.
    c_len = calls[0].canvas.shape[1]
    ids = mx.concatenate([c.canvas for c in calls], axis=1)  # [1, B*C]
    embeds = model._embed(ids)
    soft = mx.zeros((len(calls), c_len, embeds.shape[-1]), dtype=embeds.dtype)
    # Self-conditioning rows (every row but those at a block's first step), by top-k setting, in
    # one pass each: the [V, D] embedding matrix is read once for all of them.
    groups: dict[int | None, list[int]] = {}
    for r, c in enumerate(calls):
        if c.self_conditioning is not None:
            groups.setdefault(c.top_k, []).append(r)
    for top_k, rows in groups.items():
        sc = mx.concatenate([calls[r].self_conditioning for r in rows], axis=0)
        part = model.soft_embeddings(sc, top_k).astype(embeds.dtype)
        soft = soft.at[mx.array(rows)].add(part)  # rows are distinct: add into zeros == set
    h = model.model.decoder.self_conditioning(embeds, soft.reshape(1, -1, embeds.shape[-1]))
    positions = mx.concatenate([mx.arange(c.cache.length, c.cache.length + c_len) for c in calls]).astype(mx.int32)
    for i, layer in enumerate(model.layers):
        views = [c.cache.layers[i].view() for c in calls]

        def attend(q, k, v, views=views):
            out = []
            for r, (pk, pv) in enumerate(views):
                rows = slice(r * c_len, (r + 1) * c_len)
                own = (k[:, :, rows], v[:, :, rows], None)
                out.append(split_attention(q[:, :, rows], [own] if pk is None else [(pk, pv, None), own]))
            return mx.concatenate(out, axis=2)

        h = layer(h, positions, attend, layer.layer_scalar)
    h = model.model.decoder.norm(h)
    return model.logits(h).reshape(len(calls), c_len, -1)
