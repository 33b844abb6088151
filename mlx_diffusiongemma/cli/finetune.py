"""`dgemma finetune` and `dgemma fuse`: the rendering (progress bar, log lines, summaries).

The work is in `mlx_diffusiongemma.train` (`finetune.FinetuneRun`, `fuse.fuse`); this module only
shows it. On a terminal a rich progress bar carries loss, validation loss, it/s, tokens/s and
peak memory; piped, one mlx-lm-style line every `--steps-per-report` steps. Ctrl-C, SIGTERM and
SIGHUP save the adapters and exit 128 + the signal (130 for Ctrl-C).
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mlx_diffusiongemma.checkpoint.files import DEFAULT_MODEL, signals_interrupt

from .errors import handle_errors
from .flags import Debug, Model, Offline, positive


def finetune(
    data: Annotated[str, typer.Option("--data", help="Folder with train.jsonl and valid.jsonl (chat 'messages' or 'prompt'/'completion').")],
    model: Model = DEFAULT_MODEL,
    fine_tune_type: Annotated[str, typer.Option("--fine-tune-type", help="lora or full.")] = "lora",
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam, adamw, sgd or adafactor.")] = "adam",
    num_layers: Annotated[Optional[int], typer.Option("--num-layers", help="Layers to fine-tune, from the last (-1: all; default 16 or all).")] = None,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, max=1024, help="LoRA rank.")] = 8,
    lora_scale: Annotated[float, typer.Option("--lora-scale", help="LoRA scale (mlx-lm's, not alpha).")] = 20.0,
    iters: Annotated[int, typer.Option("--iters", min=1, help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Canvases per step.")] = 4,
    learning_rate: Annotated[float, typer.Option("--learning-rate", callback=positive, help="Learning rate.")] = 1e-5,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="constant or cosine.")] = "constant",
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Linear warm-up steps.")] = 0,
    adapter_path: Annotated[str, typer.Option("--adapter-path", help="Folder the adapters are written to.")] = "adapters",
    resume_adapter_file: Annotated[Optional[str], typer.Option("--resume-adapter-file", help="adapters.safetensors of an earlier run to start from.")] = None,
    val_batches: Annotated[int, typer.Option("--val-batches", min=-1, help="Validation batches (-1: all, 0: none).")] = 25,
    steps_per_eval: Annotated[int, typer.Option("--steps-per-eval", min=1, help="Validate every N steps.")] = 200,
    steps_per_report: Annotated[int, typer.Option("--steps-per-report", min=1, help="Log a line every N steps (piped output).")] = 10,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Save the adapters every N steps.")] = 100,
    max_seq_length: Annotated[int, typer.Option("--max-seq-length", min=1, help="Longest example, prompt + answer tokens.")] = 2048,
    grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint", help="Recompute feed-forward activations in the backward pass (less memory).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order and the corruption noise.")] = 0,
    offline: Offline = False,
    debug: Debug = False,
):
    """Fine-tune with the block-diffusion objective: LoRA (also on 4-bit models) or full."""
    from mlx_diffusiongemma.train.finetune import FinetuneSettings

    err = Console(stderr=True, highlight=False)
    with handle_errors(debug):
        settings = FinetuneSettings(
            model=model, data=data, fine_tune_type=fine_tune_type, optimizer=optimizer, num_layers=num_layers,
            lora_rank=lora_rank, lora_scale=lora_scale, iters=iters, batch_size=batch_size,
            learning_rate=learning_rate, lr_schedule=lr_schedule, warmup=warmup, adapter_path=adapter_path,
            resume_adapter_file=resume_adapter_file, val_batches=val_batches, steps_per_eval=steps_per_eval,
            save_every=save_every, max_seq_length=max_seq_length, grad_checkpoint=grad_checkpoint, seed=seed,
            offline=offline or None)
        with signals_interrupt():  # SIGTERM/SIGHUP stop and save like Ctrl-C
            code = run_finetune(settings, steps_per_report=steps_per_report, out=Console(highlight=False), err=err,
                                interactive=err.is_terminal)
    raise typer.Exit(code)


def fuse(
    adapter_path: Annotated[str, typer.Option("--adapter-path", help="Adapter folder from `dgemma finetune`.")] = "adapters",
    save_path: Annotated[str, typer.Option("--save-path", help="Destination folder (must not exist).")] = "fused_model",
    model: Model = DEFAULT_MODEL,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Write unquantized weights.")] = False,
    offline: Offline = False,
    debug: Debug = False,
):
    """Merge fine-tuned adapters into the weights and write a model folder."""
    with handle_errors(debug):
        run_fuse(model, adapter_path, save_path, dequantize=dequantize, offline=offline or None,
                 out=Console(highlight=False), err=Console(stderr=True, highlight=False))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def header(run) -> Table:
    s = run.settings
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    kind = s.fine_tune_type
    if kind == "lora":
        kind += f" (rank {s.lora_rank}, scale {s.lora_scale:g})"
    table.add_row("model", escape(str(s.model)))
    table.add_row("fine-tune", f"{kind} on the last {run.num_layers} of {len(run.model.layers)} layers")
    share = 100 * run.trainable / max(run.total, 1)
    table.add_row("trainable", f"{run.trainable / 1e6:.3f}M of {run.total / 1e6:.3f}M parameters ({share:.3f}%)")
    table.add_row("data", f"{len(run.train_items)} training / {len(run.valid_items)} validation canvases "
                          f"of {run.model.canvas_length} tokens")
    table.add_row("schedule", f"{s.iters} iters · batch {s.batch_size} · {s.optimizer} lr {s.learning_rate:g} "
                              f"({s.lr_schedule}{f', warmup {s.warmup}' if s.warmup else ''}) · seed {s.seed}")
    table.add_row("adapters", escape(str(run.adapter_dir)))
    return table


def run_finetune(settings, *, steps_per_report: int, out: Console, err: Console, interactive: bool) -> int:
    from mlx_diffusiongemma.train.finetune import FinetuneRun

    if interactive:
        err.print(f"[dim]loading {escape(str(settings.model))} and {escape(str(settings.data))}…[/]")
    run = FinetuneRun.prepare(settings)
    err.print(header(run))
    progress = Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} · val {task.fields[val]} · {task.fields[its]} it/s · "
                   "{task.fields[tps]} tok/s · peak {task.fields[mem]} GB"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not interactive,
    )
    task = progress.add_task("train", total=settings.iters, loss="-", val="-", its="-", tps="-", mem="-")
    t0 = time.perf_counter()
    last = None
    window: list[float] = []
    reports = run.reports()
    try:
        with progress:
            for r in reports:
                last = r
                window.append(r.loss)
                elapsed = time.perf_counter() - t0
                its = r.step / elapsed if elapsed > 0 else 0.0
                tps = r.trained_tokens / elapsed if elapsed > 0 else 0.0
                smooth = sum(window[-10:]) / len(window[-10:])
                progress.update(task, completed=r.step, loss=f"{smooth:.3f}", val=_fmt(run.last_val_loss),
                                its=f"{its:.2f}", tps=f"{tps:.0f}", mem=f"{r.peak_memory_gb:.2f}")
                if not interactive and r.step == 1 and run.initial_val_loss is not None:
                    err.print(f"Iter 0: Val loss {run.initial_val_loss:.3f}", markup=False, highlight=False)
                if not interactive and (r.step % steps_per_report == 0 or r.val_loss is not None
                                        or r.step == settings.iters):
                    line = f"Iter {r.step}: Train loss {smooth:.3f}"
                    if r.val_loss is not None:
                        line += f", Val loss {r.val_loss:.3f}"
                    line += (f", Learning Rate {r.learning_rate:.3e}, It/sec {its:.3f}, Tokens/sec {tps:.1f}, "
                             f"Trained Tokens {r.trained_tokens}, Peak mem {r.peak_memory_gb:.3f} GB")
                    err.print(line, markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt as e:
        reports.close()
        path = run.save()
        signum = getattr(e, "signum", 2)  # Terminated: SIGTERM or SIGHUP
        how = "" if signum == 2 else f" ({escape(str(e))})"
        err.print(f"interrupted{how} at step {run.step}: adapters saved to {escape(str(path))}")
        return 128 + signum
    path = run.save()
    elapsed = time.perf_counter() - t0
    summary = (f"trained {last.step} steps in {elapsed:.1f} s · loss {sum(window[-10:]) / len(window[-10:]):.3f}"
               f" · val loss {_fmt(run.initial_val_loss)} -> {_fmt(run.last_val_loss)} · peak memory {last.peak_memory_gb:.2f} GB")
    err.print(summary, markup=False, highlight=False, soft_wrap=True)
    out.print(f"adapters saved to {escape(str(path))}")
    out.print(f"[dim]try: dgemma chat --model {escape(str(settings.model))} --adapter-path "
              f"{escape(str(run.adapter_dir))}[/]")
    return 0


def run_fuse(model: str, adapter_path: str, save_path: str, *, dequantize: bool, offline: bool | None,
             out: Console, err: Console) -> None:
    from mlx_diffusiongemma.train.fuse import fuse

    err.print(f"[dim]loading {escape(model)} with the adapters in {escape(adapter_path)}…[/]")
    summary = fuse(model, adapter_path, save_path, dequantize=dequantize, offline=offline)
    kind = "quantized" if summary["quantized"] else "unquantized"
    out.print(f"fused {summary['fused_layers']} LoRA layers; {kind} model written to {escape(summary['save_path'])}")
