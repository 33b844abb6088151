"""DiffusionGemma in MLX: one set of layer weights, two passes.

- encoder pass (causal): prompt and committed canvases -> KV cache; each layer ends with the
  ENCODER's own `layer_scalar` (`model.encoder.language_model.layers.N.layer_scalar`);
- decoder pass (bidirectional over the canvas, reads the cache, never writes it): canvas ids plus
  self-conditioning -> float32 softcapped logits; each layer ends with the DECODER's `layer_scalar`.

Parameter paths follow the Hugging Face checkpoint (`model.decoder.*`), with routed experts held
as fused `SwitchLinear` tensors (`experts.gate_up_proj.weight` `[E, 2I, D]`, gate rows first), the
layout the other MLX port's conversions also use, so one loader serves every layout.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import activations
from .args import PREFILL_CHUNK, GenerationDefaults, ModelArgs, TextArgs, VisionArgs
from .cache import KV_GROUP_SIZE, CanvasKV, LayerKV, PromptCache, kv_group_size_for
from .layers import AttentionBiases, Layer, SelfConditioning, split_attention
from .vision import MultimodalEmbedder, VisionTower


class Decoder(nn.Module):
    """Holds every text weight (`model.decoder.*` on disk); both passes use these layers."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class EncoderLayerScalar(nn.Module):
    """What the encoder does not share with the decoder: its layer scalar, and its attention
    biases when the config has `attention_bias`."""

    def __init__(self, args: TextArgs | None = None, layer: int = 0):
        super().__init__()
        self.layer_scalar = mx.ones((1,))
        if args is not None and args.attention_bias:
            self.self_attn = AttentionBiases(args, layer)

    @property
    def biases(self) -> AttentionBiases | None:
        return self.get("self_attn")


class EncoderLanguageModel(nn.Module):
    def __init__(self, args: TextArgs):
        super().__init__()
        self.layers = [EncoderLayerScalar(args, i) for i in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: TextArgs, vision: VisionArgs | None = None):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)
        if vision is not None:
            self.vision_tower = VisionTower(vision)
            self.embed_vision = MultimodalEmbedder(vision, args.hidden_size)


class Backbone(nn.Module):
    def __init__(self, args: TextArgs, vision: VisionArgs | None = None):
        super().__init__()
        self.encoder = Encoder(args, vision)
        self.decoder = Decoder(args)


def _encoder_mask(q_start: int, n: int, k_start: int, k_rows: int, window: int | None,
                  groups: mx.array | None = None) -> mx.array:
    """Causal (and sliding-window) mask for `n` queries at positions `q_start...` over `k_rows`
    keys at positions `k_start...`: `[n, k_rows]`, built once per chunk and layer type.

    `groups` (`[n]`, -1 for text) marks the chunk's image runs: a query also sees every key of
    its own run, ahead of it or out of the window (the reference's blockwise overlay, OR-ed with
    the causal or sliding mask on every layer type). A run never spans two chunks, so only the
    chunk's own keys (the last `n` columns) can share a query's group."""
    qpos = mx.arange(q_start, q_start + n)[:, None]
    kpos = mx.arange(k_start, k_start + k_rows)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    if groups is not None:
        same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
        same = mx.concatenate([mx.zeros((n, k_rows - n), dtype=mx.bool_), same], axis=1)
        mask = mask | same
    return mask


