"""Checkpoint key mapping and quantization recipes, shared by the loader and the converter.

Three on-disk layouts map to one set of MLX parameter paths:
- Hugging Face (`save_pretrained`): `model.decoder.*` holds every text weight, experts as bare
  `experts.gate_up_proj` / `experts.down_proj` tensors, encoder `layer_scalar`s under
  `model.encoder.language_model.layers.N`, `lm_head` tied to the embedding, vision tensors;
- ours (`dgemma convert`) and the other MLX port's (mlx-vlm, as in the mlx-community
  conversions): the same paths with `.weight` / `.scales` / `.biases` on the fused experts.
"""

from __future__ import annotations

import re
from typing import Any

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_UNUSED_SUFFIXES = (".input_min", ".input_max", ".output_min", ".output_max")
_ENCODER_TEXT = "model.encoder.language_model."
# The encoder's own tensors: layer scalars, and attention biases (`attention_bias: true`), which
# the reference does not tie to the decoder's (it ties weights only).
_ENCODER_SCALAR = re.compile(
    r"^model\.encoder\.language_model\.layers\.(\d+)\.(layer_scalar|self_attn\.[qkvo]_proj\.bias)$")
_EXPERT_BARE = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")

# Quantization recipes: name -> rule per module kind. "bits" of None keeps the weight as is.
RECIPES = ("mixed-4bit", "8bit", "bf16")
DEFAULT_RECIPE = "mixed-4bit"
GROUP_SIZE = 64

# Module paths quantized at 4 bits in the default recipe: the routed experts (most of the
# parameters) and the self-conditioning MLP. Everything else that is a matrix gets 8 bits.
_FOUR_BIT = re.compile(r"(\.experts\.(gate_up_proj|down_proj)|\.self_conditioning\.(gate|up|down)_proj)$")


def is_vision_key(key: str) -> bool:
    return key.startswith(VISION_PREFIXES)


def map_key(key: str, vision: bool = True) -> str | None:
    """MLX parameter path for a checkpoint key, or None when the tensor is not used.

    Vision tensors keep their Hugging Face names (mlx-vlm's conversions use the same ones),
    their clipping bounds included (the tower clamps with them when `use_clipped_linears`);
    `vision=False` drops them all (text-only loading and conversion)."""
    if is_vision_key(key):
        return key if vision and "rotary_emb" not in key else None
    if key.endswith(_UNUSED_SUFFIXES) or "rotary_emb" in key:
        return None
    if key == "lm_head.weight":
        return None  # tied to model.decoder.embed_tokens.weight
    if key.startswith(_ENCODER_TEXT):
        # The encoder's text weights are the decoder's; only its layer scalars are its own.
        return key if _ENCODER_SCALAR.match(key) else None
    if _EXPERT_BARE.search(key):
        return key + ".weight"
    return key


def sanitize(weights: dict[str, Any], vision: bool = True) -> dict[str, Any]:
    """Map a checkpoint's tensors (any supported layout) to MLX parameter paths."""
    out = {}
    for key, value in weights.items():
        new = map_key(key, vision)
        if new is not None:
            out[new] = value
    return out


def module_bits(path: str, recipe: str = DEFAULT_RECIPE) -> int | None:
    """Bits for the matrix at module `path` under `recipe` (None: not quantized).

    The vision tower and its projection stay bfloat16 in every recipe (as in mlx-vlm's
    conversions): on a random tower 8 bits multiplied the features' error against float32 by
    2.4 (8.1% vs 3.3% relative) for half of a part that is small next to the text weights
    (measured by tests/test_vision.py::test_vision_8bit_against_bf16, see docs/vision.md)."""
    if recipe == "bf16" or is_vision_key(path + "."):
        return None
    if recipe == "8bit":
        return 8
    if recipe != DEFAULT_RECIPE:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return 4 if _FOUR_BIT.search(path) else 8


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


default_quant_predicate = quant_predicate(DEFAULT_RECIPE)
