"""The model split across processes (and machines) with `mx.distributed`.

- Expert parallelism: rank r holds a contiguous slice of every layer's routed experts (the slices
  differ by at most one expert when the count does not divide). Routing stays global (every rank
  has the router); each rank evaluates the (token, slot) pairs with its local expert weights,
  zero-weights the pairs routed elsewhere, and one `all_sum` per layer adds the partial outputs.
- Tensor parallelism (optional, `tensor_parallel=("attention", "mlp")`): attention heads and the
  dense MLP's intermediate width split evenly, with mlx.nn's sharded layers
  (`AllToShardedLinear` in, `ShardedToAllLinear` out, which does the `all_sum`), as mlx-lm shards
  its models. Each adds one `[tokens, hidden]` all_sum per layer; docs/distributed.md weighs
  what that costs against what it saves.
- Everything else (embedding/logits, norms, router, self-conditioning) is replicated, so every
  rank ends a pass with the same logits: the ring all-reduce hands every rank the same bits, the
  sampler then takes the same decisions on every rank from the same seed, and the engine runs
  unchanged on each rank with its one host synchronisation per step.

Loading (`load_sharded`) reads only the rank's slice of each tensor straight from the safetensors
files through a read-only memory map: no rank ever holds the whole model, not even one whole
expert tensor at a time. Any layout `loading.load` accepts works (ours, mlx-vlm's, Hugging Face's).

Launch with MLX's own launcher, e.g. `mlx.launch --backend ring -n 2 -- dgemma generate ...`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import weights as W
from .config import load_generation_defaults, parse_model_args, read_json
from .errors import CheckpointError, DiffusionGemmaError
from .loading import _quantize_from_config, check_safetensors, check_tensors, safetensors_files
from .model import Experts, ExpertLinear, Model

TENSOR_PARTS = ("attention", "mlp")


class DistributedError(DiffusionGemmaError):
    """The process group cannot be formed, a rank was lost, or the model cannot be split so."""


# -- the plan ----------------------------------------------------------------------------------


def expert_ranges(num_experts: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) expert ranges per rank; the first `num_experts % size` ranks hold
    one more expert than the others."""
    if num_experts < size:
        raise DistributedError(f"{num_experts} experts cannot be split over {size} ranks (each needs at least one)")
    base, extra = divmod(num_experts, size)
    out, start = [], 0
    for r in range(size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    experts: tuple[int, int]  # this rank's [start, stop) of every layer's routed experts
    attention: bool = False  # heads split evenly over the ranks
    mlp: bool = False  # the dense MLP's intermediate width split evenly


def _quant_group(quantization: dict[str, Any] | None, path: str) -> int | None:
    """The quantization group size of the module at `path`, or None when it is not quantized."""
    if not quantization:
        return None
    rule = quantization.get(path, quantization)
    return rule.get("group_size", 64) if isinstance(rule, dict) else None


def plan_shards(args, rank: int, size: int, tensor_parallel: Sequence[str] = (),
                quantized_paths: set[str] | None = None) -> ShardPlan:
    """Check that the model can be split as asked over `size` ranks and say how rank `rank` does.

    `quantized_paths` (module paths stored quantized, with their group sizes from the config)
    matters for tensor parallelism only: a split of a quantized input dimension must fall on
    quantization-group boundaries.
    """
    unknown = set(tensor_parallel) - set(TENSOR_PARTS)
    if unknown:
        raise DistributedError(f"unknown tensor-parallel part(s) {sorted(unknown)}; choose from {TENSOR_PARTS}")
    text = args.text
    experts = expert_ranges(text.num_experts, size)[rank]
    quant = args.quantization if quantized_paths else None

    def quantized(path: str) -> int | None:
        return _quant_group(quant, path) if quantized_paths and path in quantized_paths else None

    if "attention" in tensor_parallel:
        for i in range(text.num_hidden_layers):
            heads, kv = text.num_attention_heads, text.kv_heads[i]
            if heads % size or kv % size:
                raise DistributedError(
                    f"attention cannot be split over {size} ranks: layer {i} has {heads} query and {kv} "
                    f"key/value heads (both must divide by {size}); drop attention tensor parallelism")
            gs = quantized(f"model.decoder.layers.{i}.self_attn.o_proj")
            if gs and (heads // size * text.head_dims[i]) % gs:
                raise DistributedError(
                    f"attention cannot be split over {size} ranks: layer {i}'s o_proj slice is not a "
                    f"multiple of its quantization group ({gs})")
    if "mlp" in tensor_parallel:
        inter = text.intermediate_size
        gs = max((quantized(f"model.decoder.layers.{i}.mlp.down_proj") or 1) for i in range(text.num_hidden_layers))
        if inter % size or (inter // size) % gs:
            raise DistributedError(
                f"the dense MLP ({inter} wide) cannot be split evenly over {size} ranks"
                + (f" in whole quantization groups of {gs}" if gs > 1 else "") + "; drop mlp tensor parallelism")
    return ShardPlan(rank, size, experts, "attention" in tensor_parallel, "mlp" in tensor_parallel)


# -- sharded modules ---------------------------------------------------------------------------


class ShardedExperts(Experts):
    """This rank's slice `[start, stop)` of a layer's routed experts; its output is the all-rank sum.

    Pairs routed to another rank's experts are pointed at a local expert and weighted by zero:
    shapes stay static (no host round trip to count rows), the weights each rank reads and holds
    are 1/N, and one all_sum per layer completes the mixture.
    """

    def __init__(self, experts: Experts, start: int, stop: int, group: mx.distributed.Group):
        nn.Module.__init__(self)
        self.start, self.count = start, stop - start
        self.group = group
        self.gate_up_proj = _expert_slice(experts.gate_up_proj, self.count)
        self.down_proj = _expert_slice(experts.down_proj, self.count)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        local = idx - self.start
        mine = (local >= 0) & (local < self.count)
        # Clipping keeps the expert order, so the sorted gather path still sees sorted indices.
        local = mx.clip(local, 0, self.count - 1)
        partial = super().__call__(x, local, mx.where(mine, weights, mx.zeros_like(weights)))
        return mx.distributed.all_sum(partial, group=self.group)


def _expert_slice(layer: nn.Module, count: int) -> nn.Module:
    """An empty expert layer of the same kind holding `count` experts (filled by the loader)."""
    if isinstance(layer, QuantizedSwitchLinear):
        out_dims, packed = layer.weight.shape[1:]
        return QuantizedSwitchLinear(packed * 32 // layer.bits, out_dims, count, bias=False,
                                     group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    out_dims, in_dims = layer.weight.shape[1:]
    return ExpertLinear(in_dims, out_dims, count, bias=False)


def _sharded_linear(layer: nn.Module, kind: str, group: mx.distributed.Group) -> nn.Module:
    """An empty mlx.nn sharded linear of the same shape and quantization (filled by the loader)."""
    if isinstance(layer, nn.QuantizedLinear):
        out_dims, packed = layer.weight.shape
        cls = QuantizedAllToShardedLinear if kind == "in" else QuantizedShardedToAllLinear
        return cls(packed * 32 // layer.bits, out_dims, False, layer.group_size, layer.bits,
                   getattr(layer, "mode", "affine"), group=group)
    out_dims, in_dims = layer.weight.shape
    cls = AllToShardedLinear if kind == "in" else ShardedToAllLinear
    return cls(in_dims, out_dims, False, group=group)


def shard_structure(model: Model, plan: ShardPlan, group: mx.distributed.Group) -> None:
    """Replace the modules this rank holds a slice of by their sharded kind (weights unset)."""
    for layer in model.layers:
        layer.experts = ShardedExperts(layer.experts, *plan.experts, group)
        if plan.attention:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                if name in attn:
                    setattr(attn, name, _sharded_linear(attn[name], "in", group))
            attn.o_proj = _sharded_linear(attn.o_proj, "out", group)
            attn.n_heads //= plan.size
            attn.n_kv_heads //= plan.size
        if plan.mlp:
            mlp = layer.mlp
            mlp.gate_proj = _sharded_linear(mlp.gate_proj, "in", group)
            mlp.up_proj = _sharded_linear(mlp.up_proj, "in", group)
            mlp.down_proj = _sharded_linear(mlp.down_proj, "out", group)


_LAYER = r"^model\.decoder\.layers\.\d+\."
_EXPERT_KEY = re.compile(_LAYER + r"experts\.(gate_up_proj|down_proj)\.")
_ROWS_KEY = re.compile(_LAYER + r"(self_attn\.(q_proj|k_proj|v_proj)|mlp\.(gate_proj|up_proj))\.")
_COLS_KEY = re.compile(_LAYER + r"(self_attn\.o_proj|mlp\.down_proj)\.")


def slice_of(name: str, shape: tuple[int, ...], plan: ShardPlan) -> tuple[int, int, int] | None:
    """(axis, start, stop) of this rank's part of the stored tensor `name` (a mapped parameter
    path), or None when the rank holds it whole."""
    if _EXPERT_KEY.match(name):
        return (0, *plan.experts)
    attention = ".self_attn." in name
    if (attention and not plan.attention) or (".mlp." in name and not plan.mlp):
        return None
    if _ROWS_KEY.match(name):
        axis = 0
    elif _COLS_KEY.match(name):
        axis = len(shape) - 1  # the input width (packed words, or groups for scales/biases)
    else:
        return None
    part = shape[axis] // plan.size
    return axis, plan.rank * part, (plan.rank + 1) * part


# -- reading slices from safetensors ------------------------------------------------------------

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


# -- loading -----------------------------------------------------------------------------------


def load_sharded(
    folder: Path,
    group: mx.distributed.Group,
    *,
    tensor_parallel: Sequence[str] = (),
    dtype: mx.Dtype | None = None,
) -> tuple[Model, dict[str, Any]]:
    """This rank's part of the model in `folder`: `(model, config dict)`.

    Each rank reads only its slices; the model carries `generation`, `source` and `plan`.
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
            name = W.map_key(key, vision=False)
            if name is not None:
                stored[name] = (s, key)
    quantized = {n[: -len(".scales")] for n in stored if n.endswith(".scales")}
    if quantized and not args.quantization:
        raise CheckpointError(f"{folder}: quantized tensors but no `quantization` block in config.json")
    plan = plan_shards(args, group.rank(), group.size(), tensor_parallel, quantized)

    model = Model(args)  # parameters stay lazy and are replaced below: nothing full-size is computed
    if quantized:
        _quantize_from_config(model, args.quantization, set(stored))
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
    model.generation = load_generation_defaults(folder, config)
    model.source = folder
    model.plan = plan
    return model, config


def held_bytes(model: Model) -> dict[str, int]:
    """Bytes of parameters this rank holds: routed experts and everything else."""
    out = {"experts": 0, "other": 0}
    for name, value in tree_flatten(model.parameters()):
        out["experts" if ".experts." in name else "other"] += value.nbytes
    return out


# -- the process group, sharing a request, and a bound on waiting ------------------------------


def init_group(backend: str = "any", timeout: float = 60.0) -> mx.distributed.Group:
    """The group `mlx.launch` set up (size 1 when not launched), formed within `timeout` seconds.

    Forming the ring blocks inside MLX until every host answers, so the bound is kept by a
    `Watchdog` process: an unreachable host ends this process with a message instead of a hang.
    """
    launched = any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_HOSTFILE"))
    if not launched:
        return mx.distributed.init()
    rank = os.environ.get("MLX_RANK", "?")
    with Watchdog(timeout, f"rank {rank}: the distributed group did not form within {timeout:g} s "
                           "(a host is unreachable or a rank did not start); stopping."):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise DistributedError(f"could not form the distributed group: {e}") from None
        # Every rank answers once before any work starts (as mlx-lm's sharded_load does).
        barrier(group)
    return group


def barrier(group: mx.distributed.Group) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def share(value: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's JSON-serialisable `value`, on every rank (the others pass anything, e.g. None).

    Two small all_sums (the length, then the bytes) carry it; the other ranks contribute zeros.
    """
    if group.size() == 1:
        return value
    data = json.dumps(value).encode() if group.rank() == 0 else b""
    n = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group, stream=mx.cpu)
    size = int(n.item())
    if group.rank() == 0:
        buf = mx.array(np.frombuffer(data, dtype=np.uint8).astype(np.int32))
    else:
        buf = mx.zeros((size,), dtype=mx.int32)
    out = mx.distributed.all_sum(buf, group=group, stream=mx.cpu)
    return json.loads(bytes(np.array(out).astype(np.uint8)).decode())


_WATCHDOG = r"""
import os, select, signal, sys
parent, deadline, message = int(sys.argv[1]), None, ""
while True:
    ready, _, _ = select.select([sys.stdin], [], [], deadline)
    if not ready:  # no word from the parent within the bound: it is stuck in a collective
        sys.stderr.write("error: " + message + "\n"); sys.stderr.flush()
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
    line = sys.stdin.readline()
    if not line or line.startswith("off"):
        sys.exit(0)  # the parent is done (or gone)
    seconds, _, message = line.rstrip("\n").partition(" ")
    deadline = float(seconds)
"""


class Watchdog:
    """Ends this process with `message` on stderr if it makes no progress for `timeout` seconds.

    A separate process, because MLX blocks in C++ (holding the interpreter lock while forming the
    group) when a peer is unreachable or stuck, where no Python thread or signal handler runs.
    `pet()` restarts the clock; leaving the `with` block stops the watchdog. A rank that dies
    outright is reported faster: MLX raises "connection to a peer was lost" at once.
    """

    def __init__(self, timeout: float, message: str):
        self.timeout, self.message = float(timeout), " ".join(message.split())
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "Watchdog":
        self._proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())],
                                      stdin=subprocess.PIPE, text=True)
        self.pet()
        return self

    def pet(self, message: str | None = None) -> None:
        if message is not None:
            self.message = " ".join(message.split())
        if self._proc is not None:
            self._proc.stdin.write(f"{self.timeout} {self.message}\n")
            self._proc.stdin.flush()

    def guard(self, events: Iterable) -> Iterator:
        """Pass `events` through, restarting the clock at each one (each step or block)."""
        for event in events:
            self.pet()
            yield event

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.write("off\n")
                self._proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            self._proc.wait(timeout=10)
            self._proc = None


