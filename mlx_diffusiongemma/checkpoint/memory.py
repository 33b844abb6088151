"""The memory plan: what a checkpoint will hold at its peak, loaded and run at a context, against
what this machine lets MLX wire. Made before any weight is read (`loading.load` checks it; the
model keeps it as `model.memory_plan`, so every request is checked against it too).

The peak is the larger of

- **loading**: the weights as stored, plus, when a recipe is applied in memory to an unquantized
  checkpoint, the unquantized weights it is computed from (the loader holds both until the end);
- **running**: the weights, plus the prompt cache for the context (`PromptCache`'s buffers: full
  layers hold the context rounded up to `cache.STEP` plus one step, sliding layers at most the
  window and two steps, K and V in bfloat16, or with `kv_bits` as `mx.quantize` packs them: the
  codes plus a bfloat16 scale and bias per group), plus the larger of two transients: a prefill chunk
  (`args.PREFILL_CHUNK` rows: one full layer's float32 attention arrays over the context, its
  dense and expert MLP activations) and a decoder step over `rows` canvas rows: `DECODER_LOGITS`
  float32 `[rows, vocab]` arrays held over all the rows (the logits the decoder pass returns, the
  self-conditioning kept from the previous step and the one made for the next), `DECODER_CHUNK`
  more over one chunk of rows (the sampler's float32 work, which `sampler.chunked_step` does
  `args.step_chunk_rows(vocab)` rows at a time: 64 of the released 262K vocabulary); one
  layer's attention arrays over prefix + canvas; fast mode's canvas K/V of every layer.

The counts of float32 arrays were fitted on MLX's measured peak of decoder steps and their
sampler work on small quantized models: the logits' on a bfloat16 4-bit model of vocabulary 64K
and canvas 256 (`scripts/decoder_memory.py`: the exact path 7.25 arrays in one chunk and 3.50 in
chunks of 64 rows, the same at 262K; fast mode's first pass less), the attention's on vocabularies 4K-32K,
contexts 64-2048 and 4-16 heads (+8% / -16% where the attention dominates).

Not counted: Python, the tokenizer, MLX's buffer cache (freed buffers MLX keeps for reuse; it
gives them back under pressure). The plan for the released model's shape is compared with a
measured peak by `scripts/full_shape.py` (docs/performance.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MemoryLimitError
from ..model.args import PREFILL_CHUNK, ModelArgs, TextArgs, step_chunk_rows
from ..model.cache import STEP
from ..model.model import Model
from .recipes import EXPERT_BITS, quant_predicate, quantize_from_config, smaller_recipes

DEFAULT_CONTEXT = 1024  # what `load` plans for when no context is asked: a chat turn and its reply
DECODER_LOGITS = 2.5  # float32 [rows, vocab] arrays over all of a step's rows
DECODER_CHUNK = 5  # and over one chunk of them (`step_chunk_rows`)
# float32 `[heads, rows, keys]` arrays of one layer's attention alive at once (the scores of the
# prefix and canvas parts, their exponentials, the masks); fitted on measured peaks (below).
SCORE_ARRAYS = 2.5
KV_BYTES = 2  # the cache holds bfloat16 K and V (the model's activations)
GB = 1e9


def kv_bytes(t: TextArgs, context: int, batch: int = 1, kv_bits: int | None = None,
             kv_group_size: int | None = None) -> int:
    """Bytes of the prompt cache's K/V buffers holding `context` positions (quantized to
    `kv_bits` in groups of `kv_group_size` when given: see `cache.QuantizedRows`)."""
    capacity = (math.ceil(context / STEP) + 1) * STEP if context else 0
    total = 0
    for layer in range(t.num_hidden_layers):
        rows = capacity
        if t.is_sliding(layer):
            rows = min(capacity, 2 * (t.sliding_window - 1 + STEP))
        d = t.head_dims[layer]
        per_row = d * KV_BYTES if kv_bits is None else d * kv_bits // 8 + 2 * (d // kv_group_size) * KV_BYTES
        total += 2 * t.kv_heads[layer] * rows * per_row
    return total * batch


def buffer_bytes(t: TextArgs, canvas: int, context: int, rows: int | None = None) -> dict[str, int]:
    """Transient bytes of a prefill chunk and of a decoder step over `rows` canvas rows (default:
    the whole canvas, the exact path); see the module's docstring for what is counted."""
    rows = canvas if rows is None else rows
    d, v, heads = t.hidden_size, t.vocab_size, t.num_attention_heads
    chunk = min(PREFILL_CHUNK, max(context, 1))
    moe = t.top_k_experts * 2 * t.moe_intermediate_size

    def activations(n: int, keys: int) -> int:
        scores = SCORE_ARRAYS * 4 * heads * n * keys  # float32, one layer at a time
        mlp = KV_BYTES * n * (3 * t.intermediate_size + 2 * moe + 8 * d)
        return scores + mlp

    prefill = activations(chunk, context + chunk)
    canvas_kv = sum(2 * canvas * t.kv_heads[i] * t.head_dims[i] * KV_BYTES for i in range(t.num_hidden_layers))
    logits = 4 * v * (DECODER_LOGITS * rows + DECODER_CHUNK * min(rows, step_chunk_rows(v)))
    decoder = int(logits + activations(rows, context + canvas)) + canvas_kv
    return {"prefill": prefill, "decoder": decoder}


