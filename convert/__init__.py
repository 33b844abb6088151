"""Convert a Hugging Face DiffusionGemma checkpoint into an MLX folder (`dgemma convert`).

    report = convert("google/diffusiongemma-26B-A4B-it", "dgemma-26b-4bit")

Input: a local Hugging Face checkpoint folder or a hub repo id (fetched with huggingface_hub).
Only `config.json` and `*.safetensors` are read: no pickles, no code from the checkpoint.

Output (written to `DST.partial-<pid>` next to DST and renamed into place when complete):
- sharded safetensors (`model-00001-of-0000N.safetensors`, each at most `shard_size_bytes`
  unless one tensor alone is larger) and `model.safetensors.index.json`, with the MLX parameter
  paths of `model.model.map_key` (fused experts as `experts.gate_up_proj.weight` etc.);
- `config.json`: the source's, plus a mlx-lm / mlx-vlm style `quantization` block (copied to
  `quantization_config` as mlx-lm does) for the quantized recipes. The vision tower is converted
  too, kept in bfloat16 by every recipe (see `checkpoint.recipes.module_bits`); with `text_only` its
  tensors are left out (counted in the report) and `vision_config` is dropped, so the converted
  config says what the folder holds (`ModelArgs.has_vision` is False);
- `generation_config.json`, tokenizer, chat template and processor files, copied as they are.

Dtypes: the reference checkpoint is bfloat16 and the runtime computes in bfloat16, so every
floating tensor is cast to bfloat16 BEFORE quantizing (whatever the source dtype); quantized
matrices therefore get bfloat16 scales and biases, exactly what `nn.quantize` produces on a
bfloat16 model, and unquantized tensors (norms, layer scalars, router scales, and every tensor of
the `bf16` recipe) are stored as bfloat16. Nothing is kept in float32.

Memory: tensors are streamed one at a time (`mx.load` is lazy: indexing one tensor and
evaluating it reads only its bytes), cast, quantized and appended to the current output shard,
which is written and released as soon as the next tensor would pass `shard_size_bytes`. Peak
memory is about one output shard plus a few copies of the largest tensor, whatever the model
size (measured in tests/test_convert.py).

Library code never prints: the returned `ConvertReport` carries counts and messages, and the
optional `progress(done_tensors, total_tensors, done_bytes, total_bytes)` callback (source
tensors and bytes) drives a progress bar. An exception raised by the callback aborts the
conversion cleanly, like any other interruption.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from mlx_diffusiongemma.checkpoint import recipes
from mlx_diffusiongemma.checkpoint.files import read_json, signals_interrupt, write_errors
from mlx_diffusiongemma.checkpoint.loading import resolve
from mlx_diffusiongemma.checkpoint.safetensors import (
    check_config_against_headers,
    check_safetensors,
    check_tensors,
    safetensors_files,
)
from mlx_diffusiongemma.errors import CheckpointError
from mlx_diffusiongemma.model.args import parse_model_args
from mlx_diffusiongemma.model.model import is_vision_key, map_key

from .plan import Plan, SizeEstimate, TensorPlan, projected_size
from .writer import ShardWriter, put_in_place, remove

# What a failed write advises besides freeing space (`files.write_errors`).
CONVERT_ELSEWHERE = "convert to a disk with room (nothing was left behind)"

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "RECIPES",
    "ConvertReport",
    "SizeEstimate",
    "convert",
    "projected_size",
]

RECIPES = recipes.RECIPES
DEFAULT_SHARD_SIZE = 5 * 2**30

ProgressCallback = Callable[[int, int, int, int], Any]

# Copied as they are when present. Everything the loader and tokenizer may read besides weights.
_AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
)
_AUX_GLOBS = ("*.jinja",)
_AUX_DIRS = ("additional_chat_templates",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class ConvertReport:
    """What `convert` wrote. `parameters_by_bits` maps stored bits (4, 8; 16 = bfloat16) to counts."""

    source: Path
    destination: Path
    recipe: str
    tensors_written: int = 0  # tensors in the output files (a quantized matrix counts 3)
    parameters_written: int = 0  # model parameters (a quantized matrix counts its elements)
    vision_tensors_skipped: int = 0  # text_only conversions
    vision_bytes_skipped: int = 0
    vision_tensors_written: int = 0
    unused_tensors_skipped: int = 0  # tied lm_head, clipping buffers, rotary tables
    parameters_by_bits: dict[int, int] = field(default_factory=dict)
    weight_bytes: int = 0  # tensor data, as `total_size` in the index
    bytes_on_disk: int = 0  # every file in the destination folder
    bits_per_weight: float = 0.0  # stored tensor bits (incl. scales and biases) / parameters
    shards: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    replaced_existing: bool = False
    messages: list[str] = field(default_factory=list)


@dataclass
class _SourceTensor:
    file: Path
    key: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    target: str | None  # MLX path, or None when left out


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    recipe: str = recipes.DEFAULT_RECIPE,
    force: bool = False,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE,
    progress: ProgressCallback | None = None,
    text_only: bool = False,
) -> ConvertReport:
    """Convert the checkpoint at `src` (folder or hub repo id) into an MLX folder at `dst`.

    `recipe` is one of `RECIPES`: "mixed-4bit" (default), "mixed-3bit", "mixed-2bit", "8bit" or "bf16" (see
    `checkpoint.recipes.module_bits`). An existing `dst` is refused unless `force`, and then replaced only
    once the new folder is complete. Raises `CheckpointError` on any problem with the input or
    the destination; nothing is left at `dst` (or next to it) by a failed or interrupted run.
    `text_only` leaves the vision tower out (a smaller folder that cannot read images).
    """
    if recipe not in recipes.RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(recipes.RECIPES)}")
    if int(shard_size_bytes) <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")

    folder = resolve(src)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: no config.json; is this a model folder?")
    config = read_json(config_path)
    args = parse_model_args(config, source=str(config_path))
    if args.quantization:
        raise CheckpointError(
            f"{folder} is already quantized (config.json has a quantization block); "
            "convert the original bfloat16 Hugging Face checkpoint instead"
        )

    dst = Path(dst).expanduser().absolute()
    _check_destination(folder, dst, force)

    if text_only:
        args.vision = None
    inventory = _inventory(folder, vision=args.vision is not None)
    # The config against the weight files' headers before the plan builds the (lazy) model: a
    # config naming a million layers is refused here.
    check_config_against_headers(args, {t.target: t.shape for t in inventory if t.target}, str(folder))
    plan = Plan(args, recipe)
    _validate(folder, inventory, plan)
    _check_disk_space(dst, plan.estimate().bytes)

    report = ConvertReport(source=folder, destination=dst, recipe=recipe)
    tmp = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    report.messages += _remove_stale_partials(dst)
    remove(tmp)  # a leftover of an earlier run of a process with our pid
    dst.parent.mkdir(parents=True, exist_ok=True)
    with signals_interrupt():
        tmp.mkdir()
        try:
            writer = ShardWriter(tmp, shard_size_bytes)
            _stream(inventory, plan, writer, report, progress)
            with write_errors(tmp, CONVERT_ELSEWHERE):
                report.shards = writer.finish(report.parameters_written)
                report.weight_bytes = writer.total_size
                for name in writer.oversized:
                    report.messages.append(
                        f"{name} alone is larger than the shard size ({shard_size_bytes} bytes): "
                        "it has a shard of its own"
                    )
                _write_config(tmp / "config.json", config, plan, text_only=args.vision is None)
                report.copied_files = copy_aux(folder, tmp)
                report.replaced_existing = put_in_place(tmp, dst, replace=force)
        except BaseException:
            remove(tmp)
            raise

    report.bytes_on_disk = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    if report.parameters_written:
        report.bits_per_weight = 8 * report.weight_bytes / report.parameters_written
    report.parameters_by_bits = dict(sorted(report.parameters_by_bits.items()))
    _summarise(report, folder)
    return report


# -- checks before anything is written ---------------------------------------------------------


def _remove_stale_partials(dst: Path) -> list[str]:
    """Delete `DST.partial-<pid>` folders left by conversions that were killed (their process
    is gone); a running conversion's folder is left alone."""
    notes = []
    for old in dst.parent.glob(f"{dst.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        remove(old)
        notes.append(f"removed {old.name}, left by an interrupted conversion")
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_destination(folder: Path, dst: Path, force: bool) -> None:
    try:
        src_real, dst_real = folder.resolve(), dst.resolve()
    except (RuntimeError, OSError) as e:  # Python reports a symlink loop as RuntimeError
        raise CheckpointError(f"{dst}: cannot resolve the destination ({e}); choose another destination") from None
    if dst_real == src_real or dst_real in src_real.parents:
        raise CheckpointError(f"{dst} is (or contains) the source checkpoint; choose another destination")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise CheckpointError(
                f"{dst} already exists; choose another destination, or force (--force) to replace it "
                "(the old folder is removed only once the new one is complete)"
            )
        if not _replaceable(dst):
            raise CheckpointError(
                f"{dst} exists and is not a model folder (config.json and *.safetensors weights); "
                "--force replaces only a model folder: choose another destination, or delete it yourself"
            )


def _replaceable(dst: Path) -> bool:
    """What --force may delete: an empty folder, or a folder that holds a model (config.json and
    safetensors weights) — never a file, a link, or a folder of anything else."""
    if dst.is_symlink() or not dst.is_dir():
        return False
    entries = list(dst.iterdir())
    if not entries:
        return True
    has_config = (dst / "config.json").is_file()
    has_weights = any(p.suffix == ".safetensors" for p in entries) or (dst / "model.safetensors.index.json").is_file()
    return has_config and has_weights


def _inventory(folder: Path, vision: bool = True) -> list[_SourceTensor]:
    """Every tensor of the checkpoint from the safetensors headers (files checked complete)."""
    try:
        files = safetensors_files(folder)
    except CheckpointError:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder} has only pickle weights ({pickles[0]}...); they can run code when loaded, "
                "so only *.safetensors checkpoints are converted"
            ) from None
        raise
    tensors: list[_SourceTensor] = []
    for f in files:
        header = check_safetensors(f)
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],  # read each file front to back
        )
        for key, info in entries:
            start, end = info["data_offsets"]
            tensors.append(_SourceTensor(f, key, start, end - start, tuple(info["shape"]), map_key(key, vision)))
    return tensors


