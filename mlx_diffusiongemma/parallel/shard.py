"""The sharded modules: a rank's slice of every layer's routed experts (one `all_sum` per layer adds
the partial outputs), and mlx.nn's sharded linears for tensor-parallel attention and MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..model.layers import ExpertLinear, Experts
from ..model.model import Model
from .plan import ShardPlan


class ShardedExperts(Experts):
    """This rank's slice `[start, stop)` of a layer's routed experts; its output is the all-rank sum.

    Pairs routed to another rank's experts are pointed at a local expert and weighted by zero:
    shapes stay static (no host round trip to count rows), the weights each rank reads and holds
    are 1/N, and one all_sum per layer completes the mixture.
    """

    def __init__(self, experts: Experts, start: int, stop: int, group: mx.distributed.Group):
        nn.Module.__init__(self)
        self.start, self.count = start, stop - start
        self.group = group
        self.gate_up_proj = _expert_slice(experts.gate_up_proj, self.count)
        self.down_proj = _expert_slice(experts.down_proj, self.count)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        local = idx - self.start
        mine = (local >= 0) & (local < self.count)
        # Clipping keeps the expert order, so the sorted gather path still sees sorted indices.
        local = mx.clip(local, 0, self.count - 1)
        partial = super().__call__(x, local, mx.where(mine, weights, mx.zeros_like(weights)))
        return mx.distributed.all_sum(partial, group=self.group)


def _expert_slice(layer: nn.Module, count: int) -> nn.Module:
    """An empty expert layer of the same kind holding `count` experts (filled by the loader)."""
    if isinstance(layer, QuantizedSwitchLinear):
        out_dims, packed = layer.weight.shape[1:]
        return QuantizedSwitchLinear(packed * 32 // layer.bits, out_dims, count, bias=False,
                                     group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    out_dims, in_dims = layer.weight.shape[1:]
    return ExpertLinear(in_dims, out_dims, count, bias=False)


def _sharded_linear(layer: nn.Module, kind: str, group: mx.distributed.Group) -> nn.Module:
    """An empty mlx.nn sharded linear of the same shape and quantization (filled by the loader)."""
    if isinstance(layer, nn.QuantizedLinear):
        out_dims, packed = layer.weight.shape
        cls = QuantizedAllToShardedLinear if kind == "in" else QuantizedShardedToAllLinear
        return cls(packed * 32 // layer.bits, out_dims, False, layer.group_size, layer.bits,
                   getattr(layer, "mode", "affine"), group=group)
    out_dims, in_dims = layer.weight.shape
    cls = AllToShardedLinear if kind == "in" else ShardedToAllLinear
    return cls(in_dims, out_dims, False, group=group)


def shard_structure(model: Model, plan: ShardPlan, group: mx.distributed.Group) -> None:
    """Replace the modules this rank holds a slice of by their sharded kind (weights unset)."""
    for layer in model.layers:
        layer.experts = ShardedExperts(layer.experts, *plan.experts, group)
        if plan.attention:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                if name in attn:
                    setattr(attn, name, _sharded_linear(attn[name], "in", group))
            attn.o_proj = _sharded_linear(attn.o_proj, "out", group)
            attn.n_heads //= plan.size
            attn.n_kv_heads //= plan.size
        if plan.mlp:
            mlp = layer.mlp
            mlp.gate_proj = _sharded_linear(mlp.gate_proj, "in", group)
            mlp.up_proj = _sharded_linear(mlp.up_proj, "in", group)
            mlp.down_proj = _sharded_linear(mlp.down_proj, "out", group)
