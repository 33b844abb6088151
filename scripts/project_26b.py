"""The 26B projection: tokens/s of exact and fast mode on Apple M-series classes, from live-row traces.

    python scripts/project_26b.py bench-results/manystep/results.json [--update-docs]

Input: a `scripts/bench_manystep.py` result (every configuration's per-canvas traces of the rows
the decoder computed, and the tokens each prompt committed). Each trace is rescaled to the
released model's canvas of 256 (`accounting.rescale_trace`: a step's live fraction kept, committed
tokens scaled alike) and priced with a per-pass cost model at the 26B-A4B shape (mixed-4bit
weights, 1K-token cache):

    t_pass(L) = t0 + bytes(L) / (eta_bw * BW) + flops(L) / (eta_f * F)

- `bytes(L)`: the weights a pass over L rows reads (`accounting.weight_bytes_per_step`), the
  experts counted at their expected number of distinct ones under uniform routing,
  `E * (1 - (1 - k/E)^L)` per layer, instead of the bound min(E, k L);
- `flops(L)`: decoder + LM head FLOPs of the pass (`accounting.rows_step_work`);
- BW, F: the chip's unified-memory bandwidth and GPU float throughput (public figures);
- eta_bw = 0.7 (assumed), and `t0` (a fixed cost per pass: kernel dispatch, syncs) and `eta_f`
  calibrated on one machine's two public measurements (lablup/mlxcel PR #218, M1 Ultra, 4-bit):
  autoregressive Gemma 4 26B-A4B at 71.3 tok/s (one row per pass) fixes `t0`; DiffusionGemma's
  reference loop at 15.1 tok/s with 27 passes per 256-token block (a full block assumed) fixes
  `eta_f`. The prompt's prefill is not counted (both sides pay it).

A linear model calibrated at its two ends (1 row, 256 rows): the middle (4-64 rows, fast mode's
regime, where MLX's quantized MoE switches kernels) is its least certain part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from docs_block import write_block  # noqa: E402  (scripts/, this file's folder)

DOCS_BEGIN = "<!-- project-26b:begin -->"
DOCS_END = "<!-- project-26b:end -->"
CANVAS = 256
CACHE = 1024
RECIPE = "mixed-4bit"
ETA_BW = 0.7
# Calibration (lablup/mlxcel PR #218): M1 Ultra, 4-bit.
CAL_CHIP = ("M1 Ultra", 800e9, 21.0e12)
CAL_AR_TOK_S = 71.3
CAL_DG_TOK_S = 15.1
CAL_DG_PASSES = 27
# (class, unified-memory bandwidth B/s, GPU float32 throughput FLOP/s): Apple's published figures
# (bandwidth) and the usual ALU-count estimates (throughput) of the largest GPU of each class.
CHIPS = [
    ("M2 Pro", 200e9, 6.8e12), ("M2 Max", 400e9, 13.6e12), ("M2 Ultra", 800e9, 27.2e12),
    ("M3 Pro", 150e9, 7.4e12), ("M3 Max", 400e9, 16.4e12), ("M3 Ultra", 819e9, 28.4e12),
    ("M4 Pro", 273e9, 9.2e12), ("M4 Max", 546e9, 18.4e12),
]


def shape_args():
    import bench_models
    from mlx_diffusiongemma.model.args import parse_model_args

    return parse_model_args(bench_models.model_config("26b-shape")).text


class PassCost:
    """bytes(L) and flops(L) of one decoder pass over L rows at the 26B shape (cached per L)."""

    def __init__(self, args):
        from mlx_diffusiongemma.perf import accounting

        self.a, self.acc = args, accounting
        self._memo: dict[tuple[int, bool], tuple[float, float]] = {}

    def __call__(self, rows: int, top_k: bool) -> tuple[float, float]:
        key = (rows, top_k)
        if key not in self._memo:
            a, acc = self.a, self.acc
            w = acc.weight_bytes_per_step(a, rows, RECIPE, top_k_self_conditioning=64 if top_k else None)
            bound = acc.distinct_experts_bound(a, rows)
            expected = a.num_experts * (1 - (1 - a.top_k_experts / a.num_experts) ** rows)
            nbytes = w["total"] - w["experts"] + w["experts"] / bound * expected
            work = acc.rows_step_work(a, CANVAS, CACHE, rows, top_k=64 if top_k else None, recipe=None)
            self._memo[key] = (nbytes, work["decoder_flops"] + work["lm_head_flops"])
        return self._memo[key]


def calibrate(cost: PassCost) -> tuple[float, float]:
    """(t0 seconds, eta_f) from the M1 Ultra pair (see the module docstring)."""
    _, bw, f = CAL_CHIP
    b1, f1 = cost(1, False)
    t0 = 1 / CAL_AR_TOK_S - b1 / (ETA_BW * bw)
    b256, f256 = cost(CANVAS, False)
    per_pass = CANVAS / CAL_DG_TOK_S / CAL_DG_PASSES
    eta_f = f256 / (f * (per_pass - t0 - b256 / (ETA_BW * bw)))
    return t0, eta_f


def project(results: dict, only_family: str | None = None) -> dict:
    from mlx_diffusiongemma.perf import accounting

    cost = PassCost(shape_args())
    t0, eta_f = calibrate(cost)
    c = results["canvas_length"]
    out = {"t0_ms": 1e3 * t0, "eta_f": eta_f, "configs": {}}
    chips = [CAL_CHIP] + CHIPS
    for label, run in results["runs"].items():
        prompts = [p for p in run["prompts"] if only_family is None or p["family"] == only_family]
        if not prompts:
            continue
        top_k = (run.get("options") or {}).get("top_k") is not None
        traces = accounting.rescale_trace([b for p in prompts for b in p["rows"]], c, CANVAS)
        tokens = sum(p["tokens"] for p in prompts) * CANVAS / c
        passes = [r for t in traces for r in t]
        row = {"passes_per_canvas": len(passes) / len(traces), "rows_per_pass": sum(passes) / len(passes)}
        for name, bw, f in chips:
            seconds = sum(t0 + cost(r, top_k)[0] / (ETA_BW * bw) + cost(r, top_k)[1] / (eta_f * f) for r in passes)
            row[name] = tokens / seconds
        out["configs"][label] = row
    b1, _ = cost(1, False)
    out["autoregressive"] = {name: 1 / (t0 + b1 / (ETA_BW * bw)) for name, bw, f in chips}
    return out


def render(proj: dict, families: dict[str, dict], labels: list[str]) -> str:
    chips = [CAL_CHIP[0]] + [c[0] for c in CHIPS]
    lines = [
        f"Cost model (scripts/project_26b.py): t_pass(L) = t0 + bytes(L) / ({ETA_BW} x bandwidth) + "
        f"FLOPs(L) / (eta_f x GPU throughput), calibrated on the M1 Ultra 4-bit pair of lablup/mlxcel PR #218 "
        f"(autoregressive 71.3 tok/s, reference loop 15.1 tok/s at 27 passes per full block): "
        f"t0 = {proj['t0_ms']:.1f} ms per pass, eta_f = {proj['eta_f']:.2f}. Traces of the many-step instrument "
        f"rescaled from canvas 64 to 256; 26B-A4B shape, mixed-4bit, 1K cache.",
        "",
    ]
    for title, p in [("all families", proj)] + [(f"`{f}` only", q) for f, q in families.items()]:
        lines += [f"Tokens/s, {title}:", "",
                  "| configuration | passes / canvas | rows / pass | " + " | ".join(chips) + " |",
                  "|---|---|---|" + "---|" * len(chips)]
        for label in labels:
            if label in p["configs"]:
                r = p["configs"][label]
                lines.append(f"| {label} | {r['passes_per_canvas']:.1f} | {r['rows_per_pass']:.0f} | "
                             + " | ".join(f"{r[ch]:.0f}" for ch in chips) + " |")
        lines.append("| autoregressive Gemma 4 26B-A4B (1 row per pass) | - | 1 | "
                     + " | ".join(f"{p['autoregressive'][ch]:.0f}" for ch in chips) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    # Repeated rather than comma-separated: labels such as "freeze settled only (no EOS tail, no
    # early commit)" hold commas.
    p.add_argument("--label", action="append", default=[], help="a configuration label to show (repeatable; default: all)")
    p.add_argument("--family", action="append", default=[], help="also a table for this family alone")
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    proj = project(results)
    fams = {f: project(results, f) for f in args.family}
    labels = args.label or list(results["runs"])
    md = render(proj, fams, labels)
    print(md)
    if args.update_docs:
        write_block(ROOT / "docs" / "performance.md", DOCS_BEGIN, DOCS_END, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