def _validate(folder: Path, inventory: list[_SourceTensor], plan: Plan) -> None:
    """Names and shapes against the runtime model, with the loader's messages."""
    if any(t.key.endswith(".scales") for t in inventory):
        raise CheckpointError(
            f"{folder} holds quantized tensors (*.scales); convert the original bfloat16 checkpoint"
        )
    seen: dict[str, _SourceTensor] = {}
    for t in inventory:
        if t.target is None:
            continue
        if t.target in seen:
            raise CheckpointError(
                f"{folder}: tensor {t.target!r} appears twice ({seen[t.target].file.name}, {t.file.name})"
            )
        seen[t.target] = t
    check_tensors(
        {name: tuple(t.shape) for name, t in plan.tensors.items()},
        {name: tuple(t.shape) for name, t in seen.items()},
        str(folder),
        label=lambda name: seen[name].key if name in seen else name,
    )


def _check_disk_space(dst: Path, needed: int) -> None:
    probe = dst.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = int(needed * 1.01) + (16 << 20)
    if free < needed:
        raise CheckpointError(
            f"not enough free disk space at {probe}: the conversion writes about "
            f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )


# -- the streaming pass ---------------------------------------------------------------------------


def _stream(
    inventory: list[_SourceTensor],
    plan: Plan,
    writer: ShardWriter,
    report: ConvertReport,
    progress: ProgressCallback | None,
) -> None:
    total_tensors = len(inventory)
    total_bytes = sum(t.nbytes for t in inventory)
    done_tensors = done_bytes = 0
    if progress is not None:
        progress(0, total_tensors, 0, total_bytes)
    current: Path | None = None
    arrays: dict[str, mx.array] = {}
    for t in inventory:
        if t.target is None:
            if is_vision_key(t.key):
                report.vision_tensors_skipped += 1
                report.vision_bytes_skipped += t.nbytes
            else:
                report.unused_tensors_skipped += 1
        else:
            if t.file != current:
                arrays = _open(t.file)  # lazy: nothing is read until a tensor is evaluated
                current = t.file
            target = plan.tensors[t.target]
            if is_vision_key(t.key):
                report.vision_tensors_written += 1
            try:
                outputs = _prepare(arrays.pop(t.key), target)
            except (RuntimeError, ValueError) as e:  # mlx reports read errors this way
                raise CheckpointError(f"could not read {t.key!r} from {t.file.name}: {e}") from None
            with write_errors(writer.folder, CONVERT_ELSEWHERE):  # e.g. the disk filled up
                for name, array in outputs:
                    writer.add(name, array)
            bits = target.quant["bits"] if target.quant else outputs[0][1].dtype.size * 8
            report.tensors_written += len(outputs)
            report.parameters_written += target.parameters
            report.parameters_by_bits[bits] = report.parameters_by_bits.get(bits, 0) + target.parameters
            del outputs
        done_tensors += 1
        done_bytes += t.nbytes
        if progress is not None:
            progress(done_tensors, total_tensors, done_bytes, total_bytes)


