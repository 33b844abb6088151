"""Fine-tuning demonstration: LoRA on a task the demo model never saw, accuracy before and after.

    python scripts/finetune_demo.py --out finetune-demo/ [--iters 300] [--update-docs]

The task (`--task`): `descending`, sorting numbers from largest to smallest ("Sort these numbers
from largest to smallest: 42 7 19" -> "42 19 7"; the demo learned increasing order only), or
`reverse-numbers` ("Reverse the numbers: 5 3 9" -> "9 3 5"; the demo reversed words only). The
script

1. writes a data folder (train.jsonl / valid.jsonl, `prompt`/`completion`) and a held-out test set
   (prompts that appear in neither file);
2. measures exact-match accuracy on the test set with the default (reference) sampler, plus on
   the demo's own closest family (sort, or reverse), which the adapters must not break;
3. runs `dgemma finetune`'s engine (`train.finetune.FinetuneRun`, LoRA) and times it, with MLX's
   peak memory (weights included) and the accounting of `train.memory` for the same run;
4. loads the model with the adapters (`load(..., adapter_path=)`) and measures both again;
5. writes `OUT/results.json`, `OUT/results.md` and, with `--update-docs`, the section of
   docs/training.md between the `finetune-demo` markers.

Budget: ~10 minutes on a 2-core x86 CPU. On Linux, preload an optimised BLAS (as for the demo's
training): `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3`, and on a Xeon that
Debian's OpenBLAS does not recognise, `OPENBLAS_CORETYPE=SAPPHIRERAPIDS` (see scripts/train_demo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_diffusiongemma import generate, load
from mlx_diffusiongemma.train.finetune import FinetuneRun, FinetuneSettings
from mlx_diffusiongemma.train.memory import finetune_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_block import write_results  # noqa: E402  (scripts/, this file's folder)

PROMPT = "Sort these numbers from largest to smallest: {}"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
MARK_START, MARK_END = "<!-- finetune-demo:start -->", "<!-- finetune-demo:end -->"


def _nums(values) -> str:
    return " ".join(str(v) for v in values)


def descending(rng: random.Random) -> tuple[str, str]:
    values = [rng.randrange(100) for _ in range(rng.randint(4, 10))]
    return PROMPT.format(_nums(values)), _nums(sorted(values, reverse=True))


def reverse_numbers(rng: random.Random) -> tuple[str, str]:
    values = [rng.randrange(100) for _ in range(rng.randint(3, 8))]
    return f"Reverse the numbers: {_nums(values)}", _nums(reversed(values))


# name: (maker, the demo family that is the control, why the task is new)
TASKS = {
    "descending": (descending, "sort", "the demo learned increasing order only"),
    "reverse-numbers": (reverse_numbers, "reverse", "the demo learned to reverse words, never numbers"),
}


def draw(make, n: int, rng: random.Random, exclude: set[str]) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        prompt, answer = make(rng)
        if prompt not in exclude:
            exclude.add(prompt)
            out.append((prompt, answer))
    return out


def write_data(folder: Path, train: list, valid: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for prompt, answer in rows:
                f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")


def accuracy(model, tokenizer, pairs, seed: int) -> dict:
    correct, tpf, t0 = 0, [], time.perf_counter()
    wrong = []
    for i, (prompt, answer) in enumerate(pairs):
        if i and i % 10 == 0:
            print(f"  {i}/{len(pairs)} evaluated", flush=True)
        r = generate(model, tokenizer, prompt, max_tokens=64, seed=seed + i, mode="exact")  # one canvas of the demo
        ok = r.answer.strip() == answer
        correct += ok
        tpf.append(r.tokens_per_forward)
        if not ok and len(wrong) < 3:
            wrong.append({"prompt": prompt, "expected": answer, "got": r.answer.strip()})
    return {"correct": correct, "total": len(pairs), "accuracy": correct / len(pairs),
            "tokens_per_forward": sum(tpf) / len(tpf), "seconds": time.perf_counter() - t0, "examples_wrong": wrong}


def held_out_control(family: str, n: int) -> list[tuple[str, str]]:
    """The demo's held-out prompts of the family the new task is closest to."""
    from mlx_diffusiongemma.demo.tasks import held_out_set

    return held_out_set(family, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--out", type=Path, default=Path("finetune-demo"))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-valid", type=int, default=64)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--n-control", type=int, default=None, help="Prompts of the demo's control family (default: --n-test).")
    p.add_argument("--replay", type=int, default=0,
                   help="Also train on this many prompts of the demo's control family (training side), "
                        "so the adapters do not overwrite what the demo knew (rehearsal).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=list(TASKS), default="descending")
    p.add_argument("--update-docs", action="store_true")
    args = p.parse_args(argv)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    seen: set[str] = set()
    make, family, why = TASKS[args.task]
    test = draw(make, args.n_test, rng, seen)
    train = draw(make, args.n_train, rng, seen)
    valid = draw(make, args.n_valid, rng, seen)
    if args.replay:
        from mlx_diffusiongemma.demo.tasks import sample

        # Training-side prompts only: the control is measured on held-out ones.
        train += [sample(rng, family, held_out=False) for _ in range(args.replay)]
        rng.shuffle(train)
    data = out / "data"
    write_data(data, train, valid)
    control = held_out_control(family, args.n_control or args.n_test)
    own = f"demo's {family}"

    model, tok = load(args.model)
    trained_model, _ = load(args.model, dtype=mx.float32)  # trained in float32 (fastmath on CPU)
    base_bytes = sum(v.nbytes for _, v in tree_flatten(trained_model.parameters()))
    before = {"new task": accuracy(model, tok, test, 1000), own: accuracy(model, tok, control, 2000)}
    print("before: " + ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in before.items()), flush=True)

    adapters = out / "adapters"
    settings = FinetuneSettings(
        model=args.model, data=str(data), iters=args.iters, batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_schedule="cosine", warmup=min(20, args.iters // 10),
        lora_rank=args.lora_rank, num_layers=args.num_layers, adapter_path=str(adapters),
        steps_per_eval=max(args.iters // 3, 1), val_batches=-1, save_every=args.iters, seed=args.seed)
    mx.reset_peak_memory()
    t0, c0 = time.perf_counter(), time.process_time()
    run = FinetuneRun.prepare(settings, model=trained_model, tokenizer=tok)
    log = []
    for r in run.reports():
        log.append({"step": r.step, "loss": r.loss, "val_loss": r.val_loss, "tokens_per_s": r.tokens_per_s})
        if r.step % 25 == 0 or r.val_loss is not None:
            print(f"step {r.step}: loss {r.loss:.3f}" + (f", val {r.val_loss:.3f}" if r.val_loss else ""), flush=True)
    run.save()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = mx.get_peak_memory()
    contexts = [len(it.context) for it in run.train_items]
    accounted = finetune_memory(model.text, canvas_length=model.canvas_length, act_bytes=4,
                                context_length=max(contexts), batch_size=args.batch_size,
                                num_layers=run.num_layers, rank=args.lora_rank, recipe="bf16",
                                weight_bytes=base_bytes)

    tuned, tok2 = load(args.model, adapter_path=adapters)
    after = {"new task": accuracy(tuned, tok2, test, 1000), own: accuracy(tuned, tok2, control, 2000)}
    results = {
        "task": make(random.Random(0))[0].rsplit(":", 1)[0] + ": ...", "why_new": why, "model": args.model, "settings": {k: getattr(settings, k) for k in (
            "iters", "batch_size", "learning_rate", "lr_schedule", "warmup", "lora_rank", "lora_scale", "seed")},
        "num_layers": run.num_layers, "trainable_parameters": run.trainable, "total_parameters": run.total,
        "train_examples": len(train), "replay": args.replay, "control_family": family, "valid_examples": len(valid), "test_examples": len(test),
        "initial_val_loss": run.initial_val_loss, "final_val_loss": run.last_val_loss,
        "wall_seconds": wall, "cpu_seconds": cpu, "peak_memory_bytes": peak, "accounted_bytes": accounted,
        "before": before, "after": after, "log": log,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} ({mx.default_device()})",
        "blas": os.environ.get("LD_PRELOAD", "MLX's bundled reference BLAS")
                + (f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']})" if "OPENBLAS_CORETYPE" in os.environ else ""),
        "command": "python " + " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    write_results(out, results, render(results), (DOCS, MARK_START, MARK_END) if args.update_docs else None, indent=2)
    return 0


def render(r: dict) -> str:
    s = r["settings"]
    b, a = r["before"], r["after"]
    lines = [
        f"Task: `{r['task']}` (new: {r['why_new']}). {r['train_examples']} training"
        + (f" (of them {r['replay']} of the demo's own `{r['control_family']}`, replayed so that it is not forgotten)"
           if r.get("replay") else "") + ", "
        f"{r['valid_examples']} validation, {r['test_examples']} held-out test prompts (in neither file).",
        f"LoRA rank {s['lora_rank']} (scale {s['lora_scale']:g}) on all {r['num_layers']} layers: "
        f"{r['trainable_parameters'] / 1e6:.2f}M trainable of {r['total_parameters'] / 1e6:.2f}M parameters; "
        f"{s['iters']} steps of batch {s['batch_size']}, Adam, lr {s['learning_rate']:g} cosine "
        f"(warm-up {s['warmup']}), seed {s['seed']}.",
        "",
        "| held-out exact match (reference sampler) | before | after |",
        "|---|---|---|",
    ]
    for name in b:
        lines.append(f"| {name} | {b[name]['correct']}/{b[name]['total']} ({b[name]['accuracy']:.0%}) "
                     f"| {a[name]['correct']}/{a[name]['total']} ({a[name]['accuracy']:.0%}) |")
    acc = r["accounted_bytes"]
    lines += [
        "",
        "| training | value |",
        "|---|---|",
        f"| validation loss | {r['initial_val_loss']:.3f} -> {r['final_val_loss']:.3f} |",
        f"| wall time (data, setup, training, validation, save) | {r['wall_seconds']:.0f} s "
        f"({r['cpu_seconds']:.0f} s of CPU time, all threads) |",
        f"| peak memory, MLX (weights included) | {r['peak_memory_bytes'] / 1e6:.0f} MB |",
        f"| peak memory, accounting (`train.memory`) | {acc['total'] / 1e6:.0f} MB |",
        f"| machine | {r['machine']}; BLAS: {r['blas']} |",
        "",
        f"Command: `{r['command']}`.",
    ]
    wrong = b["new task"]["examples_wrong"][:1]
    if wrong:
        got = wrong[0]["got"].replace("`", "'").replace("\n", " ")
        lines += ["", f"Before, the demo answered `{wrong[0]['prompt']}` with `{got}` "
                      f"(expected `{wrong[0]['expected']}`)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