class Model(nn.Module):
    """DiffusionGemma: `prefill`, `extend` (encoder), `denoise`, `denoise_rows`, `denoise_batch` (decoder).

    Beside its weights a model carries `args` (config.json), `generation` (generation_config.json:
    the sampler's defaults, the end-of-sequence ids), `source` (the folder it was loaded from,
    None for a model built in memory) and `memory_plan` (the loader's `checkpoint.memory.MemoryPlan`,
    which every request's context is checked against; None for a model built in memory); the
    loader sets the last three."""

    def __init__(self, args: ModelArgs, generation: GenerationDefaults | None = None, source: Path | None = None):
        super().__init__()
        self.args = args
        self.text = args.text
        self.model = Backbone(args.text, args.vision)
        self.embed_scale = math.sqrt(args.text.hidden_size)
        self.generation = generation or GenerationDefaults()
        self.source = source
        self.memory_plan = None
        self.kv_bits: int | None = None  # the prompt cache's K/V bits (None: float, the exact path)
        self.kv_group_size = KV_GROUP_SIZE

    def set_kv_bits(self, kv_bits: int | None, group_size: int | None = None) -> None:
        """Hold every new prompt cache's K/V quantized to `kv_bits` (4 or 8; None: float, exact),
        in groups of `group_size` (default `cache.default_group_size`), as mlx-lm's `--kv-bits` /
        `--kv-group-size`; ValueError for values this model cannot use."""
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size_for(kv_bits, group_size, self.text.head_dims)

    # -- structure ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[Layer]:
        return self.model.decoder.layers

    @property
    def canvas_length(self) -> int:
        return self.args.canvas_length

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def embed_dtype(self) -> mx.Dtype:
        e = self.model.decoder.embed_tokens
        return e.scales.dtype if hasattr(e, "scales") else e.weight.dtype

    def make_cache(self) -> PromptCache:
        keep = self.text.sliding_window - 1
        return PromptCache(
            [LayerKV(keep if self.text.is_sliding(i) else None, self.kv_bits, self.kv_group_size)
             for i in range(self.text.num_hidden_layers)]
        )

    def _embed(self, ids: mx.array) -> mx.array:
        h = self.model.decoder.embed_tokens(ids)
        # The reference casts the scale to the weight dtype (sqrt(2816) -> 53.0 in bfloat16).
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    # -- images --------------------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        return "vision_tower" in self.model.encoder

    def encode_image(self, pixel_values: Any, position_ids: Any, grid: tuple[int, int]) -> mx.array:
        """One image's soft tokens in the text width, `[rows * cols / k**2, hidden]`
        (`get_image_features` of the reference for one image, without padding).

        `pixel_values` `[patches, 3 * patch**2]` in [0, 1] and `position_ids` `[patches, 2]`
        (column, row) come from `processor.ImageProcessor`; `grid` is (rows, cols) of patches."""
        if not self.has_vision:
            raise ValueError("this model has no vision tower (a text-only checkpoint or load)")
        enc = self.model.encoder
        feats = enc.vision_tower(mx.array(pixel_values), mx.array(position_ids), grid)
        return enc.embed_vision(feats)

    # -- encoder pass --------------------------------------------------------------------------
    def prefill(self, token_ids: Any, chunk_size: int = PREFILL_CHUNK,
                image_features: Sequence[mx.array] | None = None) -> PromptCache:
        """Encode a prompt (causal) into a new cache; long prompts go through in chunks."""
        cache = self.make_cache()
        self.extend(cache, token_ids, chunk_size=chunk_size, image_features=image_features)
        return cache

    def extend(self, cache: PromptCache, token_ids: Any, chunk_size: int = PREFILL_CHUNK,
               valid: mx.array | None = None,
               image_features: Sequence[mx.array] | None = None) -> PromptCache:
        """Encode `token_ids` (causal) after what `cache` holds, appending their K/V to it.
        `valid` `[batch, tokens]` marks real tokens of a left-padded batch (see `encode_chunk`).

        With `image_features` (one `[n_i, hidden]` array per image, in prompt order, from
        `encode_image`), the image token positions take those rows instead of their embedding
        (the i-th image token gets the i-th row of the concatenated features) and, under the
        released `use_bidirectional_attention: "vision"`, each run of image tokens attends
        bidirectionally within itself. Chunks are stretched so that no run is split."""
        ids = _as_ids(token_ids)
        n = ids.shape[1]
        if n and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            # MLX's gather does not check bounds: an id past the table reads whatever memory lies
            # beyond it (garbage or NaN logits that change from run to run), so refuse it here.
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) for this model, "
                             f"got {int(ids.min())}..{int(ids.max())}")
        placement = None
        if image_features is not None and len(image_features) > 0:
            placement = self._image_placement(ids, image_features)
        start = 0
        while start < n:
            end = min(start + chunk_size, n)
            if placement is not None:
                is_image = placement[0]
                while end < n and is_image[end - 1] and is_image[end]:
                    end += 1  # never split a run of image tokens between two chunks
            chunk_valid = None if valid is None else valid[:, start:end]
            self.encode_chunk(cache, ids[:, start:end], chunk_valid, placement, start)
            mx.eval(cache.state())  # bound the lazy graph (and memory) to one chunk
            start = end
        return cache

    def _image_placement(self, ids: mx.array, features: Sequence[mx.array]):
        """(is_image `[n]` numpy bool, feature row per position, all features `[T, D]`, groups)."""
        if ids.shape[0] != 1:
            raise ValueError("prompts with images are encoded one sequence at a time")
        row = np.array(ids[0]) == self.args.image_token_id
        feats = mx.concatenate([f.reshape(-1, f.shape[-1]) for f in features], axis=0)
        if int(row.sum()) != feats.shape[0]:
            raise ValueError(
                f"the prompt has {int(row.sum())} image tokens but the images give {feats.shape[0]} soft tokens"
            )
        index = np.where(row, np.cumsum(row) - 1, 0).astype(np.int32)
        groups = None
        if self.args.bidirectional == "vision":
            starts = row & ~np.concatenate([[False], row[:-1]])
            groups = np.where(row, np.cumsum(starts) - 1, -1).astype(np.int32)
        return row, index, feats, groups

    def encode_chunk(self, cache: PromptCache, ids: mx.array, valid: mx.array | None = None,
                     placement=None, offset: int = 0) -> None:
        """Encode one chunk after the cache, lazily (nothing is evaluated: training differentiates
        through it). `valid` `[batch, n]` marks real tokens in a
        left-padded batch: padding positions are never attended to (by this chunk, later chunks
        or the decoder). Without it the pass is exactly the single-prompt inference path.
        `placement` (from `_image_placement`) puts image features at the chunk's image tokens
        (the chunk starts at `offset` in the prompt) and gives their bidirectional groups."""
        n = ids.shape[1]
        pos = cache.length
        if valid is not None or cache.valid is not None:
            valid = mx.ones(ids.shape, dtype=mx.bool_) if valid is None else valid.astype(mx.bool_)
            cache.valid = valid if cache.valid is None else mx.concatenate([cache.valid, valid], axis=1)
        h = self._embed(ids)
        groups = None
        if placement is not None:
            is_image, index, feats, all_groups = placement
            chunk = is_image[offset : offset + n]
            if chunk.any():
                rows = feats[mx.array(index[offset : offset + n])].astype(h.dtype)
                h = mx.where(mx.array(chunk)[None, :, None], rows[None], h)
                if all_groups is not None:
                    groups = mx.array(all_groups[offset : offset + n])
        masks: dict[bool, mx.array] = {}
        scalars = self.model.encoder.language_model.layers
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = cache.layers[i]
            sliding = self.text.is_sliding(i)
            rows_before = kv.rows

            def attend(q, k, v, kv=kv, sliding=sliding, rows_before=rows_before):
                keys, values = kv.append(k, v)
                if sliding not in masks:
                    window = self.text.sliding_window if sliding else None
                    mask = _encoder_mask(pos, n, pos - rows_before, rows_before + n, window, groups)
                    keys_ok = cache.key_mask(rows_before + n, end=pos + n)
                    masks[sliding] = mask if keys_ok is None else mask & keys_ok
                return split_attention(q, [(keys, values, masks[sliding])])

            if i == last:
                # The encoder's output is never read: the last layer only has to write its K/V.
                attn = layer.self_attn
                _, k, v = attn.qkv(layer.input_layernorm(h), pos, scalars[i].biases)
                kv.append(k, v)
                break
            h = layer(h, pos, attend, scalars[i].layer_scalar, scalars[i].biases)
        cache.length += n

    # -- decoder pass --------------------------------------------------------------------------
    def soft_embeddings(self, self_conditioning: mx.array, top_k: int | None = None) -> mx.array:
        """softmax(previous processed logits) @ E * sqrt(hidden), in the embedding dtype.

        With `top_k`, only the k most probable tokens contribute: their exact probabilities
        (not renormalised) times their embedding rows, gathered instead of a `[V, D]` matmul.
        The error is at most (1 - captured mass) * max_v ||E_v|| * sqrt(hidden).
        """
        dtype = self.embed_dtype
        x = self_conditioning.astype(mx.float32)
        e = self.model.decoder.embed_tokens
        if top_k is not None and top_k < x.shape[-1]:
            idx = mx.argpartition(-x, kth=top_k - 1, axis=-1)[..., :top_k]
            return self.soft_embeddings_top_k(idx, mx.take_along_axis(x, idx, axis=-1)
                                              - mx.logsumexp(x, axis=-1, keepdims=True))
        probs = mx.softmax(x, axis=-1).astype(dtype)
        if hasattr(e, "scales"):  # quantized embedding: probs @ dequant(W) without dequantizing
            soft = mx.quantized_matmul(
                probs, e.weight, e.scales, e.get("biases"), transpose=False,
                group_size=e.group_size, bits=e.bits, mode=getattr(e, "mode", "affine"),
            )
        else:
            soft = probs @ e.weight
        return soft * mx.array(self.embed_scale, dtype=dtype)

    def denoise(
        self,
        canvas_ids: Any,
        cache: PromptCache,
        self_conditioning: mx.array | None = None,
        *,
        self_conditioning_top_k: int | None = None,
        self_conditioning_mask: mx.array | None = None,
    ) -> mx.array:
        """One decoder pass: float32 softcapped logits `[batch, canvas, vocab]`.

        `self_conditioning` is the previous denoising step's PROCESSED logits (the raw logits
        divided by that step's temperature), shape `[batch, canvas, vocab]`, any float dtype; they
        are softmaxed in float32 and cast to the embedding dtype, as in the reference. `None` at
        the first step of a canvas (the block then runs on zeros). The cache is only read.
        `self_conditioning_top_k` selects the cheaper top-k self-conditioning (see
        `soft_embeddings`); the default is the exact one, as in the reference.
        `self_conditioning_mask` `[batch]` bool zeroes the signal of the rows set to False (the
        reference's argument of the same name, used in training).
        """
        ids = _as_ids(canvas_ids)
        pos = cache.length
        embeds = self._embed(ids)
        if self_conditioning is None:
            soft = mx.zeros_like(embeds)
        else:
            soft = self.soft_embeddings(self_conditioning, self_conditioning_top_k).astype(embeds.dtype)
            if self_conditioning_mask is not None:
                soft = soft * self_conditioning_mask.astype(soft.dtype)[:, None, None]
        h = self.model.decoder.self_conditioning(embeds, soft)
        for i, layer in enumerate(self.layers):
            prefix_k, prefix_v = cache.layers[i].view()
            prefix_mask = None if prefix_k is None else cache.key_mask(prefix_k.shape[2])

            def attend(q, k, v, pk=prefix_k, pv=prefix_v, pm=prefix_mask):
                parts = [(k, v, None)] if pk is None else [(pk, pv, pm), (k, v, None)]
                return split_attention(q, parts)

            h = layer(h, pos, attend, layer.layer_scalar)
        h = self.model.decoder.norm(h)
        return self.logits(h)

    def make_canvas_kv(self, batch: int = 1) -> CanvasKV:
        """Empty per-layer canvas K/V for `denoise_rows` (filled by its first, all-rows pass)."""
        c = self.canvas_length
        proj = self.model.decoder.layers[0].self_attn.q_proj
        proj = getattr(proj, "linear", proj)  # a LoRA adapter (mlx-lm's LoRALinear) wraps the projection
        dtype = proj.weight.dtype
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):  # quantized projections
            dtype = self.embed_dtype
        # The heads each layer's attention holds here: a rank of a tensor-parallel split holds its share.
        shapes = [(batch, layer.self_attn.n_kv_heads, c + 1, layer.self_attn.head_dim) for layer in self.layers]
        return CanvasKV([mx.zeros(s, dtype=dtype) for s in shapes], [mx.zeros(s, dtype=dtype) for s in shapes])

    def soft_embeddings_top_k(self, indices: mx.array, log_probs: mx.array) -> mx.array:
        """Self-conditioning embedding from the k most probable tokens only: their exact
        probabilities (`exp(log_probs)`, not renormalised) times their embedding rows, a gather
        instead of the `[V, D]` matmul (`soft_embeddings(x, top_k=k)` calls it with the top-k of x)."""
        dtype = self.embed_dtype
        rows = self.model.decoder.embed_tokens(indices)  # [..., k, D], dequantized rows when quantized
        p = mx.exp(log_probs.astype(mx.float32)).astype(dtype)
        return (p[..., None] * rows).sum(axis=-2) * mx.array(self.embed_scale, dtype=dtype)

    def denoise_rows(
        self,
        canvas_ids: Any,
        rows: mx.array,
        cache: PromptCache,
        canvas_kv: "CanvasKV",
        soft: mx.array | None = None,
    ) -> mx.array:
        """A decoder pass over some canvas rows only (fast mode): logits `[1, len(rows), vocab]`.

        `canvas_ids` `[1, C]` is the whole canvas; `rows` int32 `[L]` the positions to compute; a
        row equal to C is padding (shape bucketing): it is computed on a dummy slot and never
        read. Every layer attends the rows' queries to the cached prefix (read in place, as in
        `denoise`) and to ALL canvas keys/values: the rows' fresh ones, written into `canvas_kv`,
        and the other positions' ones kept there from their last computation (frozen positions
        are not recomputed). With every row live this is `denoise`; with some rows frozen it is
        the approximation of dKV-Cache / Fast-dLLM: frozen rows' K/V are stale by the steps since
        they were last computed.

        `soft` `[1, L, D]` is the rows' self-conditioning embedding (`soft_embeddings(...)` or
        `soft_embeddings_top_k(...)` of their previous processed logits), None at the first step.
        """
        return self.denoise_rows_batch([canvas_ids], [rows], [cache], [canvas_kv], [soft])[0]

    def denoise_rows_batch(self, canvases: Sequence[Any], rows: Sequence[mx.array], caches: Sequence[PromptCache],
                           canvas_kvs: Sequence["CanvasKV"], softs: Sequence[mx.array | None]) -> list[mx.array]:
        """`denoise_rows` for several requests in one decoder pass: logits `[1, len(rows[r]), V]`
        per request, each equal to its own `denoise_rows(...)` up to rounding.

        As in `denoise_batch`, every request's rows are laid end to end as one sequence, each row
        with its own position, so that everything that reads weights (embeddings, projections,
        the dense MLP, the routed experts, the LM head) reads them once for all requests' rows;
        attention stays per request, over its own cached prefix and its own canvas K/V."""
        embeds, soft_rows, positions, index, spans = [], [], [], [], []
        start = 0
        for ids, r, cache, soft in zip(canvases, rows, caches, softs):
            ids = _as_ids(ids)
            r = r.astype(mx.int32)
            padded = mx.concatenate([ids, mx.zeros((1, 1), dtype=mx.int32)], axis=1)  # slot C: padding
            e = self._embed(padded[:, r])
            embeds.append(e)
            soft_rows.append(mx.zeros_like(e) if soft is None else soft.astype(e.dtype))
            positions.append(r + cache.length)
            index.append(r[None, None, :, None])
            spans.append((start, start + r.shape[0], ids.shape[1]))
            start += r.shape[0]
        h = self.model.decoder.self_conditioning(_joined(embeds, 1), _joined(soft_rows, 1))
        positions = _joined(positions, 0)
        for i, layer in enumerate(self.layers):
            views = [cache.layers[i].view() for cache in caches]

            def attend(q, k, v, i=i, views=views):
                out = []
                for (pk, pv), kv, idx, (a, b, c) in zip(views, canvas_kvs, index, spans):
                    kr, vr = k[:, :, a:b], v[:, :, a:b]
                    ck = mx.put_along_axis(kv.keys[i], mx.broadcast_to(idx, kr.shape), kr.astype(kv.keys[i].dtype), axis=2)
                    cv = mx.put_along_axis(kv.values[i], mx.broadcast_to(idx, vr.shape), vr.astype(kv.values[i].dtype), axis=2)
                    kv.keys[i], kv.values[i] = ck, cv
                    own = (ck[:, :, :c], cv[:, :, :c], None)
                    out.append(split_attention(q[:, :, a:b], [own] if pk is None else [(pk, pv, None), own]))
                return _joined(out, 2)

            h = layer(h, positions, attend, layer.layer_scalar)
        h = self.model.decoder.norm(h)
        logits = self.logits(h)
        return [logits[:, a:b] for a, b, _ in spans] if len(spans) > 1 else [logits]

    def denoise_batch(self, canvases: Sequence[mx.array], caches: Sequence[PromptCache],
                      self_conditioning: Sequence[mx.array | None],
                      top_k: Sequence[int | None]) -> mx.array:
        """One decoder pass for several requests, each canvas `[1, C]` over its own cache: logits
        `[B, C, V]`, row r equal to `denoise(canvases[r], caches[r], self_conditioning[r], ...)`
        up to rounding.

        Rows differ in their cached prefix (length, content) and position. Everything that reads
        weights runs batched, `B * C` rows at once: embeddings, self-conditioning, projections,
        the dense MLP, the routed experts and the LM head, which dominate a denoising step (the
        MoE weights are read once for all rows instead of once per request). Attention is per
        request, over its cache read in place and its own canvas (the same `split_attention` call
        as a single request's pass: no padding, no masks, no copy of any cache)."""
        if len(canvases) == 1:
            return self.denoise(canvases[0], caches[0], self_conditioning[0], self_conditioning_top_k=top_k[0])
        # The rows are laid end to end as ONE sequence of B * C tokens, each with its own position
        # (the per-row-position form, `[L]` offsets at batch 1): every per-token layer (projections,
        # norms, MLPs, experts) is then exactly the single-request computation.
        c_len = canvases[0].shape[1]
        ids = mx.concatenate(list(canvases), axis=1)  # [1, B*C]
        embeds = self._embed(ids)
        soft = mx.zeros((len(canvases), c_len, embeds.shape[-1]), dtype=embeds.dtype)
        # Self-conditioning rows (every row but those at a block's first step), by top-k setting, in
        # one pass each: the [V, D] embedding matrix is read once for all of them.
        groups: dict[int | None, list[int]] = {}
        for r, (sc, k) in enumerate(zip(self_conditioning, top_k)):
            if sc is not None:
                groups.setdefault(k, []).append(r)
        for k, rows in groups.items():
            sc = mx.concatenate([self_conditioning[r] for r in rows], axis=0)
            part = self.soft_embeddings(sc, k).astype(embeds.dtype)
            soft = soft.at[mx.array(rows)].add(part)  # rows are distinct: add into zeros == set
        h = self.model.decoder.self_conditioning(embeds, soft.reshape(1, -1, embeds.shape[-1]))
        positions = mx.concatenate([mx.arange(c.length, c.length + c_len) for c in caches]).astype(mx.int32)
        for i, layer in enumerate(self.layers):
            views = [c.layers[i].view() for c in caches]

            def attend(q, k, v, views=views):
                out = []
                for r, (pk, pv) in enumerate(views):
                    rows = slice(r * c_len, (r + 1) * c_len)
                    own = (k[:, :, rows], v[:, :, rows], None)
                    out.append(split_attention(q[:, :, rows], [own] if pk is None else [(pk, pv, None), own]))
                return mx.concatenate(out, axis=2)

            h = layer(h, positions, attend, layer.layer_scalar)
        h = self.model.decoder.norm(h)
        return self.logits(h).reshape(len(canvases), c_len, -1)

    def logits(self, h: mx.array) -> mx.array:
        cap = self.text.final_logit_softcapping
        out = self.model.decoder.embed_tokens.as_linear(h).astype(mx.float32)
        tanh = activations.tanh if self.fast_act else mx.tanh
        return tanh(out / cap) * cap

    fast_act: bool = False

    def set_training_kernels(self, *, dense_experts: bool, fast_activations: bool) -> None:
        """Switch the training-speed formulations on or off (see `Experts.dense`, `activations`)."""
        self.fast_act = fast_activations
        self.model.decoder.self_conditioning.fast_act = fast_activations
        for layer in self.layers:
            layer.experts.dense = dense_experts
            layer.experts.fast_act = fast_activations
            layer.mlp.fast_act = fast_activations

    # -- weights -------------------------------------------------------------------------------
    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's tensors (any supported layout) under this model's parameter paths; the
        vision tower's are dropped when the model has none (see `map_key`)."""
        out = {}
        for key, value in weights.items():
            new = map_key(key, vision=self.has_vision)
            if new is not None:
                out[new] = value
        return out


