"""Held-out accuracy of the demo model per task family, for our engine and the reference.

    python scripts/eval_demo.py [--model demo] [--per-family 50] [--hf DIR] [--out docs/demo-eval.json]

For every family of `mlx_diffusiongemma.demo_tasks`: exact match (or validity, for the free-choice
family) on held-out prompts with the checkpoint's default sampler (the reference's), tokens per
forward (generated tokens / decoder passes) and steps per canvas. With `--hf DIR` (the Hugging Face
export, `scripts/export_hf.py`), the same prompts also go through the reference `transformers`
generate (its own randomness, seeded per prompt), so both columns come from one run.
Prints a markdown table; `--out` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from mlx_diffusiongemma import generate, load
from mlx_diffusiongemma.demo.tasks import FAMILIES, held_out_set
from mlx_diffusiongemma.diffusion.options import SamplerOptions

# Two canvases of 64: every answer of the suite fits with the shipped tokenizer (numbers 0-99 are
# single tokens). A tokenizer that spells numbers by digit needs --max-tokens 320 (the longest
# count answer, 91 numbers, is ~274 tokens). The budget is fixed, not taken from the reference
# answer, so a reply that never ends cannot be cut to the right length.
MAX_TOKENS = 128


def eval_ours(model, tok, cases, seed0: int, max_tokens: int = MAX_TOKENS, **options) -> dict:
    options = {"mode": "exact", **options}  # the exact path unless asked: the column the reference's stands beside
    correct, tpf, steps, outputs = 0, [], [], []
    t0 = time.perf_counter()
    gen_tokens = 0
    for i, (family, prompt, answer) in enumerate(cases):
        r = generate(model, tok, prompt, max_tokens=max_tokens, seed=seed0 + i, **options)
        ok = FAMILIES[family].judge(prompt, answer, r.text.strip())
        correct += ok
        tpf.append(r.tokens_per_forward)
        steps += list(r.steps_per_block)
        gen_tokens += len(r.tokens)
        outputs.append({"prompt": prompt, "expected": answer, "got": r.text, "ok": bool(ok)})
    dt = time.perf_counter() - t0
    return {"accuracy": correct / len(cases), "tokens_per_forward": statistics.mean(tpf),
            "steps_per_canvas": statistics.mean(steps), "seconds": dt, "tokens": gen_tokens, "outputs": outputs}


def eval_reference(folder: Path, cases, seed0: int, max_tokens: int = MAX_TOKENS) -> dict:
    import torch
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from mlx_diffusiongemma.prompts.render import render_messages

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    eos = set(ref.generation_config.eos_token_id if isinstance(ref.generation_config.eos_token_id, list)
              else [ref.generation_config.eos_token_id])
    correct, tpf, outputs = 0, [], []
    t0 = time.perf_counter()
    for i, (family, prompt, answer) in enumerate(cases):
        ids = render_messages(tok, [{"role": "user", "content": prompt}])
        torch.manual_seed(seed0 + i)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=max_tokens)
        new = out.sequences[0, len(ids):].tolist()
        cut = next((j for j, t in enumerate(new) if t in eos), len(new))
        text = tok.decode(new[:cut], skip_special_tokens=False)
        ok = FAMILIES[family].judge(prompt, answer, text.strip())
        correct += ok
        tpf.append(float(out.tokens_per_forward[0]))
        outputs.append({"prompt": prompt, "expected": answer, "got": text, "ok": bool(ok)})
    return {"accuracy": correct / len(cases), "tokens_per_forward": statistics.mean(tpf),
            "seconds": time.perf_counter() - t0, "outputs": outputs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--per-family", type=int, default=50)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--hf", type=Path, help="the Hugging Face export, to run the reference generate too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="reply budget per prompt (a fixed one)")
    p.add_argument("--entropy-bound", type=float,
                   help="override the checkpoint's entropy bound (ours only): how much a step may commit at once")
    p.add_argument("--fast", action="store_true", help="our fast mode (docs/fast-mode.md) instead of the exact path")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if (args.entropy_bound is not None or args.fast) and args.hf:
        p.error("--entropy-bound and --fast apply to our engine only; the reference column runs the checkpoint's sampler")
    sampler = {} if args.entropy_bound is None else {"entropy_bound": args.entropy_bound}
    options = {**sampler, "mode": "fast" if args.fast else "exact"}

    model, tok = load(args.model)
    try:  # the engine's own check of sampler values, before the first prompt rather than in it
        SamplerOptions(**sampler).resolve(model.generation)
    except ValueError as e:
        p.error(str(e))
    rows = {}
    for family in args.families.split(","):
        cases = [(family, q, a) for q, a in held_out_set(family, args.per_family)]
        row = {"n": len(cases), "ours": eval_ours(model, tok, cases, args.seed, args.max_tokens, **options)}
        if args.hf:
            row["reference"] = eval_reference(args.hf, cases, args.seed, args.max_tokens)
        rows[family] = row
        print(f"{family}: ours {row['ours']['accuracy']:.0%}"
              + (f", reference {row['reference']['accuracy']:.0%}" if args.hf else ""), file=sys.stderr, flush=True)

    head = "| family | n | exact match (ours) | tokens/forward (ours) | steps/canvas (ours) |"
    sep = "|---|---|---|---|---|"
    if args.hf:
        head += " exact match (reference) | tokens/forward (reference) |"
        sep += "---|---|"
    lines = [head, sep]
    for family, row in rows.items():
        o = row["ours"]
        # The real count: a family with fewer distinct held-out prompts (pick has one) gives fewer.
        line = (f"| {family} | {row['n']} | {o['accuracy']:.1%} | {o['tokens_per_forward']:.2f} | "
                f"{o['steps_per_canvas']:.1f} |")
        if args.hf:
            r = row["reference"]
            line += f" {r['accuracy']:.1%} | {r['tokens_per_forward']:.2f} |"
        lines.append(line)
    mean = lambda key, side="ours": statistics.mean(r[side][key] for r in rows.values())  # noqa: E731
    line = f"| **mean** | | {mean('accuracy'):.1%} | {mean('tokens_per_forward'):.2f} | {mean('steps_per_canvas'):.1f} |"
    if args.hf:
        line += f" {mean('accuracy', 'reference'):.1%} | {mean('tokens_per_forward', 'reference'):.2f} |"
    lines.append(line)
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "per_family": args.per_family, "sampler": options, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
