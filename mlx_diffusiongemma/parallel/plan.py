"""How the model splits over ranks: expert ranges, the tensor-parallel parts, and which slice of each
stored tensor a rank holds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import DiffusionGemmaError

TENSOR_PARTS = ("attention", "mlp")


class DistributedError(DiffusionGemmaError):
    """The process group cannot be formed, a rank was lost, or the model cannot be split so."""


def expert_ranges(num_experts: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) expert ranges per rank; the first `num_experts % size` ranks hold
    one more expert than the others."""
    if num_experts < size:
        raise DistributedError(f"{num_experts} experts cannot be split over {size} ranks (each needs at least one)")
    base, extra = divmod(num_experts, size)
    out, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    experts: tuple[int, int]  # this rank's [start, stop) of every layer's routed experts
    attention: bool = False  # heads split evenly over the ranks
    mlp: bool = False  # the dense MLP's intermediate width split evenly


def _quant_group(quantization: dict[str, Any] | None, path: str) -> int | None:
    """The quantization group size of the module at `path`, or None when it is not quantized."""
    if not quantization:
        return None
    rule = quantization.get(path, quantization)
    return rule.get("group_size", 64) if isinstance(rule, dict) else None


def plan_shards(args, rank: int, size: int, tensor_parallel: Sequence[str] = (),
                quantized_paths: set[str] | None = None) -> ShardPlan:
    """Check that the model can be split as asked over `size` ranks and say how rank `rank` does.

    `quantized_paths` (module paths stored quantized, with their group sizes from the config)
    matters for tensor parallelism only: a split of a quantized input dimension must fall on
    quantization-group boundaries.
    """
    unknown = set(tensor_parallel) - set(TENSOR_PARTS)
    if unknown:
        raise DistributedError(f"unknown tensor-parallel part(s) {sorted(unknown)}; choose from {TENSOR_PARTS}")
    text = args.text
    experts = expert_ranges(text.num_experts, size)[rank]
    quant = args.quantization if quantized_paths else None

    def quantized(path: str) -> int | None:
        return _quant_group(quant, path) if quantized_paths and path in quantized_paths else None

    if "attention" in tensor_parallel:
        for i in range(text.num_hidden_layers):
            heads, kv = text.num_attention_heads, text.kv_heads[i]
            if heads % size or kv % size:
                raise DistributedError(
                    f"attention cannot be split over {size} ranks: layer {i} has {heads} query and {kv} "
                    f"key/value heads (both must divide by {size}); drop attention tensor parallelism")
            gs = quantized(f"model.decoder.layers.{i}.self_attn.o_proj")
            if gs and (heads // size * text.head_dims[i]) % gs:
                raise DistributedError(
                    f"attention cannot be split over {size} ranks: layer {i}'s o_proj slice is not a "
                    f"multiple of its quantization group ({gs})")
    if "mlp" in tensor_parallel:
        inter = text.intermediate_size
        gs = max((quantized(f"model.decoder.layers.{i}.mlp.down_proj") or 1) for i in range(text.num_hidden_layers))
        if inter % size or (inter // size) % gs:
            raise DistributedError(
                f"the dense MLP ({inter} wide) cannot be split evenly over {size} ranks"
                + (f" in whole quantization groups of {gs}" if gs > 1 else "") + "; drop mlp tensor parallelism")
    return ShardPlan(rank, size, experts, "attention" in tensor_parallel, "mlp" in tensor_parallel)


_LAYER = r"^model\.decoder\.layers\.\d+\."
_EXPERT_KEY = re.compile(_LAYER + r"experts\.(gate_up_proj|down_proj)\.")
_ROWS_KEY = re.compile(_LAYER + r"(self_attn\.(q_proj|k_proj|v_proj)|mlp\.(gate_proj|up_proj))\.")
_COLS_KEY = re.compile(_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.")


def slice_of(name: str, shape: tuple[int, ...], plan: ShardPlan) -> tuple[int, int, int] | None:
    """(axis, start, stop) of this rank's part of the stored tensor `name` (a mapped parameter
    path), or None when the rank holds it whole."""
    if _EXPERT_KEY.match(name):
        return (0, *plan.experts)
    attention = ".self_attn." in name
    if (attention and not plan.attention) or (".mlp." in name and not plan.mlp):
        return None
    if _ROWS_KEY.match(name):
        axis = 0
    elif _COLS_KEY.match(name):
        axis = len(shape) - 1  # the input width (packed words, or groups for scales/biases)
    else:
        return None
    part = shape[axis] // plan.size
    return axis, plan.rank * part, (plan.rank + 1) * part