def _open(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx reports I/O problems as RuntimeError/ValueError
        raise CheckpointError(f"could not read {path.name}: {e}") from None


def _prepare(value: mx.array, target: TensorPlan) -> list[tuple[str, mx.array]]:
    """Read (evaluate) one source tensor and produce what is stored for it, evaluated."""
    if mx.issubdtype(value.dtype, mx.floating):
        value = value.astype(mx.bfloat16)
    if target.quant:
        # Exactly what QuantizedLinear / QuantizedEmbedding / QuantizedSwitchLinear do on a
        # bfloat16 model: `mx.quantize(weight, group_size, bits, mode="affine")`.
        wq, scales, biases = mx.quantize(value, target.quant["group_size"], target.quant["bits"], mode="affine")
        base = target.module
        outputs = [(target.name, wq), (f"{base}.scales", scales), (f"{base}.biases", biases)]
    else:
        outputs = [(target.name, value)]
    mx.eval(*(a for _, a in outputs))
    return outputs


# -- the small files --------------------------------------------------------------------------------


def _write_config(path: Path, config: dict[str, Any], plan: Plan, text_only: bool = False) -> None:
    import json

    dropped = ("_name_or_path", "vision_config") if text_only else ("_name_or_path",)
    out = {k: v for k, v in config.items() if k not in dropped}
    out.pop("quantization", None)
    out.pop("quantization_config", None)
    quantization = plan.quantization_config()
    if quantization is not None:
        out["quantization"] = quantization
        out["quantization_config"] = quantization  # mlx-lm writes both (hub model tree)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


def copy_aux(folder: Path, tmp: Path) -> list[str]:
    names = [n for n in _AUX_FILES if (folder / n).is_file()]
    for pattern in _AUX_GLOBS:
        names += sorted(p.name for p in folder.glob(pattern) if p.is_file() and p.name not in names)
    for name in names:
        shutil.copyfile(folder / name, tmp / name)  # follows the hub cache's symlinks
    for d in _AUX_DIRS:
        if (folder / d).is_dir():
            shutil.copytree(folder / d, tmp / d)
            names.append(d + "/")
    return names


def _summarise(report: ConvertReport, folder: Path) -> None:
    if report.vision_tensors_skipped:
        report.messages.append(
            f"left out the vision tower: {report.vision_tensors_skipped} tensors "
            f"({report.vision_bytes_skipped / 1e6:.1f} MB) as asked (text only); "
            "vision_config was dropped from config.json"
        )
    if report.unused_tensors_skipped:
        report.messages.append(
            f"left out {report.unused_tensors_skipped} unused tensors (tied lm_head, clipping buffers)"
        )
    if "tokenizer.json" not in report.copied_files and "tokenizer.model" not in report.copied_files:
        report.messages.append(
            f"{folder} has no tokenizer files: add them to {report.destination} before loading it"
        )
