"""A checkpoint folder or hub repo id -> (model, tokenizer), whatever the on-disk layout.

Accepted: our converted folders, original Hugging Face checkpoints (mapped on the fly and
optionally quantized in memory) and the other MLX port's conversions (mlx-community). Only
safetensors are read: no pickles, no code from the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from ..model.args import parse_model_args
from ..model.cache import kv_group_size_for
from ..model.model import Model, is_vision_key, map_key
from .adapters import load_adapters, materialize
from .config import load_generation_defaults, load_model_args
from .files import read_json
from . import memory
from .memory import DEFAULT_CONTEXT, MemoryPlan, display_name, recipe_of, set_wired_limit, weight_bytes
from .recipes import quant_predicate, quantize_from_config
from .safetensors import check_config_against_headers, check_safetensors, check_tensors, iter_checkpoint, safetensors_files
from .tokenizer import check_tokenizer_files, load_tokenizer

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve(path_or_repo: str | Path, *, offline: bool | None = None, config_only: bool = False) -> Path:
    """A local folder as is; otherwise a hub repo id fetched (or found in the cache) by
    huggingface_hub (`offline`: the cache only; `config_only`: its JSON files, no weights)."""
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
        patterns = ["*.json"] if config_only else _HUB_PATTERNS
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=bool(offline)))
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
    context: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
) -> tuple[Model, dict[str, Any]]:
    """Build and fill the model from a local checkpoint folder; returns (model, config dict).

    `dtype` casts floating tensors that are not quantized (e.g. `mx.float32` for parity tests);
    `quantize` applies a recipe from `recipes.RECIPES` in memory to an unquantized checkpoint;
    `text_only` leaves the vision tower out (less memory; images are then refused). The model
    carries the folder's generation settings (`model.generation`), the folder (`model.source`)
    and its memory plan (`model.memory_plan`, for `context` positions, `memory.DEFAULT_CONTEXT`
    by default): a checkpoint whose plan is over what MLX can use here is refused with
    `MemoryLimitError` before any weight is read. `kv_bits` (4 or 8) holds the prompt cache
    quantized (`Model.set_kv_bits`; None, the default, keeps the exact float cache).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    dtype = as_dtype(dtype)
    config = read_json(folder / "config.json")
    args = load_model_args(folder, config)
    if text_only:
        args.vision = None
    shapes, stored = stored_tensors(folder)
    check_config_against_headers(args, shapes, str(folder))
    plan = _with_kv(plan_memory(folder, args, stored, quantize=quantize, dtype=dtype, context=context),
                    args, kv_bits, kv_group_size)
    plan.check()
    set_wired_limit()
    model = Model(args, load_generation_defaults(folder, config), folder)
    model.set_kv_bits(kv_bits, plan.kv_group_size)
    model.memory_plan = plan
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


def stored_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, int]]]:
    """From the shards' headers (checked complete), for every tensor the model keeps: its shape,
    and its (dtype, bytes on disk)."""
    shapes: dict[str, tuple[int, ...]] = {}
    stored: dict[str, tuple[str, int]] = {}
    for f in safetensors_files(folder):
        for key, info in check_safetensors(f).items():
            if key != "__metadata__" and (mapped := map_key(key)) is not None:
                shapes[mapped] = tuple(info["shape"])
                stored[mapped] = (info["dtype"], info["data_offsets"][1] - info["data_offsets"][0])
    return shapes, stored


def plan(path_or_repo: str | Path, *, context: int | None = None, quantize: str | None = None,
         text_only: bool = False, offline: bool | None = None, kv_bits: int | None = None,
         kv_group_size: int | None = None) -> MemoryPlan:
    """The memory plan of loading a checkpoint (see `load`) without loading it. A hub repo id
    fetches its JSON files only; a folder without weights (config.json and the index) is planned
    from its config alone, as Hugging Face checkpoints store their weights (bfloat16)."""
    folder = resolve(path_or_repo, offline=offline, config_only=True)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    args = load_model_args(folder, read_json(folder / "config.json"))
    if text_only:
        args.vision = None
    return _with_kv(_plan_of(folder, args, quantize, context), args, kv_bits, kv_group_size)


def _with_kv(plan: MemoryPlan, args, kv_bits: int | None, kv_group_size: int | None) -> MemoryPlan:
    """`plan` with the prompt cache held at `kv_bits` (checked against the model: ValueError if
    unusable); the group size is recorded only for a quantized cache."""
    group = kv_group_size_for(kv_bits, kv_group_size, args.text.head_dims)
    return replace(plan, kv_bits=kv_bits, kv_group_size=group if kv_bits else None)


