"""Path or hub repo id -> (model, tokenizer), whatever the on-disk layout.

Accepted: our converted folders, original Hugging Face checkpoints (mapped on the fly and
optionally quantized in memory) and the other MLX port's conversions (mlx-community). Only
safetensors are read: no pickles, no code from the checkpoint.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import weights as W
from .config import (
    GenerationDefaults,
    ModelArgs,
    check_regular_file,
    load_generation_defaults,
    parse_model_args,
    read_json,
)
from .demo import is_trained_demo
from .errors import CheckpointError
from .model import Model

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve(path_or_repo: str | Path, *, offline: bool | None = None) -> Path:
    """A local folder as is; "demo" the trained demo model shipped in the package and
    "demo-random" the tiny random one (built on first use), both offline; otherwise a hub repo
    id fetched (or found in the cache) by huggingface_hub."""
    p = Path(path_or_repo).expanduser()
    if str(path_or_repo) == "demo" and not p.exists():
        from .demo import shipped_demo_dir

        folder = shipped_demo_dir()
        if not (folder / "model.safetensors").exists():
            raise CheckpointError(f"the demo model is missing from this installation ({folder}); reinstall the package")
        return folder
    if str(path_or_repo) == "demo-random" and not p.exists():
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


def shard_path(folder: Path, name: Any, source: Path) -> Path:
    """`folder / name` for a shard named in an index, refusing any name that could leave the
    folder: absolute paths, drive letters, `..` parts, or anything that is not a plain string.
    (The check is on the name, not on the resolved path: the hub cache links shards to blobs
    outside the snapshot folder, legitimately.)"""
    bad = not isinstance(name, str) or not name or "\0" in name
    if not bad:
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        bad = (posix.is_absolute() or windows.is_absolute() or bool(windows.drive)
               or ".." in posix.parts or ".." in windows.parts or not name.endswith(".safetensors"))
    if bad:
        raise CheckpointError(
            f"{source}: shard name {name!r} is not a *.safetensors file inside the checkpoint folder; "
            "refusing to read it (an index may only name files next to it)"
        )
    return folder / name


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's shards, checked against its index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> file")
        paths = {shard_path(folder, n, index) for n in weight_map.values()}
        files = sorted(paths)
        missing = [p.name for p in files if not (p.exists() or p.is_symlink())]
        if missing:
            raise CheckpointError(
                f"{folder}: {len(missing)} shard(s) listed in the index are missing "
                f"(first: {missing[0]}); the download looks incomplete"
            )
        if not files:
            raise CheckpointError(f"{index}: the index lists no weight files")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return files


_HEADER_LIMIT = 100_000_000


def _check_header(path: Path, header: Any) -> dict[str, Any]:
    """The parsed header is an object of {dtype, shape, data_offsets} entries with sane values."""
    bad = f"{path.name} is not a safetensors file (bad header"
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad}: not a JSON object); delete it and download or convert again")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
            and 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
        )
        if not ok:
            raise CheckpointError(
                f"{bad}: entry {key!r} lacks a valid dtype, shape or data_offsets); "
                "delete it and download or convert again"
            )
    return header


def check_safetensors(path: Path) -> dict[str, Any]:
    """Read a safetensors header and check the file is complete (not truncated)."""
    size = check_regular_file(path).st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path.name} is not a safetensors file (bad header)") from None
    except OSError as e:
        raise CheckpointError(f"could not read {path}: {e.strerror or e}") from None
    header = _check_header(path, header)
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name} is truncated: {size} bytes on disk, {8 + n + end} expected; "
            "delete it and download or convert again"
        )
    return header


_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.")


def check_config_against_headers(args: ModelArgs, headers: dict[str, tuple[int, ...]], source: str) -> None:
    """Compare config.json with what the weight files hold (mapped names -> shapes) BEFORE the
    model is built: a config naming a million layers or a huge vocabulary is refused here, with
    a message, instead of allocating a model the weights cannot fill."""
    t = args.text
    layers = {int(m.group(1)) for name in headers if (m := _LAYER.match(name))}
    found_layers = max(layers) + 1 if layers else 0
    # A config SMALLER than the weights builds a small model, and the name and shape check
    # reports the unexpected tensors as usual; a larger one is refused before it is built.
    if t.num_hidden_layers > found_layers:
        raise CheckpointError(
            f"{source}: config.json says num_hidden_layers = {t.num_hidden_layers}, the weight files "
            f"hold {found_layers} layers; the config does not belong to these weights"
        )
    embed = headers.get("model.decoder.embed_tokens.weight")
    if embed is None or len(embed) != 2:
        raise CheckpointError(f"{source}: missing tensor 'model.decoder.embed_tokens.weight'")
    if t.vocab_size > embed[0]:
        raise CheckpointError(
            f"{source}: tensor 'model.decoder.embed_tokens.weight' has shape {tuple(embed)}, "
            f"config.json implies {t.vocab_size} rows (vocab_size = {t.vocab_size})"
        )
    norm = headers.get("model.decoder.norm.weight")
    if norm is not None and tuple(norm) != (t.hidden_size,):
        raise CheckpointError(
            f"{source}: tensor 'model.decoder.norm.weight' has shape {tuple(norm)}, "
            f"config.json implies ({t.hidden_size},) (hidden_size = {t.hidden_size})"
        )


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
    dtype: mx.Dtype | str | None = None,
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
    dtype = as_dtype(dtype)
    config = read_json(folder / "config.json")
    args = parse_model_args(config, source=str(folder / "config.json"))
    if text_only:
        args.vision = None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in safetensors_files(folder):
        for key, info in check_safetensors(f).items():
            if key != "__metadata__" and (mapped := W.map_key(key)) is not None:
                shapes[mapped] = tuple(info["shape"])
    check_config_against_headers(args, shapes, str(folder))
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


# Files the tokenizer loader may open; each must be a regular file when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


def check_tokenizer_files(folder: Path) -> None:
    """A tokenizer must be there (transformers otherwise builds an empty one silently and every
    prompt becomes <unk>), and nothing it reads may be a pipe or a device."""
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            check_regular_file(path)
    for path in folder.glob("*.jinja"):
        check_regular_file(path)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{folder}: no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files "
            "of the original checkpoint into this folder"
        )


def load_tokenizer(folder: Path, generation: GenerationDefaults):
    """mlx_lm's TokenizerWrapper (streaming detokenizer, chat template) with the EOS set."""
    from mlx_lm.tokenizer_utils import load as load_tok

    check_tokenizer_files(Path(folder))
    try:
        return load_tok(Path(folder), eos_token_ids=list(generation.eos_token_ids))
    except Exception as e:  # transformers raises many kinds for a missing/broken tokenizer
        raise CheckpointError(f"{folder}: could not load the tokenizer ({type(e).__name__}: {e})") from None


def load(
    path_or_repo: str | Path,
    *,
    dtype: mx.Dtype | str | None = None,
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
    dtype = as_dtype(dtype)
    folder = resolve(path_or_repo, offline=offline)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    config_path = folder / "config.json"
    parse_model_args(read_json(config_path), source=str(config_path))  # the model type first
    check_tokenizer_files(folder)  # then the tokenizer, before the (slow) weights: fail fast
    model, config = load_model(folder, dtype=dtype, quantize=quantize, text_only=text_only)
    model.generation = load_generation_defaults(folder, config)
    model.source = folder
    model.is_demo = is_trained_demo(config)
    if adapter_path is not None:
        from .train.lora import load_adapters

        load_adapters(model, adapter_path)
    model.processor = None
    if model.has_vision:
        from .processor import ImageProcessor

        model.processor = ImageProcessor.from_folder(folder, model.args.vision)
    tokenizer = load_tokenizer(folder, model.generation)
    return model, tokenizer
