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
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope

from . import fastmath
from mlx_lm.models.switch_layers import SwitchLinear

from .cache import LayerKV, PromptCache
from .config import ModelArgs, TextArgs, VisionArgs
from .vision import MultimodalEmbedder, VisionTower

# Rows of prompt encoded per encoder call in `prefill`: bounds the score/mask memory of long
# prompts to chunk x (window or prefix) instead of N x N.
PREFILL_CHUNK = 512
_NEG_INF = -1e30


def rms_norm_no_scale(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


class Attention(nn.Module):
    def __init__(self, args: TextArgs, layer: int):
        super().__init__()
        self.is_sliding = args.is_sliding(layer)
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.kv_heads[layer]
        self.head_dim = args.head_dims[layer]
        self.eps = args.rms_norm_eps
        d = args.hidden_size
        bias = args.attention_bias  # as the reference: q/k/v/o projections all get a bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        # Full-attention layers have no v_proj: values are v_norm(k_proj(x)) (K=V), whatever the
        # config says about `attention_k_eq_v`.
        if self.is_sliding:
            self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
        kind = "sliding_attention" if self.is_sliding else "full_attention"
        rope = dict(args.rope_parameters.get(kind) or {})
        self.rope = initialize_rope(
            dims=self.head_dim,
            base=float(rope.get("rope_theta", 10_000.0)),
            traditional=False,
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )

    def _project(self, name: str, x: mx.array, biases: "AttentionBiases | None") -> mx.array:
        """`name`'s projection of x, with the encoder's own bias when `biases` is given: the
        reference ties only the WEIGHTS of the encoder to the decoder's, so with
        `attention_bias` each pass has its own biases (the decoder's live in the Linear)."""
        proj = getattr(self, name)
        if biases is None:
            return proj(x)
        return _linear_without_bias(proj, x) + getattr(biases, name).bias.astype(x.dtype)

    def qkv(self, x: mx.array, offset: int | mx.array,
            biases: "AttentionBiases | None" = None) -> tuple[mx.array, mx.array, mx.array]:
        """Projected, normalised, rotated q/k/v, each `[B, heads, L, head_dim]`.

        `offset` is the position of the first row (rows are consecutive), or an int32 array `[L]`
        with each row's own position (the live rows of a fast-mode decoder pass, batch 1).
        `biases`: the encoder's own attention biases (see `_project`)."""
        b, n, _ = x.shape
        q = self.q_norm(self._project("q_proj", x, biases).reshape(b, n, self.n_heads, self.head_dim))
        k = self._project("k_proj", x, biases).reshape(b, n, self.n_kv_heads, self.head_dim)
        v = (self._project("v_proj", x, biases).reshape(b, n, self.n_kv_heads, self.head_dim)
             if self.is_sliding else k)
        k = self.k_norm(k)
        v = rms_norm_no_scale(v, self.eps)  # taken before k_norm and RoPE when K=V
        if isinstance(offset, mx.array):
            q, k = self._rope_rows(q, offset), self._rope_rows(k, offset)
        else:
            q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
            k = self.rope(k.transpose(0, 2, 1, 3), offset=offset)
        return q, k, v.transpose(0, 2, 1, 3)

    def _rope_rows(self, x: mx.array, positions: mx.array) -> mx.array:
        """RoPE at one position per row: `[1, L, H, D]` -> `[1, H, L, D]`. Each row becomes a batch
        entry, because `mx.fast.rope` takes one offset per batch entry."""
        if x.shape[0] != 1:
            raise ValueError("per-row positions need batch 1")
        rows = x.transpose(1, 2, 0, 3)  # [L, H, 1, D]
        return self.rope(rows, offset=positions).transpose(2, 1, 0, 3)

    def out(self, o: mx.array, biases: "AttentionBiases | None" = None) -> mx.array:
        b, _, n, _ = o.shape
        return self._project("o_proj", o.transpose(0, 2, 1, 3).reshape(b, n, -1), biases)


def _linear_without_bias(proj: nn.Module, x: mx.array) -> mx.array:
    """x @ W^T of a Linear or QuantizedLinear, leaving out its own bias."""
    if isinstance(proj, nn.QuantizedLinear):
        return mx.quantized_matmul(x, proj.weight, proj.scales, proj.get("biases"), transpose=True,
                                   group_size=proj.group_size, bits=proj.bits, mode=getattr(proj, "mode", "affine"))
    if isinstance(proj, nn.Linear):
        return x @ proj.weight.T
    inner = getattr(proj, "linear", proj)  # a wrapper (a LoRA adapter): take its layer's bias out
    return proj(x) - inner.bias.astype(x.dtype)


class _Bias(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.bias = mx.zeros((dims,))


class AttentionBiases(nn.Module):
    """The encoder's own attention biases (`model.encoder.language_model.layers.N.self_attn.*_proj.bias`),
    present only with `attention_bias: true`."""

    def __init__(self, args: TextArgs, layer: int):
        super().__init__()
        heads, kv, d = args.num_attention_heads, args.kv_heads[layer], args.head_dims[layer]
        self.q_proj = _Bias(heads * d)
        self.k_proj = _Bias(kv * d)
        if args.is_sliding(layer):
            self.v_proj = _Bias(kv * d)
        self.o_proj = _Bias(args.hidden_size)


def split_attention(
    q: mx.array,
    parts: list[tuple[mx.array, mx.array, mx.array | None]],
) -> mx.array:
    """Exact softmax attention (scale 1.0) over several key/value sets without concatenating them.

    `q` is `[B, Hq, L, D]`; each part is `(k, v, mask)` with k/v `[B, Hkv, S_i, D]` and an optional
    boolean mask broadcastable to `[L, S_i]`. The parts' scores are combined with one shared
    maximum, which is how the decoder reads the cached prefix in place (zero bytes copied) and the
    canvas K/V that never enter the cache. Grouped-query heads are folded into the query rows
    instead of repeating K/V.
    """
    b, hq, n, d = q.shape
    hkv = parts[0][0].shape[1]
    rep = hq // hkv
    qg = q.reshape(b, hkv, rep * n, d)
    # Scores in float32 whatever the activation dtype: the reference's default (sdpa) path keeps
    # them in float32, and rounding bf16 scores before the softmax loses ~3 significant digits.
    qf = qg.astype(mx.float32)
    scores = []
    for k, _, mask in parts:
        s = qf @ k.astype(mx.float32).swapaxes(-1, -2)
        if mask is not None:
            s = s.reshape(b, hkv, rep, n, -1)
            s = mx.where(mask, s, _NEG_INF)
            s = s.reshape(b, hkv, rep * n, -1)
        scores.append(s)
    m = scores[0].max(axis=-1, keepdims=True)
    for s in scores[1:]:
        m = mx.maximum(m, s.max(axis=-1, keepdims=True))
    num = None
    den = None
    for s, (_, v, _) in zip(scores, parts):
        p = mx.exp(s - m)
        part = p.astype(v.dtype) @ v if v.dtype != mx.float32 else p @ v
        num = part.astype(mx.float32) if num is None else num + part.astype(mx.float32)
        den = p.sum(axis=-1, keepdims=True) if den is None else den + p.sum(axis=-1, keepdims=True)
    o = (num / den).astype(q.dtype)
    return o.reshape(b, hq, n, d)


def gelu(x: mx.array, fast: bool) -> mx.array:
    """GELU-tanh: MLX's own, or the cheap training version (`fastmath`, same to float32 rounding)."""
    return fastmath.gelu_tanh(x) if fast else nn.gelu_approx(x)


class MLP(nn.Module):
    """GeGLU feed-forward (dense MLP and the self-conditioning block)."""

    fast_act: bool = False  # training switch, see `Model.set_training_kernels`

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu(self.gate_proj(x), self.fast_act) * self.up_proj(x))


class Router(nn.Module):
    """Weightless RMSNorm * scale * hidden**-0.5 -> logits -> softmax -> top-k -> renormalise."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.root = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, h: mx.array) -> tuple[mx.array, mx.array]:
        x = rms_norm_no_scale(h, self.eps) * (self.scale * self.root).astype(h.dtype)
        probs = mx.softmax(self.proj(x).astype(mx.float32), axis=-1)
        # Indices carry no gradient (training differentiates through the weights only).
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        w = w * self.per_expert_scale[idx].astype(mx.float32)
        return idx, w


def _sort_by_expert(x: mx.array, idx: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Order (token, slot) pairs by expert so the gather matmuls read each expert contiguously."""
    k = idx.shape[-1]
    flat = idx.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // k], flat[order], mx.argsort(order)


class ExpertLinear(SwitchLinear):
    """mlx_lm's SwitchLinear (so `nn.quantize` turns it into a `gather_qmm` layer), except that
    unquantized half-precision weights run through `gather_mm` in float32 on the CPU backend,
    whose GatherMM kernel only supports float32 (MLX 0.32). The float32 copy is made once per
    weight array and kept (CPU only: tests and benchmarks); on a GPU nothing changes."""

    _f32: tuple[mx.array, mx.array] | None = None  # (source weight, its float32 copy)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self["weight"]
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
            if self._f32 is None or self._f32[0] is not w:
                wt = w.astype(mx.float32).swapaxes(-1, -2)
                mx.eval(wt)
                object.__setattr__(self, "_f32", (w, wt))  # not a parameter: kept out of the tree
            y = mx.gather_mm(x.astype(mx.float32), self._f32[1], rhs_indices=indices, sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        return super().__call__(x, indices, sorted_indices=sorted_indices)


def _dense_weight(layer: nn.Module) -> mx.array:
    """`[E, out, in]` weight of an expert layer for the dense path: a quantized base is
    dequantized, and a LoRA-wrapped layer (`mlx_lm.tuner.lora.LoRASwitchLinear`, fine-tuning)
    adds its low-rank update `scale * B @ A` (its dropout, off by default, is not applied)."""
    base = getattr(layer, "linear", layer)
    if "scales" in base:
        w = mx.dequantize(base["weight"], base["scales"], base.get("biases"), group_size=base.group_size,
                          bits=base.bits, mode=getattr(base, "mode", "affine"))
    else:
        w = base["weight"]
    if "lora_a" in layer:
        w = w + (layer.scale * (layer["lora_b"] @ layer["lora_a"])).astype(w.dtype)
    return w


class Experts(nn.Module):
    """Routed GeGLU experts with gather-based selection (`gather_mm` / `gather_qmm`).

    `gate_up_proj` stays fused (`[E, 2I, D]`, gate rows first) as on disk: one gather matmul
    instead of two, and no lazy split feeding `gather_qmm` (a reported source of nondeterminism).
    """

    def __init__(self, args: TextArgs):
        super().__init__()
        d, i, e = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_up_proj = ExpertLinear(d, 2 * i, e, bias=False)
        self.down_proj = ExpertLinear(i, d, e, bias=False)

    # Training switch: run every expert on every row and weight by the router's (sparse) top-k
    # weights. The same function as the gather path (zero weight outside the top-k), but plain
    # matmuls: on MLX's CPU backend `gather_mm` runs ~30x slower than a BLAS matmul, so for a
    # handful of experts the dense form is the faster one. LoRA-wrapped and quantized experts
    # go through `_dense_weight`.
    dense: bool = False
    fast_act: bool = False

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        if self.dense:
            return self._dense(x, idx, weights)
        shape = idx.shape
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        sort = idx.size >= 64
        if sort:
            x, sidx, inv = _sort_by_expert(x, idx)
        else:
            sidx = idx
        gu = self.gate_up_proj(x, sidx, sorted_indices=sort)
        gate, up = mx.split(gu, 2, axis=-1)
        y = self.down_proj(gelu(gate, self.fast_act) * up, sidx, sorted_indices=sort)
        if sort:
            y = mx.unflatten(y[inv], 0, shape)
        y = y.squeeze(-2)  # [..., K, D]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


    def _dense(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """Every expert on every row as two 2D matmuls: `[N, D] @ [D, E*2I]`, then the
        activations scaled by each row's expert weight (zero outside its top-k) and
        `[N, E*I] @ [E*I, D]`, which sums the weighted experts' outputs in the same product."""
        wgu, wd = _dense_weight(self.gate_up_proj), _dense_weight(self.down_proj)  # [E, 2I, D], [E, D, I]
        e, two_i, d = wgu.shape
        lead = x.shape[:-1]
        rows = x.reshape(-1, d)
        onehot = (idx.reshape(-1, idx.shape[-1])[..., None] == mx.arange(e)).astype(weights.dtype)
        w = (onehot * weights.reshape(-1, weights.shape[-1])[..., None]).sum(axis=1)  # [N, E]
        gu = (rows @ wgu.reshape(e * two_i, d).T).reshape(-1, e, two_i)
        gate, up = mx.split(gu, 2, axis=-1)
        act = gelu(gate, self.fast_act) * up * w[..., None].astype(up.dtype)  # [N, E, I]
        out = act.reshape(rows.shape[0], -1) @ wd.swapaxes(1, 2).reshape(-1, d)
        return out.reshape(*lead, d)


class Layer(nn.Module):
    def __init__(self, args: TextArgs, layer: int):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(d, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(d, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(d, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(d, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(d, eps=eps)
        self.layer_scalar = mx.ones((1,))  # the decoder's; the encoder's lives in the encoder

    def feed_forward(self, h: mx.array) -> mx.array:
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        idx, w = self.router(h)  # routed on the raw residual
        moe = self.post_feedforward_layernorm_2(self.experts(self.pre_feedforward_layernorm_2(h), idx, w))
        return h + self.post_feedforward_layernorm(dense + moe)

    def __call__(
        self,
        x: mx.array,
        offset: int,
        attend: Callable[[mx.array, mx.array, mx.array], mx.array],
        layer_scalar: mx.array,
        biases: AttentionBiases | None = None,
    ) -> mx.array:
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), offset, biases)
        h = x + self.post_attention_layernorm(self.self_attn.out(attend(q, k, v), biases))
        return self.feed_forward(h) * layer_scalar.astype(h.dtype)


class SelfConditioning(nn.Module):
    fast_act: bool = False

    def __init__(self, args: TextArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=self.eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, embeds: mx.array, soft: mx.array) -> mx.array:
        n = self.pre_norm(soft)
        signal = self.down_proj(gelu(self.gate_proj(n), self.fast_act) * self.up_proj(n))
        return rms_norm_no_scale(embeds + signal, self.eps)  # post_norm has no weight


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


class CanvasKV:
    """Per-layer keys/values of every canvas position from its last computation (fast mode):
    `[B, kv_heads, C + 1, head_dim]` per layer; slot C is where padding rows write."""

    def __init__(self, keys: list[mx.array], values: list[mx.array]):
        self.keys = keys
        self.values = values

    def state(self) -> list[mx.array]:
        return self.keys + self.values


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
    """DiffusionGemma text model: `prefill`, `extend` (encoder) and `denoise` (decoder)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.text = args.text
        self.model = Backbone(args.text, args.vision)
        self.embed_scale = math.sqrt(args.text.hidden_size)

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
            [LayerKV(keep if self.text.is_sliding(i) else None) for i in range(self.text.num_hidden_layers)]
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
        `valid` `[batch, tokens]` marks real tokens of a left-padded batch (see `_encode_chunk`).

        With `image_features` (one `[n_i, hidden]` array per image, in prompt order, from
        `encode_image`), the image token positions take those rows instead of their embedding
        (the i-th image token gets the i-th row of the concatenated features) and, under the
        released `use_bidirectional_attention: "vision"`, each run of image tokens attends
        bidirectionally within itself. Chunks are stretched so that no run is split."""
        ids = _as_ids(token_ids)
        n = ids.shape[1]
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
            self._encode_chunk(cache, ids[:, start:end], chunk_valid, placement, start)
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

    def _encode_chunk(self, cache: PromptCache, ids: mx.array, valid: mx.array | None = None,
                      placement=None, offset: int = 0) -> None:
        """Encode one chunk after the cache. `valid` `[batch, n]` marks real tokens in a
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
        scale = mx.array(self.embed_scale, dtype=dtype)
        x = self_conditioning.astype(mx.float32)
        e = self.model.decoder.embed_tokens
        if top_k is not None and top_k < x.shape[-1]:
            idx = mx.argpartition(-x, kth=top_k - 1, axis=-1)[..., :top_k]
            p = mx.exp(mx.take_along_axis(x, idx, axis=-1) - mx.logsumexp(x, axis=-1, keepdims=True))
            rows = e(idx)  # [B, C, k, D], dequantized rows when the embedding is quantized
            return (p.astype(dtype)[..., None] * rows).sum(axis=-2) * scale
        probs = mx.softmax(x, axis=-1).astype(dtype)
        if hasattr(e, "scales"):  # quantized embedding: probs @ dequant(W) without dequantizing
            soft = mx.quantized_matmul(
                probs, e.weight, e.scales, e.get("biases"), transpose=False,
                group_size=e.group_size, bits=e.bits, mode=getattr(e, "mode", "affine"),
            )
        else:
            soft = probs @ e.weight
        return soft * scale

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

    def make_canvas_kv(self, batch: int = 1) -> "CanvasKV":
        """Empty per-layer canvas K/V for `denoise_rows` (filled by its first, all-rows pass)."""
        c = self.canvas_length
        dtype = self.model.decoder.layers[0].self_attn.q_proj.weight.dtype
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):  # quantized projections
            dtype = self.embed_dtype
        shapes = [(batch, self.text.kv_heads[i], c + 1, self.text.head_dims[i]) for i in range(len(self.layers))]
        return CanvasKV([mx.zeros(s, dtype=dtype) for s in shapes], [mx.zeros(s, dtype=dtype) for s in shapes])

    def soft_embeddings_top_k(self, indices: mx.array, log_probs: mx.array) -> mx.array:
        """Self-conditioning embedding from the k most probable tokens only: their exact
        probabilities (`exp(log_probs)`, not renormalised) times their embedding rows, a gather
        instead of the `[V, D]` matmul. Same as `soft_embeddings(x, top_k=k)` given the top-k of x."""
        dtype = self.embed_dtype
        rows = self.model.decoder.embed_tokens(indices)  # [..., k, D]
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
        ids = _as_ids(canvas_ids)
        c = ids.shape[1]
        rows = rows.astype(mx.int32)
        padded = mx.concatenate([ids, mx.zeros((1, 1), dtype=mx.int32)], axis=1)  # slot C: padding
        pos = cache.length
        embeds = self._embed(padded[:, rows])
        if soft is None:
            soft = mx.zeros_like(embeds)
        h = self.model.decoder.self_conditioning(embeds, soft.astype(embeds.dtype))
        positions = rows + pos
        index = rows[None, None, :, None]
        for i, layer in enumerate(self.layers):
            prefix_k, prefix_v = cache.layers[i].view()

            def attend(q, k, v, i=i, pk=prefix_k, pv=prefix_v):
                ck = mx.put_along_axis(canvas_kv.keys[i], mx.broadcast_to(index, k.shape), k.astype(canvas_kv.keys[i].dtype), axis=2)
                cv = mx.put_along_axis(canvas_kv.values[i], mx.broadcast_to(index, v.shape), v.astype(canvas_kv.values[i].dtype), axis=2)
                canvas_kv.keys[i], canvas_kv.values[i] = ck, cv
                own = (ck[:, :, :c], cv[:, :, :c], None)
                return split_attention(q, [own] if pk is None else [(pk, pv, None), own])

            h = layer(h, positions, attend, layer.layer_scalar)
        h = self.model.decoder.norm(h)
        return self.logits(h)

    def logits(self, h: mx.array) -> mx.array:
        cap = self.text.final_logit_softcapping
        out = self.model.decoder.embed_tokens.as_linear(h).astype(mx.float32)
        tanh = fastmath.tanh if self.fast_act else mx.tanh
        return tanh(out / cap) * cap

    fast_act: bool = False

    def set_training_kernels(self, *, dense_experts: bool, fast_activations: bool) -> None:
        """Switch the training-speed formulations on or off (see `Experts.dense`, `fastmath`)."""
        self.fast_act = fast_activations
        self.model.decoder.self_conditioning.fast_act = fast_activations
        for layer in self.layers:
            layer.experts.dense = dense_experts
            layer.experts.fast_act = fast_activations
            layer.mlp.fast_act = fast_activations

    # -- weights -------------------------------------------------------------------------------
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        from .weights import sanitize

        return sanitize(weights)

    @property
    def quant_predicate(self):
        from .weights import default_quant_predicate

        return default_quant_predicate


def _as_ids(token_ids: Any) -> mx.array:
    ids = token_ids if isinstance(token_ids, mx.array) else mx.array(token_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"token ids must be [tokens] or [batch, tokens], got shape {ids.shape}")
    return ids.astype(mx.int32)
