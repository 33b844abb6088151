"""Exact vs fast mode on the many-step instrument: free-choice tasks that take 20+ passes per canvas.

    python scripts/bench_manystep.py --model manystep-train/model --out bench-results/manystep \
        [--per-family 50] [--only 0,1,2] [--update-docs]

The model is made by `scripts/train_manystep.py` (the demo fine-tuned on
`demo.tasks.MANY_STEP_FAMILIES`). Every held-out prompt of every family is generated once per
configuration with the same seed (the prompt's index) through the public API, interleaved
prompt-major (scripts/bench_demo.py's `run_ours`), and judged by validity (many right answers).
Reported per configuration: validity per family (count and %), passes per canvas (decoder passes,
the repair pass included), end-to-end tokens/s, decoder FLOPs per committed token
(`perf.accounting.generation_work` over the rows really computed). The rows: the exact path, fast
mode's few-step setting (the default before this instrument), the default, and each turbo technique
(monotone commit, the refreshed forward set, the
two-stage confidence threshold, forced flush + repair) switched on against it. The live-row
traces go to `results.json` for the 26B projection (scripts/project_26b.py).

`--profile` adds where a step's time goes in fast mode, by live-row count (decoder pass, sampler
step, settle rule, host bookkeeping), measured by timing each piece with a sync after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench_demo import run_ours, summarize  # noqa: E402  (scripts/, this file's folder)
from docs_block import write_results  # noqa: E402

DOCS_BEGIN = "<!-- bench-manystep:begin -->"
DOCS_END = "<!-- bench-manystep:end -->"


def log(msg: str) -> None:
    print(f"[bench-manystep {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def configurations() -> list[tuple[str, str, Any]]:
    """(label, mode, FastOptions), each turbo technique switched on against the few-step setting
    (fast mode's default until this instrument; the rows were measured against it)."""
    from mlx_diffusiongemma.diffusion.options import FastOptions

    full = FastOptions.few_steps()
    turbo = replace(full, freeze=False, monotone=True, refresh_frozen=True, commit_gap=None)
    settled = replace(full, commit_gap=None, eos_tail_gap=None)  # "freeze settled only"
    no_commit = replace(full, commit_gap=None)
    refreshed = replace(full, refresh_frozen=True)
    window = {"bound_window": 4}
    thawing = {"bound_window": 4, "thaw": True}
    return [
        ("exact (reference sampler)", "exact", None),
        ("fast, few-step setting (the default before)", "fast", full),
        ("freeze settled only (no EOS tail, no early commit)", "fast", settled),
        ("fast without early commit", "fast", no_commit),
        ("fast without early commit + refreshed forward set", "fast", replace(no_commit, refresh_frozen=True)),
        ("monotone commit instead of the settle rule", "fast", replace(full, freeze=False, monotone=True, commit_gap=None)),
        ("monotone + refreshed forward set", "fast", turbo),
        ("fast + refreshed forward set", "fast", refreshed),
        ("fast + two-stage threshold 0.95 -> 0.8 at step 8", "fast",
         replace(full, confidence_commit=0.95, confidence_commit_late=0.8, confidence_switch_step=8)),
        ("fast + flush after 16 + repair", "fast", replace(full, flush_after=16, repair=True)),
        ("fast + repair", "fast", replace(full, repair=True)),
        ("turbo in our harness (monotone, refresh, threshold 0.9, repair)", "fast",
         replace(turbo, confidence_commit=0.9, repair=True)),
        ("freeze settled only + every frozen row refreshed every 2 steps", "fast", replace(settled, refresh_every=2)),
        ("freeze settled only + every frozen row refreshed every 4 steps", "fast", replace(settled, refresh_every=4)),
        ("freeze settled only + frozen neighbours within 4 in the entropy bound", "fast", replace(settled, **window)),
        ("fast without early commit + refreshed forward set + neighbours within 4 in the bound", "fast",
         replace(no_commit, refresh_frozen=True, **window)),
        ("fast + refreshed forward set + neighbours within 4 in the bound", "fast", replace(refreshed, **window)),
        ("freeze settled only + neighbours within 4 in the bound + thaw", "fast", replace(settled, **thawing)),
        ("fast without early commit + refreshed forward set + neighbours within 4 + thaw", "fast",
         replace(no_commit, refresh_frozen=True, **thawing)),
        ("fast + refreshed forward set + neighbours within 4 + thaw", "fast", replace(refreshed, **thawing)),
        ("fast mode (default: refreshed forward set + neighbours within 4 + thaw, early commit gap 3)", "fast",
         replace(refreshed, commit_gap=3.0, **thawing)),
    ]


def prompts(per_family: int, families: list[str] | None = None) -> tuple[list[tuple[str, str, str]], list[int]]:
    """The held-out prompts, family by family; the seed of a prompt is its index in the list of
    every family's prompts (so a run over some families gives the same seeds as a run over all)."""
    from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES, held_out_set

    items = [(fam, p, a) for fam in MANY_STEP_FAMILIES
             for p, a in held_out_set(fam, per_family, families=MANY_STEP_FAMILIES)]
    keep = [i for i, it in enumerate(items) if families is None or it[0] in families]
    return [items[i] for i in keep], keep


def judge(family: str, prompt: str, reference: str, produced: str) -> bool:
    from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES

    return bool(MANY_STEP_FAMILIES[family].judge(prompt, reference, produced))


def passes(run: dict[str, Any]) -> dict[str, float]:
    """Decoder passes per canvas (the repair pass included), overall and per family."""
    def mean(ps):
        blocks = [len(b) for p in ps for b in p["rows"]]
        return sum(blocks) / len(blocks) if blocks else 0.0
    fams = sorted({p["family"] for p in run["prompts"]})
    return {"all": mean(run["prompts"]), **{f: mean([p for p in run["prompts"] if p["family"] == f]) for f in fams}}


def profile(model, tok, items, fast, max_tokens: int) -> dict[int, dict[str, float]]:
    """Seconds per step by live-row count, split into the pieces of one fast-mode step, each timed
    with a sync after it (so the sum is a little above an unprofiled step)."""
    import mlx.core as mx

    from mlx_diffusiongemma import generate
    from mlx_diffusiongemma.diffusion import block as block_mod
    from mlx_diffusiongemma.diffusion import fast as fast_mod

    spent: dict[int, dict[str, float]] = {}
    current = {"rows": 0}

    orig_run, orig_call = block_mod.RowsCall.run, fast_mod._FastBlock.call
    orig_sample, orig_settle = fast_mod._FastBlock.sample, fast_mod.SettleRule.__call__

    def call(self, canvas, state):
        t = time.perf_counter()
        out = orig_call(self, canvas, state)
        if out is not None:
            current["rows"] = out.live
            row = spent.setdefault(out.live, {"steps": 0})
            row["steps"] += 1
            row["host bookkeeping"] = row.get("host bookkeeping", 0.0) + time.perf_counter() - t
        return out

    def settle(self, view):
        t = time.perf_counter()
        out = orig_settle(self, view)
        mx.eval(out.pinned, out.ids, out.frozen)
        row = spent.setdefault(current["rows"], {"steps": 0})
        row["settle rule"] = row.get("settle rule", 0.0) + time.perf_counter() - t
        return out

    def run_rows(self, model_):
        t = time.perf_counter()
        out = orig_run(self, model_)
        mx.eval(out)
        row = spent.setdefault(current["rows"], {"steps": 0})
        row["decoder pass"] = row.get("decoder pass", 0.0) + time.perf_counter() - t
        return out

    def sample(self, *a, **k):
        t = time.perf_counter()
        out = orig_sample(self, *a, **k)
        mx.eval([x for x in out if isinstance(x, mx.array)])
        row = spent.setdefault(current["rows"], {"steps": 0})
        row["sampler step"] = row.get("sampler step", 0.0) + time.perf_counter() - t
        return out

    block_mod.RowsCall.run, fast_mod._FastBlock.call = run_rows, call
    fast_mod._FastBlock.sample, fast_mod.SettleRule.__call__ = sample, settle
    try:
        total = 0.0
        steps = 0
        for i, (fam, p, a) in enumerate(items):
            t = time.perf_counter()
            r = generate(model, tok, p, max_tokens=max_tokens, seed=i, mode="fast", fast=fast)
            total += time.perf_counter() - t
            steps += sum(len(b) for b in r.live_rows)
    finally:
        block_mod.RowsCall.run, fast_mod._FastBlock.call = orig_run, orig_call
        fast_mod._FastBlock.sample, fast_mod.SettleRule.__call__ = orig_sample, orig_settle
    out = {}
    for rows, row in sorted(spent.items()):
        n = row.pop("steps")
        if n:
            out[rows] = {"steps": n, **{k: v / n for k, v in row.items()}}
    out[-1] = {"steps": steps, "wall per step": total / max(steps, 1)}
    return out


def run_reference(folder: Path, items, max_tokens: int, fams: list[str]) -> dict[str, Any]:
    """The reference `generate` (transformers) on the same prompts, seeded per prompt with
    `torch.manual_seed(i)` (its own random stream, so answers differ from ours; validity is what
    compares). Decoder passes are counted by a forward hook on its decoder."""
    import torch
    import transformers
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from mlx_diffusiongemma.prompts.render import render_messages

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    calls = [0]
    ref.model.decoder.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    rows, passes_total, canvases = [], 0, 0
    for i, (family, prompt, answer) in enumerate(items):
        ids = render_messages(tok, [{"role": "user", "content": prompt}])
        torch.manual_seed(i)
        calls[0] = 0
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=max_tokens)
        new = out.sequences[0, len(ids):].tolist()
        cut = next((j for j, t in enumerate(new) if t in eos), len(new))
        text = tok.decode(new[:cut], skip_special_tokens=False)
        blocks = -(-(cut + 1) // ref.config.canvas_length)
        passes_total += calls[0]
        canvases += blocks
        rows.append({"family": family, "prompt": prompt, "text": text, "correct": judge(family, prompt, answer, text),
                     "passes": calls[0], "canvases": blocks})
    return {"version": transformers.__version__, "prompts": rows,
            "valid": {f: sum(r["correct"] for r in rows if r["family"] == f) for f in fams},
            "passes_per_canvas": passes_total / max(canvases, 1)}


def merge(paths: list[Path], out: Path, update_docs: bool) -> int:
    """Several runs (other families or other configurations, same model and seeds) as one result."""
    parts = [json.loads(p.read_text()) for p in paths]
    base = parts[0]
    runs: dict[str, Any] = {}
    for part in parts:
        for label, run in part["runs"].items():
            runs.setdefault(label, {"prompts": [], "options": run.get("options")})["prompts"] += run["prompts"]
    from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES

    fams = [f for f in MANY_STEP_FAMILIES if any(f in part["families"] for part in parts)]
    order = ["exact (reference sampler)"] + [c[0] for c in configurations()]
    summary = {}
    for label in sorted(runs, key=lambda x: order.index(x) if x in order else len(order)):
        run = runs[label]
        run["prompts"].sort(key=lambda r: r.get("seed", 0))
        summary[label] = s = summarize(run, fams)
        s["passes_per_canvas"] = passes(run)
    results = {**base, "runs": runs, "summary": summary, "families": fams,
               "n_prompts": len(runs["exact (reference sampler)"]["prompts"]),
               "minutes": max(part["minutes"] for part in parts),
               "commands": [c for part in parts for c in part["commands"]]}
    for part in parts:
        for key in ("profile", "profile_config", "reference"):
            if part.get(key):
                results[key] = part[key]
    md = render(results) + "\n\n(Merged from " + ", ".join(str(p) for p in paths) + ": runs in parallel, so the " \
        "tokens/s of rows from different runs compare less well than the other columns.)"
    write_results(out, results, md, (ROOT / "docs" / "fast-mode.md", DOCS_BEGIN, DOCS_END) if update_docs else None)
    return 0


def render(results: dict[str, Any]) -> str:
    fams = results["families"]
    n = results["per_family"]
    summary = results["summary"]
    exact = summary.get("exact (reference sampler)")  # absent in a --skip-exact run
    lines = [
        f"Many-step instrument: `{results['model']}` ({results['dtype']}), {n} held-out prompts per family x "
        f"{len(fams)} families, seeds 0..{results['n_prompts'] - 1}, max {results['max_tokens']} tokens; machine "
        f"{results['machine']}; run took {results['minutes']:.1f} min.",
        "",
        "| configuration | " + " | ".join(f"{f} valid" for f in fams) + " | passes / canvas | tokens/s | vs exact "
        "| decoder MFLOP / token | vs exact |",
        "|---|" + "---|" * (len(fams) + 5),
    ]
    for label, s in summary.items():
        rows = results["runs"][label]["prompts"]
        counts = [f"{sum(p['correct'] for p in rows if p['family'] == f)}/{sum(p['family'] == f for p in rows)}"
                  if any(p["family"] == f for p in rows) else "-" for f in fams]
        fl = s["decoder_flops_per_token"]
        lines.append(
            f"| {label} | " + " | ".join(counts)
            + f" | {s['passes_per_canvas']['all']:.1f} | {s['tokens_per_s']:.1f} "
            + (f"| {s['tokens_per_s'] / exact['tokens_per_s']:.2f}x " if exact else "| - ")
            + f"| {fl / 1e6:.2f} "
            + (f"| {exact['decoder_flops_per_token'] / fl:.2f}x fewer |" if exact else "| - |"))
    lines += ["", "Passes per canvas by family:", "", "| configuration | " + " | ".join(fams) + " |",
              "|---|" + "---|" * len(fams)]
    for label, s in summary.items():
        pc = s["passes_per_canvas"]
        lines.append(f"| {label} | " + " | ".join(f"{pc[f]:.1f}" if f in pc else "-" for f in fams) + " |")
    if results.get("reference"):
        ref = results["reference"]
        lines += ["", f"The reference `generate` (transformers {ref['version']}, PyTorch CPU float32, its own "
                  f"random stream) on the same prompts: validity "
                  + ", ".join(f"{f} {ref['valid'][f]}/{n}" for f in fams)
                  + f"; {ref['passes_per_canvas']:.1f} passes per canvas."]
    if results.get("profile"):
        prof = results["profile"]
        keys = ["decoder pass", "sampler step", "settle rule", "host bookkeeping"]
        lines += ["", f"Where a fast-mode step's time goes ({results['profile_config']}), ms per step by rows "
                  "computed (each piece timed with a sync after it):", "",
                  "| rows computed | steps | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for rows, row in prof.items():
            if int(rows) < 0:
                continue
            lines.append(f"| {rows} | {row['steps']} | " + " | ".join(f"{1e3 * row.get(k, 0.0):.2f}" for k in keys) + " |")
    lines += ["", "Commands:", "", "```", *results["commands"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the many-step model folder (scripts/train_manystep.py)")
    p.add_argument("--out", type=Path, default=Path("bench-results/manystep"))
    p.add_argument("--per-family", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--only", default=None, help="comma-separated row numbers (0-based) to run; row 0 always runs")
    p.add_argument("--profile", action="store_true", help="also profile fast mode's steps by live-row count")
    p.add_argument("--hf", type=Path, default=None,
                   help="the model's Hugging Face export (scripts/export_hf.py): run the reference generate too")
    p.add_argument("--reference-json", type=Path, default=None,
                   help="a reference result written by an earlier `--hf ... --reference-only` run")
    p.add_argument("--reference-only", action="store_true", help="with --hf: run the reference only, write OUT/reference.json")
    p.add_argument("--families", default=None, help="comma-separated families to run (default: all; seeds unchanged)")
    p.add_argument("--skip-exact", action="store_true", help="leave out the exact row (to be merged with a run that has it)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="merge these results.json files (prompts of the same configuration joined) and render them")
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.update_docs)
    if args.reference_only:
        from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES

        args.out.mkdir(parents=True, exist_ok=True)
        ref = run_reference(args.hf, prompts(args.per_family)[0], args.max_tokens, list(MANY_STEP_FAMILIES))
        (args.out / "reference.json").write_text(json.dumps(ref, indent=1))
        log(f"reference: validity {ref['valid']}, {ref['passes_per_canvas']:.1f} passes per canvas")
        return 0

    import mlx.core as mx

    from mlx_diffusiongemma import load
    from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES
    from mlx_diffusiongemma.diffusion.options import FastOptions

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    commands = [shlex.join([sys.executable, *sys.argv])]
    model, tok = load(args.model, dtype=getattr(mx, args.dtype))
    fams = args.families.split(",") if args.families else list(MANY_STEP_FAMILIES)
    items, seeds = prompts(args.per_family, fams)
    configs = configurations()
    if args.only:
        keep = {int(x) for x in args.only.split(",")}
        configs = [c for i, c in enumerate(configs) if i in keep or (i == 0 and not args.skip_exact)]
    log(f"{len(configs)} configurations x {len(items)} prompts")
    runs = run_ours(model, tok, items, configs, args.max_tokens, judge_fn=judge, seeds=seeds)
    summary = {}
    for label, mode, fast in configs:
        runs[label]["options"] = None if fast is None else asdict(fast)
        summary[label] = s = summarize(runs[label], fams)
        s["passes_per_canvas"] = passes(runs[label])
        log(f"{label}: {s['tokens_per_s']:.1f} tok/s, {s['passes_per_canvas']['all']:.1f} passes/canvas, "
            f"validity {s['accuracy']}")
    results = {
        "model": str(args.model), "dtype": args.dtype, "per_family": args.per_family, "families": fams,
        "n_prompts": len(items), "max_tokens": args.max_tokens,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, MLX {mx.__version__} {mx.default_device()}",
        "summary": summary, "runs": runs, "commands": commands, "canvas_length": model.canvas_length,
    }
    if args.hf is not None:
        log("the reference generate (transformers, PyTorch CPU)")
        results["reference"] = run_reference(args.hf, items, args.max_tokens, fams)
    elif args.reference_json is not None:
        results["reference"] = json.loads(args.reference_json.read_text())
    if args.profile:
        fast = FastOptions.few_steps()
        results["profile_config"] = "fast, few-step setting"
        results["profile"] = profile(model, tok, items[:: max(1, len(items) // 40)], fast, args.max_tokens)
    for label in runs:
        for row, seed in zip(runs[label]["prompts"], seeds):
            row["seed"] = seed
    results["minutes"] = (time.perf_counter() - t0) / 60
    write_results(args.out, results, render(results),
                  (ROOT / "docs" / "fast-mode.md", DOCS_BEGIN, DOCS_END) if args.update_docs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
