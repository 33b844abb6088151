"""End-to-end rows on the trained demo model: the exact path, each fast-mode technique alone, the
full fast mode, and (optionally) mlx-vlm 0.7.10 on the demo's Hugging Face export.

    python scripts/bench_demo.py --out bench-results/demo [--per-family 12] [--vlm-python PY --hf-export DIR]

For every configuration, every held-out prompt of every task family
(`mlx_diffusiongemma.demo_tasks.held_out_set`, the prompts `scripts/eval_demo.py` scores) is
generated once with the same seed (the prompt's index), through the public API
(`mlx_diffusiongemma.generate`), and judged by the family's checker (exact match, or validity for
the free-choice families). Reported per configuration: end-to-end tokens/s (committed tokens over
prefill + generation wall time, summed over prompts), decoder FLOPs per committed token (from
`accounting.generation_work` and the rows the decoder really ran), LM-head FLOPs and sampler
bytes per committed token, steps per canvas, rows per step, and exact-match accuracy per family.
The live-row trace of the full fast mode is kept and applied to the 26B shape (canvas 256).

mlx-vlm runs in its own environment (`--vlm-python`, with mlx-vlm 0.7.10) through
`scripts/bench_worker_vlm_e2e.py`, on a folder made by its own converter from the export, in
float32 (its CPU experts cannot run bf16); so our rows are measured in float32 too (`--dtype`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from docs_block import write_results  # noqa: E402  (scripts/, this file's folder)

DOCS_BEGIN = "<!-- bench-demo:begin -->"
DOCS_END = "<!-- bench-demo:end -->"
SHAPE_26B_CANVAS = 256
SHAPE_26B_CACHE = 1024


def log(msg: str) -> None:
    print(f"[bench-demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def configurations(commit_gap: float) -> list[tuple[str, str, Any]]:
    """(label, mode, FastOptions) in table order. The single-technique rows start from every
    technique off, so each one measures one technique alone."""
    from dataclasses import replace

    from mlx_diffusiongemma.diffusion.options import FastOptions

    off = FastOptions.none()
    full = FastOptions.few_steps()  # the default until the many-step instrument: the rows were measured against it
    no_commit = replace(full, commit_gap=None)
    thawing = {"bound_window": 4, "thaw": True}  # the frozen neighbours in the entropy bound, and thaw
    return [
        ("exact (reference sampler)", "exact", None),
        ("fast loop, every technique off", "fast", off),
        ("freeze settled positions only", "fast", replace(off, freeze=True)),
        ("freeze + bucketing", "fast", replace(off, freeze=True, bucket=True)),
        ("EOS stop only", "fast", replace(off, eos_stop=True)),
        (f"EOS tail at first sight (gap {full.eos_tail_gap:g}) only", "fast", replace(off, eos_tail_gap=full.eos_tail_gap)),
        ("top-64 sampler only", "fast", replace(off, top_k=64)),
        (f"early commit (gap {full.commit_gap:g}) only", "fast", replace(off, commit_gap=full.commit_gap)),
        # How the default was reached, one technique added per row:
        ("freeze, EOS stop, top-64, bucketing", "fast",
         replace(no_commit, eos_tail_gap=None, stop_mean_over_canvas=False)),
        ("+ EOS tail at first sight (stop mean over the computed rows)", "fast",
         replace(no_commit, stop_mean_over_canvas=False)),
        ("+ stop mean over the canvas", "fast", no_commit),
        (f"fast, few-step setting (the default before: + early commit gap {full.commit_gap:g})", "fast", full),
        ("few-step setting without the EOS tail", "fast", replace(full, eos_tail_gap=None)),
        (f"few-step setting with early commit gap {commit_gap:g}", "fast", replace(full, commit_gap=commit_gap)),
        # What holds validity on the many-step instrument (scripts/bench_manystep.py).
        ("fast mode without early commit, refreshed forward set", "fast", replace(no_commit, refresh_frozen=True)),
        ("fast mode without early commit, refreshed forward set, neighbours within 4 + thaw", "fast",
         replace(no_commit, refresh_frozen=True, **thawing)),
        ("freeze settled only, neighbours within 4 + thaw", "fast", replace(no_commit, eos_tail_gap=None, **thawing)),
        ("fast mode, refreshed forward set, neighbours within 4 + thaw", "fast",
         replace(full, refresh_frozen=True, **thawing)),
        ("fast mode (default: refreshed forward set, neighbours within 4 + thaw, early commit gap 3)", "fast",
         replace(full, refresh_frozen=True, commit_gap=3.0, **thawing)),
    ]


def prompts(per_family: int, seed: int | None = None) -> list[tuple[str, str, str]]:
    """The held-out prompts `scripts/eval_demo.py` scores, or (`seed`) another draw of held-out
    prompts: a tuning set, so that a setting chosen on it is then reported on the usual set."""
    from mlx_diffusiongemma.demo.tasks import FAMILIES, held_out_set

    kw = {} if seed is None else {"seed": seed}
    return [(fam, p, a) for fam in FAMILIES for p, a in held_out_set(fam, per_family, **kw)]


def judge(family: str, prompt: str, reference: str, produced: str) -> bool:
    from mlx_diffusiongemma.demo.tasks import FAMILIES

    return bool(FAMILIES[family].judge(prompt, reference, produced))


def run_ours(model, tok, items, configs, max_tokens: int, judge_fn=None, seeds=None) -> dict[str, dict[str, Any]]:
    """Every configuration on every prompt, interleaved (prompt-major), so that a change of
    machine load during the run touches every configuration alike. `judge_fn(family, prompt,
    reference, text)` (default: the demo families' `judge`) says whether an answer is right;
    `seeds` (default: the prompt's index) the seed of each prompt."""
    judge_fn = judge_fn or judge
    seeds = seeds or list(range(len(items)))
    from mlx_diffusiongemma import generate
    from mlx_diffusiongemma.perf import accounting

    args = model.text
    c = model.canvas_length
    runs = {label: {"prompts": []} for label, _, _ in configs}
    # Warm-up (compiles the sampler for the shapes each configuration uses): two prompts each.
    for label, mode, fast in configs:
        for fam, p, a in items[:2]:
            generate(model, tok, p, max_tokens=max_tokens, seed=0, mode=mode, fast=fast)
    for i, (fam, p, a) in enumerate(items):
        for label, mode, fast in configs:
            top_k = None if fast is None else fast.top_k
            t = time.perf_counter()
            r = generate(model, tok, p, max_tokens=max_tokens, seed=seeds[i], mode=mode, fast=fast)
            wall = time.perf_counter() - t
            if mode == "exact":
                rows = [[c] * s for s in r.steps_per_block]
                live = rows
            else:
                rows = r.padded_rows
                live = r.live_rows
            work = accounting.generation_work(args, c, r.prompt_tokens, rows, len(r.tokens), top_k=top_k, recipe=None)
            runs[label]["prompts"].append({
                "family": fam, "prompt": p, "reference": a, "text": r.text, "correct": judge_fn(fam, p, a, r.text),
                "tokens": len(r.tokens), "wall_s": wall, "prefill_s": r.prefill_time,
                "generation_s": r.generation_time, "steps_per_block": r.steps_per_block, "rows": rows,
                "live_rows": live, "prompt_tokens": r.prompt_tokens,
                "decoder_flops": work["total"]["decoder_flops"], "lm_head_flops": work["total"]["lm_head_flops"],
                "sampler_bytes": work["total"]["sampler_bytes"],
            })
        if (i + 1) % 10 == 0:
            log(f"  {i + 1}/{len(items)} prompts")
    return runs


def summarize(run: dict[str, Any], families: list[str]) -> dict[str, Any]:
    ps = run["prompts"]
    tokens = sum(p["tokens"] for p in ps)
    wall = sum(p["wall_s"] for p in ps)
    blocks = sum(len(p["steps_per_block"]) for p in ps)
    steps = sum(sum(p["steps_per_block"]) for p in ps)
    s = {
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "wall_s": wall,
        "steps_per_canvas": steps / blocks if blocks else 0.0,
        "accuracy": {f: _acc([p for p in ps if p["family"] == f]) for f in families},
        "accuracy_mean": sum(_acc([p for p in ps if p["family"] == f]) for f in families) / len(families),
    }
    if "decoder_flops" in ps[0]:
        rows = sum(sum(sum(b) for b in p["rows"]) for p in ps)
        live = sum(sum(sum(b) for b in p["live_rows"]) for p in ps)
        s.update({
            "decoder_flops_per_token": sum(p["decoder_flops"] for p in ps) / tokens,
            "lm_head_flops_per_token": sum(p["lm_head_flops"] for p in ps) / tokens,
            "sampler_bytes_per_token": sum(p["sampler_bytes"] for p in ps) / tokens,
            "rows_per_step": rows / steps if steps else 0.0,
            "live_rows_per_step": live / steps if steps else 0.0,
        })
    return s


def _acc(ps: list[dict]) -> float:
    return 100.0 * sum(p["correct"] for p in ps) / len(ps) if ps else float("nan")


def shape_26b(trace_runs: dict[str, dict], canvas: int, top_k: dict[str, int | None]) -> dict[str, Any]:
    """Per-token decoder FLOPs of each configuration at the 26B shape: every recorded trace's live
    fraction of the canvas applied to a canvas of 256 (and committed tokens scaled the same way),
    at a 1K cache."""
    sys.path.insert(0, str(HERE))
    import bench_models
    from mlx_diffusiongemma.perf import accounting
    from mlx_diffusiongemma.model.args import parse_model_args

    args = parse_model_args(bench_models.model_config("26b-shape")).text
    out = {}
    scale = SHAPE_26B_CANVAS / canvas
    for label, run in trace_runs.items():
        trace = [b for p in run["prompts"] for b in p["rows"]]
        tokens = sum(p["tokens"] for p in run["prompts"]) * scale
        big = accounting.rescale_trace(trace, canvas, SHAPE_26B_CANVAS)
        # One "generation" per recorded canvas, each at the same cache length.
        total = {"decoder_flops": 0, "lm_head_flops": 0, "weight_bytes": 0, "steps": 0}
        for block in big:
            w = accounting.generation_work(args, SHAPE_26B_CANVAS, SHAPE_26B_CACHE, [block], 1,
                                           top_k=top_k[label], recipe="mixed-4bit")
            for k in ("decoder_flops", "lm_head_flops", "weight_bytes"):
                total[k] += w["total"][k]
            total["steps"] += w["steps"]
        out[label] = {
            "decoder_flops_per_token": total["decoder_flops"] / tokens,
            "lm_head_flops_per_token": total["lm_head_flops"] / tokens,
            "weight_bytes_per_token": total["weight_bytes"] / tokens,
            "weight_bytes_per_step": total["weight_bytes"] / max(total["steps"], 1),
            "tokens_per_step": tokens / max(total["steps"], 1),
        }
    # The autoregressive reference point: one token per pass of the same 26B body at the same cache.
    w = accounting.rows_step_work(args, 1, SHAPE_26B_CACHE, 1, top_k=None, recipe="mixed-4bit")
    out["autoregressive (1 row per token, same body)"] = {
        "decoder_flops_per_token": w["body_flops"], "lm_head_flops_per_token": w["lm_head_flops"],
        "weight_bytes_per_token": w["weight_bytes"], "weight_bytes_per_step": w["weight_bytes"], "tokens_per_step": 1.0,
    }
    return out


def legacy_text_config(path: Path) -> None:
    """The full-attention layers' shape in the released config.json's legacy fields
    (`global_head_dim`, `num_global_key_value_heads`): transformers 5.23 writes a
    `per_layer_config` map instead, which mlx-vlm 0.7.10 does not read (it would fall back to
    512 / 2). Same rewrite as scripts/make_mlxvlm_fixture.py."""
    config = json.loads(path.read_text())
    text = config["text_config"]
    per_layer = text.pop("per_layer_config", None) or {}
    full = [i for i, t in enumerate(text.get("layer_types", [])) if t == "full_attention"]
    for i in full:
        entry = per_layer.get(str(i)) or per_layer.get(i) or {}
        if "head_dim" in entry:
            text["global_head_dim"] = entry["head_dim"]
        if "num_key_value_heads" in entry:
            text["num_global_key_value_heads"] = entry["num_key_value_heads"]
    text["use_bidirectional_attention"] = "vision"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_vlm(vlm_python: str, hf_export: Path, out: Path, tok, items, max_tokens: int,
            commands: list[str]) -> dict | None:
    from mlx_diffusiongemma.prompts.render import render_messages

    folder = out / "vlm-demo"
    if not (folder / "config.json").exists():
        legacy = out / "hf-legacy"
        shutil.rmtree(legacy, ignore_errors=True)
        shutil.copytree(hf_export, legacy)
        legacy_text_config(legacy / "config.json")
        cmd = [vlm_python, "-m", "mlx_vlm", "convert", "--hf-path", str(legacy), "--mlx-path", str(folder)]
        commands.append(shlex.join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            log(f"mlx-vlm convert failed: {r.stderr[-2000:]}")
            return None
    job = out / "vlm_prompts.json"
    rows = [{"family": f, "prompt": p, "reference": a, "ids": render_messages(tok, [{"role": "user", "content": p}])}
            for f, p, a in items]
    job.write_text(json.dumps({"items": rows, "max_tokens": max_tokens}))
    res = out / "vlm_result.json"
    cmd = [vlm_python, str(HERE / "bench_worker_vlm_e2e.py"), "--model", str(folder), "--prompts", str(job),
           "--out", str(res)]
    commands.append(shlex.join(cmd))
    r = subprocess.run(cmd, text=True)
    if r.returncode or not res.exists():
        log("mlx-vlm worker failed")
        return None
    data = json.loads(res.read_text())
    for run in data["runs"].values():
        for p in run["prompts"]:
            p["correct"] = judge(p["family"], p["prompt"], p["reference"], p["text"])
    return data


def render(results: dict[str, Any]) -> str:
    fams = results["families"]
    exact = results["summary"]["exact (reference sampler)"]
    lines = [
        f"Demo model: `{results['model']}` ({results['dtype']}), {results['per_family']} held-out prompts per family "
        + ("" if results.get("prompt_seed") is None else f"(tuning draw, seed {results['prompt_seed']}) ")
        + f"x {len(fams)} families, seeds 0..{results['n_prompts'] - 1}, max {results['max_tokens']} tokens; "
        f"machine {results['machine']}; run took {results['minutes']:.1f} min.",
        "",
        "| configuration | tokens/s | vs exact | decoder GFLOP / token | vs exact | LM head MFLOP / token "
        "| sampler KB / token | steps / canvas | rows / step | mean accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in results["summary"].items():
        fl = s.get("decoder_flops_per_token")
        # mlx-vlm reports no work accounting: its FLOP columns stay empty.
        ratio = f"{exact['decoder_flops_per_token'] / fl:.2f}x fewer" if fl else "-"
        lines.append(
            f"| {label} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / exact['tokens_per_s']:.2f}x "
            f"| {_f(fl, 1e9, '.4f')} | {ratio} "
            f"| {_f(s.get('lm_head_flops_per_token'), 1e6, '.2f')} | {_f(s.get('sampler_bytes_per_token'), 1e3, '.1f')} "
            f"| {s['steps_per_canvas']:.2f} | {_f(s.get('rows_per_step'), 1, '.1f')} | {s['accuracy_mean']:.1f}% |"
        )
    lines += ["", "Exact-match accuracy per family (%; validity for `sudoku` and `pick`):", "",
              "| configuration | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for label, s in results["summary"].items():
        lines.append(f"| {label} | " + " | ".join(f"{s['accuracy'][f]:.0f}" for f in fams) + " |")
    if results.get("shape_26b"):
        lines += ["", f"The 26B shape (canvas {SHAPE_26B_CANVAS}, cache {SHAPE_26B_CACHE}, mixed-4bit weights), "
                  "each configuration's live-row trace from the demo model rescaled to the wider canvas:", "",
                  "| configuration | decoder GFLOP / token | LM head GFLOP / token | tokens / step "
                  "| weights read / step | weights read / token |", "|---|---|---|---|---|---|"]
        for label, s in results["shape_26b"].items():
            lines.append(f"| {label} | {s['decoder_flops_per_token'] / 1e9:.1f} | {s['lm_head_flops_per_token'] / 1e9:.2f} "
                         f"| {s['tokens_per_step']:.2f} | {s['weight_bytes_per_step'] / 1e9:.2f} GB "
                         f"| {s['weight_bytes_per_token'] / 1e9:.3f} GB |")
    lines += ["", "Commands:", "", "```", *results["commands"], "```"]
    return "\n".join(lines)


def _f(x, scale, fmt) -> str:
    return "-" if x is None else format(x / scale, fmt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="the trained demo model ('demo') or a folder")
    p.add_argument("--out", type=Path, default=Path("bench-results/demo"))
    p.add_argument("--per-family", type=int, default=12)
    p.add_argument("--prompt-seed", type=int, default=None,
                   help="draw the held-out prompts with this seed instead of the evaluation set's (for tuning)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--commit-gap", type=float, default=1.0,
                   help="the early-commit gap of the last row (the default fast mode uses FastOptions' own)")
    p.add_argument("--only", default=None, help="comma-separated row numbers (0-based) to run")
    p.add_argument("--vlm-python", default=None)
    p.add_argument("--hf-export", type=Path, default=None)
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)

    import mlx.core as mx

    from mlx_diffusiongemma import load
    from mlx_diffusiongemma.demo.tasks import FAMILIES

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    commands = [shlex.join([sys.executable, *sys.argv])]
    model, tok = load(args.model, dtype=getattr(mx, args.dtype))
    items = prompts(args.per_family, args.prompt_seed)
    fams = list(FAMILIES)
    configs = configurations(args.commit_gap)
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        configs = [c for i, c in enumerate(configs) if i in keep or i == 0]
    log(f"{len(configs)} configurations x {len(items)} prompts")
    runs = run_ours(model, tok, items, configs, args.max_tokens)
    summary = {}
    for label, mode, fast in configs:
        runs[label]["options"] = None if fast is None else asdict(fast)
        summary[label] = s = summarize(runs[label], fams)
        log(f"{label}: {s['tokens_per_s']:.1f} tok/s, {s['decoder_flops_per_token'] / 1e6:.2f} MFLOP/token, "
            f"{s['steps_per_canvas']:.2f} steps/canvas, accuracy {s['accuracy_mean']:.1f}%")
    if args.vlm_python and args.hf_export:
        vlm = run_vlm(args.vlm_python, args.hf_export, args.out, tok, items, args.max_tokens, commands)
        if vlm:
            for label, run in vlm["runs"].items():
                runs[label] = run
                summary[label] = summarize(run, fams)
    top_k = {label: (None if fast is None else fast.top_k) for label, _, fast in configs}
    results = {
        "model": str(args.model), "dtype": args.dtype, "per_family": args.per_family,
        "prompt_seed": args.prompt_seed, "families": fams,
        "n_prompts": len(items), "max_tokens": args.max_tokens,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, MLX {mx.__version__} {mx.default_device()}",
        "summary": summary, "runs": runs, "commands": commands,
        "shape_26b": shape_26b({k: runs[k] for k in top_k}, model.canvas_length, top_k),
    }
    results["minutes"] = (time.perf_counter() - t0) / 60
    write_results(args.out, results, render(results),
                  (ROOT / "docs" / "performance.md", DOCS_BEGIN, DOCS_END) if args.update_docs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