def _plan_of(folder: Path, args, quantize: str | None, context: int | None) -> MemoryPlan:
    if list(folder.glob("*.safetensors")):
        return plan_memory(folder, args, stored_tensors(folder)[1], quantize=quantize, context=context)
    if args.quantization:
        raise CheckpointError(f"{folder}: a quantized checkpoint without its weights; the plan needs their headers")
    weights = weight_bytes(args)
    limit, source = memory.memory_limit()  # looked up here: tests set a smaller machine
    context = _context(args, context)
    if quantize and quantize != "bf16":
        return MemoryPlan(display_name(folder), quantize, args, weight_bytes(args, recipe=quantize), weights, context, limit, source)
    return MemoryPlan(display_name(folder), "bf16", args, weights, 0, context, limit, source)


def plan_memory(folder: Path, args, stored: dict[str, tuple[str, int]], *, quantize: str | None = None,
                dtype: mx.Dtype | None = None, context: int | None = None) -> MemoryPlan:
    """The memory plan of loading `folder` (its tensors `stored`: name -> (dtype, bytes), the
    names the model keeps) with these options. The weights of a checkpoint loaded as stored are
    its tensors' bytes (cast to `dtype` if given); of a recipe applied in memory, the recipe's
    bytes, with the stored ones held beside them while loading."""
    keep = {k: v for k, v in stored.items() if args.vision is not None or not is_vision_key(k)}
    floating = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    to = dtype.size if dtype is not None else None

    def cast(kind: str, n: int) -> int:
        return n // floating[kind] * to if to and kind in floating else n

    as_stored = sum(cast(kind, n) for kind, n in keep.values())
    limit, source = memory.memory_limit()  # looked up here: tests set a smaller machine
    context = _context(args, context)
    if quantize and quantize != "bf16":
        # Unquantized tensors, scales and biases stay in the stored float type (or `dtype`).
        kinds = [kind for kind, _ in keep.values() if kind in floating]
        native = floating[max(set(kinds), key=kinds.count)] if kinds else 2
        weights = weight_bytes(args, recipe=quantize, float_bytes=to or native)
        return MemoryPlan(display_name(folder), quantize, args, weights, as_stored, context, limit, source)
    if quantize == "bf16":
        as_stored = sum(n // floating[kind] * 2 if kind in floating else n for kind, n in keep.values())
    return MemoryPlan(display_name(folder), recipe_of(args.quantization) if not quantize else quantize, args,
                      as_stored, 0, context, limit, source)


def _context(args, context: int | None) -> int:
    """The context to plan for: `memory.DEFAULT_CONTEXT` (at most the model's), or the one asked
    for, which must be a whole number of positions the model has."""
    limit = args.text.max_position_embeddings
    if context is None:
        return min(DEFAULT_CONTEXT, limit)
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= limit:
        raise ValueError(f"context must be a whole number from 1 to the model's {limit} positions, got {context!r}")
    return context


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
    context: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int | None = None,
):
    """Load a DiffusionGemma checkpoint folder or hub repo: `(model, tokenizer)`.

    The model carries `model.generation` (sampler defaults from generation_config.json) and
    `model.source` (the resolved folder); `text_only=True` leaves the vision tower out.
    `adapter_path` applies fine-tuned adapters (a folder written by `dgemma finetune`,
    mlx-lm's format) on top of the weights. Before any weight is read, the memory plan for
    `context` positions (`checkpoint.memory`) is checked against what MLX can use here:
    `MemoryLimitError` (one line, naming a smaller recipe, a shorter context or the GPU limit's
    sysctl) instead of a swap storm; requests are then checked against the same plan.
    `kv_bits` (4 or 8, with `kv_group_size`, as mlx-lm's `--kv-bits`) holds the prompt cache
    quantized: less memory for long prompts, logits no longer exact (docs/performance.md).
    """
    dtype = as_dtype(dtype)
    folder = resolve(path_or_repo, offline=offline)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    config_path = folder / "config.json"
    parse_model_args(read_json(config_path), source=str(config_path))  # the model type first
    check_tokenizer_files(folder)  # then the tokenizer, before the (slow) weights: fail fast
    model, _ = load_model(folder, dtype=dtype, quantize=quantize, text_only=text_only, context=context,
                          kv_bits=kv_bits, kv_group_size=kv_group_size)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    tokenizer = load_tokenizer(folder, model.generation)
    return model, tokenizer
