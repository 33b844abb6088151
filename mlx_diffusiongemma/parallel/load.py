"""Loading a rank's part of a checkpoint: only its slices, read straight from the safetensors files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint.config import load_generation_defaults
from ..checkpoint.files import read_json
from ..checkpoint.recipes import quantize_from_config
from ..checkpoint.safetensors import SafetensorsSlicer, check_tensors, safetensors_files
from ..errors import CheckpointError
from ..model.args import parse_model_args
from ..model.model import Model, map_key
from .plan import plan_shards, slice_of
from .shard import shard_structure


def load_sharded(
    folder: Path,
    group: mx.distributed.Group,
    *,
    tensor_parallel: Sequence[str] = (),
    dtype: mx.Dtype | None = None,
) -> tuple[Model, dict[str, Any]]:
    """This rank's part of the model in `folder`: `(model, config dict)`.

    Each rank reads only its slices; the model carries `generation` and `source`.
    `dtype` casts floating tensors that are not quantized (float32 for the parity tests).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    config = read_json(folder / "config.json")
    args = parse_model_args(config, source=str(folder / "config.json"))
    args.vision = None  # text only across ranks: images are not supported under mlx.launch yet
    slicers = [SafetensorsSlicer(f) for f in safetensors_files(folder)]
    stored: dict[str, tuple[SafetensorsSlicer, str]] = {}
    for s in slicers:
        for key in s.names():
            name = map_key(key, vision=False)
            if name is not None:
                stored[name] = (s, key)
    quantized = {n[: -len(".scales")] for n in stored if n.endswith(".scales")}
    if quantized and not args.quantization:
        raise CheckpointError(f"{folder}: quantized tensors but no `quantization` block in config.json")
    plan = plan_shards(args, group.rank(), group.size(), tensor_parallel, quantized)

    model = Model(args, load_generation_defaults(folder, config), folder)  # parameters stay lazy and are replaced below: nothing full-size is computed
    if quantized:
        quantize_from_config(model, args.quantization, set(stored))
    shard_structure(model, plan, group)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}

    found: dict[str, tuple[int, ...]] = {}
    parts: dict[str, tuple[int, int, int] | None] = {}
    for name, (s, key) in stored.items():
        shape = list(s.shape(key))
        part = slice_of(name, tuple(shape), plan)
        if part is not None:
            shape[part[0]] = part[2] - part[1]
        found[name], parts[name] = tuple(shape), part
    check_tensors(expected, found, str(folder))

    loaded = []
    for name, (s, key) in stored.items():
        value = s.read(key, parts[name])
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        mx.eval(value)  # one slice at a time: the peak stays one tensor slice above the shard
        loaded.append((name, value))
    model.load_weights(loaded, strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, config


def held_bytes(model: Model) -> dict[str, int]:
    """Bytes of parameters this rank holds: routed experts and everything else."""
    out = {"experts": 0, "other": 0}
    for name, value in tree_flatten(model.parameters()):
        out["experts" if ".experts." in name else "other"] += value.nbytes
    return out
