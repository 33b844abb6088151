"""Make the many-step instrument: the demo model fine-tuned on free-choice tasks (reproducible).

    nice -n 10 python scripts/train_manystep.py --out manystep-train/ [--iters 700] [--max-minutes 25]

Real text takes 20-34 denoising steps per canvas; the demo's families settle in 2-6, where
freezing settled positions is safe. This model answers the free-choice families of
`demo.tasks.MANY_STEP_FAMILIES` (pick 5-12 or 24-40 different increasing numbers in a range:
many right answers, so the distribution stays spread and the
reference's entropy budget accepts few positions per step) plus sorting as a deterministic
control. It starts from the shipped demo model (`mlx_diffusiongemma/demo/model`: its tokenizer,
config and weights) and trains with the package's trainer (`train.loop.train`, float32, AdamW,
warmup + cosine), then writes a loadable folder (bf16 weights) to `OUT/model`. `--max-minutes`
stops the run early after that much CPU time of this process (the schedule keeps its length; the
last weights are saved), so the budget on a shared CPU is bounded. `scripts/bench_manystep.py` measures exact vs fast mode on it.

On Linux preload an optimised BLAS, as for scripts/train_demo.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from train_demo import encode_pair, save, validation_batches, warmup_cosine  # noqa: E402  (scripts/, this file's folder)

from mlx_diffusiongemma.demo.build import special_ids  # noqa: E402
from mlx_diffusiongemma.demo.tasks import MANY_STEP_FAMILIES, MANY_STEP_WEIGHTS, sample  # noqa: E402
from mlx_diffusiongemma.model.args import parse_model_args  # noqa: E402
from mlx_diffusiongemma.model.model import Model  # noqa: E402
from mlx_diffusiongemma.train.loop import evaluate, train  # noqa: E402
from mlx_diffusiongemma.train.objective import canvas_items, make_batch  # noqa: E402

DEMO = ROOT / "mlx_diffusiongemma" / "demo" / "model"


def batches(tok, ids: dict, canvas: int, batch_size: int, seed: int, mix: dict[str, float]):
    """Endless batches from the training side of the many-step families, weighted by `mix`."""
    rng = random.Random(seed)
    names = list(mix)
    weights = [mix[n] for n in names]
    pending = []
    while True:
        while len(pending) < batch_size:
            family = rng.choices(names, weights)[0]
            prompt, answer = sample(rng, family, held_out=False, families=MANY_STEP_FAMILIES)
            pending += canvas_items(encode_pair(tok, prompt, answer, ids["<turn|>"]), canvas, ids["<eos>"])
        yield make_batch(pending[:batch_size], pad_id=ids["<pad>"])
        pending = pending[batch_size:]


def parse_mix(text: str) -> dict[str, float]:
    """`pick=3,sort=1` -> {"pick": 3.0, "sort": 1.0}, each a family of MANY_STEP_FAMILIES."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in MANY_STEP_FAMILIES or not weight:
            raise argparse.ArgumentTypeError(f"{part!r}: expected family=weight, family one of {', '.join(MANY_STEP_FAMILIES)}")
        mix[name] = float(weight)
    return mix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init-from", type=Path, default=DEMO)
    p.add_argument("--iters", type=int, default=700, help="total optimizer steps of the schedule")
    p.add_argument("--max-minutes", type=float, default=25.0, help="stop (and save) after this much CPU time")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--mix", type=parse_mix, default=dict(MANY_STEP_WEIGHTS),
                   help="family=weight,... (default: demo.tasks.MANY_STEP_WEIGHTS)")
    args = p.parse_args(argv)

    from mlx_lm.tokenizer_utils import load as load_tok

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ids = special_ids(args.init_from)
    tok = load_tok(args.init_from, eos_token_ids=[ids["<eos>"], ids["<turn|>"]])
    config = json.loads((args.init_from / "config.json").read_text())
    mx.random.seed(args.seed)
    model = Model(parse_model_args(config))
    model.load_weights(str(args.init_from / "model.safetensors"))
    model.set_dtype(mx.float32)
    model.set_training_kernels(dense_experts=False, fast_activations=True)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"{n_params / 1e6:.2f}M parameters, canvas {model.canvas_length}", flush=True)

    canvas = model.canvas_length
    val_batches = validation_batches(tok, ids, canvas, MANY_STEP_FAMILIES)
    optimizer = optim.AdamW(learning_rate=warmup_cosine(args.learning_rate, args.warmup, args.iters), weight_decay=0.01)
    previous = args.init_from / "training.json"
    previous_stage = json.loads(previous.read_text()) if previous.exists() else None
    meta_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    log = open(out / "train_log.jsonl", "a")
    t0, cpu0 = time.perf_counter(), time.process_time()
    reports = train(model, optimizer, batches(tok, ids, canvas, args.batch_size, args.seed, args.mix), iters=args.iters,
                    seed=args.seed, report_every=25, steps_per_eval=100, validate=lambda: evaluate(model, val_batches))
    for r in reports:
        elapsed = time.perf_counter() - t0
        row = {**r.__dict__, "elapsed_s": round(elapsed, 1)}
        cpu = time.process_time() - cpu0
        row["cpu_s"] = round(cpu, 1)
        val = f" val {r.val_loss:.4f}" if r.val_loss is not None else ""
        print(f"step {r.step} loss {r.loss:.4f}{val} lr {r.learning_rate:.2e} {r.it_per_s:.2f} it/s t {elapsed:.0f}s "
              f"cpu {cpu:.0f}s", flush=True)
        over = cpu > args.max_minutes * 60
        log.write(json.dumps(row) + "\n")
        log.flush()
        if r.step % args.save_every == 0 or r.step == args.iters or over:
            save(model, out / "model", args.init_from, {
                "step": r.step, "args": meta_args, "families": args.mix, "elapsed_s": row["elapsed_s"],
                "loss": r.loss, "val_loss": r.val_loss, **({"previous_stage": previous_stage} if previous_stage else {})})
            model.train()
        if over:
            print(f"stopped at step {r.step}: --max-minutes {args.max_minutes:g} reached", flush=True)
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
