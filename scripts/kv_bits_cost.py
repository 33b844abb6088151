"""What the quantized prefix KV cache (`kv_bits`, mlx-lm's `--kv-bits`) costs against the float cache.

    python scripts/kv_bits_cost.py [--models demo,tiny,small] [--prompts 12] [--generate 12] [--out kv.json]

For each model, loaded float32 (so the only difference is the cache), the same inputs with the
float cache and with the cache quantized to 8 and 4 bits: a prompt encoded into the cache, then
the decoder's logits over a random canvas (first step) and again with the first step's
probabilities as self-conditioning (second step). Reported: the largest absolute logit error,
the mean KL(float cache || quantized cache) per canvas position at temperature 1, and how often
the argmaxes agree. On the demo model (trained, with a tokenizer) also: `generate` with a fixed
seed on held-out task prompts, and the share of generated tokens equal to the float cache's
(position by position) and of answers that are identical. Prompts: held-out demo task prompts
through the chat template; random token prompts of 16-400 tokens for the random `bench_models`
presets (`tiny`, `small`). Also the memory plan (`checkpoint/memory.py`) of the released 26B
shape at long contexts with each cache (`--plan-only` prints just that). Prints markdown tables
(docs/performance.md has them).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import full_shape  # noqa: E402
from recipe_cost import demo_questions, divergence_inputs  # noqa: E402

import mlx_diffusiongemma as dg  # noqa: E402
from mlx_diffusiongemma.checkpoint.loading import load_model  # noqa: E402

BITS = (8, 4)
# The released model's shape (scripts/full_shape.py's config; the plan needs no weights), with
# positions up to the 256K the table below plans for.
RELEASED = copy.deepcopy(full_shape.RELEASED)
RELEASED["text_config"]["max_position_embeddings"] = 262144


def plan_table(tmp: Path) -> None:
    from mlx_diffusiongemma.checkpoint.loading import plan

    folder = tmp / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(RELEASED))
    print("| context | cache: bf16 / 8-bit / 4-bit | mixed-3bit peak: bf16 / 8-bit / 4-bit cache | mixed-2bit peak: bf16 / 8-bit / 4-bit cache |")
    print("|---|---|---|---|")
    for context in (8192, 32768, 131072, 262144):
        # Converted checkpoints (no unquantized copy held while loading), as `dgemma info` shows.
        plans = {r: [plan(folder, context=context, kv_bits=b).converted(r) for b in (None, 8, 4)]
                 for r in ("mixed-3bit", "mixed-2bit")}
        cache = " / ".join(f"{p.kv / 1e9:.2f}" for p in plans["mixed-3bit"])
        peaks = [" / ".join(f"{p.peak / 1e9:.2f}" for p in plans[r]) for r in plans]
        print(f"| {context // 1024}K | {cache} GB | {peaks[0]} GB | {peaks[1]} GB |")
    # The longest context under the default GPU limit of a 16 and a 24 GB Mac (Metal's recommended
    # working set: about two thirds of the memory, in GiB).
    from dataclasses import replace

    macs = {"16 GB Mac (11.45 GB)": int(16 * 2**30 * 2 / 3), "24 GB Mac (17.18 GB)": int(24 * 2**30 * 2 / 3)}
    print()
    print("| recipe | " + " | ".join(f"longest context, {m}: bf16 / 8-bit / 4-bit cache" for m in macs) + " |")
    print("|---|" + "---|" * len(macs))
    for recipe in ("mixed-4bit", "mixed-3bit", "mixed-2bit"):
        cells = []
        for limit in macs.values():
            longest = [replace(plan(folder, kv_bits=b).converted(recipe), limit=limit).longest_context()
                       for b in (None, 8, 4)]
            cells.append(" / ".join(f"{n:,}" if n else "none" for n in longest))
        print(f"| {recipe} | " + " | ".join(cells) + " |")


def _logits(model, prompt: list[int], canvas: mx.array) -> list[mx.array]:
    cache = model.prefill(mx.array([prompt]))
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, self_conditioning=first)
    return [first.astype(mx.float32), second.astype(mx.float32)]


def _compare(p: mx.array, q: mx.array) -> tuple[float, float, float]:
    lp, lq = p - mx.logsumexp(p, -1, keepdims=True), q - mx.logsumexp(q, -1, keepdims=True)
    kl = float(mx.mean(mx.sum(mx.exp(lp) * (lp - lq), -1)))
    top1 = float(mx.mean((p.argmax(-1) == q.argmax(-1)).astype(mx.float32)))
    return float(mx.abs(p - q).max()), kl, top1


def divergence(name: str, folder: Path, prompts: list[list[int]], seed: int = 0) -> dict[str, dict[str, float]]:
    model, _ = load_model(folder, dtype=mx.float32)  # with the vision tower (as stored)
    rng = np.random.default_rng(seed)
    canvases = [mx.array(rng.integers(0, model.vocab_size, (1, model.canvas_length))) for _ in prompts]
    ref = [_logits(model, p, c) for p, c in zip(prompts, canvases)]
    scale = max(float(mx.abs(r).max()) for pair in ref for r in pair)
    out = {}
    for bits in BITS:
        model.set_kv_bits(bits)
        errs, kls, tops = [], [], []
        for pair, p, c in zip(ref, prompts, canvases):
            for r, q in zip(pair, _logits(model, p, c)):
                err, kl, top = _compare(r, q)
                errs.append(err)
                kls.append(kl)
                tops.append(top)
        out[f"kv{bits}"] = {"max_abs": max(errs), "logit_scale": scale, "kl": statistics.mean(kls),
                            "top1": statistics.mean(tops), "group_size": model.kv_group_size}
        print(f"{name} kv{bits}: {json.dumps(out[f'kv{bits}'])}", file=sys.stderr, flush=True)
    return out


def agreement(n: int) -> dict[str, dict[str, float]]:
    model, tok = dg.load("demo", dtype="float32")
    questions = demo_questions(n)
    ref = [dg.generate(model, tok, q, seed=0, mode="exact").tokens for q in questions]
    out = {}
    for bits in BITS:
        model.set_kv_bits(bits)
        same = total = whole = 0
        for q, r in zip(questions, ref):
            t = dg.generate(model, tok, q, seed=0, mode="exact").tokens
            same += sum(a == b for a, b in zip(r, t))
            total += max(len(r), len(t))
            whole += t == r
        out[f"kv{bits}"] = {"tokens_equal": same / max(total, 1), "answers_equal": whole / len(questions)}
        print(f"demo generate kv{bits}: {json.dumps(out[f'kv{bits}'])}", file=sys.stderr, flush=True)
    model.set_kv_bits(None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=12, help="prompts per model for the logit comparison")
    p.add_argument("--generate", type=int, default=12, help="demo prompts generated with each cache (0: none)")
    p.add_argument("--models", default="demo,tiny,small")
    p.add_argument("--out", type=Path)
    p.add_argument("--plan-only", action="store_true")
    args = p.parse_args(argv)
    if args.plan_only:
        with tempfile.TemporaryDirectory() as tmp:
            plan_table(Path(tmp))
        return 0
    results: dict = {"divergence": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder, prompts = divergence_inputs(name, Path(tmp), args.prompts, longest=400)
            results["divergence"][name] = divergence(name, folder, prompts)
    if args.generate:
        results["generate"] = agreement(args.generate)
    print("| model | kv-bits | max abs logit error (logit scale) | KL / position | top-1 agreement |")
    print("|---|---|---|---|---|")
    for name, row in results["divergence"].items():
        for bits in BITS:
            r = row[f"kv{bits}"]
            print(f"| {name} | {bits} | {r['max_abs']:.4f} ({r['logit_scale']:.1f}) | {r['kl']:.2e} | {r['top1']:.3f} |")
    if "generate" in results:
        print()
        print("| demo, `generate` seed 0 | tokens equal to the float cache's | answers identical |")
        print("|---|---|---|")
        for bits in BITS:
            r = results["generate"][f"kv{bits}"]
            print(f"| kv-bits {bits} | {r['tokens_equal']:.1%} | {r['answers_equal']:.1%} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
