"""One rank of the multi-process tests (started by `mlx.launch` from tests/test_distributed.py).

For each job (a checkpoint folder and the tensor-parallel parts to split) it loads this rank's
shard in float32, runs `prefill` + two `denoise` passes (without and with self-conditioning) and a
seeded generation, and rank 0 writes every result to one file, atomically (temporary name, then
rename), so a run that fails leaves no output at all.

`--fail load|hang` makes the last rank die after loading, or stop answering: rank 0 must then end
with a clear error (and exit code 1), within the watchdog's bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", required=True, help="JSON list of {name, folder, tp}")
    p.add_argument("--inputs", required=True, help="JSON {prompt, canvas, seed, max_tokens, steps}")
    p.add_argument("--out", required=True)
    p.add_argument("--fail", choices=["load", "hang"], default=None)
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args()

    from mlx_diffusiongemma.diffusion.engine import Request, run
    from mlx_diffusiongemma.diffusion.options import FastOptions, SamplerOptions
    from mlx_diffusiongemma.diffusion.events import GenerationResult
    from mlx_diffusiongemma.parallel.group import Watchdog, init_group, lost_peer
    from mlx_diffusiongemma.parallel.load import held_bytes, load_sharded
    from mlx_diffusiongemma.parallel.plan import DistributedError

    from mlx_diffusiongemma.parallel.group import stop_on_termination

    group = init_group(timeout=a.timeout)
    rank, size = group.rank(), group.size()
    stop_on_termination("lost another rank of the group (mlx.launch stopped this one after another rank exited)")
    inputs = json.loads(a.inputs)
    results: dict[str, np.ndarray] = {}
    try:
        with Watchdog(a.timeout, f"rank {rank}: no answer from the other ranks within {a.timeout:g} s "
                                 "(a rank is stuck or a host is unreachable); stopping.") as dog:
            for job in json.loads(a.jobs):
                mx.reset_peak_memory()
                model, _ = load_sharded(job["folder"], group, tensor_parallel=job["tp"], dtype=mx.float32)
                dog.pet()
                if a.fail and rank == size - 1:
                    if a.fail == "load":
                        os._exit(3)
                    time.sleep(3600)  # a stuck rank: alive, never answering
                cache = model.prefill(inputs["prompt"])
                canvas = mx.array(inputs["canvas"], dtype=mx.int32)[None]
                first = model.denoise(canvas, cache)
                second = model.denoise(canvas, cache, first / 0.7)
                mx.eval(first, second)
                dog.pet()
                req = Request(list(inputs["prompt"]), max_tokens=inputs["max_tokens"], seed=inputs["seed"],
                              sampler=SamplerOptions(max_denoising_steps=inputs["steps"]))
                result = None
                for event in dog.guard(run(model, req)):
                    if isinstance(event, GenerationResult):
                        result = event
                if not job["tp"]:  # fast mode (live rows over frozen K/V) on the expert split too
                    fast_req = Request(list(inputs["prompt"]), max_tokens=inputs["max_tokens"], seed=inputs["seed"],
                                       sampler=SamplerOptions(max_denoising_steps=inputs["steps"]), fast=FastOptions())
                    fast = list(dog.guard(run(model, fast_req)))[-1]
                    results[f"{job['name']}/fast_tokens"] = np.array(fast.tokens, dtype=np.int64)
                held = held_bytes(model)
                # Every rank's held bytes and peak, gathered on rank 0 (slot per rank).
                mine = mx.zeros((size, 3), dtype=mx.float32)
                mine[rank] = mx.array([held["experts"], held["other"], mx.get_peak_memory()], dtype=mx.float32)
                per_rank = mx.distributed.all_sum(mine, group=group)
                name = job["name"]
                results[f"{name}/first"] = np.array(first)
                results[f"{name}/second"] = np.array(second)
                results[f"{name}/tokens"] = np.array(result.tokens, dtype=np.int64)
                results[f"{name}/steps"] = np.array(result.steps_per_block, dtype=np.int64)
                results[f"{name}/syncs"] = np.array([result.host_syncs], dtype=np.int64)
                results[f"{name}/per_rank"] = np.array(per_rank)
    except DistributedError as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        print(f"error: rank {rank}: lost another rank of the group ({e}); stopping.", file=sys.stderr)
        return 1
    if rank == 0:
        tmp = a.out + ".partial.npz"
        try:
            np.savez(tmp, **results)
            os.replace(tmp, a.out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
