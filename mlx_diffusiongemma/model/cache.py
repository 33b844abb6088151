"""Key/value caches: the prompt's (`PromptCache`, written by the encoder pass and read, never written,
by the decoder pass) and fast mode's per-layer canvas K/V (`CanvasKV`).

Design (see docs/architecture.md):
- Each layer keeps its keys/values in a preallocated buffer that grows in steps of `STEP` rows,
  so an encoder `extend` writes new rows in place instead of concatenating the whole prefix.
- Sliding layers keep only the last `sliding_window - 1` rows visible (what the reference keeps);
  the buffer is compacted only when it runs out of room, copying at most that many rows.
- The decoder never writes here: it attends to `layer.view()` (a slice, no copy) and to the
  canvas K/V separately, merging the two softmax parts (see `layers.split_attention`). So a
  denoising step copies zero bytes of cached prefix.
- Optionally (`kv_bits`, as mlx-lm's `--kv-bits`) the buffers hold K/V quantized with
  `mx.quantize` along the head dimension: `QuantizedRows` (packed codes, scales, biases). The
  attention then reads them in place with `mx.quantized_matmul`, as mlx-lm's
  `quantized_scaled_dot_product_attention` does. mlx-lm's `QuantizedKVCache` is not used itself:
  it concatenates/trims by offset and has no sliding-window compaction or in-place fork, which
  this cache's readers (the decoder's read-only view, `copy`) rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

STEP = 256
KV_BITS = (4, 8)  # what `kv_bits` may be (None: the float cache, the exact path)
KV_GROUP_SIZES = (32, 64, 128)  # mx.quantize's group sizes
KV_GROUP_SIZE = 64  # mlx-lm's default; `kv_group_size=None` takes it, or 32 where a head dim needs


def default_group_size(head_dims) -> int:
    """mlx-lm's 64, or 32 for models whose head dims 64 does not divide (the small test models)."""
    return KV_GROUP_SIZE if all(d % KV_GROUP_SIZE == 0 for d in head_dims) else 32


def kv_group_size_for(kv_bits, group_size, head_dims) -> int:
    """The quantized cache's group size: `group_size`, or (None) `default_group_size`; checked
    with the bits against the model's head dims (`check_kv_bits`: ValueError if unusable)."""
    group = default_group_size(head_dims) if group_size is None else group_size
    check_kv_bits(kv_bits, group, head_dims)
    return group


def check_kv_bits(kv_bits, group_size, head_dims=()) -> None:
    """Raise ValueError (one line) unless `kv_bits`/`group_size` are a quantized cache this model
    can hold: bits in `KV_BITS` (or None), a group size in `KV_GROUP_SIZES` dividing every head dim."""
    if kv_bits is None:
        return
    if isinstance(kv_bits, bool) or kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (or None for the float cache), got {kv_bits!r}")
    if isinstance(group_size, bool) or group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size!r}")
    bad = sorted({d for d in head_dims if d % group_size})
    if bad:
        raise ValueError(f"kv_group_size {group_size} does not divide this model's head dimension {bad[0]}; use a smaller one")


