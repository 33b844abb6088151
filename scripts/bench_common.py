"""Timing harness shared by the benchmark workers (standard library + mlx only).

Each worker (ours, the other MLX port, the transformers reference) runs in its own process, in
its own virtual environment, and imports this file from `scripts/`; so the same protocol times
every port: warm-up calls first, then `repeats` timed calls, each fully evaluated, all raw
samples kept. Peak memory is MLX's allocator peak (`mx.get_peak_memory`), reset before each
measured piece, so it includes the model weights resident at the time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def summarize(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    n = len(s)
    if not n:
        return {"samples": [], "n": 0}
    q1 = s[max(0, math.ceil(n / 4) - 1)]
    q3 = s[min(n - 1, math.ceil(3 * n / 4) - 1)]
    return {
        "samples": samples,
        "n": n,
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "q1": q1,
        "q3": q3,
        "spread": (s[-1] - s[0]) / statistics.median(s) if statistics.median(s) > 0 else 0.0,
    }


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int, before: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Time `fn` (which must block until its work is done) `repeats` times after `warmup` calls.

    `before` runs untimed before every call (e.g. to rebuild an input)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    samples = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def measure(fn: Callable[[], Any], mem: "Memory", label: str, *, warmup: int, repeats: int) -> dict[str, Any]:
    """`time_calls` plus the MLX peak memory of the timed calls, logged: the protocol every worker
    uses for one measured piece (a forward at a cache length, a sampler step)."""
    mem.reset()
    s = time_calls(fn, warmup=warmup, repeats=repeats)
    s["peak_memory_gb"] = mem.peak_gb()
    log(f"  {label}: {s['median']*1e3:.2f} ms")
    return s


class Memory:
    """Peak of MLX's allocator around a measured piece."""

    def __init__(self, mx):
        self.mx = mx

    def reset(self) -> None:
        gc.collect()
        self.mx.clear_cache()
        self.mx.reset_peak_memory()

    def peak_gb(self) -> float:
        return self.mx.get_peak_memory() / 1e9

    def active_gb(self) -> float:
        return self.mx.get_active_memory() / 1e9


def measure_prefill(mx, prefill: Callable[[Any], Any], plan: dict[str, Any], vocab: int, mem: "Memory") -> dict[str, Any]:
    """Time `prefill(ids)` (which must return with its cache evaluated) at each planned prompt
    length: the same protocol for every port."""
    out: dict[str, Any] = {}
    lengths = sorted(plan["prompt_lengths"])
    for _ in range(plan["prefill_warmup"] if lengths else 0):
        prefill(random_ids(mx, lengths[0], vocab, seed=1))
    for n in lengths:
        ids = random_ids(mx, n, vocab, seed=n)
        samples, peaks = [], []
        for _ in range(plan["prefill_repeats"]):
            mem.reset()
            t = time.perf_counter()
            cache = prefill(ids)
            samples.append(time.perf_counter() - t)
            peaks.append(mem.peak_gb())
            del cache
        s = summarize(samples)
        s["tokens_per_s"] = n / s["median"]
        s["peak_memory_gb"] = max(peaks)
        out[str(n)] = s
        log(f"  prefill {n}: {s['median']*1e3:.0f} ms ({s['tokens_per_s']:.0f} tok/s)")
    return out


def worker_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--plan", required=True, help="JSON file with the measurement plan")
    ap.add_argument("--out", required=True, help="JSON file to write")
    return ap.parse_args()


def load_plan(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def random_ids(mx, n: int, vocab: int, seed: int, low: int = 12) -> Any:
    """`[1, n]` int32 token ids drawn uniformly from [low, vocab) (past the special tokens)."""
    key = mx.random.key(seed)
    return mx.random.randint(low, vocab, (1, n), key=key).astype(mx.int32)


def run_guarded(result: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; on failure record the error under result['errors'][name] and go on."""
    try:
        return fn()
    except Exception as e:  # one failing piece must not lose the others
        result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}".strip()[:2000]
        traceback.print_exc(file=sys.stderr)
        return None


def write_result(path: str, result: dict[str, Any]) -> None:
    result.setdefault("python", platform.python_version())
    Path(path).write_text(json.dumps(result, indent=1, default=str))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


PROFILED_OPS = ("quantized_matmul", "gather_qmm", "gather_mm")


def profile_ops(mx, fn: Callable[[], Any], ops: tuple[str, ...] = PROFILED_OPS) -> dict[str, Any]:
    """Synchronous per-op profile of one call of `fn`.

    Every call of `mx.<op>` for `op` in `ops` (the quantized matmuls and the experts' gather
    matmuls; both ports call them through the `mx` module) is made eager: its array inputs are
    evaluated first (untimed), then the op is timed with its output evaluated. Returns the
    total wall time of `fn` under this profile and the time and call count per op, so that
    `total - sum(ops)` is everything else (dense matmuls, attention, norms, sampling glue)."""
    originals = {name: getattr(mx, name) for name in ops}
    acc: dict[str, dict[str, Any]] = {name: {"s": 0.0, "calls": 0, "shapes": {}} for name in ops}
    untimed = [0.0]

    def wrap(name, orig):
        def timed(*args, **kwargs):
            t_in = time.perf_counter()
            arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, mx.array)]
            mx.eval(arrays)
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            mx.eval(out)
            dt = time.perf_counter() - t0
            untimed[0] += t0 - t_in
            a = acc[name]
            a["s"] += dt
            a["calls"] += 1
            key = "x".join(str(d) for d in args[0].shape) + " . " + "x".join(str(d) for d in args[1].shape)
            a["shapes"][key] = a["shapes"].get(key, 0) + 1
            return out
        return timed

    for name, orig in originals.items():
        setattr(mx, name, wrap(name, orig))
    try:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    finally:
        for name, orig in originals.items():
            setattr(mx, name, orig)
    ops_s = sum(a["s"] for a in acc.values())
    # Inputs evaluated eagerly before an op are work the op's producers would have done anyway:
    # they stay in "rest", which is total minus the ops' own time.
    return {"total_s": total, "ops": acc, "ops_s": ops_s, "rest_s": total - ops_s}
