"""Time one MoE expert layer of the released shape at few rows: routes sorted by expert or not.

    python scripts/few_rows_moe.py --out bench-results/few-rows-moe [--bits 4] [--repeats 15] [--update-docs]

Fast mode recomputes only the live rows of a canvas, 1-64 of them late in a block, so what one
decoder pass costs at few rows decides what it saves (issue 31). The MoE is most of a pass's
weight traffic: the released model's 128 experts of 2816 -> 2x704 -> 2816, top-8 routing, as
`model.layers.Experts` runs them (`gather_qmm` at `--bits`, group 64). For each row count the
layer runs with its routes sorted by expert (`sorted_indices=True`, what `Experts` does from
`sort_from` = 64 routes on, as mlx_lm's SwitchGLU) and unsorted, interleaved, median of
`--repeats` evaluated calls after warm-up. Random weights and routing (each row's 8 experts
distinct, uniform over the 128): the kernel's cost does not depend on the values.

On Apple silicon this times Metal's kernels (where mlx-vlm's turbo engine reports a faster
matrix-vector dispatch below ~48 rows); elsewhere MLX's CPU backend.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from docs_block import write_results  # noqa: E402  (scripts/, this file's folder)
from full_shape import RELEASED  # noqa: E402

from mlx_diffusiongemma.model.args import parse_model_args  # noqa: E402
from mlx_diffusiongemma.model.layers import Experts  # noqa: E402

DOCS_BEGIN = "<!-- few-rows-moe:begin -->"
DOCS_END = "<!-- few-rows-moe:end -->"
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


def build(bits: int, dtype: mx.Dtype) -> tuple[Experts, int, int]:
    args = parse_model_args(RELEASED).text
    mx.random.seed(0)
    layer = Experts(args)
    layer.set_dtype(dtype)
    nn.quantize(layer, group_size=64, bits=bits)
    mx.eval(layer.parameters())
    return layer, args.num_experts, args.top_k_experts


def inputs(rows: int, experts: int, k: int, d: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    x = mx.random.normal((1, rows, d)).astype(dtype)
    idx = mx.argpartition(mx.random.uniform(shape=(1, rows, experts)), kth=k - 1, axis=-1)[..., :k].astype(mx.uint32)
    weights = mx.softmax(mx.random.normal((1, rows, k)), axis=-1)
    mx.eval(x, idx, weights)
    return x, idx, weights


def time_layer(layer: Experts, sort: bool, x, idx, weights) -> float:
    layer.sort_from = 0 if sort else 1 << 30
    t = time.perf_counter()
    mx.eval(layer(x, idx, weights))
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-results/few-rows-moe"))
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--repeats", type=int, default=15)
    # bf16 is what the model runs in on a Mac; MLX's CPU backend emulates bf16 in its quantized
    # matmul (6-7x slower than float16/float32 there), so on a CPU float16 says more.
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated live-row counts")
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/fast-mode.md")
    args = p.parse_args(argv)

    dtype = getattr(mx, args.dtype)
    layer, experts, k = build(args.bits, dtype)
    d = RELEASED["text_config"]["hidden_size"]
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        x, idx, weights = inputs(rows, experts, k, d, dtype)
        for sort in (True, False, True, False):  # warm-up: compiles and plans both
            time_layer(layer, sort, x, idx, weights)
        samples = {True: [], False: []}
        for _ in range(args.repeats):
            for sort in (True, False):
                samples[sort].append(time_layer(layer, sort, x, idx, weights))
        row = {"rows": rows, "routes": rows * k, "sorted_ms": 1e3 * statistics.median(samples[True]),
               "unsorted_ms": 1e3 * statistics.median(samples[False]), "samples": samples}
        row["library_sorts"] = rows * k >= Experts.sort_from
        table.append(row)
        print(f"rows {rows:4d}: sorted {row['sorted_ms']:8.2f} ms, unsorted {row['unsorted_ms']:8.2f} ms", flush=True)

    machine = f"{platform.machine()} {platform.processor() or ''} MLX {mx.__version__} {mx.default_device()}"
    lines = [f"One expert layer of the released shape ({experts} experts, top-{k}, 2816 -> 2x704 -> 2816, "
             f"{args.bits}-bit, group 64, {args.dtype} activations), median of {args.repeats} calls; {machine}. "
             f"`scripts/few_rows_moe.py`.", "",
             "| live rows | routes | sorted (ms) | unsorted (ms) | unsorted / sorted | ms per row (library's choice) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        chosen = r["sorted_ms"] if r["library_sorts"] else r["unsorted_ms"]
        lines.append(f"| {r['rows']} | {r['routes']} | {r['sorted_ms']:.2f} | {r['unsorted_ms']:.2f} | "
                     f"{r['unsorted_ms'] / r['sorted_ms']:.2f} | {chosen / r['rows']:.3f} |")
    results = {"bits": args.bits, "dtype": args.dtype, "repeats": args.repeats, "machine": machine, "table": table,
               "command": "python scripts/few_rows_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_results(args.out, results, "\n".join(lines),
                  (ROOT / "docs" / "fast-mode.md", DOCS_BEGIN, DOCS_END) if args.update_docs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
