"""Draw OUT/decoder_step.png from OUT/results.json (run by `scripts/bench.py` with any python
that has matplotlib; needs nothing else):

    python scripts/bench_chart.py bench-results/results.json bench-results/decoder_step.png

One panel per preset and precision: the median decoder forward time of one denoising step
against the cache length, for each port (min-max as error bars).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"ours": ("mlx-diffusiongemma (ours)", "tab:blue", "o"),
         "mlx-vlm": ("mlx-vlm 0.7.10", "tab:orange", "s"),
         "transformers": ("transformers 5.23 (torch CPU f32)", "tab:gray", "^")}


def main(src: str, dst: str) -> None:
    results = json.loads(Path(src).read_text())
    runs = results["runs"]
    panels = []
    for preset in results["presets"]:
        for precision in results["precisions"]:
            if any((runs.get(f"{preset}-{precision}-{p}") or {}).get("forward") for p in STYLE):
                panels.append((preset, precision))
    if not panels:
        raise SystemExit("no decoder timings in " + src)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (preset, precision) in zip(axes.flat, panels):
        for port, (label, color, marker) in STYLE.items():
            fwd = (runs.get(f"{preset}-{precision}-{port}") or {}).get("forward") or {}
            if not fwd:
                continue
            xs = sorted(int(k) for k in fwd)
            med = [fwd[str(x)]["median"] * 1e3 for x in xs]
            lo = [m - fwd[str(x)]["min"] * 1e3 for m, x in zip(med, xs)]
            hi = [fwd[str(x)]["max"] * 1e3 - m for m, x in zip(med, xs)]
            ax.errorbar(xs, med, yerr=[lo, hi], label=label, color=color, marker=marker, capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel("decoder forward, ms / step")
        ax.set_title(f"{preset}, {precision}")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    machine = results.get("machine", {})
    fig.suptitle(f"DiffusionGemma decoder step vs cache length ({machine.get('cpu_model') or machine.get('machine')}, "
                 f"{machine.get('cpu_count')} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
