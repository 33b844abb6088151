"""What each quantization recipe costs: per-family accuracy on the demo model and the KL divergence
of its logits against the float32 model on the small models.

    python scripts/recipe_cost.py [--per-family 20] [--models demo,tiny,small] [--out recipe-cost.json]

- accuracy: `scripts/eval_demo.py`'s held-out prompts and judges, the checkpoint's default sampler,
  for the demo model as stored (bfloat16) and with every mixed recipe applied in memory;
- KL: for each model, float32 against each recipe on the same inputs: a prompt encoded into the
  cache, then the decoder's logits over a random canvas (first step) and again with the first
  step's probabilities as self-conditioning (second step); mean KL(float32 || recipe) per canvas
  position at temperature 1, and how often the two argmaxes agree. Demo prompts are held-out task
  prompts through the chat template; the random `bench_models` presets (`tiny`, `small`, widths
  multiple of 64, so every matrix is quantized) get random token prompts;
- with `--manystep FOLDER` (the many-step instrument, `scripts/train_manystep.py`): its exact-path
  validity per family for each recipe (`scripts/bench_manystep.py`'s prompts, seeds and judges).

The demo model's expert down projection is 96 wide, not a multiple of the group size 64: it stays
bfloat16 in every recipe, so on the demo model a recipe quantizes the expert gate/up only.
Prints markdown tables (docs/performance.md has them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402
from eval_demo import eval_ours  # noqa: E402

from mlx_diffusiongemma import load  # noqa: E402
from mlx_diffusiongemma.checkpoint.loading import load_model  # noqa: E402
from mlx_diffusiongemma.demo import shipped_demo_dir  # noqa: E402
from mlx_diffusiongemma.demo.tasks import FAMILIES, held_out_set  # noqa: E402
from mlx_diffusiongemma.prompts.render import render_messages  # noqa: E402

MIXED = ("mixed-4bit", "mixed-3bit", "mixed-2bit")


def accuracy(per_family: int, recipes=("bf16",) + MIXED, families=tuple(FAMILIES)) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for recipe in recipes:
        model, tok = load("demo", quantize=None if recipe == "bf16" else recipe)
        out[recipe] = {}
        for family in families:
            cases = [(family, q, a) for q, a in held_out_set(family, per_family)]
            out[recipe][family] = eval_ours(model, tok, cases, 0)["accuracy"]
        print(f"{recipe}: mean {statistics.mean(out[recipe].values()):.1%} {json.dumps(out[recipe])}", file=sys.stderr, flush=True)
    return out


def manystep_validity(folder: Path, per_family: int) -> dict[str, dict[str, float]]:
    """Exact-path validity per family of the many-step instrument (scripts/train_manystep.py) as
    stored and with every mixed recipe applied in memory: bench_manystep's held-out prompts, seeds
    and judges, bench_demo's interleaved runner."""
    import bench_manystep
    from bench_demo import run_ours

    items, seeds = bench_manystep.prompts(per_family)
    exact = [("exact", "exact", None)]
    out: dict[str, dict[str, float]] = {}
    for recipe in ("bf16",) + MIXED:
        model, tok = load(str(folder), quantize=None if recipe == "bf16" else recipe)
        run = run_ours(model, tok, items, exact, 128, judge_fn=bench_manystep.judge, seeds=seeds)["exact"]
        fams = sorted({p["family"] for p in run["prompts"]})
        out[recipe] = {f: statistics.mean(float(p["correct"]) for p in run["prompts"] if p["family"] == f) for f in fams}
        print(f"manystep {recipe}: {json.dumps(out[recipe])}", file=sys.stderr, flush=True)
    return out


def _logits(model, prompt: list[int], canvas: mx.array) -> list[mx.array]:
    cache = model.prefill(mx.array([prompt]))
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, self_conditioning=first)
    return [first.astype(mx.float32), second.astype(mx.float32)]


def _kl_top1(p: mx.array, q: mx.array) -> tuple[float, float]:
    lp, lq = p - mx.logsumexp(p, -1, keepdims=True), q - mx.logsumexp(q, -1, keepdims=True)
    kl = float(mx.mean(mx.sum(mx.exp(lp) * (lp - lq), -1)))
    top1 = float(mx.mean((p.argmax(-1) == q.argmax(-1)).astype(mx.float32)))
    return kl, top1


