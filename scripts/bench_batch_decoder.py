#!/usr/bin/env python3
"""The server's batched decoder pass against one pass per request, on the same inputs.

    python scripts/bench_batch_decoder.py --model demo --batch 1,2,4,8 --prefix 200 --repeats 8

For each batch size B, B requests with different cached prefixes (prefix .. prefix + B - 1
tokens) and self-conditioning inputs: times `Model.denoise_batch` (one pass for all) and
B calls of `model.denoise` (one per request), alternating, and prints the best and median of
`--repeats` and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args(argv)

    import mlx.core as mx

    import mlx_diffusiongemma as dg
    from mlx_diffusiongemma.diffusion.block import DenoiseCall, run_calls

    model, _ = dg.load(args.model)  # "demo": the trained demo; "demo-random": the random one
    c, v = model.canvas_length, model.vocab_size
    print(f"model {args.model} · canvas {c} · prefix {args.prefix}+ tokens · device {mx.default_device()}")
    print()
    print("| requests | batched pass ms (best / median) | one pass each, total ms (best / median) | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    key = mx.random.key(0)
    for b in [int(x) for x in args.batch.split(",")]:
        calls = []
        for r in range(b):
            cache = model.make_cache()
            model.extend(cache, [(11 * i + r) % v for i in range(args.prefix + r)])
            k1, k2, key = mx.random.split(key, 3)
            calls.append(DenoiseCall(mx.random.randint(0, v, (1, c), key=k1), cache,
                                     mx.random.normal((1, c, v), key=k2), None))
        mx.eval([x.canvas for x in calls], [x.self_conditioning for x in calls])
        one = lambda: [model.denoise(x.canvas, x.cache, x.self_conditioning) for x in calls]  # noqa: E731
        mx.eval(run_calls(model, calls), one())  # warm-up
        batched, single = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out_b = mx.concatenate(run_calls(model, calls), axis=0)
            mx.eval(out_b)
            batched.append(time.perf_counter() - t)
            t = time.perf_counter()
            out_s = one()
            mx.eval(out_s)
            single.append(time.perf_counter() - t)
        diff = max(mx.abs(out_b[r : r + 1] - out_s[r]).max().item() for r in range(b))
        print(f"| {b} | {min(batched) * 1e3:.1f} / {statistics.median(batched) * 1e3:.1f} "
              f"| {min(single) * 1e3:.1f} / {statistics.median(single) * 1e3:.1f} "
              f"| {statistics.median(single) / statistics.median(batched):.2f}x | {diff:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
