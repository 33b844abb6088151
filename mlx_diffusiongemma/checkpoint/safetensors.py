"""Safetensors files of a checkpoint: the shards an index names (confined to the folder), complete
headers (a truncated download is refused before reading), names and shapes checked against the
model, and reading whole tensors or one rank's slice of them through a memory map."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from ..model.args import ModelArgs
from .files import check_regular_file, read_json


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


_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # bf16 as raw bits
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsSlicer:
    """Read whole tensors or slices of one safetensors file through a read-only memory map, so
    only the pages of the requested slice are ever read (the file is checked complete first)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = check_safetensors(self.path)
        with open(self.path, "rb") as f:
            self._base = 8 + int.from_bytes(f.read(8), "little")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def read(self, name: str, part: tuple[int, int, int] | None = None) -> mx.array:
        info = self.header[name]
        kind = info["dtype"]
        if kind not in _NUMPY_DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {name!r} has unsupported dtype {kind}")
        begin, end = info["data_offsets"]
        raw = self._map[self._base + begin : self._base + end]
        arr = raw.view(_NUMPY_DTYPES[kind]).reshape(info["shape"])
        if part is not None:
            axis, start, stop = part
            index = [slice(None)] * arr.ndim
            index[axis] = slice(start, stop)
            arr = arr[tuple(index)]
        out = mx.array(np.ascontiguousarray(arr))
        return out.view(mx.bfloat16) if kind == "BF16" else out
