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
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256


class LayerKV:
    """Keys/values of one layer, `[batch, kv_heads, rows, head_dim]`, rows in position order."""

    def __init__(self, keep: int | None = None):
        self.keep = keep  # rows a sliding layer keeps after each pass; None keeps all
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.start = 0  # first visible row in the buffer
        self.end = 0  # one past the last written row

    @property
    def rows(self) -> int:
        return self.end - self.start

    def view(self) -> tuple[mx.array, mx.array] | tuple[None, None]:
        if self.keys is None or self.rows == 0:
            return None, None
        return self.keys[..., self.start : self.end, :], self.values[..., self.start : self.end, :]

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write `k`, `v` after the held rows; return every held row plus the new ones.

        The returned view is what the new queries may attend to (the caller masks sliding
        windows); afterwards a sliding layer drops rows that no later query can see.
        """
        n = k.shape[2]
        if self.keys is None or self.end + n > self.keys.shape[2]:
            self._reallocate(k, v, n)
        # slice_update returns a new array (in place when MLX can donate the buffer) and rebinds
        # only this layer's attribute: `a[...] = x` would mutate an array a forked cache shares.
        at = mx.array([self.end])
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

    def _reallocate(self, k: mx.array, v: mx.array, n: int) -> None:
        held_k, held_v = self.view()
        held = self.rows
        capacity = ((held + n + STEP - 1) // STEP + 1) * STEP
        b, h, _, d = k.shape
        new_k = mx.zeros((b, h, capacity, d), dtype=k.dtype)
        new_v = mx.zeros((b, h, capacity, v.shape[-1]), dtype=v.dtype)
        if held:
            new_k[..., :held, :] = held_k  # new_k is not shared yet, so in-place is safe here
            new_v[..., :held, :] = held_v
        self.keys, self.values = new_k, new_v
        self.start, self.end = 0, held

    def copy(self) -> "LayerKV":
        other = LayerKV(self.keep)
        other.keys, other.values, other.start, other.end = self.keys, self.values, self.start, self.end
        return other

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


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
            if layer.keys is not None:
                out += [layer.keys, layer.values]
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
