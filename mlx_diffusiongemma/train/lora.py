"""LoRA and full fine-tuning setup, and saving adapters in mlx-lm's format, through `mlx_lm.tuner`.

`mlx_lm.tuner.utils.linear_to_lora_layers` walks `model.layers` (our decoder layers, which both
the encoder and the decoder pass run) and wraps every linear layer of the last `num_layers`:
attention and dense-MLP projections and the router in `LoRALinear`, the fused routed experts in
`LoRASwitchLinear`. Our `ExpertLinear` is a `SwitchLinear` (and `nn.quantize` turns it into a
`QuantizedSwitchLinear`), so `LoRASwitchLinear.from_base` takes it as is, quantized or not:
LoRA on a 4-bit base (QLoRA) is the same call. An adapter folder is what mlx-lm writes and
reads: `adapter_config.json` (`fine_tune_type`, `num_layers`, `lora_parameters`) and
`adapters.safetensors` (the trainable parameters), loaded back by `checkpoint.adapters`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint.adapters import (
    ADAPTER_CONFIG,
    DEFAULT_LORA,
    FINE_TUNE_TYPES,
    check_lora_parameters,
    check_num_layers,
    is_quantized,
)
from ..checkpoint.files import write_errors
from ..errors import CheckpointError


def setup_finetune(model, fine_tune_type: str, num_layers: int, lora: dict[str, Any] | None = None) -> None:
    """Freeze the model and make trainable what the fine-tune type trains (as `mlx_lm.lora` does):
    LoRA adapters on the last `num_layers` layers (-1: all), or, for "full", every weight of
    those layers (their norms, router and experts included). Full fine-tuning needs unquantized
    weights; LoRA works on quantized ones (QLoRA)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"fine-tune type {fine_tune_type!r} is not one of {', '.join(FINE_TUNE_TYPES)}")
    n = check_num_layers(model, num_layers, "--num-layers")
    model.freeze()
    if fine_tune_type == "full":
        layers = model.layers[-n:]
        if any(is_quantized(layer) for layer in layers):
            raise CheckpointError("full fine-tuning needs unquantized weights; this model is quantized: "
                                  "use --fine-tune-type lora (QLoRA), or a bf16 checkpoint")
        for layer in layers:
            layer.unfreeze()
        return
    params = dict(DEFAULT_LORA if lora is None else lora)
    check_lora_parameters(params, "lora parameters")
    linear_to_lora_layers(model, n, params)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized matrix counts its unpacked elements."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model)


def adapter_weights(model) -> dict[str, mx.array]:
    """The trainable parameters (LoRA matrices, or the weights a full fine-tune trains)."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, path: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write the trainable parameters to `path` (a file) and, with `config`, adapter_config.json
    beside it. Each goes to a temporary file first and both are renamed into place together, so
    an interruption (Ctrl-C, a signal) cannot leave half a file, nor a new config beside older
    weights. A failed write names the file (a full disk says so)."""
    path = Path(path)
    tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")  # mx.save_safetensors wants the suffix
    config_tmp = path.with_name(f".partial-{os.getpid()}-{ADAPTER_CONFIG}")
    try:
        with write_errors(path, "save the adapters to a disk with room (--adapter-path)"):
            path.parent.mkdir(parents=True, exist_ok=True)
            weights = adapter_weights(model)
            mx.eval(weights)
            mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
            if config is not None:
                config_tmp.write_text(adapter_config_text(config))
                os.replace(config_tmp, path.parent / ADAPTER_CONFIG)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    return path


def adapter_config_text(config: dict[str, Any]) -> str:
    """adapter_config.json: mlx-lm's keys (`fine_tune_type`, `num_layers`, `lora_parameters`,
    and the run's other settings), sorted as mlx-lm writes them."""
    return json.dumps(dict(sorted(config.items())), indent=4) + "\n"


def write_adapter_config(folder: str | Path, config: dict[str, Any]) -> Path:
    """adapter_config.json alone (`adapter_config_text`); a training run writes it with its
    weights instead (`save_adapters`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ADAPTER_CONFIG
    path.write_text(adapter_config_text(config))
    return path
