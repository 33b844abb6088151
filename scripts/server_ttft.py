#!/usr/bin/env python3
"""Time to first text, block-only streaming vs streaming inside the canvas, and what it costs.

    python scripts/server_ttft.py --model demo --prompts 24 --max-tokens 64

Serves the model in-process on a free loopback port and sends each prompt twice, one request at
a time and with the same seed: once streaming committed blocks only, once with
`stream_options.in_canvas` (the settled left part of a block is streamed and pinned). Reports the
time to the first content byte, the total time, steps per block, and the accuracy cost: with the
demo task suite (mlx_diffusiongemma.demo_tasks, the trained demo model) each reply is judged;
otherwise the in-canvas reply is compared with the block-only one (same seed).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from server_load import sse_request  # noqa: E402


def prompts(n: int) -> tuple[list[tuple[str, str | None, object]], bool]:
    """[(prompt, reference or None, judge or None)], and whether they are judged tasks."""
    try:
        tasks = importlib.import_module("mlx_diffusiongemma.demo_tasks")
        families = getattr(tasks, "FAMILIES")
    except (ImportError, AttributeError):
        base = ["Tell me a story.", "What is block diffusion?", "List three colours.", "Why is the sky blue?"]
        return [(f"{base[i % len(base)]} ({i})", None, None) for i in range(n)], False
    names = list(families)
    out = []
    per = -(-n // len(names))
    for k in range(per):  # round robin over the families
        for name in names:
            prompt, ref = tasks.held_out_set(name, per)[k]
            out.append((prompt, ref, families[name].judge))
    return out[:n], True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--stability", type=int, default=2)
    ap.add_argument("--max-entropy", type=float, default=0.5)
    args = ap.parse_args(argv)

    import mlx_diffusiongemma as dg
    from helpers_server import running
    from mlx_diffusiongemma.server import ServerConfig, create_app

    model, tok = dg.load(args.model)  # "demo": the trained demo; "demo-random": the random one
    items, judged = prompts(args.prompts)
    # No prompt cache: both modes pay the same prefill.
    app = create_app(model, tok, ServerConfig(model_id="m", prompt_cache_size=0))
    modes = {"block": {"include_usage": True},
             "in-canvas": {"include_usage": True, "in_canvas": True}}
    rows = {m: [] for m in modes}
    with running(app) as url:
        # The exact path, as the documented table (docs/server.md) was measured before fast mode became the default.
        base = {"model": "m", "stream": True, "max_tokens": args.max_tokens, "mode": "exact",
                "in_canvas_stability": args.stability, "in_canvas_max_entropy": args.max_entropy}
        if args.steps:
            base["max_denoising_steps"] = args.steps
        sse_request(url, dict(base, seed=0, stream_options={"include_usage": True},
                              messages=[{"role": "user", "content": "warm up"}]), 300)
        for i, (prompt, ref, judge) in enumerate(items):
            for mode, options in modes.items():
                out = sse_request(url, dict(base, seed=i, stream_options=options,
                                            messages=[{"role": "user", "content": prompt}]), 300)
                out["correct"] = judge(prompt, ref, out["text"].strip()) if judge else None
                rows[mode].append(out)
    print(f"model {args.model} · {len(items)} prompts · max_tokens {args.max_tokens} · steps {args.steps or 'default'}"
          f" · in-canvas rule: argmax stable {args.stability} steps, entropy < {args.max_entropy}")
    print()
    print("| mode | mean first text s | median first text s | mean total s | replies equal to block-only |"
          + (" task accuracy |" if judged else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if judged else ""))
    for mode, outs in rows.items():
        ttft = [o["ttft"] for o in outs if o["ttft"] is not None]
        total = statistics.mean(o["wall"] for o in outs)
        same = sum(o["text"] == b["text"] for o, b in zip(outs, rows["block"]))
        score = f"{same}/{len(outs)}"
        if judged:
            score += f" | {sum(bool(o['correct']) for o in outs)}/{len(outs)}"
        print(f"| {mode} | {statistics.mean(ttft):.3f} | {statistics.median(ttft):.3f} | {total:.3f} | {score} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