def weight_bytes(args: ModelArgs, *, recipe: str | None = None, quantization: dict[str, Any] | None = None,
                 names: set[str] | None = None, float_bytes: int = 2) -> int:
    """Bytes of the weights once loaded, from the config alone: the model built lazily (nothing is
    allocated) and quantized as the loader would (`recipe` in memory, or the checkpoint's
    `quantization` block for the modules whose `.scales` are in `names`); floating tensors that
    stay unquantized (and the scales and biases) at `float_bytes` each."""
    model = Model(args)
    if quantization:
        quantize_from_config(model, quantization, names or set())
    elif recipe and recipe != "bf16":
        nn.quantize(model, class_predicate=quant_predicate(recipe))
    total = 0
    for _, p in tree_flatten(model.parameters()):
        total += p.nbytes if not mx.issubdtype(p.dtype, mx.floating) else p.size * float_bytes
    return total


def memory_limit() -> tuple[int | None, str]:
    """(bytes MLX may use here, where the number comes from): Metal's recommended working set on
    a Mac (what macOS lets the GPU wire), the physical memory elsewhere."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def set_wired_limit() -> None:
    """Wire the recommended working set on a Mac, as mlx-lm's server does once at start
    (`mlx_lm.utils.maybe_set_recommended_wired_limit`; written out here: importing mlx_lm.utils
    pulls in transformers, seconds before the first token)."""
    size = mx.device_info().get("max_recommended_working_set_size")
    if size is not None:
        mx.set_wired_limit(int(size))


@dataclass
class MemoryPlan:
    """The plan for one checkpoint: bytes at load and at run time for `context` positions."""

    name: str
    recipe: str | None  # the recipe the weights are in (None: an unknown quantization)
    args: ModelArgs
    weights: int
    load_extra: int  # unquantized weights held while a recipe is applied in memory
    context: int
    limit: int | None
    limit_source: str
    rows: int | None = None  # decoder rows per step (None: the whole canvas)
    kv_bits: int | None = None  # the prompt cache's quantization (None: bfloat16 K/V)
    kv_group_size: int | None = None

    @property
    def kv(self) -> int:
        return kv_bytes(self.args.text, self.context, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)

    @property
    def buffers(self) -> int:
        return max(buffer_bytes(self.args.text, self.args.canvas_length, self.context, self.rows).values())

    @property
    def run_peak(self) -> int:
        return self.weights + self.kv + self.buffers

    @property
    def peak(self) -> int:
        return max(self.weights + self.load_extra, self.run_peak)

    @property
    def fits(self) -> bool:
        return self.limit is None or self.peak <= self.limit

    @property
    def headroom(self) -> int | None:
        """Bytes beside the weights for running requests and kept prompt caches (None: the limit
        is unknown)."""
        return None if self.limit is None else self.limit - self.weights

    def request_bytes(self, positions: int) -> int:
        """What one running request holds at its peak beside the weights: the prompt cache for
        `positions` (prompt plus canvases) and its own transients (a batched decoder pass holds
        every request's logits at once). A request fits alone when this is within `headroom`,
        which is what `check_request` says."""
        plan = self.at(positions)
        return math.ceil(plan.run_peak - plan.weights)

    def at(self, context: int) -> "MemoryPlan":
        """The same checkpoint planned for another context."""
        return replace(self, load_extra=0, context=context)

    def converted(self, recipe: str) -> "MemoryPlan":
        """The plan of this checkpoint converted to `recipe` (from the config alone)."""
        return replace(self, recipe=recipe, weights=weight_bytes(self.args, recipe=recipe), load_extra=0)

    def summary(self) -> str:
        load = f"; loading holds {_gb(self.weights + self.load_extra)}" if self.load_extra else ""
        return (f"{_gb(self.peak)} at a {self.context}-token context ({_gb(self.weights)} weights, "
                f"{_gb(self.kv)} cache{f' ({self.kv_bits}-bit)' if self.kv_bits else ''}, {_gb(self.buffers)} buffers{load})")

    def limit_text(self) -> str:
        return f"{_gb(self.limit)} ({self.limit_source})" if self.limit is not None else "unknown"

    def longest_context(self) -> int:
        """The most positions that fit beside these weights (0: none)."""
        if self.limit is None:
            return self.args.text.max_position_embeddings
        lo, hi = 0, self.args.text.max_position_embeddings
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.at(mid).fits else (lo, mid - 1)
        return lo

    def check(self) -> None:
        """Raise `MemoryLimitError` (one line, with what to do) when the peak is over the limit."""
        if self.fits:
            return
        remedies = []
        if self.load_extra and self.run_peak <= self.limit:
            remedies.append("converting it first (`dgemma convert` streams the weights; the converted "
                            "folder loads without an unquantized copy)")
        smaller = [r for r in smaller_recipes(self.recipe) if r in EXPERT_BITS]
        for recipe in smaller:  # the largest that fits, else the smallest
            other = self.converted(recipe)
            if other.fits or recipe == smaller[-1]:
                remedies.append(f"the {recipe} recipe (`dgemma convert --recipe {recipe}`: {_gb(other.peak)})")
                break
        longest = self.longest_context()
        if 0 < longest < self.context:
            remedies.append(f"a context of at most {longest} tokens")
        memory_size = mx.device_info().get("memory_size")
        if self.limit_source.startswith("Metal") and (memory_size is None or self.peak < 0.9 * memory_size):
            mb = math.ceil(self.peak * 1.1 / 2**20)
            remedies.append(f"raising the GPU limit (`sudo sysctl iogpu.wired_limit_mb={mb}`, until restart)")
        remedies = remedies or ["a machine with more memory"]
        raise MemoryLimitError(f"{self.name} needs {self.summary()}, over the {self.limit_text()} MLX can use "
                               f"here. Try {'; or '.join(remedies)}.")

    def check_request(self, positions: int) -> None:
        """Raise `MemoryLimitError` when a request's `positions` (prompt plus canvases) would not
        fit beside the weights."""
        plan = self.at(positions)
        if plan.fits:
            return
        error = MemoryLimitError(f"the prompt plus its canvases ({positions} positions) need {plan.summary()}, "
                                 f"over the {plan.limit_text()} MLX can use here. Shorten the prompt or lower max_tokens.")
        raise error


def recipe_of(quantization: dict[str, Any] | None) -> str | None:
    """The recipe a checkpoint's `quantization` block was written by (None: another one)."""
    if not quantization:
        return "bf16"
    bits = quantization.get("bits")
    names = {b: r for r, b in EXPERT_BITS.items()} | {8: "8bit"}
    return names.get(bits)


def display_name(folder: Path) -> str:
    """A folder as users named it: a hub cache snapshot as its repo id, others by their name."""
    parts = folder.parts
    if "snapshots" in parts and parts.index("snapshots") > 0:
        repo = parts[parts.index("snapshots") - 1]
        if repo.startswith("models--"):
            return repo.removeprefix("models--").replace("--", "/")
    return folder.name


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 2**20:.1f} MiB"
