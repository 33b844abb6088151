"""Path or hub repo id -> (model, tokenizer), whatever the on-disk layout.

Accepted: our converted folders, original Hugging Face checkpoints (mapped on the fly and
optionally quantized in memory) and the other MLX port's conversions (mlx-community). Only
safetensors are read: no pickles, no code from the checkpoint.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import weights as W
from .config import GenerationDefaults, load_generation_defaults, parse_model_args, read_json
from .errors import CheckpointError
from .model import Model

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve(path_or_repo: str | Path, *, offline: bool | None = None) -> Path:
    """A local folder as is; "demo" the random demo model (built on first use, offline);
    otherwise a hub repo id fetched (or found in the cache) by huggingface_hub."""
    p = Path(path_or_repo).expanduser()
    if str(path_or_repo) == "demo" and not p.exists():
        from .demo import ensure_demo

        return ensure_demo()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; give the checkpoint's folder")
        return p
    text = str(path_or_repo)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such folder (and not a hub repo id like 'owner/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS, local_files_only=bool(offline)))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text} is not in the local Hugging Face cache and the hub cannot be reached. "
            "Connect once to download it, point --model at a local folder, or try `--model demo`."
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not fetch {text} from the hub: {e}") from None
    except OSError as e:
        raise CheckpointError(f"could not fetch {text}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's shards, checked against its index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: {len(missing)} shard(s) listed in the index are missing "
                f"(first: {missing[0]}); the download looks incomplete"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return files


def check_safetensors(path: Path) -> dict[str, Any]:
    """Read a safetensors header and check the file is complete (not truncated)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} is not a safetensors file (bad header)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: {size} bytes on disk, {8 + n + end} expected; "
            "delete it and download or convert again"
        )
    return header


def iter_checkpoint(folder: Path) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    """Yield (file, tensors) shard by shard."""
    for f in safetensors_files(folder):
        check_safetensors(f)
        try:
            yield f, mx.load(str(f))
        except Exception as e:  # mlx reports I/O problems as RuntimeError/ValueError
            raise CheckpointError(f"could not read {f.name}: {e}") from None


def _quantize_from_config(model: Model, quantization: dict[str, Any], names: set[str]) -> None:
    """Quantize the modules the checkpoint stores quantized, with per-module overrides."""
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def predicate(path: str, module: Any) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]  # a per-module override, or False
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in names and default

    nn.quantize(model, class_predicate=predicate)


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    source: str,
    label: Callable[[str], str] = lambda name: name,
) -> None:
    """Compare a checkpoint's (mapped) tensor names and shapes with what the model expects;
    raise a CheckpointError naming the first problem (`label` gives the name to show)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {label(unexpected[0])!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; is this a DiffusionGemma checkpoint matching its config.json?"
        )
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    for name, shape in found.items():
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(
                f"{source}: tensor {label(name)!r} has shape {tuple(shape)}, "
                f"config.json implies {tuple(expected[name])}"
            )


def load_weights_into(model: Model, weights: dict[str, mx.array], source: str) -> None:
    """Check names and shapes against the model, then load."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_tensors(expected, {k: tuple(v.shape) for k, v in weights.items()}, source)
    model.load_weights(list(weights.items()), strict=True)


def load_model(
    folder: Path,
    *,
    dtype: mx.Dtype | None = None,
    quantize: str | None = None,
    text_only: bool = False,
) -> tuple[Model, dict[str, Any]]:
    """Build and fill the model from a local checkpoint folder; returns (model, config dict).

    `dtype` casts floating tensors that are not quantized (e.g. `mx.float32` for parity tests);
    `quantize` applies a recipe from `weights.RECIPES` in memory to an unquantized checkpoint;
    `text_only` leaves the vision tower out (less memory; images are then refused).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    config = read_json(folder / "config.json")
    args = parse_model_args(config, source=str(folder / "config.json"))
    if text_only:
        args.vision = None
    model = Model(args)
    weights: dict[str, mx.array] = {}
    for _, shard in iter_checkpoint(folder):
        weights.update(W.sanitize(shard, vision=args.vision is not None))
    quantized = any(k.endswith(".scales") for k in weights)
    if quantized:
        if not args.quantization:
            raise CheckpointError(f"{folder}: quantized tensors but no `quantization` block in config.json")
        if quantize:
            raise CheckpointError(f"{folder} is already quantized; drop the quantize option")
        _quantize_from_config(model, args.quantization, set(weights))
    if dtype is not None:
        # Quantization scales/biases are cast too: a float32 request on a quantized checkpoint
        # then computes in float32 (bf16 -> f32 is exact) instead of silently producing bf16.
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    load_weights_into(model, weights, str(folder))
    if quantize and quantize != "bf16":
        nn.quantize(model, class_predicate=W.quant_predicate(quantize))
    elif quantize == "bf16":
        model.set_dtype(mx.bfloat16)
    # Parameters and the arrays modules keep privately (the proportional RoPE's `_freqs`): a lazy
    # array built here belongs to this thread's stream, and evaluating it later on another
    # thread (a server's or an app's worker) fails with "no Stream(cpu, 0) in current thread".
    mx.eval(model.parameters(), [v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)])
    model.eval()
    return model, config


def load_tokenizer(folder: Path, generation: GenerationDefaults):
    """mlx_lm's TokenizerWrapper (streaming detokenizer, chat template) with the EOS set."""
    from mlx_lm.tokenizer_utils import load as load_tok

    try:
        return load_tok(Path(folder), eos_token_ids=list(generation.eos_token_ids))
    except Exception as e:  # transformers raises many kinds for a missing/broken tokenizer
        raise CheckpointError(f"{folder}: could not load the tokenizer ({type(e).__name__}: {e})") from None


def load(
    path_or_repo: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    quantize: str | None = None,
    offline: bool | None = None,
    adapter_path: str | Path | None = None,
    text_only: bool = False,
):
    """Load a DiffusionGemma checkpoint: `(model, tokenizer)`.

    The model carries `model.generation` (sampler defaults from generation_config.json),
    `model.source` (the resolved folder) and `model.processor` (the image processor, or None
    for a text-only model or load: `text_only=True` leaves the vision tower out).
    `adapter_path` applies fine-tuned adapters (a folder written by `dgemma finetune`,
    mlx-lm's format) on top of the weights.
    """
    folder = resolve(path_or_repo, offline=offline)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    model, config = load_model(folder, dtype=dtype, quantize=quantize, text_only=text_only)
    model.generation = load_generation_defaults(folder, config)
    model.source = folder
    if adapter_path is not None:
        from .train.lora import load_adapters

        load_adapters(model, adapter_path)
    model.processor = None
    if model.has_vision:
        from .processor import ImageProcessor

        model.processor = ImageProcessor.from_folder(folder, model.args.vision)
    tokenizer = load_tokenizer(folder, model.generation)
    return model, tokenizer