def divergence(name: str, folder: Path, prompts: list[list[int]], seed: int = 0) -> dict[str, dict[str, float]]:
    base, _ = load_model(folder, dtype=mx.float32, text_only=True)
    rng = np.random.default_rng(seed)
    canvases = [mx.array(rng.integers(0, base.vocab_size, (1, base.canvas_length))) for _ in prompts]
    ref = [_logits(base, p, c) for p, c in zip(prompts, canvases)]
    out = {}
    for recipe in ("bf16",) + MIXED:
        model, _ = load_model(folder, quantize=recipe, text_only=True)
        kls, tops = [], []
        for (r1, r2), p, c in zip(ref, prompts, canvases):
            q1, q2 = _logits(model, p, c)
            for r, q in ((r1, q1), (r2, q2)):
                kl, top = _kl_top1(r, q)
                kls.append(kl)
                tops.append(top)
        out[recipe] = {"kl": statistics.mean(kls), "top1": statistics.mean(tops)}
        print(f"{name} {recipe}: KL {out[recipe]['kl']:.4f}, top-1 {out[recipe]['top1']:.3f}", file=sys.stderr, flush=True)
    return out


def demo_questions(n: int) -> list[str]:
    """`n` held-out demo questions, spread over the families."""
    per = max(1, n // len(FAMILIES))
    return [q for family in FAMILIES for q, _ in held_out_set(family, per)][:n]


def divergence_inputs(name: str, root: Path, n: int, longest: int) -> tuple[Path, list[list[int]]]:
    """The checkpoint and prompt ids a divergence table runs on (here and in kv_bits_cost.py):
    the shipped demo with `n` of its held-out questions through the chat template, or the
    `bench_models` preset `name` written under `root` with `n` random prompts of 16 to `longest`
    ids (seeded)."""
    if name == "demo":
        _, tok = load("demo")
        return shipped_demo_dir(), [render_messages(tok, [{"role": "user", "content": q}]) for q in demo_questions(n)]
    folder = bench_models.build_hf_checkpoint(name, root / name)
    rng = np.random.default_rng(1)
    vocab = bench_models.PRESETS[name]["vocab"]
    return folder, [rng.integers(3, vocab, int(rng.integers(16, longest))).tolist() for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-family", type=int, default=20)
    p.add_argument("--prompts", type=int, default=24, help="prompts per model for the KL")
    p.add_argument("--models", default="demo,tiny,small")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--recipes", default=",".join(("bf16",) + MIXED), help="recipes of the accuracy table")
    p.add_argument("--families", default=",".join(FAMILIES), help="demo families of the accuracy table")
    p.add_argument("--manystep", type=Path, help="the many-step instrument's folder: its exact-path validity per recipe")
    p.add_argument("--manystep-per-family", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    results: dict = {}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy(args.per_family, tuple(args.recipes.split(",")), tuple(args.families.split(",")))
    if args.manystep:
        results["manystep"] = manystep_validity(args.manystep, args.manystep_per_family)
    results["divergence"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            folder, prompts = divergence_inputs(name, Path(tmp), args.prompts, longest=200)
            results["divergence"][name] = divergence(name, folder, prompts)

    recipes = ("bf16",) + MIXED
    if "accuracy" in results:
        acc = results["accuracy"]
        names = list(acc)
        print("| family | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for family in acc[names[0]]:
            print(f"| {family} | " + " | ".join(f"{acc[r][family]:.0%}" for r in names) + " |")
        print("| **mean** | " + " | ".join(f"{statistics.mean(acc[r].values()):.1%}" for r in names) + " |")
        print()
    if "manystep" in results:
        val = results["manystep"]
        print("| many-step family (exact path validity) | " + " | ".join(recipes) + " |")
        print("|---|" + "---|" * len(recipes))
        for family in val["bf16"]:
            print(f"| {family} | " + " | ".join(f"{val[r][family]:.0%}" for r in recipes) + " |")
        print()
    print("| model | " + " | ".join(f"{r} KL / top-1" for r in recipes) + " |")
    print("|---|" + "---|" * len(recipes))
    for name, row in results["divergence"].items():
        print(f"| {name} | " + " | ".join(f"{row[r]['kl']:.4f} / {row[r]['top1']:.3f}" for r in recipes) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
