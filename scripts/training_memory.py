"""Print the memory a fine-tuning step needs, by accounting (`mlx_diffusiongemma.train.memory`),
as the markdown table in docs/training.md.

    python scripts/training_memory.py                # the 26B-A4B shape, LoRA on a 4-bit base
    python scripts/training_memory.py --model demo   # a local model folder's shape (or 'demo')
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_diffusiongemma.model.args import parse_text_args
from mlx_diffusiongemma.train.memory import finetune_memory  # noqa: E402

COLUMNS = [("weights", "weights"), ("trained_state", "LoRA/trained state"),
           ("activations_decoder", "decoder acts"), ("activations_encoder", "encoder acts"),
           ("attention_scores_decoder", "decoder scores"), ("attention_scores_encoder", "encoder scores"),
           ("recomputed_feed_forward", "recompute"), ("logits", "logits"), ("total", "total")]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}" if n >= 1e8 or n == 0 else f"{n / 1e9:.4f}"


def table(text_args, canvas: int, rows: list[dict]) -> str:
    head = "| run | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        m = finetune_memory(text_args, canvas_length=canvas, **r)
        label = (f"{r.get('fine_tune_type', 'lora')}"
                 f"{' r' + str(r.get('rank', 8)) if r.get('fine_tune_type', 'lora') == 'lora' else ''}, "
                 f"{'all' if r.get('num_layers', 16) == -1 else r.get('num_layers', 16)} layers, {r.get('recipe', 'mixed-4bit')}, batch {r.get('batch_size', 1)}, "
                 f"context {r['context_length']}{', grad ckpt' if r.get('grad_checkpoint') else ''}")
        lines.append(f"| {label} | " + " | ".join(gb(m[k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="A model folder (or 'demo'); default: the 26B-A4B shape.")
    args = p.parse_args(argv)
    if args.model is None:
        from bench_models import PRESETS, text_config

        text = parse_text_args(text_config("26b-shape"))
        canvas = PRESETS["26b-shape"]["canvas"]
        rows = [
            dict(context_length=512),
            dict(context_length=512, grad_checkpoint=True),
            dict(context_length=2048),
            dict(context_length=2048, grad_checkpoint=True),
            dict(context_length=512, batch_size=4, grad_checkpoint=True),
            dict(context_length=512, num_layers=-1, grad_checkpoint=True),
            dict(context_length=512, recipe="bf16"),
        ]
        name = "26B-A4B shape"
    else:
        from mlx_diffusiongemma.checkpoint.config import load_model_args
        from mlx_diffusiongemma.checkpoint.loading import resolve

        margs = load_model_args(resolve(args.model))
        text, canvas = margs.text, margs.canvas_length
        rows = [dict(context_length=64, batch_size=4, num_layers=-1, recipe="bf16", dense_experts=True)]
        name = args.model
    print(f"Memory of one fine-tuning step, {name}, canvas {canvas} (GB = 1e9 bytes):\n")
    print(table(text, canvas, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
