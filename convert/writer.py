"""Streaming sharded safetensors output and the atomic destination folder.

Why not `mlx_lm.utils.save_model` / `make_shards`: both take the whole weight dict (a model in
memory), while the converter must hold at most one shard. `ShardWriter` applies the same rule as
`make_shards` (start a new shard when the next tensor would pass the limit; a tensor larger than
the limit gets a shard of its own) one tensor at a time, and writes the same files: shards named
`model-00001-of-0000N.safetensors` (`model.safetensors` when there is one), safetensors metadata
`{"format": "mlx"}`, and `model.safetensors.index.json` with `weight_map` and
`metadata.total_size` / `total_parameters`. Since the number of shards is known only at the end,
shards are written under provisional names and renamed when the last one is flushed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

INDEX_NAME = "model.safetensors.index.json"
_METADATA = {"format": "mlx"}


def _header_cost(name: str, array: mx.array) -> int:
    """Generous size of a tensor's entry in the safetensors JSON header."""
    return len(name) + 64 + 24 * (array.ndim + 2)


class ShardWriter:
    """Collect evaluated arrays and write a shard each time `limit` bytes would be passed."""

    def __init__(self, folder: Path, limit: int):
        self.folder = Path(folder)
        self.limit = int(limit)
        self._buffer: dict[str, mx.array] = {}
        self._buffered = 0  # bytes the current shard file would have
        self._written: list[tuple[Path, list[str]]] = []
        self.total_size = 0  # tensor data bytes, as in the index metadata
        self.oversized: list[str] = []  # tensors larger than the limit on their own

    def add(self, name: str, array: mx.array) -> None:
        cost = array.nbytes + _header_cost(name, array)
        if self._buffer and self._buffered + cost > self.limit:
            self.flush()
        if not self._buffer:
            self._buffered = 8 + 64  # header length field and the metadata entry
            if self._buffered + cost > self.limit:
                self.oversized.append(name)
        self._buffer[name] = array
        self._buffered += cost
        self.total_size += array.nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f"partial-{len(self._written) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), self._buffer, metadata=_METADATA)
        self._written.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffered = 0
        mx.clear_cache()  # give the shard's buffers back instead of keeping them cached

    def finish(self, total_parameters: int) -> list[str]:
        """Flush, give the shards their final names, write the index; returns the shard names."""
        self.flush()
        count = len(self._written)
        fmt = "model-{:05d}-of-{:05d}.safetensors" if count > 1 else "model.safetensors"
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, keys) in enumerate(self._written):
            final = fmt.format(i + 1, count)
            os.replace(path, self.folder / final)
            names.append(final)
            for k in keys:
                weight_map[k] = final
        index = {
            "metadata": {"total_size": self.total_size, "total_parameters": total_parameters},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(self.folder / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=4)
        return names


def remove(path: Path) -> None:
    """Delete a file, link or folder tree if it is there."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def put_in_place(tmp: Path, dst: Path, *, replace: bool) -> bool:
    """Rename the finished `tmp` folder to `dst`; True when an existing `dst` was replaced.

    An existing `dst` is moved aside first and deleted only once `tmp` has taken its name, so a
    failure at any point leaves either the old or the new folder at `dst`, never neither.
    """
    if not (dst.exists() or dst.is_symlink()):
        os.replace(tmp, dst)
        return False
    if not replace:
        from mlx_diffusiongemma.errors import CheckpointError

        raise CheckpointError(f"{dst} appeared while converting; nothing was written there")
    old = dst.with_name(f"{dst.name}.replaced-{os.getpid()}")
    remove(old)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    remove(old)
    return True
