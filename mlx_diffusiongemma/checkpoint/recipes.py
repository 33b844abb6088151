"""Quantization: the recipes the converter writes and the loader applies in memory, and the
`quantization` block of config.json read back into quantized modules. One module, so the converter
and the loader cannot disagree."""

from __future__ import annotations

import re
from typing import Any

import mlx.nn as nn


# Quantization recipes: name -> rule per module kind. "bits" of None keeps the weight as is.
# Largest first among the mixed ones: `smaller_recipes` walks this order.
RECIPES = ("mixed-4bit", "mixed-3bit", "mixed-2bit", "8bit", "bf16")
DEFAULT_RECIPE = "mixed-4bit"
GROUP_SIZE = 64

# The mixed recipes differ only in the routed experts' width (90% of the 26B model's weights):
# 4 bits (15.4 GB, the default), 3 bits (12.6 GB: a 24 GB Mac's default GPU limit with room
# for a long context) and 2 bits (9.7 GB: a 16 GB Mac's). The self-conditioning MLP is 4-bit
# and every other matrix 8-bit in all three. mlx-lm's mixed presets (`mixed_3_4`, `mixed_2_6`,
# ...) are not reused: they pick bits by the substrings "v_proj"/"down_proj" and the layer
# index, which here would put 6 bits on the expert down projections of 14 of 30 layers (+2.5 GB
# at the 2-bit recipe, over a 16 GB Mac's limit); the experts are where the bytes are.
EXPERT_BITS = {"mixed-4bit": 4, "mixed-3bit": 3, "mixed-2bit": 2}
_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
_SELF_CONDITIONING = re.compile(r"\.self_conditioning\.(gate|up|down)_proj$")


def module_bits(path: str, recipe: str = DEFAULT_RECIPE) -> int | None:
    """Bits for the matrix at module `path` under `recipe` (None: not quantized).

    The vision tower and its projection stay bfloat16 in every recipe (as in mlx-vlm's
    conversions): on a random tower 8 bits multiplied the features' error against float32 by
    2.4 (8.1% vs 3.3% relative) for half of a part that is small next to the text weights
    (measured by tests/test_vision.py::test_vision_8bit_against_bf16, see docs/vision.md)."""
    # Imported here: the recipes' names are read by `dgemma convert --help`, which need not
    # import the model (and through it mlx-lm and transformers).
    from ..model.model import is_vision_key

    if recipe == "bf16" or is_vision_key(path + "."):
        return None
    if recipe == "8bit":
        return 8
    if recipe not in EXPERT_BITS:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if _EXPERTS.search(path):
        return EXPERT_BITS[recipe]
    return 4 if _SELF_CONDITIONING.search(path) else 8


def smaller_recipes(recipe: str | None) -> tuple[str, ...]:
    """The mixed recipes that store fewer bytes than `recipe` (None: an unknown layout, taken as
    the default's), largest first: what to suggest when a model does not fit."""
    order = ("bf16", "8bit") + tuple(EXPERT_BITS)
    index = order.index(recipe) if recipe in order else order.index(DEFAULT_RECIPE)
    return order[index + 1:]


def quant_predicate(recipe: str = DEFAULT_RECIPE, group_size: int = GROUP_SIZE):
    """A `class_predicate` for `mlx.nn.quantize` implementing a recipe.

    Norms, scalars and router scales are vectors and are never quantized; a matrix whose input
    width is not a multiple of the group size (only in tiny test models) stays unquantized.
    """

    def predicate(path: str, module: Any) -> bool | dict[str, int]:
        if not hasattr(module, "to_quantized"):
            return False
        bits = module_bits(path, recipe)
        if bits is None:
            return False
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape[-1] % group_size:
            return False
        return {"group_size": group_size, "bits": bits}

    return predicate


def quantize_from_config(model: nn.Module, quantization: dict[str, Any], names: set[str]) -> None:
    """Quantize the modules the checkpoint stores quantized, with per-module overrides."""
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: Any) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]  # a per-module override, or False
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in names and default

    nn.quantize(model, class_predicate=predicate)