def stop_on_termination(message: str) -> None:
    """Turn SIGTERM into a `DistributedError(message)`.

    `mlx.launch` terminates the surviving ranks as soon as one rank exits; rank 0 may be between
    collectives then (loading, or computing), and would vanish without a word. The error is
    raised where the main thread is, so the caller reports it and cleans up as for any error.
    """
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise DistributedError(message)

    signal.signal(signal.SIGTERM, handler)


def lost_peer(error: BaseException) -> bool:
    """Whether an exception is MLX reporting a lost connection to another rank."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("[ring]" in text or "[jaccl]" in text or "peer" in text)


# -- communication accounting ------------------------------------------------------------------


def collectives_per_layer(tensor_parallel: Sequence[str] = ()) -> int:
    """all_sums of a `[rows, hidden]` activation per layer: the experts' one, plus one for each
    tensor-parallel part (attention's o_proj, the dense MLP's down_proj)."""
    return 1 + sum(part in tensor_parallel for part in TENSOR_PARTS)


def pass_communication(text, rows: int, ranks: int, tensor_parallel: Sequence[str] = (), *,
                       encoder: bool = False, activation_bytes: int = 2) -> dict[str, float]:
    """Bytes one pass over `rows` tokens exchanges (a decoder step: rows = canvas length).

    A ring all-reduce of S bytes over N ranks sends (and receives) 2 (N - 1) / N x S bytes per
    rank, in 2 (N - 1) hops (reduce-scatter, then all-gather). An encoder pass skips the last
    layer's feed-forward and attention output (it only writes that layer's K/V).
    """
    layers = text.num_hidden_layers - (1 if encoder else 0)
    collectives = collectives_per_layer(tensor_parallel) * layers
    payload = rows * text.hidden_size * activation_bytes
    sent = collectives * payload * 2 * (ranks - 1) / ranks
    return {"collectives": collectives, "payload_bytes": payload, "sent_per_rank": sent,
            "hops_per_collective": 2 * (ranks - 1), "on_links": sent * ranks}


def link_time(comm: dict[str, float], gbit_per_s: float, hop_latency_s: float) -> float:
    """Seconds a pass spends communicating on a full-duplex link of `gbit_per_s` with a per-message
    latency: bandwidth term plus one latency per hop of every collective (nothing overlapped)."""
    return comm["sent_per_rank"] * 8 / (gbit_per_s * 1e9) + comm["collectives"] * comm["hops_per_collective"] * hop_latency_s
