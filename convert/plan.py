"""What a conversion writes, decided from config.json alone (no weights needed).

The schema is the runtime's own `Model`, built lazily: MLX arrays are not materialised until
evaluated, so building even the 26B model this way costs a few kilobytes. Its parameter paths and
shapes are what the loader expects, and its modules are what `nn.quantize` would see, so the
quantization decision per matrix comes from the very predicate the in-memory path uses
(`checkpoint.recipes.quant_predicate`): the converter and the loader cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlx.utils import tree_flatten

from mlx_diffusiongemma.checkpoint import recipes
from mlx_diffusiongemma.model.args import ModelArgs, parse_model_args
from mlx_diffusiongemma.model.model import Model

MODE = "affine"
UNQUANTIZED_BITS = 16  # every float tensor that is not quantized is stored as bfloat16
# The top-level `bits` of each recipe's `quantization` block; modules at other widths get a
# per-module override (mlx-lm / mlx-vlm style).
_DEFAULT_BITS = {**recipes.EXPERT_BITS, "8bit": 8}


@dataclass(frozen=True)
class TensorPlan:
    name: str  # MLX parameter path (as the loader expects it)
    shape: tuple[int, ...]
    quant: dict[str, int] | None  # {"group_size", "bits"} when stored quantized
    matrix: bool  # the weight of a module `nn.quantize` could quantize

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        return self.quant["bits"] if self.quant else UNQUANTIZED_BITS

    def stored_bytes(self) -> int:
        """Bytes of tensor data written for this parameter (weight, plus scales and biases)."""
        if not self.quant:
            return self.parameters * 2
        rows = math.prod(self.shape[:-1])
        cols = self.shape[-1]
        packed = rows * (cols * self.quant["bits"] // 32) * 4  # uint32 words
        groups = rows * (cols // self.quant["group_size"])
        return packed + 2 * groups * 2  # bf16 scales and biases


def _as_args(config: ModelArgs | dict[str, Any]) -> ModelArgs:
    if isinstance(config, ModelArgs):
        return config
    if isinstance(config, dict):
        return parse_model_args(config)
    raise TypeError(f"expected ModelArgs or a config.json dict, got {type(config).__name__}")


class Plan:
    """Per-parameter storage decisions for one config and recipe."""

    def __init__(self, args: ModelArgs | dict[str, Any], recipe: str = recipes.DEFAULT_RECIPE):
        if recipe not in recipes.RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(recipes.RECIPES)}")
        self.args = _as_args(args)
        self.recipe = recipe
        model = Model(self.args)  # lazy: nothing is allocated until evaluated
        modules = dict(model.named_modules())
        predicate = recipes.quant_predicate(recipe, recipes.GROUP_SIZE)
        self.tensors: dict[str, TensorPlan] = {}
        for name, value in tree_flatten(model.parameters()):
            module = modules.get(name[: -len(".weight")]) if name.endswith(".weight") else None
            matrix = module is not None and hasattr(module, "to_quantized")
            quant = None
            if matrix:
                decision = predicate(name[: -len(".weight")], module)
                if decision:
                    quant = {"group_size": int(decision["group_size"]), "bits": int(decision["bits"])}
            self.tensors[name] = TensorPlan(name, tuple(value.shape), quant, matrix)

    def quantization_config(self) -> dict[str, Any] | None:
        """The `quantization` block of config.json (None for bf16).

        Top level: the recipe's default `group_size`/`bits`/`mode`. Per module path: an override
        `{"group_size", "bits"}` where a matrix differs from the default, `false` where a matrix
        stays unquantized. `checkpoint.recipes.quantize_from_config` reads exactly this.
        """
        if self.recipe not in _DEFAULT_BITS:
            return None
        default_bits = _DEFAULT_BITS[self.recipe]
        config: dict[str, Any] = {"group_size": recipes.GROUP_SIZE, "bits": default_bits, "mode": MODE}
        for t in self.tensors.values():
            if not t.matrix:
                continue
            if t.quant is None:
                config[t.module] = False
            elif t.quant != {"group_size": recipes.GROUP_SIZE, "bits": default_bits}:
                config[t.module] = dict(t.quant)
        return config

    def estimate(self) -> "SizeEstimate":
        by_bits: dict[int, int] = {}
        total_bytes = 0
        for t in self.tensors.values():
            by_bits[t.bits] = by_bits.get(t.bits, 0) + t.parameters
            total_bytes += t.stored_bytes()
        params = sum(by_bits.values())
        return SizeEstimate(
            recipe=self.recipe,
            parameters=params,
            parameters_by_bits=dict(sorted(by_bits.items())),
            bytes=total_bytes,
            bits_per_weight=8 * total_bytes / params if params else 0.0,
        )


@dataclass
class SizeEstimate:
    """Projected size of a conversion (tensor data only; the vision tower included unless the
    config has none)."""

    recipe: str
    parameters: int
    parameters_by_bits: dict[int, int] = field(default_factory=dict)
    bytes: int = 0
    bits_per_weight: float = 0.0


def projected_size(args: ModelArgs | dict[str, Any], recipe: str = recipes.DEFAULT_RECIPE) -> SizeEstimate:
    """Bytes and bits per weight a conversion of this config would write, without any weights.

    `args` is a parsed `ModelArgs` or a config.json dict. Counts the text model's parameters
    (decoder weights, encoder layer scalars), i.e. what `convert` writes; safetensors headers
    (a few kB per shard) are not included.
    """
    return Plan(args, recipe).estimate()
