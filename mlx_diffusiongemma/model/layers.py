"""The layers of DiffusionGemma's text model: attention (with the split softmax that reads a cache in
place), the dense GeGLU MLP, the router and the routed experts (gather-based, `SwitchLinear`), the
decoder layer and the self-conditioning block."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear

from . import activations
from .args import TextArgs
from .cache import QuantizedRows

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
    instead of repeating K/V. A part's k/v may be `cache.QuantizedRows` (the quantized prefix
    cache): its scores and values are then read in place with `mx.quantized_matmul`, as mlx-lm's
    `quantized_scaled_dot_product_attention` does (that function itself is not used: it takes one
    key set and applies the softmax itself, so it cannot share a maximum with the canvas's part).
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
        if isinstance(k, QuantizedRows):  # scales in float32: the scores stay float32 as below
            s = mx.quantized_matmul(qf, k.data, k.scales.astype(mx.float32), k.biases.astype(mx.float32),
                                    transpose=True, group_size=k.group_size, bits=k.bits)
        else:
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
        if isinstance(v, QuantizedRows):
            part = mx.quantized_matmul(p.astype(v.scales.dtype), v.data, v.scales, v.biases,
                                       transpose=False, group_size=v.group_size, bits=v.bits)
        else:
            part = p.astype(v.dtype) @ v if v.dtype != mx.float32 else p @ v
        num = part.astype(mx.float32) if num is None else num + part.astype(mx.float32)
        den = p.sum(axis=-1, keepdims=True) if den is None else den + p.sum(axis=-1, keepdims=True)
    o = (num / den).astype(q.dtype)
    return o.reshape(b, hq, n, d)


def gelu(x: mx.array, fast: bool) -> mx.array:
    """GELU-tanh: MLX's own, or the cheap training version (`activations`, same to float32 rounding)."""
    return activations.gelu_tanh(x) if fast else nn.gelu_approx(x)


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
    # From this many (token, slot) routes on, the routes are sorted by expert before the gather
    # matmuls (mlx_lm's SwitchGLU uses the same 64): below it the sort and its inverse cost more
    # than contiguous expert reads save. scripts/few_rows_moe.py times both sides per row count.
    sort_from: int = 64

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        if self.dense:
            return self._dense(x, idx, weights)
        shape = idx.shape
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        sort = idx.size >= self.sort_from
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
