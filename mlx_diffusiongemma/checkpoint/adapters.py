"""Adapter folders in mlx-lm's format, read and applied to a loaded model.

An adapter folder is what `dgemma finetune` (and mlx-lm) writes: `adapter_config.json`
(`fine_tune_type`, `num_layers`, `lora_parameters`) and `adapters.safetensors` (the trainable
parameters). `load_adapters` checks the folder, then `mlx_lm.tuner.utils.load_adapters` wraps the
layers and loads the weights. Writing adapters is the training wing's (`train/lora.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from .safetensors import check_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
FINE_TUNE_TYPES = ("lora", "full")
# mlx-lm's defaults (`mlx_lm.lora.CONFIG_DEFAULTS`).
DEFAULT_LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}
MAX_RANK = 1024
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
# What trained parameters are stored as (an integer tensor would reach the kernels, whose
# message would blame them: "GatherMM only supports float32").
FLOAT_DTYPES = ("F32", "F16", "BF16")
LORA_LEAVES = ("lora_a", "lora_b")


def lora_parameters(rank: int = 8, scale: float = 20.0, dropout: float = 0.0,
                    keys: list[str] | None = None) -> dict[str, Any]:
    """The `lora_parameters` block of adapter_config.json (mlx-lm's names)."""
    params: dict[str, Any] = {"rank": int(rank), "scale": float(scale), "dropout": float(dropout)}
    if keys is not None:
        params["keys"] = list(keys)
    check_lora_parameters(params, "lora parameters")
    return params


def check_lora_parameters(params: Any, source: str) -> None:
    if not isinstance(params, dict):
        raise CheckpointError(f"{source}: 'lora_parameters' must be an object")
    rank = params.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise CheckpointError(f"{source}: LoRA rank must be an integer in 1..{MAX_RANK}, got {rank!r}")
    scale = params.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise CheckpointError(f"{source}: LoRA 'scale' must be a finite number, got {scale!r}")
    dropout = params.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise CheckpointError(f"{source}: LoRA 'dropout' must be in [0, 1), got {dropout!r}")
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise CheckpointError(f"{source}: LoRA 'keys' must be a list of module names")


def check_num_layers(model, num_layers: Any, source: str) -> int:
    total = len(model.layers)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise CheckpointError(f"{source}: num_layers must be an integer, got {num_layers!r}")
    if num_layers == -1:
        return total
    if not 1 <= num_layers <= total:
        raise CheckpointError(f"{source}: num_layers {num_layers} is not in 1..{total} "
                              f"(the model has {total} layers; -1 means all)")
    return num_layers


def is_quantized(module: nn.Module) -> bool:
    return any(name.endswith(".scales") or name == "scales" for name, _ in tree_flatten(module.parameters()))


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; is this an adapter folder?")
    if path.stat().st_size > MAX_ADAPTER_CONFIG_BYTES:
        raise CheckpointError(f"{path}: too large for an adapter config")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise CheckpointError(f"{path}: fine_tune_type {kind!r} is not supported (use {', '.join(FINE_TUNE_TYPES)})")
    if kind == "lora":
        check_lora_parameters(config.get("lora_parameters"), str(path))
    return config


def load_adapters(model, adapter_path: str | Path):
    """Apply an adapter folder (mlx-lm's format) to a loaded model, in place; returns the model.

    The folder's config is checked first (clear errors for a wrong folder or a model with a
    different shape), then `mlx_lm.tuner.utils.load_adapters` wraps the layers and loads the
    weights. The model is left in eval mode (LoRA dropout off)."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    folder = Path(adapter_path).expanduser()
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    header = {k: v for k, v in check_safetensors(weights).items() if k != "__metadata__"}
    if not header:
        raise CheckpointError(f"{weights}: holds no tensors; the adapters were not saved (train again)")
    for name, info in header.items():
        if info["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{weights}: tensor {name!r} is {info['dtype']}; adapter weights are floating "
                                  f"point ({', '.join(FLOAT_DTYPES)})")
    n = check_num_layers(model, config.get("num_layers"), str(folder / ADAPTER_CONFIG))
    if config.get("fine_tune_type", "lora") == "full" and is_quantized(model):
        raise CheckpointError(f"{folder}: full fine-tuned weights cannot be loaded into a quantized model")
    try:
        mlx_lm_load_adapters(model, str(folder))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: adapters do not fit this model: {e}") from None
    # mlx-lm loads with strict=False: a parameter the file lacks keeps its initial value (a LoRA
    # B of zeros: the base model's output, silently).
    missing = sorted(set(expected_adapter_keys(model, config.get("fine_tune_type", "lora"), n)) - set(header))
    if missing:
        raise CheckpointError(f"{weights}: {len(missing)} adapter tensor(s) that {ADAPTER_CONFIG} implies are "
                              f"missing (first: {missing[0]}); the file is partial or belongs to other settings")
    materialize(model)
    model.eval()
    return model


def expected_adapter_keys(model, fine_tune_type: str, num_layers: int) -> list[str]:
    """The parameter names an adapter file of this type must hold for a model already set up
    (LoRA: every `lora_a`/`lora_b`; full: every weight of the last `num_layers` layers)."""
    names = [name for name, _ in tree_flatten(model.parameters())]
    if fine_tune_type != "full":
        return [name for name in names if name.rsplit(".", 1)[-1] in LORA_LEAVES]
    paths = {id(m): name for name, m in model.named_modules()}
    prefixes = tuple(paths[id(layer)] + "." for layer in model.layers[-num_layers:])
    return [name for name in names if name.startswith(prefixes)]


def materialize(model) -> None:
    """Evaluate every array a model holds: parameters and the arrays modules keep privately (the
    proportional RoPE's `_freqs`). A lazy array built on one thread belongs to that thread's
    stream; evaluating it later on another thread (a server's engine, an app's worker) fails with
    "There is no Stream(cpu, 0) in current thread"."""
    private = [v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)]
    mx.eval(model.parameters(), private)
