"""A checkpoint folder or hub repo id -> (model, tokenizer), whatever the on-disk layout.

Accepted: our converted folders, original Hugging Face checkpoints (mapped on the fly and
optionally quantized in memory) and the other MLX port's conversions (mlx-community). Only
safetensors are read: no pickles, no code from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from ..model.args import parse_model_args
from ..model.model import Model, map_key
from .adapters import load_adapters, materialize
from .config import load_generation_defaults, load_model_args
from .files import read_json
from .recipes import quant_predicate, quantize_from_config
from .safetensors import check_config_against_headers, check_safetensors, check_tensors, iter_checkpoint, safetensors_files
from .tokenizer import check_tokenizer_files, load_tokenizer

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve(path_or_repo: str | Path, *, offline: bool | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id fetched (or found in the cache) by
    huggingface_hub (`offline`: the cache only)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; give the checkpoint's folder")
        return p
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such folder (and not a hub repo id like 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # "owner/name" is also how a mistyped relative path looks: say that no such folder exists too.
    no_folder = f"there is no folder {text!r} here ({Path.cwd()}), and "
    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, local_files_only=bool(offline)))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{no_folder}{text} is not in the local Hugging Face cache and the hub cannot be reached. "
            "Connect once to download it, point --model at a local folder, or try `--model demo`."
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{no_folder}could not fetch {text} from the hub: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{no_folder}could not fetch {text}: {e}") from None


def load_weights_into(model: Model, weights: dict[str, mx.array], source: str) -> None:
    """Check names and shapes against the model, then load."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_tensors(expected, {k: tuple(v.shape) for k, v in weights.items()}, source)
    model.load_weights(list(weights.items()), strict=True)


def load_model(
    folder: Path,
    *,
    dtype: mx.Dtype | str | None = None,
    quantize: str | None = None,
    text_only: bool = False,
) -> tuple[Model, dict[str, Any]]:
    """Build and fill the model from a local checkpoint folder; returns (model, config dict).

    `dtype` casts floating tensors that are not quantized (e.g. `mx.float32` for parity tests);
    `quantize` applies a recipe from `recipes.RECIPES` in memory to an unquantized checkpoint;
    `text_only` leaves the vision tower out (less memory; images are then refused). The model
    carries the folder's generation settings (`model.generation`) and the folder (`model.source`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    dtype = as_dtype(dtype)
    config = read_json(folder / "config.json")
    args = load_model_args(folder, config)
    if text_only:
        args.vision = None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in safetensors_files(folder):
        for key, info in check_safetensors(f).items():
            if key != "__metadata__" and (mapped := map_key(key)) is not None:
                shapes[mapped] = tuple(info["shape"])
    check_config_against_headers(args, shapes, str(folder))
    model = Model(args, load_generation_defaults(folder, config), folder)
    weights: dict[str, mx.array] = {}
    for _, shard in iter_checkpoint(folder):
        weights.update(model.sanitize(shard))
    quantized = any(k.endswith(".scales") for k in weights)
    if quantized:
        if not args.quantization:
            raise CheckpointError(f"{folder}: quantized tensors but no `quantization` block in config.json")
        if quantize:
            raise CheckpointError(f"{folder} is already quantized; drop the quantize option")
        quantize_from_config(model, args.quantization, set(weights))
    if dtype is not None:
        # Quantization scales/biases are cast too: a float32 request on a quantized checkpoint
        # then computes in float32 (bf16 -> f32 is exact) instead of silently producing bf16.
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_weights_into(model, weights, str(folder))
    if quantize and quantize != "bf16":
        nn.quantize(model, class_predicate=quant_predicate(quantize))
    elif quantize == "bf16":
        model.set_dtype(mx.bfloat16)
    materialize(model)
    model.eval()
    return model, config


_DTYPES = ("float32", "float16", "bfloat16")


def as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    """An MLX floating dtype from itself or its name ("float32", "bfloat16", "float16"; an
    "mx." / "mlx.core." prefix is allowed), as users write it."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("mlx.core.").removeprefix("mx.")
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
        if name in _DTYPES:
            return getattr(mx, name)
    raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} (or an mx.Dtype), got {dtype!r}")


def load(
    path_or_repo: str | Path,
    *,
    dtype: mx.Dtype | str | None = None,
    quantize: str | None = None,
    offline: bool | None = None,
    adapter_path: str | Path | None = None,
    text_only: bool = False,
):
    """Load a DiffusionGemma checkpoint folder or hub repo: `(model, tokenizer)`.

    The model carries `model.generation` (sampler defaults from generation_config.json) and
    `model.source` (the resolved folder); `text_only=True` leaves the vision tower out.
    `adapter_path` applies fine-tuned adapters (a folder written by `dgemma finetune`,
    mlx-lm's format) on top of the weights.
    """
    dtype = as_dtype(dtype)
    folder = resolve(path_or_repo, offline=offline)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    config_path = folder / "config.json"
    parse_model_args(read_json(config_path), source=str(config_path))  # the model type first
    check_tokenizer_files(folder)  # then the tokenizer, before the (slow) weights: fail fast
    model, _ = load_model(folder, dtype=dtype, quantize=quantize, text_only=text_only)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    tokenizer = load_tokenizer(folder, model.generation)
    return model, tokenizer