def _joined(parts: list[mx.array], axis: int) -> mx.array:
    """The parts concatenated along `axis`; one part as it is (one request's pass: no copy)."""
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def _as_ids(token_ids: Any) -> mx.array:
    ids = token_ids if isinstance(token_ids, mx.array) else mx.array(token_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"token ids must be [tokens] or [batch, tokens], got shape {ids.shape}")
    return ids.astype(mx.int32)


# -- the checkpoint key map ----------------------------------------------------------------------
# Three on-disk layouts map to one set of parameter paths: Hugging Face's (`save_pretrained`:
# `model.decoder.*` holds every text weight, bare `experts.gate_up_proj` / `experts.down_proj`
# tensors, encoder `layer_scalar`s under `model.encoder.language_model.layers.N`, `lm_head` tied to
# the embedding, vision tensors), ours (`dgemma convert`) and mlx-vlm's (the mlx-community
# conversions): the same paths with `.weight` / `.scales` / `.biases` on the fused experts.

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

_UNUSED_SUFFIXES = (".input_min", ".input_max", ".output_min", ".output_max")

_ENCODER_TEXT = "model.encoder.language_model."

# The encoder's own tensors: layer scalars, and attention biases (`attention_bias: true`), which
# the reference does not tie to the decoder's (it ties weights only).
_ENCODER_SCALAR = re.compile(
    r"^model\.encoder\.language_model\.layers\.(\d+)\.(layer_scalar|self_attn\.[qkvo]_proj\.bias)$")

_EXPERT_BARE = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def is_vision_key(key: str) -> bool:
    return key.startswith(VISION_PREFIXES)


def map_key(key: str, vision: bool = True) -> str | None:
    """MLX parameter path for a checkpoint key, or None when the tensor is not used.

    Vision tensors keep their Hugging Face names (mlx-vlm's conversions use the same ones),
    their clipping bounds included (the tower clamps with them when `use_clipped_linears`);
    `vision=False` drops them all (text-only loading and conversion)."""
    if is_vision_key(key):
        return key if vision and "rotary_emb" not in key else None
    if key.endswith(_UNUSED_SUFFIXES) or "rotary_emb" in key:
        return None
    if key == "lm_head.weight":
        return None  # tied to model.decoder.embed_tokens.weight
    if key.startswith(_ENCODER_TEXT):
        # The encoder's text weights are the decoder's; only its layer scalars are its own.
        return key if _ENCODER_SCALAR.match(key) else None
    if _EXPERT_BARE.search(key):
        return key + ".weight"
    return key