@dataclass(frozen=True)
class QuantizedRows:
    """K or V quantized along the last axis (`mx.quantize`'s triple) plus how."""

    data: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.data.shape[-1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.biases.nbytes

    def arrays(self) -> list[mx.array]:
        return [self.data, self.scales, self.biases]

    def rows(self, start: int, end: int) -> "QuantizedRows":
        return replace(self, **{f: getattr(self, f)[..., start:end, :] for f in ("data", "scales", "biases")})

    def written(self, new: "QuantizedRows", at: mx.array) -> "QuantizedRows":
        return replace(self, **{f: mx.slice_update(getattr(self, f), getattr(new, f), at, axes=(2,))
                                for f in ("data", "scales", "biases")})

    def dequantized(self) -> mx.array:
        return mx.dequantize(self.data, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


def quantize_rows(x: mx.array, group_size: int, bits: int) -> QuantizedRows:
    return QuantizedRows(*mx.quantize(x, group_size=group_size, bits=bits), group_size, bits)


def _zeros_like_rows(x, capacity: int):
    """An empty buffer of `capacity` rows shaped like `x` (an array or QuantizedRows)."""
    if isinstance(x, QuantizedRows):
        return replace(x, **{f: _zeros_like_rows(getattr(x, f), capacity) for f in ("data", "scales", "biases")})
    b, h, _, d = x.shape
    return mx.zeros((b, h, capacity, d), dtype=x.dtype)


def _slice_rows(x, start: int, end: int):
    return x.rows(start, end) if isinstance(x, QuantizedRows) else x[..., start:end, :]


class LayerKV:
    """Keys/values of one layer, `[batch, kv_heads, rows, head_dim]`, rows in position order."""

    def __init__(self, keep: int | None = None, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE):
        self.keep = keep  # rows a sliding layer keeps after each pass; None keeps all
        self.kv_bits = kv_bits  # None: float K/V as computed; else held as `QuantizedRows`
        self.kv_group_size = kv_group_size
        self.keys: mx.array | QuantizedRows | None = None
        self.values: mx.array | QuantizedRows | None = None
        self.start = 0  # first visible row in the buffer
        self.end = 0  # one past the last written row

    @property
    def rows(self) -> int:
        return self.end - self.start

    def view(self) -> tuple[mx.array, mx.array] | tuple[None, None]:
        if self.keys is None or self.rows == 0:
            return None, None
        return _slice_rows(self.keys, self.start, self.end), _slice_rows(self.values, self.start, self.end)

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write `k`, `v` after the held rows; return every held row plus the new ones.

        The returned view is what the new queries may attend to (the caller masks sliding
        windows); afterwards a sliding layer drops rows that no later query can see.
        """
        n = k.shape[2]
        if self.kv_bits is not None:
            k = quantize_rows(k, self.kv_group_size, self.kv_bits)
            v = quantize_rows(v, self.kv_group_size, self.kv_bits)
        if self.keys is None or self.end + n > self.keys.shape[2]:
            self._reallocate(k, v, n)
        # slice_update returns a new array (in place when MLX can donate the buffer) and rebinds
        # only this layer's attribute: `a[...] = x` would mutate an array a forked cache shares.
        at = mx.array([self.end])
        if self.kv_bits is not None:
            self.keys, self.values = self.keys.written(k, at), self.values.written(v, at)
        else:
            self.keys = mx.slice_update(self.keys, k, at, axes=(2,))
            self.values = mx.slice_update(self.values, v, at, axes=(2,))
        self.end += n
        keys, values = self.view()
        if self.keep is not None:
            self.start = max(self.start, self.end - self.keep)
            if self.keys.shape[2] > 2 * (self.keep + STEP):
                # A long append (an unchunked prompt) left a buffer far larger than the window:
                # keep only the visible rows (the views returned above still hold the old buffer).
                self._reallocate(k, v, 0)
        return keys, values

    def _reallocate(self, k, v, n: int) -> None:
        held_k, held_v = self.view()
        held = self.rows
        capacity = ((held + n + STEP - 1) // STEP + 1) * STEP
        new_k, new_v = _zeros_like_rows(k, capacity), _zeros_like_rows(v, capacity)
        if held:
            at = mx.array([0])
            if isinstance(new_k, QuantizedRows):
                new_k, new_v = new_k.written(held_k, at), new_v.written(held_v, at)
            else:
                new_k[..., :held, :] = held_k  # new_k is not shared yet, so in-place is safe here
                new_v[..., :held, :] = held_v
        self.keys, self.values = new_k, new_v
        self.start, self.end = 0, held

    def copy(self) -> "LayerKV":
        other = LayerKV(self.keep, self.kv_bits, self.kv_group_size)
        other.keys, other.values, other.start, other.end = self.keys, self.values, self.start, self.end
        return other

    def arrays(self) -> list[mx.array]:
        """The buffers' arrays (three each when quantized)."""
        out = []
        for a in (self.keys, self.values):
            if a is not None:
                out += a.arrays() if isinstance(a, QuantizedRows) else [a]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


class PromptCache:
    """The encoder's cache for every layer plus the number of tokens encoded so far."""

    def __init__(self, layers: list[LayerKV]):
        self.layers = layers
        self.length = 0  # tokens encoded; the next token's position
        # `[batch, length]` bool, False at padding positions (left-padded batches of prompts of
        # different lengths, as in training); None when every encoded position is a real token.
        self.valid: mx.array | None = None

    def key_mask(self, rows: int, end: int | None = None) -> mx.array | None:
        """`[batch, 1, 1, 1, rows]` validity of the `rows` positions before `end` (default: the
        cache length), shaped for `model.split_attention`'s grouped scores; None without padding."""
        if self.valid is None:
            return None
        end = self.length if end is None else end
        return self.valid[:, end - rows : end][:, None, None, None, :]

    def state(self) -> list[mx.array]:
        """Arrays to pass to `mx.eval` so the cache is materialised."""
        out = []
        for layer in self.layers:
            out += layer.arrays()
        return out

    def copy(self) -> "PromptCache":
        """A cheap fork: buffers are shared until one side writes (MLX arrays are values)."""
        other = PromptCache([layer.copy() for layer in self.layers])
        other.length = self.length
        other.valid = self.valid
        return other

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


class CanvasKV:
    """Per-layer keys/values of every canvas position from its last computation (fast mode):
    `[B, kv_heads, C + 1, head_dim]` per layer; slot C is where padding rows write."""

    def __init__(self, keys: list[mx.array], values: list[mx.array]):
        self.keys = keys
        self.values = values

    def state(self) -> list[mx.array]:
        return self.keys + self.values
