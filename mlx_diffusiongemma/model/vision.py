"""The Gemma 4 vision tower and its projection into the text width, in MLX.

What the reference computes (transformers 5.23: `Gemma4VisionModel` then
`DiffusionGemmaMultimodalEmbedder`, called by `DiffusionGemmaEncoderModel.get_image_features`):

1. patch embedding: `input_proj(2 * (pixels - 0.5))` plus a learned 2D position embedding
   (`table[0][x] + table[1][y]`) per 16x16 patch;
2. bidirectional transformer layers over the patches: q/k RMS-normalised with weights, v without,
   attention scale 1.0, an axial 2D RoPE (first half of each head rotated by the patch column,
   second half by the row), sandwich norms around attention and a GeGLU MLP;
3. pooling: the mean of each k x k block of patches (k = `pooling_kernel_size`), row-major, times
   `sqrt(hidden)`, in float32 (optionally standardised);
4. projection: a weightless RMSNorm and a linear map into the text hidden size.

Images are encoded one at a time at their own patch count. The reference pads every image of a
batch to the processor's patch budget and masks the padding out of attention and pooling; with no
padding at all the valid patches see exactly the same keys, so the features are the same and the
work is only the image's own.

Parameter paths follow the Hugging Face checkpoint (`model.encoder.vision_tower.*`,
`model.encoder.embed_vision.*`); mlx-vlm's conversions use the same names.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .args import VisionArgs


class ClippableLinear(nn.Module):
    """A bias-free linear layer held as `.linear`, with optional input/output clamping.

    Gemma 4 checkpoints with `use_clipped_linears` carry scalar `input_min/max` and
    `output_min/max` per layer; the reference clamps with them, so we do too."""

    def __init__(self, dims: int, out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims, out, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if self.clipped:
            x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        if self.clipped:
            y = mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))
        return y


def axial_rope(x: mx.array, positions: mx.array, theta: float) -> mx.array:
    """Rotate `x` `[N, heads, head_dim]`: the first half of each head by the patch column
    (`positions[:, 0]`), the second half by the row, each half as a non-interleaved RoPE with
    `head_dim / 4` frequencies. Angles in float32, cast to x's dtype as in the reference."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))  # [half / 2]
    parts = []
    for axis in range(2):
        angles = positions[:, axis : axis + 1].astype(mx.float32) * inv_freq[None, :]  # [N, half / 2]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None, :]  # [N, 1, half]
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        part = x[..., axis * half : (axis + 1) * half]
        a, b = part[..., : half // 2], part[..., half // 2 :]
        rotated = mx.concatenate([-b, a], axis=-1)
        parts.append(part * cos + rotated * sin)
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.eps = args.rms_norm_eps
        self.theta = args.rope_theta
        d, hd, c = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.q_proj = ClippableLinear(d, self.n_heads * hd, c)
        self.k_proj = ClippableLinear(d, self.n_kv_heads * hd, c)
        self.v_proj = ClippableLinear(d, self.n_kv_heads * hd, c)
        self.o_proj = ClippableLinear(self.n_heads * hd, d, c)
        self.q_norm = nn.RMSNorm(hd, eps=self.eps)
        self.k_norm = nn.RMSNorm(hd, eps=self.eps)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        n = x.shape[0]
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(n, self.n_heads, self.head_dim)), positions, self.theta)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(n, self.n_kv_heads, self.head_dim)), positions, self.theta)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(n, self.n_kv_heads, self.head_dim), None, self.eps)
        # Every patch of the image sees every other one (no mask: the image carries no padding).
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], scale=1.0
        )
        return self.o_proj(o[0].transpose(1, 0, 2).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d, i, c = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(d, i, c)
        self.up_proj = ClippableLinear(d, i, c)
        self.down_proj = ClippableLinear(i, d, c)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(d, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(d, eps=eps)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        table = self.position_embedding_table
        # Gemma 4 takes pixels in [0, 1] and maps them to [-1, 1] here, not in the processor.
        h = self.input_proj((2 * (pixels - 0.5)).astype(table.dtype))
        return h + table[0][positions[:, 0]] + table[1][positions[:, 1]]


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


class VisionTower(nn.Module):
    """`Gemma4VisionModel`: patches of one image -> pooled soft tokens `[rows * cols, hidden]`."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, pixels: mx.array, positions: mx.array, grid: tuple[int, int]) -> mx.array:
        """`pixels` `[rows * cols, 3 * patch**2]` in [0, 1] (row-major patches), `positions`
        `[rows * cols, 2]` as (column, row), `grid` = (rows, cols) of patches."""
        rows, cols = grid
        k = self.args.pooling_kernel_size
        if rows * cols != pixels.shape[0] or rows % k or cols % k:
            raise ValueError(f"a {rows}x{cols} patch grid does not match {pixels.shape[0]} patches "
                             f"pooled {k}x{k}")
        positions = positions.astype(mx.int32)
        h = self.patch_embedder(pixels, positions)
        for layer in self.encoder.layers:
            h = layer(h, positions)
        dtype = h.dtype
        # Mean of each k x k block of patches, in float32 (as the reference's pooling matmul),
        # soft tokens in row-major order of the pooled grid.
        blocks = h.astype(mx.float32).reshape(rows // k, k, cols // k, k, -1)
        pooled = (blocks.sum(axis=(1, 3)) / (k * k)).reshape((rows // k) * (cols // k), -1)
        pooled = pooled.astype(dtype).astype(mx.float32) * math.sqrt(self.args.hidden_size)
        if self.args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(dtype)


class MultimodalEmbedder(nn.Module):
    """`DiffusionGemmaMultimodalEmbedder`: weightless RMSNorm, then a linear map to the text width."""

    def __init__(self, vision: VisionArgs, text_hidden: int):
        super().__init__()
        self.eps = vision.rms_norm_eps
        self.embedding_projection = nn.Linear(vision.hidden_size, text_hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(x, None, self.eps))
