"""Train the demo model from scratch with the package's own trainer (reproducible).

    python scripts/train_demo.py --out demo-train/ [--iters 3000] [--batch-size 32] [--seed 0]

Builds the tokenizer (a BPE trained on the task suite), a small DiffusionGemma (routed experts,
sliding and full layers, self-conditioning; canvas 64), trains it on the training side of
`mlx_diffusiongemma.demo_tasks` with `mlx_diffusiongemma.train` (full fine-tuning from random
initialisation, float32, dense experts), and writes a loadable folder (bf16 weights) to
`OUT/model` every `--save-every` steps and at the end. `OUT/train_log.jsonl` keeps every report.
To ship it: `cp OUT/model/* mlx_diffusiongemma/demo/model/`.

On Linux, preloading an optimised BLAS makes MLX's CPU matmuls ~30x faster, e.g.
`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python scripts/train_demo.py ...`
(Debian's libopenblas0-pthread). Debian 12's OpenBLAS (0.3.21) does not know the newest Xeons and
falls back to its generic kernel ("Core: Prescott" under `OPENBLAS_VERBOSE=2`): there, also set
`OPENBLAS_CORETYPE=SAPPHIRERAPIDS` (or `SKYLAKEX`); measured 2026-12-06 on such a machine, MLX's
2048x2048 float32 matmul went from ~30 to ~195 GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_diffusiongemma.model.args import parse_model_args
from mlx_diffusiongemma.demo.build import (
    build_tokenizer,
    card_template_ids,
    trained_generation_config,
    model_config,
    special_ids,
    training_mix,
)
from mlx_diffusiongemma.demo.tasks import FAMILIES, held_out_set
from mlx_diffusiongemma.prompts.render import render_messages
from mlx_diffusiongemma.model.model import Model
from mlx_diffusiongemma.train.loop import evaluate, train
from mlx_diffusiongemma.train.objective import Example, canvas_items, make_batch


def encode_pair(tok, prompt: str, answer: str, turn_end: int) -> Example:
    ids = render_messages(tok, [{"role": "user", "content": prompt}])
    return Example(tuple(ids), tuple(tok.encode(answer, add_special_tokens=False)) + (turn_end,))


def batches(tok, ids: dict, canvas: int, batch_size: int, seed: int, template_fraction: float = 0.0,
            weights: dict[str, float] | None = None):
    """Endless batches of canvas items from the training mix. A `template_fraction` of the `card`
    answers is written in a template's form (holes padded with end tokens: demo/build.py's card_template_ids),
    its fixed text pinned (never corrupted) as `dgemma fill` pins it."""
    mix = training_mix(seed, weights)
    rng = random.Random(f"templates-{seed}")
    pending = []
    while True:
        while len(pending) < batch_size:
            family, prompt, answer = next(mix)
            if family == "card" and rng.random() < template_fraction:
                reply, pinned = card_template_ids(tok, rng, answer, ids["<eos>"])
                example = Example(tuple(render_messages(tok, [{"role": "user", "content": prompt}])),
                                  tuple(reply) + (ids["<turn|>"],), tuple(pinned) + (False,))
            else:
                example = encode_pair(tok, prompt, answer, ids["<turn|>"])
            pending += canvas_items(example, canvas, ids["<eos>"])
        yield make_batch(pending[:batch_size], pad_id=ids["<pad>"])
        pending = pending[batch_size:]


def parse_weights(text: str) -> dict[str, float]:
    """'sort=4,add=3' -> {'sort': 4.0, 'add': 3.0}; unknown families and bad weights are errors."""
    weights = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in FAMILIES:
            raise argparse.ArgumentTypeError(f"unknown family {name!r} (families: {', '.join(FAMILIES)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight is not a number") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a weight is a finite number >= 0")
    return weights


def init_qk_norms(model: Model) -> None:
    """Start q/k norm weights at head_dim**-0.25. Attention runs at scale 1 (as in Gemma 4), so
    with norm weights of 1 the q.k logits start with std sqrt(head_dim): softmax is saturated and
    a first run learnt no copying from the prompt in 2000 steps. This gives them std ~1."""
    for layer in model.layers:
        attn = layer.self_attn
        w = attn.head_dim ** -0.25
        attn.q_norm.weight = mx.full(attn.q_norm.weight.shape, w)
        attn.k_norm.weight = mx.full(attn.k_norm.weight.shape, w)


def validation_batches(tok, ids: dict, canvas: int, families: dict, per_family: int = 8) -> list:
    """The fixed validation set: `per_family` held-out prompts of each family (seed 99), as canvas
    items in batches of 32."""
    items = []
    for name in families:
        for prompt, answer in held_out_set(name, per_family, seed=99, families=families):
            items += canvas_items(encode_pair(tok, prompt, answer, ids["<turn|>"]), canvas, ids["<eos>"])
    return [make_batch(items[i : i + 32], pad_id=ids["<pad>"]) for i in range(0, len(items), 32)]


def warmup_cosine(learning_rate: float, warmup: int, iters: int):
    """Linear warm-up from 1e-6 over `warmup` steps, then cosine decay to 5% at `iters`."""
    return optim.join_schedules(
        [optim.linear_schedule(1e-6, learning_rate, warmup),
         optim.cosine_decay(learning_rate, max(1, iters - warmup), learning_rate * 0.05)], [warmup])


def save(model: Model, folder: Path, source: Path, meta: dict) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "training.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iters", type=int, default=1500, help="total optimizer steps of the schedule")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--steps-per-eval", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="start from OUT/model's weights")
    p.add_argument("--start-step", type=int, default=0, help="with --resume: the step to continue the schedule at")
    p.add_argument("--init-from", type=Path, help="start from this model folder's weights, tokenizer and config "
                   "(continued training with a fresh schedule, e.g. from mlx_diffusiongemma/demo/model)")
    p.add_argument("--digit-tokens", action="store_true",
                   help="a tokenizer that splits numbers into digits, as Gemma's does (demo_build.build_tokenizer)")
    p.add_argument("--template-fraction", type=float, default=0.0,
                   help="fraction of card answers written as filled templates (teaches holes that end early)")
    p.add_argument("--family-weights", type=parse_weights, default=None, metavar="NAME=W,...",
                   help="mix weights for some families, e.g. 'sort=4,add=3' (the rest keep demo_tasks.WEIGHTS)")
    args = p.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"  # tokenizer + configs, no weights
    if args.init_from is not None and not (base / "config.json").exists():
        base.mkdir(parents=True)
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(args.init_from / name, base / name)
    if not (base / "config.json").exists():
        build_tokenizer(base, digits=args.digit_tokens)
        ids = special_ids(base)
        vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
        (base / "config.json").write_text(json.dumps(
            model_config(len(vocab), hidden=args.hidden, layers=args.layers), indent=2))
        (base / "generation_config.json").write_text(json.dumps(
            trained_generation_config([ids["<eos>"], ids["<turn|>"]]), indent=2))
    from mlx_lm.tokenizer_utils import load as load_tok

    ids = special_ids(base)
    tok = load_tok(base, eos_token_ids=[ids["<eos>"], ids["<turn|>"]])
    config = json.loads((base / "config.json").read_text())
    mx.random.seed(args.seed)
    model = Model(parse_model_args(config))
    if args.resume or args.init_from is not None:
        source = out / "model" if args.resume else args.init_from
        model.load_weights(str(source / "model.safetensors"))
        model.set_dtype(mx.float32)
    else:
        init_qk_norms(model)
    # Training-speed formulations (same functions; see Experts.dense and fastmath): on MLX's CPU
    # backend the gather kernels are no slower than dense experts at this size, GELU/tanh are.
    model.set_training_kernels(dense_experts=False, fast_activations=True)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{n_params / 1e6:.2f}M parameters, canvas {model.canvas_length}, vocab {model.vocab_size}", flush=True)

    canvas = model.canvas_length
    val_batches = validation_batches(tok, ids, canvas, FAMILIES)
    optimizer = optim.AdamW(learning_rate=warmup_cosine(args.learning_rate, args.warmup, args.iters), weight_decay=0.01)
    optimizer.state["step"] = mx.array(args.start_step, mx.uint64)  # the schedule resumes; moments restart
    # The stages behind a continued run travel with its weights (training.json), so a shipped
    # model's folder says how all of it was made.
    previous = args.init_from / "training.json" if args.init_from is not None else None
    previous_stage = json.loads(previous.read_text()) if previous is not None and previous.exists() else None
    if args.resume and (out / "model" / "training.json").exists():
        previous_stage = json.loads((out / "model" / "training.json").read_text()).get("previous_stage")
    log = open(out / "train_log.jsonl", "a")
    t0 = time.perf_counter()
    reports = train(model, optimizer, batches(tok, ids, canvas, args.batch_size, args.seed + args.start_step,
                                           args.template_fraction, args.family_weights),
                    iters=args.iters - args.start_step, start_step=args.start_step, seed=args.seed, report_every=25, steps_per_eval=args.steps_per_eval,
                    validate=lambda: evaluate(model, val_batches))
    for r in reports:
        row = {**r.__dict__, "elapsed_s": round(time.perf_counter() - t0, 1)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        val = f" val {r.val_loss:.4f}" if r.val_loss is not None else ""
        print(f"step {r.step} loss {r.loss:.4f}{val} lr {r.learning_rate:.2e} {r.it_per_s:.2f} it/s "
              f"{r.tokens_per_s:.0f} tok/s peak {r.peak_memory_gb:.2f} GB t {row['elapsed_s']}s", flush=True)
        if r.step % args.save_every == 0 or r.step == args.iters:
            save(model, out / "model", base, {"step": r.step, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                                "elapsed_s": row["elapsed_s"], "loss": r.loss, "val_loss": r.val_loss,
                                                **({"previous_stage": previous_stage} if previous_stage else {})})
            model.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
