"""Peak memory per rank with the model split over N processes on this machine (loopback ring).

    python scripts/dist_memory.py [--preset medium] [--ranks 2,4] [--out bench-results/dist]

Builds the preset's random checkpoint (scripts/bench_models.py), converts it with our converter
(mixed-4bit: what users run), then loads it and runs a prefill and one denoising step, once in a
single process and once per rank count under `mlx.launch --backend ring`. Each rank reports the
parameter bytes it holds (routed experts / the rest), MLX's peak memory and the process's peak
resident size. Prints a markdown table (docs/distributed.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCH = "from mlx._distributed_utils.launch import main; main()"


def worker(folder: str, out: str) -> int:
    """One rank (or the single process): load, prefill 64 tokens, one denoise step, report."""
    import mlx.core as mx

    from mlx_diffusiongemma.checkpoint.loading import load_model
    from mlx_diffusiongemma.parallel.group import init_group
    from mlx_diffusiongemma.parallel.load import held_bytes, load_sharded

    group = init_group(timeout=300)
    rank, size = group.rank(), group.size()
    mx.reset_peak_memory()
    if size == 1:
        model, _ = load_model(Path(folder))
    else:
        model, _ = load_sharded(Path(folder), group)
    load_peak = mx.get_peak_memory()
    held = held_bytes(model)
    cache = model.prefill(list(range(3, 67)))
    canvas = mx.arange(model.canvas_length, dtype=mx.int32)[None] + 3
    mx.eval(model.denoise(canvas, cache))
    step_peak = mx.get_peak_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    row = mx.zeros((size, 5), dtype=mx.float32)
    row[rank] = mx.array([held["experts"], held["other"], load_peak, step_peak, rss], dtype=mx.float32)
    if size > 1:
        row = mx.distributed.all_sum(row, group=group)
    mx.eval(row)  # on every rank: a collective needs them all
    if rank == 0:
        tmp = out + ".partial"
        Path(tmp).write_text(json.dumps(row.tolist()))
        os.replace(tmp, out)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="medium")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--out", type=Path, default=Path("bench-results/dist"))
    p.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(*a.worker)

    sys.path.insert(0, str(HERE))
    from bench_models import build_hf_checkpoint

    from mlx_diffusiongemma.convert import convert

    a.out.mkdir(parents=True, exist_ok=True)
    hf = build_hf_checkpoint(a.preset, a.out / f"{a.preset}-hf")
    q4 = a.out / f"{a.preset}-mixed-4bit"
    if not (q4 / "config.json").exists():
        convert(hf, q4, recipe="mixed-4bit")
    runs: dict[int, list[list[float]]] = {}
    for n in [1] + [int(x) for x in a.ranks.split(",")]:
        out = a.out / f"memory-{n}.json"
        out.unlink(missing_ok=True)
        me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(q4), str(out)]
        cmd = me if n == 1 else [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", str(n),
                                 "--starting-port", str(_free_port()), "--", *me]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        if not out.exists():
            raise SystemExit(f"the {n}-rank run left no results")
        runs[n] = json.loads(out.read_text())

    mb = lambda x: f"{x / 2**20:.2f} MiB"  # noqa: E731
    print(f"\n### Peak memory per rank, preset `{a.preset}`, mixed-4bit (prefill 64 + one step)\n")
    print("| ranks | rank | routed experts held | other parameters held | MLX peak after load | "
          "MLX peak after a step | process peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for n, rows in runs.items():
        for r, (experts, other, load_peak, step_peak, rss) in enumerate(rows):
            print(f"| {n} | {r} | {mb(experts)} | {mb(other)} | {mb(load_peak)} | {mb(step_peak)} | {mb(rss)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
