"""Merge LoRA adapters into the weights and write a model folder our loader reads.

Each LoRA layer is replaced by its `fuse()` (mlx-lm's: `W + scale * B @ A`, re-quantized with
the base's group size and bits when the base was quantized, unless `dequantize`). A fused
expert layer comes back from mlx-lm as a plain `SwitchLinear`; it is turned back into our
`ExpertLinear` (same weights) so the fused model runs exactly like a loaded one.

The folder gets sharded safetensors under our parameter paths (the layout `dgemma convert`
writes), a config.json whose `quantization` block describes the fused model's quantized
modules, and the source folder's generation config, tokenizer and chat template.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from ..checkpoint.files import signals_interrupt, write_errors
from ..errors import CheckpointError
from ..model.layers import ExpertLinear

DEFAULT_SHARD_SIZE = 5 * 2**30


def _as_expert_linear(layer: SwitchLinear) -> ExpertLinear:
    out = ExpertLinear(layer.input_dims, layer.output_dims, layer.num_experts, bias="bias" in layer)
    out.weight = layer.weight
    if "bias" in layer:
        out.bias = layer.bias
    return out


def fuse_adapters(model, *, dequantize: bool = False) -> int:
    """Merge every LoRA layer into its base, in place; returns how many were fused. With
    `dequantize`, every quantized layer comes out unquantized (in the scales' dtype)."""
    fused = []
    for name, module in model.named_modules():
        if hasattr(module, "fuse") and hasattr(module, "lora_a"):
            new = module.fuse(dequantize=dequantize)
            if type(new) is SwitchLinear:
                new = _as_expert_linear(new)
            fused.append((name, new))
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    model.freeze()
    mx.eval(model.parameters())
    return len(fused)


def dequantize_model(model) -> None:
    """Replace every quantized layer by its unquantized counterpart (experts: `ExpertLinear`)."""
    from mlx_lm.utils import dequantize_model as mlx_lm_dequantize

    mlx_lm_dequantize(model)
    swaps = [(n, _as_expert_linear(m)) for n, m in model.named_modules() if type(m) is SwitchLinear]
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def quantization_block(model) -> dict[str, Any] | None:
    """A config.json `quantization` block for the model's quantized modules (None if none):
    the most common group size/bits at the top, the others as per-module overrides, in the form
    `checkpoint.recipes.quantize_from_config` reads."""
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            quantized[name] = {"group_size": int(module.group_size), "bits": int(module.bits),
                               "mode": getattr(module, "mode", "affine")}
    if not quantized:
        return None
    common = Counter(json.dumps(q, sort_keys=True) for q in quantized.values()).most_common(1)[0][0]
    block: dict[str, Any] = json.loads(common)
    for name, q in sorted(quantized.items()):
        if q != block:
            block[name] = {k: v for k, v in q.items() if k != "mode" or v != block.get("mode")}
    return block


def save_model(model, source: Path, dst: Path, *, shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write `model` as a folder at `dst` (must not exist): weights, config, tokenizer files."""
    from ..convert import copy_aux  # the converter's list of small files to carry along
    from ..convert.writer import ShardWriter
    from mlx_lm.utils import get_total_parameters

    source, dst = Path(source), Path(dst).expanduser()
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; choose another --save-path or remove it")
    config = json.loads((source / "config.json").read_text())
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # SIGTERM/SIGHUP interrupt like Ctrl-C, so the partial folder goes on the way out.
    with signals_interrupt(), write_errors(tmp, "fuse to a disk with room (nothing was left behind)"):
        tmp.mkdir(parents=True)
        try:
            writer = ShardWriter(tmp, shard_size)
            for name, value in tree_flatten(model.parameters()):
                writer.add(name, value)
            writer.finish(get_total_parameters(model))
            # The vision tower's weights are written when the model has one: its config goes with them.
            dropped = ("quantization", "quantization_config") + (() if model.has_vision else ("vision_config",))
            out = {k: v for k, v in config.items() if k not in dropped}
            block = quantization_block(model)
            if block is not None:
                out["quantization"] = block
                out["quantization_config"] = block
            (tmp / "config.json").write_text(json.dumps(out, indent=2) + "\n")
            copy_aux(source, tmp)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def fuse(model_path: str | Path, adapter_path: str | Path, save_path: str | Path, *,
         dequantize: bool = False, offline: bool | None = None) -> dict[str, Any]:
    """Load a model and its adapters, merge them, write the merged folder. Returns a summary."""
    from ..api import load

    model, _ = load(model_path, adapter_path=adapter_path, offline=offline)
    count = fuse_adapters(model, dequantize=dequantize)
    folder = save_model(model, model.source, Path(save_path))
    return {"fused_layers": count, "save_path": str(folder), "quantized": quantization_block(model) is not None}
